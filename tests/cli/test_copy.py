"""``kiln cp`` (the real CLI process) against the real daemon with real agent processes.

The same round trip on a real microVM is in tests/cli/test_vm.py; here the
edges: where things land, ``-`` streams, refusals and exit codes.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from kiln.sdk import Sandbox

from .conftest import Cli, Daemon


def make_tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "sub" / "run.sh").chmod(0o751)
    (tree / "data.bin").write_bytes(os.urandom(300_000))
    (tree / "link").symlink_to("sub/run.sh")
    return tree


def assert_same_tree(a: Path, b: Path) -> None:
    def walk(root: Path) -> dict[str, tuple[int, str | bytes]]:
        out: dict[str, tuple[int, str | bytes]] = {}
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                p = Path(dirpath) / name
                st = p.lstat()
                if p.is_symlink():
                    out[str(p.relative_to(root))] = (st.st_mode, os.readlink(p))
                elif p.is_dir():
                    out[str(p.relative_to(root))] = (st.st_mode, b"")
                else:
                    out[str(p.relative_to(root))] = (st.st_mode, p.read_bytes())
        return out

    assert walk(a) == walk(b)


def test_a_tree_goes_in_and_comes_back(
    cli: Cli, sb: Sandbox, daemon: Daemon, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path)
    workdir = daemon.workdir(sb.id)
    cli.ok("cp", str(tree), f"{sb.name}:{workdir}")  # into an existing directory
    assert_same_tree(tree, workdir / "tree")
    cli.ok("cp", str(tree), f"{sb.id}:{workdir}/copy")  # to a new path, by id
    assert_same_tree(tree, workdir / "copy")
    out = tmp_path / "out"
    cli.ok("cp", f"{sb.name}:{workdir}/copy", str(out))
    assert_same_tree(tree, out)
    contents = tmp_path / "contents"
    contents.mkdir()
    cli.ok("cp", f"{sb.name}:{workdir}/copy/.", str(contents))  # a directory's content
    assert_same_tree(tree, contents)
    cli.ok("cp", f"{tree}/.", f"{sb.name}:{workdir}/copy/empty")
    assert_same_tree(tree / "sub", workdir / "copy" / "empty" / "sub")
    assert cli("cp", str(tree), f"{sb.name}:{workdir}/copy/data.bin").returncode == 4
    assert cli("cp", str(tree), f"{sb.name}:{workdir}/no/parent").returncode == 3
    cli.ok("cp", f"{sb.name}:{workdir}/copy/sub/run.sh", str(tmp_path / "run"))
    assert (tmp_path / "run").read_text() == "#!/bin/sh\necho hi\n"
    assert (tmp_path / "run").stat().st_mode & 0o7777 == 0o751


def test_tar_streams_on_stdin_and_stdout(cli: Cli, sb: Sandbox, daemon: Daemon) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    cli.ok("cp", "-", f"{sb.name}:.", input=buf.getvalue())
    assert (daemon.workdir(sb.id) / "hello.txt").read_bytes() == b"hi\n"
    proc = cli("cp", f"{sb.name}:hello.txt", "-")
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        assert tar.getnames() == ["hello.txt"]


def test_refusals_and_exit_codes(cli: Cli, sb: Sandbox, daemon: Daemon, tmp_path: Path) -> None:
    missing = cli("cp", f"{sb.name}:/no/such/file", str(tmp_path / "x"))
    assert missing.returncode == 3, missing.stderr
    assert cli("cp", str(tmp_path / "nope"), f"{sb.name}:/tmp").returncode == 3
    assert cli("cp", "a", "b").returncode == 2
    assert cli("cp", f"{sb.name}:/a", f"{sb.name}:/b").returncode == 2
    assert cli("cp", "./x", "nosuchbox:/tmp").returncode == 3
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, "../../.."
        tar.addfile(link)
        tar.addfile(tarfile.TarInfo("escape/evil"), io.BytesIO(b""))
    refused = cli("cp", "-", f"{sb.name}:.", input=evil.getvalue())
    assert refused.returncode == 1
    assert "outside" in refused.stderr.decode()
    assert not (daemon.workdir(sb.id) / "escape").exists()


def test_a_download_reaching_outside_is_refused(
    cli: Cli, sb: Sandbox, daemon: Daemon, tmp_path: Path
) -> None:
    box = daemon.workdir(sb.id) / "box"
    box.mkdir()
    (box / "esc").symlink_to("../../..")
    out = tmp_path / "out"
    proc = cli("cp", f"{sb.name}:{box}", str(out))
    assert proc.returncode == 1
    assert "points outside" in proc.stderr.decode()
    assert not (out / "esc").exists()
    # A symlink already in the destination is not followed out of it either.
    (box / "esc").unlink()
    (box / "esc").mkdir()
    (box / "esc" / "f").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    (dest / "box").mkdir(parents=True)
    (dest / "box" / "esc").symlink_to(outside)
    proc = cli("cp", f"{sb.name}:{box}", str(dest))
    assert proc.returncode == 1
    assert "outside" in proc.stderr.decode()
    assert list(outside.iterdir()) == []
