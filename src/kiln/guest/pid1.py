"""PID 1 duties inside the VM. Never used in test mode.

Boot (:func:`boot`), before the agent starts serving:

1. mount /proc, /sys, /dev (devtmpfs), /dev/pts (a new devpts instance, with
   /dev/ptmx pointing into it), /dev/shm, /run, /tmp; skip what is mounted already
   (the initramfs may have moved /dev, /proc and /sys over);
2. bring up ``lo``;
3. read the configuration: the config drive (``kiln.config=`` on the kernel
   command line, default /dev/vdb: an ext4 disk mounted read-only at
   /run/kiln/config, holding config.json) or, without one, the ``kiln.*``
   kernel parameters. A drive that starts with :data:`TEMPLATE_MAGIC` instead
   means this boot makes a *template*: the host snapshots the machine while it
   waits here, and every sandbox restored from that snapshot finds its own
   config drive in the same slot and carries on from this point -- all of the
   agent's start-up (imports, above all) already done;
4. apply it: the sandbox user, hostname, /etc/resolv.conf, eth0 (static address
   and default route, by ioctl: see netconf), volumes (mounted, root chowned to the user),
   files (owned by the user, on the first boot only: see :mod:`.started`), /workspace.

Every step logs its failure and the boot goes on: an agent that answers with a
half-configured machine is more useful than a VM that never comes up.

Shutdown (:func:`power_off`): SIGTERM to everything, SIGKILL after a grace
period, sync, unmount volumes and the config drive, remount / read-only,
reboot(RB_POWER_OFF). Children are reaped during boot by ``subprocess`` itself
(nothing else runs yet) and afterwards by :class:`kiln.guest.process.Children`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import grp
import logging
import os
import pwd
import resource
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from kiln.protocol import SANDBOX_UID

from . import netconf
from .config import (
    CONFIG_FILE,
    CONFIG_MOUNT,
    DEFAULT_CONFIG_DEVICE,
    TEMPLATE_MAGIC,
    TEMPLATE_READY_LINE,
    GuestConfig,
    VolumeSpec,
    config_from_cmdline,
    parse_cmdline,
)
from .errors import ConfigError, SetupError
from .prepared import Prepared, prepare_template
from .started import first_start
from .users import ensure_user, own_dir, write_owned

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MNT_DETACH = 2
RB_POWER_OFF = 0x4321FEDC
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
KILL_GRACE = 2.0
NOFILE_LIMIT = 65536
BLKFLSBUF = 0x1261  # drop a block device's buffer cache
RNDRESEEDCRNG = 0x5207  # reseed the kernel CRNG from its input pool now
_TEMPLATE_POLL = 0.01


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.reboot.argtypes = [ctypes.c_int]
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    rc = _libc().mount(_b(source), _b(target), _b(fstype), flags, _b(data))
    _check(rc, f"mount {fstype} on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc().umount2(_b(target), flags), f"umount {target}")


def set_clock(unix_ns: int, seed: bytes | None) -> None:
    """CLOCK_SET: clock_settime(CLOCK_REALTIME) and mix ``seed`` into the kernel RNG."""
    # time's own C call, not ctypes: right after a restore every code path runs
    # for the first time under TCG, and libffi's is a long one.
    time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)
    if seed:
        mix_seed(seed)


def mix_seed(seed: bytes) -> None:
    """Mix ``seed`` into the kernel's entropy pool and reseed the CRNG from it at once.

    Clones restored from one snapshot share the CRNG state; a write alone would
    only reach the CRNG at its next periodic reseed (up to a minute later).
    """
    import fcntl  # noqa: PLC0415

    fd = _urandom()
    os.write(fd, seed)
    try:
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:  # ENODATA: the CRNG is not initialised yet
        log.debug("CRNG reseed: %s", exc)


@functools.cache
def _urandom() -> int:
    """/dev/urandom, opened once at boot: opening it first thing after a restore
    took 6-10 ms of every CLOCK_SET (TCG translating the open path anew)."""
    return os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)


def reconfigure(config: GuestConfig, uid: int, gid: int) -> Callable[[], None] | None:
    """The machine's part of a CONFIGURE (see :meth:`kiln.guest.agent.Agent._configure`).

    Clock and RNG and the kernel's host name now, before the answer (raises OSError);
    the host name's files and the spec's files are returned, to be written after the
    answer has gone out (the agent holds every later request until they are): on
    ext4 under TCG they took 8-9 ms of the claim's round trip. A failure there is
    logged, as at boot. Nothing here spawns a process."""
    if config.clock_ns:
        set_clock(config.clock_ns, config.seed)
    elif config.seed:
        mix_seed(config.seed)
    if config.hostname:
        set_kernel_hostname(config.hostname)
    if not config.hostname and not config.files:
        return None
    return functools.partial(_write_configured_files, config, uid, gid)


def _write_configured_files(config: GuestConfig, uid: int, gid: int) -> None:
    if config.hostname:
        try:
            write_hostname_files(config.hostname)
        except OSError as exc:
            log.error("configure: hostname files: %s", exc)
    for file in config.files:
        try:
            write_owned(file.path, file.content, file.mode, uid, gid)
        except OSError as exc:
            log.error("configure: file %s: %s", file.path, exc)


def catch_up_clock(config: GuestConfig) -> None:
    """Apply the drive's seed, and its clock if ours is behind it (a restored template)."""
    if config.seed:
        _step("RNG seed", mix_seed, config.seed)
    if config.clock_ns and time.time_ns() < config.clock_ns:
        _step("clock", set_clock, config.clock_ns, None)


# ---- boot ------------------------------------------------------------------------

_BASE_MOUNTS = (
    # source, target, fstype, flags, data
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)


@dataclass
class BootResult:
    config: GuestConfig
    #: Mount points made at boot that power_off must unmount (innermost last).
    mounts: list[str] = field(default_factory=list)
    #: What a template made ready before its snapshot (see wait_while_template).
    prepared: Prepared | None = None
    #: The disk's first boot: its files were written now and its init is to run.
    #: False when the machine boots again from a disk set up before (a reboot).
    first: bool = True


def boot(config_override: Path | None = None) -> BootResult:
    os.umask(0o022)
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if os.statvfs("/").f_flag & os.ST_RDONLY:
        # The kernel's default "ro": the sandbox's disk is its own, make it writable.
        _step("remount / read-write", mount, None, "/", None, MS_REMOUNT)
    mount_basics()
    _step("open /dev/urandom", _urandom)
    _step("open files limit", _raise_nofile)
    _step("loopback", interface_up, "lo")
    cmdline = parse_cmdline(_read_text("/proc/cmdline"))
    result = BootResult(GuestConfig())
    if config_override is not None:
        try:
            result.config = GuestConfig.load(config_override)
        except ConfigError as exc:
            log.error("%s", exc)
    else:
        result.config = load_config(cmdline, result)
    # After load_config: a template waits in there, and its disk must not be marked.
    result.first = first_start()
    apply_config(result.config, result.mounts, first=result.first)
    return result


def _step(what: str, action: Callable[..., object], *args: object) -> None:
    try:
        action(*args)
    except (OSError, SetupError, subprocess.SubprocessError) as exc:
        log.error("boot: %s failed: %s", what, exc)


def _raise_nofile() -> None:
    """The kernel gives init 1024 open files; every exec holds ~5 while it runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < NOFILE_LIMIT:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_LIMIT, max(hard, NOFILE_LIMIT)))


def _read_text(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def mount_basics() -> None:
    for source, target, fstype, flags, options in _BASE_MOUNTS:
        data = f"{options},gid={_tty_gid()}" if fstype == "devpts" else options
        try:
            os.makedirs(target, exist_ok=True)
            if os.path.ismount(target):
                continue  # e.g. moved over from the initramfs
            mount(source, target, fstype, flags, data)
        except OSError as exc:
            log.error("boot: %s", exc)
    # A private devpts instance needs /dev/ptmx to point into it.
    with contextlib.suppress(OSError):
        if not os.path.islink("/dev/ptmx"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink("/dev/ptmx")
            os.symlink("pts/ptmx", "/dev/ptmx")
    for link, target in (
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ):
        if not os.path.lexists(link):
            with contextlib.suppress(OSError):
                os.symlink(target, link)


def _tty_gid() -> int:
    try:
        return grp.getgrnam("tty").gr_gid
    except KeyError:
        return 5


def interface_up(name: str) -> None:
    """ifconfig NAME up, with the SIOCSIFFLAGS ioctl (no process spawned)."""
    import fcntl  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh", name.encode(), 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", name.encode(), flags | IFF_UP))


def load_config(cmdline: dict[str, str], result: BootResult) -> GuestConfig:
    """The config drive if there is one, else the kernel command line."""
    mounts = result.mounts
    fallback = config_from_cmdline(cmdline)
    location = cmdline.get("config", DEFAULT_CONFIG_DEVICE)
    config: GuestConfig | None = None
    try:
        if location in ("", "none"):
            pass
        elif os.path.isfile(location):
            config = GuestConfig.load(Path(location))
        elif os.path.exists(location) and stat.S_ISBLK(os.stat(location).st_mode):
            result.prepared = wait_while_template(location)
            os.makedirs(CONFIG_MOUNT, exist_ok=True)
            mount(location, CONFIG_MOUNT, "ext4", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            mounts.append(CONFIG_MOUNT)
            config = GuestConfig.load(Path(CONFIG_MOUNT) / CONFIG_FILE)
        else:
            log.info("boot: no config drive at %s, using the kernel command line", location)
    except (OSError, ConfigError) as exc:
        log.error(
            "boot: config drive %s unusable (%s); using the kernel command line", location, exc
        )
    if config is None:
        return fallback
    if config.token is None and fallback.token is not None:
        config = replace(config, token=fallback.token)
    catch_up_clock(config)
    return config


def wait_while_template(device: str) -> Prepared | None:
    """Block while ``device`` holds the template placeholder (see the module docs).

    Polls rather than waits for an event: the host swaps the drive's backing
    file under a snapshot, which no guest-side event announces. A template
    first makes ready what every sandbox would otherwise do after its restore
    (see :mod:`kiln.guest.prepared`).
    """
    import fcntl  # noqa: PLC0415

    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.pread(fd, len(TEMPLATE_MAGIC), 0) != TEMPLATE_MAGIC:
            return None
        prepared = prepare_template()
        log.info("%s", TEMPLATE_READY_LINE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        while True:
            time.sleep(_TEMPLATE_POLL)
            fcntl.ioctl(fd, BLKFLSBUF)  # read the disk, not what we cached of it
            if os.pread(fd, len(TEMPLATE_MAGIC), 0) != TEMPLATE_MAGIC:
                break
        log.info("template: config drive arrived at %.2f s", time.monotonic())
        return prepared
    finally:
        os.close(fd)


def apply_config(config: GuestConfig, mounts: list[str], *, first: bool = True) -> None:
    user: pwd.struct_passwd | None = None
    try:
        user = ensure_user(config.user)
    except (OSError, SetupError) as exc:
        log.error("boot: user %s: %s", config.user, exc)
    uid, gid = (user.pw_uid, user.pw_gid) if user else (SANDBOX_UID, SANDBOX_UID)
    if config.aslr is not None:
        _step("ASLR", set_aslr, config.aslr)
    if config.hostname:
        _step("hostname", set_hostname, config.hostname)
    if config.dns:
        _step("resolv.conf", write_resolv_conf, config.dns)
    if config.network is not None:
        _step("network", netconf.configure, config.network)
    for volume in config.volumes:
        _step(f"volume {volume.mount}", mount_volume, volume, uid, gid, mounts)
    for file in config.files if first else ():
        _step(f"file {file.path}", write_owned, file.path, file.content, file.mode, uid, gid)
    _step("/workspace", own_dir, "/workspace", uid, gid)


def set_aslr(enabled: bool) -> None:
    """kernel.randomize_va_space: 2 (full) or 0 (off), for processes started from now."""
    Path("/proc/sys/kernel/randomize_va_space").write_text("2\n" if enabled else "0\n")


def set_hostname(name: str) -> None:
    set_kernel_hostname(name)
    write_hostname_files(name)


def set_kernel_hostname(name: str) -> None:
    # The syscall, not a write to /proc/sys/kernel/hostname: in a fork's clone
    # every path is new to TCG, and procfs's write path is the longer one.
    socket.sethostname(name)


def write_hostname_files(name: str) -> None:
    """/etc/hostname, and the name on /etc/hosts' 127.0.1.1 line (what resolves it)."""
    rewrite("/etc/hostname", name + "\n")
    hosts = _read_text("/etc/hosts")
    lines = [ln for ln in hosts.splitlines() if not ln.startswith("127.0.1.1")]
    if not any(ln.split()[:1] == ["127.0.0.1"] for ln in lines):
        lines.insert(0, "127.0.0.1\tlocalhost")
    lines.append(f"127.0.1.1\t{name}")
    rewrite("/etc/hosts", "\n".join(lines) + "\n")


def write_resolv_conf(servers: tuple[str, ...]) -> None:
    path = Path("/etc/resolv.conf")
    if path.is_symlink():
        path.unlink()  # e.g. into systemd-resolved's runtime dir, which does not run here
    rewrite(str(path), "".join(f"nameserver {s}\n" for s in servers))


def rewrite(path: str, text: str) -> None:
    """``path`` holds ``text`` (made 0644 if missing), written over in place.

    Not truncated first: ext4 flushes a file truncated to zero and written again
    as soon as it is closed (its "auto_da_alloc" guard), and that writeback is
    ~30 ms of a fork's identity change under TCG. Cut to length afterwards, if
    the old text was longer."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        if os.fstat(fd).st_size > len(data):
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def mount_volume(volume: VolumeSpec, uid: int, gid: int, mounts: list[str]) -> None:
    if volume.size is not None:
        wait_for_capacity(volume.device, volume.size)
    os.makedirs(volume.mount, exist_ok=True)
    mount(volume.device, volume.mount, volume.fstype, MS_NOSUID | MS_NODEV)
    mounts.append(volume.mount)
    os.chown(volume.mount, uid, gid)


def wait_for_capacity(device: str, size: int, timeout: float = 10.0) -> None:
    """Until the kernel sees ``device`` with ``size`` bytes (SetupError after ``timeout``).

    A sandbox restored from a template has its volumes in disk slots the
    template saw as tiny placeholders; the host's resize notification updates
    the size, possibly a moment after the config drive arrived.
    """
    sysfs = f"/sys/block/{os.path.basename(device)}/size"
    deadline = time.monotonic() + timeout
    while True:
        seen = int(_read_text(sysfs) or 0) * 512
        if seen == size:
            return
        if time.monotonic() > deadline:
            raise SetupError(f"{device} has {seen} bytes, expected {size}")
        time.sleep(0.005)


# ---- shutdown --------------------------------------------------------------------


def power_off(mounts: list[str]) -> None:
    """Stop every process, flush and unmount, and power the VM off. Does not return."""
    log.info("powering off")
    _kill_all(signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while _reap_all() and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_all(signal.SIGKILL)
    _reap_all()
    os.sync()
    for target in reversed(mounts):
        try:
            umount(target)
        except OSError:
            with contextlib.suppress(OSError):
                umount(target, MNT_DETACH)
    with contextlib.suppress(OSError):
        mount(None, "/", None, MS_REMOUNT | MS_RDONLY)
    os.sync()
    _check(_libc().reboot(RB_POWER_OFF), "reboot")


def _kill_all(sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, sig)  # from PID 1: every process but ourselves


def _reap_all() -> bool:
    """Reap whatever has exited; True while children remain. Only at shutdown: here
    nobody else waits for a status any more, so waitpid(-1) steals nothing."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
