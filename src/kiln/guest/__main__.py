"""``python -m kiln.guest``: the agent's command line.

Test mode (a plain process, Unix sockets, no PID 1 duty, commands run as the
invoking user; no sync()/fsync() before answering unless ``--sync``: nothing
snapshots a test host's disk, and a global sync() there flushes every other
process's writes too, measured at 16 ms per exec on a busy shared host)::

    python -m kiln.guest --test-mode --socket-dir DIR [--token TOKEN] [--config JSON]

Container mode (``--container``, the Docker engine): PID 1 of a container whose
runtime did the machine's set-up; TCP 1024/1025 like a VM, config from
``--config``, no power-off (see :mod:`kiln.guest.container`)::

    python3 /usr/lib/kiln/agent.pyz --container --config /run/kiln/config.json

VM mode (the default): TCP 1024 (control) and 1025 (forward) on 0.0.0.0; as
PID 1 it first does the boot duties of :mod:`kiln.guest.pid1` and powers the
machine off when it stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import GuestError
from .ports import CONTROL_PORT, FORWARD_PORT

# The agent's modules (asyncio above all) come after the argument parsing, so
# that a container's agent listens before it imports them: see _run_container.
if TYPE_CHECKING:
    from .agent import Agent, ClockSetter, Reconfigurer
    from .config import GuestConfig
    from .context import Settings, UserInfo
    from .prepared import Prepared

log = logging.getLogger("kiln.guest")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln-guest", description="kiln guest agent")
    p.add_argument(
        "--test-mode",
        action="store_true",
        help="serve Unix sockets in --socket-dir as a plain process (no PID 1 duties)",
    )
    p.add_argument(
        "--container",
        action="store_true",
        help="PID 1 of a container: serve TCP, set up the user and files, no VM duties",
    )
    p.add_argument("--socket-dir", type=Path, help="test mode: where control.sock/forward.sock go")
    p.add_argument("--token", help="require AUTH with this token (default: the config's token)")
    p.add_argument("--config", type=Path, help="config JSON (the config drive's config.json)")
    p.add_argument("--workdir", help="default working directory (VM: /workspace, test: cwd)")
    p.add_argument(
        "--session-idle-timeout",
        type=float,
        metavar="SECONDS",
        help="SIGKILL a TTY session detached this long (0 or unset: never)",
    )
    p.add_argument(
        "--max-finished-sessions",
        type=int,
        default=64,
        metavar="N",
        help="finished TTY sessions kept listed (oldest evicted first)",
    )
    p.add_argument(
        "--auth-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="deadline for the AUTH frame (default 5)",
    )
    p.add_argument(
        "--reap-orphans",
        action="store_true",
        help="become a child subreaper and reap orphans, as PID 1 does",
    )
    p.add_argument(
        "--sync",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flush to disk before answering: sync() before a piped EXIT, fsync of written"
        " files (default: on in a VM, off in test mode, where nothing snapshots the disk"
        " and sync() would flush the whole host)",
    )
    p.add_argument(
        "--no-pid1", action="store_true", help="skip the PID 1 duties even when running as PID 1"
    )
    p.add_argument("--listen-host", default="0.0.0.0", help="VM mode: address to listen on")
    p.add_argument("--control-port", type=int, default=CONTROL_PORT)
    p.add_argument("--forward-port", type=int, default=FORWARD_PORT)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.test_mode and args.socket_dir is None:
        parser.error("--test-mode needs --socket-dir")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="kiln-guest[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.test_mode:
            return _run_test_mode(args)
        if args.container:
            return _run_container(args)
        return _run_vm(args)
    except GuestError as exc:
        log.error("%s", exc)
        return 1


def _settings(
    args: argparse.Namespace, config: GuestConfig, *, test_mode: bool, user: UserInfo, workdir: str
) -> Settings:
    from .context import Settings  # noqa: PLC0415 - see the imports at the top

    timeout = args.session_idle_timeout
    if timeout is None:
        timeout = config.session_idle_timeout
    return Settings(
        test_mode=test_mode,
        workdir=os.path.abspath(args.workdir) if args.workdir else workdir,
        user=user,
        sandbox_env=dict(config.env),
        token=args.token or config.token,
        auth_timeout=args.auth_timeout,
        session_idle_timeout=timeout or None,
        max_finished_sessions=max(args.max_finished_sessions, 0),
        durable=not test_mode if args.sync is None else args.sync,
    )


def _run_test_mode(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports at the top

    from .agent import Agent, Listen  # noqa: PLC0415
    from .config import GuestConfig  # noqa: PLC0415
    from .context import UserInfo  # noqa: PLC0415

    config = GuestConfig.load(args.config) if args.config else GuestConfig()
    settings = _settings(args, config, test_mode=True, user=UserInfo.current(), workdir=os.getcwd())
    _become_subreaper_if_asked(args)
    agent = Agent(
        settings,
        Listen(socket_dir=args.socket_dir),
        init_script=config.init,
        reap_orphans=args.reap_orphans,
    )
    asyncio.run(agent.run())
    return 0


def _become_subreaper_if_asked(args: argparse.Namespace) -> None:
    if args.reap_orphans:
        from .process import become_subreaper  # noqa: PLC0415

        become_subreaper()


def _run_container(args: argparse.Namespace) -> int:
    # Listening first: the host's connection is accepted by the kernel, and its
    # AUTH waits in the socket, while python imports the agent (~0.1 s; 0.3 s
    # under gVisor); the host need not poll for the port.
    sockets = (
        socket.create_server((args.listen_host, args.control_port), backlog=128),
        socket.create_server((args.listen_host, args.forward_port), backlog=128),
    )
    import asyncio  # noqa: PLC0415 - see the imports at the top
    from dataclasses import replace  # noqa: PLC0415

    from . import container  # noqa: PLC0415
    from .config import GuestConfig  # noqa: PLC0415

    config = GuestConfig.load(args.config) if args.config else GuestConfig()
    first = container.first_start()
    container.boot(config, first=first)
    if not first:
        config = replace(config, init=None)  # ran at the first start; its files are kept
    elif config.init and config.network is not None:
        container.wait_for_network(config.network)
    # Writes land in the host's page cache the moment they are made: nothing
    # snapshots a disk under us, and sync() here would flush the whole host.
    if args.sync is None:
        args.sync = False
    agent = _vm_agent(
        args,
        config,
        reap_orphans=True,
        clock=None,
        reconfigure=lambda new, user: container.reconfigure(new, user.uid, user.gid),
        host_closes_first=True,
        sockets=sockets,
    )
    container.mark_started()
    asyncio.run(agent.run())
    return 0


def _run_vm(args: argparse.Namespace) -> int:
    if os.getpid() == 1 and not args.no_pid1:
        return _run_pid1(args)
    import asyncio  # noqa: PLC0415 - see the imports at the top

    from .config import CONFIG_FILE, CONFIG_MOUNT, GuestConfig  # noqa: PLC0415

    if args.config:
        config = GuestConfig.load(args.config)
    elif (Path(CONFIG_MOUNT) / CONFIG_FILE).is_file():
        config = GuestConfig.load(Path(CONFIG_MOUNT) / CONFIG_FILE)
    else:
        config = GuestConfig()
    _become_subreaper_if_asked(args)
    asyncio.run(_vm_agent(args, config, reap_orphans=args.reap_orphans, clock=None).run())
    return 0


def _run_pid1(args: argparse.Namespace) -> int:
    """PID 1: boot duties, serve, power off. Never returns: if PID 1 exits, the kernel panics."""
    import asyncio  # noqa: PLC0415 - see the imports at the top
    import importlib  # noqa: PLC0415
    from dataclasses import replace  # noqa: PLC0415

    from . import pid1  # noqa: PLC0415 - only PID 1 needs ctypes and the boot code
    from .started import mark_started  # noqa: PLC0415

    # The whole agent is imported before the boot: a template is snapshotted in
    # there, and the sandboxes restored from it must not import it again (TCG).
    importlib.import_module(f"{__package__}.agent")
    importlib.import_module(f"{__package__}.reidentify")

    mounts: list[str] = []
    try:
        # CLOCK_MONOTONIC counts from the kernel's start: the boot timeline for free.
        started = time.monotonic()
        booted = pid1.boot(args.config)
        mounts = booted.mounts
        config = booted.config
        if booted.first:
            # Durable: the files are written and the init is about to run; a reboot
            # of this disk must redo neither.
            mark_started(durable=True)
        else:
            log.info("boot: booted again from a disk set up before: no files, no init")
            config = replace(config, init=None)
        log.info(
            "boot timeline: agent main at %.2f s, boot duties done at %.2f s",
            started,
            time.monotonic(),
        )
        agent = _vm_agent(
            args,
            config,
            reap_orphans=True,
            clock=pid1.set_clock,
            prepared=booted.prepared,
            reconfigure=lambda new, user: pid1.reconfigure(new, user.uid, user.gid),
        )
        _watch_for_fork(args, config, agent)
        asyncio.run(agent.run())
    except BaseException:
        log.exception("agent failed; powering off")
    try:
        pid1.power_off(mounts)
    except BaseException:
        log.exception("power off failed")
    while True:  # nothing left to do, but PID 1 must not exit
        signal.pause()


def _watch_for_fork(args: argparse.Namespace, config: GuestConfig, agent: Agent) -> None:
    """A fork's clone learns its identity from a new config drive (see reidentify)."""
    import stat  # noqa: PLC0415
    from dataclasses import replace  # noqa: PLC0415

    from .config import DEFAULT_CONFIG_DEVICE, parse_cmdline  # noqa: PLC0415
    from .reidentify import IdentityWatch  # noqa: PLC0415

    if args.config is not None:
        return
    try:
        cmdline = parse_cmdline(Path("/proc/cmdline").read_text())
        device = cmdline.get("config", DEFAULT_CONFIG_DEVICE)
        if not stat.S_ISBLK(os.stat(device).st_mode):
            return
    except OSError:
        return

    def on_new(new: GuestConfig) -> None:
        agent.settings = replace(agent.settings, token=new.token)

    interface = config.network.interface if config.network is not None else None
    IdentityWatch(
        device,
        config.sandbox_id,
        on_new,
        interface=interface,
        current_token=lambda: agent.settings.token,
        network=config.network,
    ).start()


def _vm_agent(
    args: argparse.Namespace,
    config: GuestConfig,
    *,
    reap_orphans: bool,
    clock: ClockSetter | None,
    prepared: Prepared | None = None,
    reconfigure: Reconfigurer | None = None,
    host_closes_first: bool = False,
    sockets: tuple[socket.socket, ...] = (),
) -> Agent:
    from dataclasses import replace  # noqa: PLC0415

    from .agent import Agent, Listen  # noqa: PLC0415
    from .context import VM_WORKDIR, UserInfo  # noqa: PLC0415
    from .errors import RequestError  # noqa: PLC0415

    try:
        user = UserInfo.lookup(config.user)
    except RequestError:
        log.warning("no user %r: commands run as the agent's own user", config.user)
        user = UserInfo.current()
    workdir = VM_WORKDIR if os.path.isdir(VM_WORKDIR) else os.getcwd()
    if config.workdir is not None:
        if os.path.isdir(config.workdir):
            workdir = config.workdir  # the image's WORKDIR
        else:
            log.warning("no directory %s: commands start in %s", config.workdir, workdir)
    settings = _settings(args, config, test_mode=False, user=user, workdir=workdir)
    settings = replace(settings, host_closes_first=host_closes_first)
    listen = Listen(
        host=args.listen_host,
        control_port=args.control_port,
        forward_port=args.forward_port,
        sockets=sockets,
    )
    return Agent(
        settings,
        listen,
        init_script=config.init,
        reap_orphans=reap_orphans,
        clock=clock,
        prepared=prepared,
        reconfigure=reconfigure,
    )


if __name__ == "__main__":
    sys.exit(main())
