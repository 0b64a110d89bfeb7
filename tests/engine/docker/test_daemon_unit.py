"""The pure parts of kiln.engine.docker.daemon: command line, config, wrapper, parsers."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from kiln.engine import EngineUnavailable
from kiln.engine.docker import DockerdConfig, DockerdError, DockerdUnavailable
from kiln.engine.docker.daemon import _hint as daemon_hint
from kiln.engine.docker.daemon import _why, containerd_argv, containerd_toml, dockerd_argv
from kiln.engine.docker.host import mentions, parse_mountinfo
from kiln.engine.docker.runsc import (
    RUNSC_FIXED_RELEASE,
    clear_checkpointed_state,
    daemon_json,
    needs_netns_workaround,
    runsc_release_date,
    runsc_wrapper,
)
from kiln.engine.docker.testing import busybox_rootfs_tar, is_static_elf


def test_config_layout_and_defaults() -> None:
    cfg = DockerdConfig(root=Path("/var/lib/kiln/docker"))
    assert cfg.data_root == Path("/var/lib/kiln/docker/data")
    assert cfg.exec_root == Path("/var/lib/kiln/docker/run")
    assert cfg.url == "unix:///var/lib/kiln/docker/docker.sock"
    assert cfg.pidfile.name == "dockerd.pid"
    assert cfg.cgroup_parent is not None
    assert cfg.cgroup_parent.startswith("/kiln-dockerd-")
    # Stable per root (a restarted kiln finds its cgroups), distinct across roots.
    assert DockerdConfig(root=Path("/var/lib/kiln/docker")).cgroup_parent == cfg.cgroup_parent
    assert DockerdConfig(root=Path("/srv/kiln/docker")).cgroup_parent != cfg.cgroup_parent


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"root": Path("relative")}, "absolute path"),
        ({"root": Path("/" + "r" * 70)}, "longer than 107 bytes"),
        ({"socket": Path("/tmp/" + "s" * 120)}, "longer than 107 bytes"),
        ({"bridge": "none"}, "bridge=None"),
        ({"bridge": "bad name"}, "bridge name"),
        ({"netns": "../x"}, "network namespace name"),
        ({"cgroup_parent": "relative"}, "absolute cgroup path"),
        ({"cgroup_parent": "/a/../b"}, "absolute cgroup path"),
        ({"shutdown_timeout": -1}, "shutdown_timeout"),
        ({"storage_driver": "overlay2 --debug"}, "not a driver name"),
        ({"log_level": "loud"}, "log level"),
    ],
)
def test_config_rejects(changes: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"root": Path("/var/lib/kiln/docker")}
    with pytest.raises(ValueError, match=message):
        DockerdConfig(**(base | changes))  # type: ignore[arg-type]


def test_argv_carries_every_choice() -> None:
    cfg = DockerdConfig(root=Path("/k"), bridge="kiln-d0")
    argv = dockerd_argv(cfg, "/usr/sbin/dockerd")
    assert argv[0] == "/usr/sbin/dockerd"
    for flag in (
        "--config-file=/k/daemon.json",
        "--data-root=/k/data",
        "--exec-root=/k/run",
        "--pidfile=/k/dockerd.pid",
        "--host=unix:///k/docker.sock",
        "--containerd=/k/run/containerd/containerd.sock",
        "--group=root",
        "--bridge=kiln-d0",
        "--iptables=false",
        "--ip-forward=false",
        "--storage-driver=overlay2",
        "--exec-opt=native.cgroupdriver=cgroupfs",
        f"--cgroup-parent={cfg.cgroup_parent}",
        "--experimental",
    ):
        assert flag in argv
    assert "--bridge=none" in dockerd_argv(DockerdConfig(root=Path("/k")), "dockerd")
    assert "--iptables=true" in dockerd_argv(DockerdConfig(root=Path("/k"), iptables=True), "d")


def test_argv_enters_the_namespace_with_nsenter() -> None:
    cfg = DockerdConfig(root=Path("/k"), netns="kd-1")
    enter = ["nsenter", "--net=/run/netns/kd-1", "--"]
    assert dockerd_argv(cfg, "/usr/sbin/dockerd")[:4] == [*enter, "/usr/sbin/dockerd"]
    assert containerd_argv(cfg, "/usr/bin/containerd") == [
        *enter,
        "/usr/bin/containerd",
        "--config=/k/run/containerd/containerd.toml",
        "--log-level=warn",
    ]


def test_containerd_toml_keeps_everything_under_the_root() -> None:
    toml = containerd_toml(DockerdConfig(root=Path("/k")))
    assert 'root = "/k/data/containerd"' in toml
    assert 'state = "/k/run/containerd/state"' in toml
    assert 'address = "/k/run/containerd/containerd.sock"' in toml
    assert "io.containerd.grpc.v1.cri" in toml


def test_daemon_json() -> None:
    assert daemon_json(None) == {}
    assert daemon_json("/usr/bin/runsc") == {"runtimes": {"runsc": {"path": "/usr/bin/runsc"}}}
    assert daemon_json("/k/runsc", ["--platform=ptrace"]) == {
        "runtimes": {"runsc": {"path": "/k/runsc", "runtimeArgs": ["--platform=ptrace"]}}
    }


@pytest.mark.parametrize(
    ("output", "date"),
    [
        ("runsc version 0.0~20221219.0\nspec: 1.0.2-dev\n", 20221219),
        ("runsc version release-20240807.0\nspec: 1.1.0\n", 20240807),
        ("runsc version 6e61813c1b37\nspec: 1.0.2\n", None),
        ("runsc version 0.0~20221399.0\n", None),
        ("", None),
    ],
)
def test_runsc_release_date(output: str, date: int | None) -> None:
    assert runsc_release_date(output) == date


def test_netns_workaround_only_where_both_hold() -> None:
    assert needs_netns_workaround(True, 20221219)
    assert needs_netns_workaround(True, None)
    assert not needs_netns_workaround(True, RUNSC_FIXED_RELEASE)
    assert not needs_netns_workaround(False, 20221219)


def test_mentions_matches_paths_not_prefixes() -> None:
    root = Path("/k/run")
    assert mentions(["shim", "-address", "/k/run/containerd/containerd.sock"], root)
    assert mentions(["runsc-gofer", "--root=/k/run/runtime-runc/moby", "gofer"], root)
    assert mentions(["dockerd", "--exec-root=/k/run"], root)
    assert not mentions(["dockerd", "--exec-root=/k/run2"], root)
    assert not mentions(["sleep", "1000"], root)


def test_parse_mountinfo() -> None:
    text = (
        "27 1 8:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "45 27 8:0 /run/netns /run/netns rw shared:1 - ext4 /dev/vda rw\n"
        "90 27 0:55 / /k/data/overlay2/abc/merged rw - overlay overlay rw,lowerdir=x\n"
        "91 27 0:4 net:[4026532] /k/run/netns/with\\040space rw - nsfs nsfs rw\n"
        "garbage\n"
    )
    assert parse_mountinfo(text) == [
        ("/", "ext4"),
        ("/run/netns", "ext4"),
        ("/k/data/overlay2/abc/merged", "overlay"),
        ("/k/run/netns/with space", "nsfs"),
    ]


def test_errors_are_engine_unavailable() -> None:
    assert issubclass(DockerdError, EngineUnavailable)
    assert issubclass(DockerdUnavailable, DockerdError)


def test_why_finds_the_buried_oserror() -> None:
    def chained(inner: BaseException) -> Exception:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise RuntimeError(("Connection aborted.", exc)) from exc
        except RuntimeError as outer:
            return outer

    assert _why(chained(FileNotFoundError(2, "x"))) == "no socket there"
    assert "nothing accepts" in _why(chained(ConnectionRefusedError(111, "x")))
    assert "permission" in _why(chained(PermissionError(13, "x")))
    assert _why(ValueError("odd")) == "odd"


# -- the runsc wrapper, run for real with a stand-in runsc ---------------------------------


@pytest.fixture
def fake_runsc(tmp_path: Path) -> Path:
    fake = tmp_path / "fake runsc"  # a space: the wrapper must quote it
    fake.write_text(
        "#!/bin/sh\n"
        "if test -e /proc/sys/net/core/rmem_default; then echo visible; else echo hidden; fi\n"
        'echo "$@"\n'
    )
    fake.chmod(0o755)
    return fake


def run_wrapper(tmp_path: Path, runsc: Path, *args: str) -> list[str]:
    script = tmp_path / "runsc"
    script.write_text(runsc_wrapper(str(runsc)))
    script.chmod(0o755)
    done = subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.splitlines()


def test_wrapper_passes_other_subcommands_straight_through(
    tmp_path: Path, fake_runsc: Path
) -> None:
    out = run_wrapper(tmp_path, fake_runsc, "--root=/k/run/x", "exec", "--process", "p", "id1")
    assert out == ["visible", "--root=/k/run/x exec --process p id1"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a mount namespace and a tmpfs)")
@pytest.mark.parametrize("subcommand", ["start", "restore"])
def test_wrapper_hides_proc_sys_net_for_network_setup(
    tmp_path: Path, fake_runsc: Path, subcommand: str
) -> None:
    out = run_wrapper(tmp_path, fake_runsc, "--root=/k/run/x", "--log=/k/l", subcommand, "id1")
    assert out == ["hidden", f"--root=/k/run/x --log=/k/l {subcommand} id1"]
    assert Path("/proc/sys/net/core/somaxconn").exists()  # only the wrapper's namespace


@pytest.mark.parametrize(("status", "cleared"), [("paused", True), ("stopped", False)])
def test_clear_checkpointed_state(tmp_path: Path, status: str, cleared: bool) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "runsc"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        f'case " $* " in *" state "*) echo \'{{"id": "c1", "status": "{status}"}}\' ;; esac\n'
    )
    fake.chmod(0o755)
    assert clear_checkpointed_state(str(fake), Path("/k/run/runtime-runc/moby"), "c1") is cleared
    lines = calls.read_text().splitlines()
    assert lines[0] == "--root /k/run/runtime-runc/moby state c1"
    assert lines[1:] == (["--root /k/run/runtime-runc/moby delete --force c1"] if cleared else [])


# -- the test image -----------------------------------------------------------------------


def test_static_elf_check(tmp_path: Path) -> None:
    (tmp_path / "text").write_text("#!/bin/sh\n")
    assert not is_static_elf(tmp_path / "text")
    assert not is_static_elf(tmp_path / "absent")
    assert not is_static_elf(Path("/bin/sh"))  # dash: dynamically linked


@pytest.mark.skipif(not is_static_elf(Path("/bin/busybox")), reason="no static busybox")
def test_busybox_rootfs_tar_lists_the_applets() -> None:
    with tarfile.open(fileobj=io.BytesIO(busybox_rootfs_tar(("sh", "sleep")))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].isfile()
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert members["tmp"].mode == 0o1777
    assert "bin/ls" not in members


def test_a_start_failure_for_missing_cgroups_says_what_to_do() -> None:
    tail = 'level=warning msg="Unable to find pids cgroup in mounts" failed to start daemon: '
    hint = daemon_hint(tail + "Devices cgroup isn't mounted")
    assert "`ip netns exec`" in hint and "nsenter --net=/run/netns/NAME" in hint
    assert daemon_hint(tail + "something else") == ""
