"""Adoption: this node takes over a sandbox of a lost node of the cluster (only
with a ``shared_dir``; see :class:`~.config.QemuConfig`).

The lost node's sandbox directory is in the shared directory under that node's
name; adoption renames it under this node's. One rename is atomic: of two nodes
racing for one sandbox one finds the directory gone (the store has decided
before, see :meth:`kiln.store.Store.adopt_sandbox`; the rename is the second
line). The paths inside move with it: the root disk overlay's backing file is
in ``shared_dir/bases`` (the same absolute path on every node), volumes are in
``shared_dir/volumes``, and the record's paths are rewritten.

The sandbox then takes this node's network identity: an address from this
node's pool (the one it had when that is free here too), its TAP here; the MAC
is a function of the id, the same everywhere. Its config drive says the new
address (so does every later boot). Then:

- a cold sandbox (a valid snapshot) is restored here at once, processes and
  files intact. If its network changed, its TAP stays off the bridge until the
  guest has taken the new address from an identity block, as a fork's clone does
  (:mod:`.identity`, :mod:`kiln.guest.reidentify`); its id,
  hostname and token stay. (One the caller wants cold, ``hot=False``, whose
  network is the same here, stays cold: its next start restores it as usual.)
- one whose machine died with its node (no valid snapshot: it was running or
  paused) keeps its disks and boots from them on its next use: files kept,
  processes lost, reported like a host reboot (:data:`Found.DISK`).

A machine of the lost node that still runs (a daemon that shut down cleanly
keeps its machines; a host cut off from the others) would write the same disk:
adoption refuses while the disk is in use -- a QEMU of this host on it, or
QEMU's lock on the image, which a shared filesystem with locks (NFSv4) carries
across hosts. Without such locks the lost node must really be down (fenced).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Final

from kiln.guest import forkframe
from kiln.network import NetworkError

from ..boots import LastBoot
from ..errors import EngineError, InvalidState
from ..states import ADOPTED, Found, Op, plan
from ..undo import Undo
from . import disks, identity, machine, process, snapshot
from .clock import set_clock
from .config import QemuConfig
from .host import Host
from .hostnet import HostNet
from .layout import Paths, Record
from .machine import VM
from .thermal import ThermalControl, why_unrestorable

log = logging.getLogger(__name__)

#: Bound on the adopted guest taking its new address after the restore.
#: What of the guest config the identity block of an adopted sandbox carries.
_IDENTITY_KEYS: Final = ("sandbox_id", "hostname", "token", "dns", "network")


class Adopter:
    """Takes over sandboxes of lost nodes; the caller adds each to the engine's VMs."""

    def __init__(
        self,
        config: QemuConfig,
        host: Host,
        net: HostNet,
        thermal: ThermalControl,
    ) -> None:
        self.config = config
        self._host = host
        self._net = net
        self._thermal = thermal

    async def adopt(self, record: Record, last_boot: object = None, *, hot: bool = True) -> VM:
        """The sandbox of ``record`` (as its lost node exported it), now this node's:
        hot if it had a valid snapshot (not ``hot``: cold when its network did not
        change, restored later like any cold sandbox), else cold and booting from its
        disks on its next use. InvalidState if it cannot be moved here."""
        sid = record.spec.sandbox_id
        if self.config.shared_dir is None:
            raise InvalidState(f"cannot take over {sid}: this node has no shared_dir")
        await self._host.ensure_ready(None)
        old_root = Path(record.dir)
        new_root = self.config.sandboxes_dir / old_root.name
        disk = Path(record.drives[0].path)
        await asyncio.to_thread(self._claim, sid, old_root, new_root, disk)
        paths = Paths(new_root)
        vm = VM(
            record=_moved(record, old_root, new_root),
            paths=paths,
            client=machine.client_for(record, self.config),
            state=ADOPTED[Found.DISK],
            meta=await asyncio.to_thread(snapshot.load_meta, paths.snapshot_meta),
            last_boot=LastBoot.from_json(last_boot),
        )
        undo = Undo()
        try:
            fields = await self._take_network(vm, undo)
        except BaseException:
            await undo.run()
            raise
        why = why_unrestorable(vm)
        if why is None and fields is None and not hot:
            vm.state = ADOPTED[Found.SNAPSHOT]
            log.info("sandbox %s taken over from %s, cold", sid, old_root)
            return vm
        if why is None:
            try:
                await self._restore(vm, fields)
                log.info("sandbox %s taken over from %s and restored", sid, old_root)
                return vm
            except EngineError as exc:
                # Its files are here now and stay: it boots from its disks instead.
                why = f"its restore failed ({exc})"
                await machine.kill(vm)
        vm.state = ADOPTED[Found.DISK]
        vm.reboot = True
        log.warning(
            "sandbox %s taken over from %s: %s; it boots from its disks on its next use"
            " (files kept, processes lost)",
            sid,
            old_root,
            why,
        )
        return vm

    def _claim(self, sid: str, old_root: Path, new_root: Path, disk: Path) -> None:
        """Blocking: the sandbox's directory renamed under this node's, unless a QEMU
        still uses its disk (this host's processes; or any host's, through QEMU's
        image lock, on a shared filesystem that carries locks, as NFSv4 does)."""
        nodes = self.config.nodes_dir
        if old_root.parent.name != "sandboxes" or old_root.parent.parent.parent != nodes:
            raise InvalidState(
                f"cannot take over {sid}: its directory {old_root} is not in the shared"
                f" directory {nodes}"
            )
        if old_root.parent == self.config.sandboxes_dir:
            raise InvalidState(f"sandbox {sid} is already this node's")
        if disk.is_relative_to(old_root) and disk.exists():
            probe = subprocess.run(
                ["qemu-img", "info", "--output=json", str(disk)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if probe.returncode != 0 and "lock" in probe.stderr:
                raise InvalidState(
                    f"cannot take over {sid}: its disk is in use (its QEMU still runs on its"
                    f" node): {probe.stderr.strip()}"
                )
        running = process.find_processes(f"{old_root}/")
        if running:
            raise InvalidState(
                f"cannot take over {sid}: its QEMU (pid {running[0]}) still runs on its node"
            )
        new_root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(old_root, new_root)
        except FileNotFoundError:
            if (new_root / "sandbox.json").is_file():
                return  # an earlier attempt of ours moved it and then failed
            raise InvalidState(
                f"cannot take over {sid}: {old_root} is gone (another node took it?)"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise InvalidState(f"cannot take over {sid}: {new_root} exists") from None
            raise
        snapshot.fsync_dir(old_root.parent)
        snapshot.fsync_dir(new_root.parent)

    async def _take_network(self, vm: VM, undo: Undo) -> dict[str, Any] | None:
        """This node's address and TAP for ``vm``, its record and config drive saying
        so; the identity block to announce when the guest's network changed."""
        rec = vm.record
        sid = rec.spec.sandbox_id
        net = self._net
        ip = self._address(rec.ip, sid)
        undo.push("release IP", lambda: net.release_ip(ip))
        tap = await net.create_tap(rec.net_owner)
        undo.push("delete TAP", lambda: net.delete_tap(tap))
        await net.pin_neighbour(ip, rec.mac)
        await net.admit(rec.spec, ip, tap, rec.mac)
        undo.push("remove the firewall rules", lambda: net.guard.release(sid))
        new = dataclasses.replace(rec, ip=ip, tap=tap)
        drive = vm.paths.config_drive
        config = await _read_config_drive(drive)
        guest_net = net.network.guest_network(ip, rec.net_owner)
        network = {
            "address": guest_net["address"],
            "gateway": guest_net["gateway"],
            "mac": guest_net["mac"],
        }
        dns = list(guest_net["dns"])
        changed = config.get("network") != network or config.get("dns") != dns
        if changed:
            config = {**config, "network": network, "dns": dns}
            # Of the size the guest kernel knows (a fork's drive grew by its block).
            size = await asyncio.to_thread(os.path.getsize, drive)
            await disks.make_config_drive(drive, config, size)
        await asyncio.to_thread(snapshot.write_json_atomic, vm.paths.record, new.to_json())
        vm.record = new
        vm.client = machine.client_for(new, self.config)
        if not changed:
            return None
        return {k: config[k] for k in _IDENTITY_KEYS if k in config}

    def _address(self, old_ip: str, sid: str) -> str:
        """The address the sandbox had when it is free in this node's pool, else a new one."""
        try:
            self._net.pool.mark_in_use(old_ip, sid)
        except NetworkError:  # outside this node's subnet, or taken here: any other will do
            return self._net.allocate_ip(sid)
        return old_ip

    async def _restore(self, vm: VM, fields: dict[str, Any] | None) -> None:
        """cold → hot here; through an identity block when the network changed."""
        vm.state = ADOPTED[Found.SNAPSHOT]
        if fields is None:
            await self._thermal.transition(vm, Op.START)
            return
        async with vm.lock:
            step = plan(Op.START, vm.state, vm.sandbox_id)
            tap = vm.record.tap
            # Off the bridge until the guest has this node's addresses (as a clone).
            frames = await self._net.packet_socket(tap, forkframe.ETHERTYPE)
            try:
                await self._thermal.restore(vm, on_bridge=False)
                await identity.tell(vm, frames, fields, vm.record.token)
            finally:
                frames.close()
                await self._net.set_tap_on_bridge(tap, True)
            await machine.wait_agent(
                vm,
                self.config,
                min(self.config.boot_timeout, identity.TIMEOUT),
                lambda probe: set_clock(probe, timeout=self.config.agent_timeout),
            )
            machine.apply(vm, step)


def _moved(record: Record, old_root: Path, new_root: Path) -> Record:
    """``record`` with its paths under ``old_root`` moved to ``new_root``."""

    def move(path: str) -> str:
        p = Path(path)
        return str(new_root / p.relative_to(old_root)) if p.is_relative_to(old_root) else path

    return dataclasses.replace(
        record,
        dir=str(new_root),
        drives=tuple(dataclasses.replace(d, path=move(d.path)) for d in record.drives),
    )


async def _read_config_drive(drive: Path) -> dict[str, Any]:
    """The ``config.json`` of a config drive (read without mounting it)."""
    out = await disks.run_tool(["debugfs", "-R", "cat /config.json", drive])
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise EngineError(f"the config drive {drive} holds no readable config.json") from exc
    if not isinstance(data, dict):
        raise EngineError(f"the config drive {drive} holds no config object")
    return data
