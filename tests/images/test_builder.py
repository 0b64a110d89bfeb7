"""Cache keys (stability, sensitivity) and the build orchestration over a real cache."""

from __future__ import annotations

import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.images import (
    TIERS,
    Image,
    build_image,
    builder,
    find_image,
    initramfs,
    kernel,
    list_images,
)
from kiln.images import agent as agent_mod
from kiln.images.builder import resolve_inputs
from kiln.images.cache import default_image_dir, write_manifest

FAKE_KERNEL = kernel.KernelPackage(
    "linux-image-6.1.0-99-cloud-amd64",
    "linux-image-6.1.0-99-cloud-amd64_6.1.999-1_amd64.deb",
    "http://deb.example/linux.deb",
    "",
)


def fake_agent(tag: str, date: tuple[int, int, int, int, int, int] = (1980, 1, 1, 0, 0, 0)):  # type: ignore[no-untyped-def]
    def build(dest: Path) -> Path:
        with zipfile.ZipFile(dest, "w") as zf:
            zf.writestr(zipfile.ZipInfo("__main__.py", date), f"print({tag!r})\n")
        return dest

    return lambda: build


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Callable[[kernel.KernelPackage | None], None]:
    """Pin what apt resolves (None: apt has no lists)."""

    def pin(pkg: kernel.KernelPackage | None) -> None:
        def resolve(metapackage: str) -> kernel.KernelPackage:
            if pkg is None:
                raise kernel.AptListsMissing("no lists")
            return pkg

        monkeypatch.setattr(kernel, "resolve_kernel_package_memo", lambda m, _memo: resolve(m))

    pin(FAKE_KERNEL)
    return pin


def test_keys_are_stable_and_an_agent_change_only_moves_the_image_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: object
) -> None:
    monkeypatch.setattr(agent_mod, "_builder", fake_agent("one"))
    first = resolve_inputs("minimal", tmp_path)
    again = resolve_inputs("minimal", tmp_path)
    assert first is not None and again is not None
    assert first.digest == again.digest
    monkeypatch.setattr(agent_mod, "_builder", fake_agent("two"))
    changed = resolve_inputs("minimal", tmp_path)
    assert changed is not None
    assert (changed.base_key, changed.kernel_key) == (first.base_key, first.kernel_key)
    assert changed.agent_digest != first.agent_digest
    assert changed.digest != first.digest


def test_kernel_and_init_changes_move_their_keys(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    offline: Callable[[kernel.KernelPackage | None], None],
) -> None:
    monkeypatch.setattr(agent_mod, "_builder", fake_agent("one"))
    before = resolve_inputs("minimal", tmp_path)
    offline(kernel.KernelPackage("linux-image-x", "linux-image-x_2_amd64.deb", "u", ""))
    newer_kernel = resolve_inputs("minimal", tmp_path)
    assert before is not None and newer_kernel is not None
    assert newer_kernel.base_key == before.base_key
    assert newer_kernel.kernel_key != before.kernel_key
    assert newer_kernel.digest != before.digest
    monkeypatch.setattr(initramfs, "INIT_SCRIPT", initramfs.INIT_SCRIPT + "# changed\n")
    newer_init = resolve_inputs("minimal", tmp_path)
    assert newer_init is not None
    assert newer_init.kernel_key == newer_kernel.kernel_key
    assert newer_init.digest != newer_kernel.digest


def test_apt_answer_is_remembered_until_apt_state_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4").write_text("1")
    calls: list[str] = []

    def resolve(metapackage: str) -> kernel.KernelPackage:
        calls.append(metapackage)
        return FAKE_KERNEL

    monkeypatch.setattr(kernel, "resolve_kernel_package", resolve)
    memo = tmp_path / "cache" / "apt-kernel.json"
    for _ in range(3):
        assert kernel.resolve_kernel_package_memo("meta", memo, [lists]) == FAKE_KERNEL
    assert calls == ["meta"]
    (lists / "deb.debian.org_debian-security_Packages.lz4").write_text("new")  # apt-get update
    assert kernel.resolve_kernel_package_memo("meta", memo, [lists]) == FAKE_KERNEL
    assert kernel.resolve_kernel_package_memo("other", memo, [lists]) == FAKE_KERNEL
    assert calls == ["meta", "meta", "other"]


def test_agent_digest_ignores_zip_timestamps(tmp_path: Path) -> None:
    a = fake_agent("same")()(tmp_path / "a.pyz")
    b = fake_agent("same", (2020, 5, 5, 5, 5, 6))()(tmp_path / "b.pyz")
    c = fake_agent("different")()(tmp_path / "c.pyz")
    assert a.read_bytes() != b.read_bytes()
    assert agent_mod.zipapp_digest(a) == agent_mod.zipapp_digest(b)
    assert agent_mod.zipapp_digest(a) != agent_mod.zipapp_digest(c)


def test_agent_digest_is_the_same_while_another_thread_builds_the_agent(tmp_path: Path) -> None:
    """marshal's bytes depend on reference counts, which a second thread compiling
    the same sources changes: the digest must not (it picked another image, and so
    another QEMU template, at a daemon start where the Docker engine built its agent)."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from kiln.guest.build import build_zipapp  # noqa: PLC0415

    alone = agent_mod.zipapp_digest(build_zipapp(tmp_path / "alone.pyz"))
    with ThreadPoolExecutor(4) as pool:
        paths = [tmp_path / f"t{i}.pyz" for i in range(8)]
        built = list(pool.map(build_zipapp, paths))
    assert {agent_mod.zipapp_digest(p) for p in built} == {alone}


def test_agent_digest_counts_a_pyc_by_its_header(tmp_path: Path) -> None:
    import zipfile  # noqa: PLC0415

    def zipapp(name: str, members: dict[str, bytes]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zf:
            for member, data in members.items():
                zf.writestr(member, data)
        return path

    header = b"M" * 16
    a = zipapp("a.pyz", {"m.py": b"x = 1\n", "m.pyc": header + b"code one"})
    b = zipapp("b.pyz", {"m.py": b"x = 1\n", "m.pyc": header + b"code two"})
    c = zipapp("c.pyz", {"m.py": b"x = 1\n", "m.pyc": b"N" * 16 + b"code one"})
    assert agent_mod.zipapp_digest(a) == agent_mod.zipapp_digest(b)
    assert agent_mod.zipapp_digest(a) != agent_mod.zipapp_digest(c)


def test_find_without_apt_lists_uses_the_newest_cached_kernel(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    offline: Callable[[kernel.KernelPackage | None], None],
) -> None:
    monkeypatch.setattr(agent_mod, "_builder", fake_agent("one"))
    offline(None)
    assert resolve_inputs("minimal", tmp_path) is None
    assert find_image("minimal", tmp_path) is None
    key = builder.kernel_key(FAKE_KERNEL.filename, TIERS["minimal"].modules)
    (tmp_path / "kernel" / key).mkdir(parents=True)
    write_manifest(
        tmp_path / "kernel" / key / builder.KERNEL_MANIFEST,
        {
            "metapackage": "linux-image-cloud-amd64",
            "filename": FAKE_KERNEL.filename,
            "built_at": "2025-01-01T00:00:00+00:00",
        },
    )
    inputs = resolve_inputs("minimal", tmp_path)
    assert inputs is not None and inputs.kernel_key == key
    assert find_image("minimal", tmp_path) is None  # the image itself is not built


# ---------------------------------------------------------------- with the real cache


@pytest.fixture
def seeded(image: Image, tmp_path: Path) -> Path:
    """A private image dir holding (hard links to) the real cached base and kernel."""
    inputs = resolve_inputs(image.tier)
    assert inputs is not None
    real = default_image_dir()
    dest = tmp_path / "cache"
    for section, key in (("base", inputs.base_key), ("kernel", inputs.kernel_key)):
        (dest / section).mkdir(parents=True)
        subprocess.run(["cp", "-al", real / section / key, dest / section / key], check=True)
    return dest


def with_marker(tag: str):  # type: ignore[no-untyped-def]
    """The real agent zipapp plus one extra member: a changed agent that still runs."""
    real = agent_mod._builder()

    def build(dest: Path) -> Path:
        real(dest)
        with zipfile.ZipFile(dest, "a") as zf:
            zf.writestr("kiln_test_marker.txt", tag)
        return dest

    return lambda: build


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_agent_change_rebuilds_only_the_fast_step(
    seeded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leftover = seeded / "images" / ".tmp-minimal-0123456789abcdef-1-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "rootfs.ext4").write_bytes(b"half written")
    monkeypatch.setattr(agent_mod, "_builder", with_marker("fast-step"))

    messages: list[str] = []
    start = time.monotonic()
    built = build_image("minimal", seeded, progress=messages.append)
    cold = time.monotonic() - start
    log = "\n".join(messages)
    assert "cached: kernel" in log and "base rootfs" in log and "cached: bookworm" in log
    assert "mmdebstrap" not in log and "downloading" not in log, log
    assert f"removed leftover of an interrupted build: {leftover}" in log
    assert not leftover.exists()
    assert cold < 30, log
    print(f"fast step: {cold:.1f} s")

    assert find_image("minimal", seeded) == built
    assert list_images(seeded) == [built]
    assert built.rootfs.stat().st_mode & 0o222 == 0  # read-only for the engine
    assert built.rootfs.stat().st_blocks * 512 < built.size_bytes  # sparse

    messages.clear()
    start = time.monotonic()
    assert build_image("minimal", seeded, progress=messages.append) == built
    assert time.monotonic() - start < 10
    assert messages == [f"[prepare] cached: minimal image {built.digest[:16]} ({built.path})"]


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_concurrent_builders_build_once(seeded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_mod, "_builder", with_marker("concurrent"))
    logs: list[list[str]] = [[], []]
    results: list[Image | BaseException] = []

    def run(log: list[str]) -> None:
        try:
            results.append(build_image("minimal", seeded, progress=log.append))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 2 and all(isinstance(r, Image) for r in results), results
    assert results[0] == results[1]
    built = [log for log in logs if any(m.startswith("[image] image ready") for m in log)]
    assert len(built) == 1, logs
    other = logs[1 - logs.index(built[0])]
    assert other[-1].startswith("[prepare] cached: minimal image"), other


def test_tree_size_counts_files_as_allocated_and_never_follows_links(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 10_000)
    (tmp_path / "b").write_bytes(b"")
    (tmp_path / "to-file").symlink_to("d/a")  # one file of its own (tiny) size
    (tmp_path / "to-dir").symlink_to("/usr")  # not walked into
    files, size = builder._tree_size(tmp_path)
    assert files == 3
    assert 10_000 <= size < 10_000 + 3 * 8192
