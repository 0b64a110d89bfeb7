"""Pure formatting for the CLI: values in, text or rich tables out, no printing.

Commands print what these return; tests call them directly. Times are
formatted relative to a ``now`` passed in, so output is deterministic.
"""

from __future__ import annotations

import json
import shlex
import stat
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from kiln.images import Image
    from kiln.protocol.fsops import FileEvent
    from kiln.protocol.messages import FileListing
    from kiln.sdk.models import (
        Capabilities,
        FileStat,
        Health,
        ImageInfo,
        LastBoot,
        NetworkPolicy,
        NodeInfo,
        Port,
        ProcessInfo,
        PublishedPort,
        SandboxInfo,
        SavedImage,
        Secret,
        SessionInfo,
        Template,
        Volume,
    )
    from kiln.store import User

ERROR_PREFIX = "kiln: error: "


def format_error(message: str) -> str:
    """One line: ``kiln: error: <message>`` (newlines in the message folded)."""
    text = " ".join(str(message).split()) or "unknown error"
    return ERROR_PREFIX + text


def format_json(value: Any) -> str:
    """Pretty JSON of a model (``to_dict()``), a list of models, or plain data."""
    return json.dumps(_plain(value), indent=2, sort_keys=False, ensure_ascii=False)


def format_json_line(value: Any) -> str:
    """Compact one-line JSON (for streams: one event per line)."""
    return json.dumps(_plain(value), separators=(",", ":"), ensure_ascii=False)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "to_json"):  # wire protocol messages
        return value.to_json()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def format_age(when: datetime | float | None, now: datetime) -> str:
    """``"42s"``, ``"5m"``, ``"3h"``, ``"2d"`` since ``when``; ``"-"`` when unknown."""
    if when is None:
        return "-"
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, UTC)
    return format_duration((now - when).total_seconds())


def format_duration(seconds: float) -> str:
    """The largest whole unit: ``"42s"``, ``"5m"``, ``"3h"``, ``"2d"``."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def format_expires(when: datetime | None, now: datetime) -> str:
    """``"in 59m"`` until ``when``; ``"now"`` once it has passed (the daemon acts within
    a second or so); ``"-"`` for no expiry."""
    if when is None:
        return "-"
    left = (when - now).total_seconds()
    return f"in {format_duration(left)}" if left >= 1 else "now"


def format_labels(labels: Mapping[str, str]) -> str:
    """``{"team": "ml", "env": "dev"}`` → ``"env=dev,team=ml"``; ``"-"`` for none."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def format_bytes(size: int) -> str:
    """``1536`` → ``"1.5K"``; binary units, like ``ls -h``."""
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_mib(mib: int) -> str:
    """``512`` → ``"512M"``, ``2048`` → ``"2G"``, ``1536`` → ``"1.5G"``."""
    if mib >= 1024:
        gib = mib / 1024
        return f"{gib:g}G"
    return f"{mib}M"


def _table(*headers: str) -> Table:
    from rich.box import SIMPLE_HEAD  # noqa: PLC0415 - rich is imported only to print tables
    from rich.table import Table  # noqa: PLC0415

    table = Table(box=SIMPLE_HEAD, pad_edge=False, show_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, no_wrap=header in ("ID", "NAME"))
    return table


def format_engine(sb: SandboxInfo) -> str:
    """``kiln list``'s ENGINE: ``qemu``, ``docker/runc``, ``docker/runsc``; ``-`` when the
    daemon did not say."""
    if not sb.engine:
        return "-"
    return f"{sb.engine}/{sb.runtime}" if sb.runtime else sb.engine


def format_sandbox_table(sandboxes: Iterable[SandboxInfo], now: datetime) -> Table:
    """``kiln list``: one row per sandbox."""
    table = _table(
        "NAME", "ID", "STATUS", "THERMAL", "IP", "CPUS", "MEMORY", "ENGINE", "IMAGE", "AGE",
        "EXPIRES",
    )  # fmt: skip
    for sb in sandboxes:
        table.add_row(
            sb.name,
            sb.id,
            sb.status,
            sb.thermal or "-",
            sb.ip or "-",
            str(sb.cpus),
            format_mib(sb.memory_mb),
            format_engine(sb),
            sb.image or "-",
            format_age(sb.created_at, now),
            format_expires(sb.expires_at, now),
        )
    return table


def format_sandbox(sb: SandboxInfo, now: datetime) -> str:
    """``kiln inspect`` / ``kiln create``: aligned ``key: value`` lines."""
    rows: list[tuple[str, str]] = [
        ("id", sb.id),
        ("name", sb.name),
        ("status", sb.status),
        ("thermal", sb.thermal or "-"),
        ("ip", sb.ip or "-"),
        ("cpus", str(sb.cpus)),
        ("memory", format_mib(sb.memory_mb)),
        ("keep_hot", "yes" if sb.keep_hot else "no"),
        ("engine", sb.engine or "-"),
        ("runtime", sb.runtime or "-"),
        *_capability_rows(sb.capabilities),
        ("network", format_network(sb.network)),
        ("image", sb.image or "-"),
        ("created", _when(sb.created_at, now)),
        ("last active", _when(sb.last_active_at, now)),
        ("last boot", format_last_boot(sb.last_boot, now)),
        ("labels", format_labels(sb.labels)),
        ("expires", _expiry(sb.expires_at, sb.on_expire, now)),
    ]
    return format_fields(rows)


def format_network(policy: NetworkPolicy | None) -> str:
    """An egress policy on one line: ``egress deny; allow pypi.org, 1.2.3.4/32``."""
    if policy is None:
        return "-"
    parts = [f"egress {policy.egress}"]
    for word, targets in (("allow", policy.allow), ("deny", policy.deny)):
        if targets:
            parts.append(f"{word} {', '.join(targets)}")
    return "; ".join(parts)


#: What each ``last_boot`` reason means for the user's processes.
_BOOT_NOTES = {
    "created": "",
    "restored": " (from its snapshot: processes kept)",
    "started": " (by a start: its stop had ended its processes)",
    "rebooted": " (its machine was lost: booted from its disk, files kept, processes lost)",
}


def format_last_boot(boot: LastBoot | None, now: datetime) -> str:
    """``kiln inspect``'s last boot: reason, what it means, when (``-``: not said)."""
    if boot is None:
        return "-"
    return f"{boot.reason}{_BOOT_NOTES.get(boot.reason, '')}, {_when(boot.at, now)}"


def _capability_rows(caps: Capabilities | None) -> list[tuple[str, str]]:
    """What the sandbox's engine can do with it (``-``: the daemon did not say)."""
    if caps is None:
        return [("pause", "-"), ("snapshots", "-"), ("fork", "-")]
    return [
        ("pause", "yes" if caps.pause else "no (it never goes warm)"),
        (
            "snapshots",
            "yes (cold and stopped keep its memory and processes)"
            if caps.snapshots
            else "no (never cold; a stop keeps its files but ends its processes)",
        ),
        ("fork", "yes" if caps.fork else "no (its engine cannot copy it running)"),
    ]


def format_stopped(sb: SandboxInfo) -> str:
    """``kiln stop``: the new status, and what a stop without snapshots did to it."""
    line = f"{sb.name}: {sb.status}"
    if sb.capabilities is not None and not sb.capabilities.snapshots:
        line += (
            "; its files are kept but its processes were ended (its engine has no"
            f" snapshots); kiln start {sb.name} boots it again"
        )
    return line


def _expiry(when: datetime | None, on_expire: str, now: datetime) -> str:
    if when is None:
        return "never"
    return f"{when.isoformat(timespec='seconds')} ({format_expires(when, now)}, then {on_expire})"


def _when(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    return f"{when.isoformat(timespec='seconds')} ({format_age(when, now)} ago)"


def format_fields(rows: Sequence[tuple[str, str]]) -> str:
    """Aligned ``key:  value`` lines."""
    width = max((len(k) for k, _ in rows), default=0) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in rows)


def format_sessions_table(sessions: Iterable[SessionInfo], now: datetime) -> Table:
    """``kiln ps``: one row per exec/TTY session."""
    table = _table("SESSION", "COMMAND", "TTY", "STATE", "ATTACHED", "AGE")
    for s in sessions:
        if s.running:
            state = "running"
        else:
            state = "exited" if s.exit_code is None else f"exited ({s.exit_code})"
        table.add_row(
            s.session_id,
            s.argv,
            "yes" if s.tty else "no",
            state,
            "yes" if s.attached else "no",
            format_age(s.created_at, now) if s.created_at else "-",
        )
    return table


def format_process_status(running: bool, exit_code: int | None) -> str:
    """``"running"``, ``"exited 0"``, or ``"exited"`` when the code is unknown."""
    if running:
        return "running"
    return "exited" if exit_code is None else f"exited {exit_code}"


def format_processes_table(processes: Iterable[ProcessInfo], now: datetime) -> Table:
    """``kiln ps``: one row per background process or TTY session."""
    table = _table("PID", "SESSION", "STATUS", "STARTED", "COMMAND")
    for p in processes:
        table.add_row(
            str(p.pid),
            p.session_id or "-",
            format_process_status(p.running, p.exit_code),
            f"{format_age(p.started_at, now)} ago" if p.started_at else "-",
            shlex.join(p.cmd),
        )
    return table


def format_mode_string(mode: str, is_dir: bool) -> str:
    """``("0755", True)`` → ``"drwxr-xr-x"``."""
    try:
        bits = int(mode, 8)
    except ValueError:
        return mode
    return stat.filemode(bits | (stat.S_IFDIR if is_dir else stat.S_IFREG))


def format_file_listing(listing: FileListing, now: datetime, base: str | None = None) -> str:
    """``kiln file ls``: ``ls -l``-like lines; a last line when the listing was capped.

    Entries that carry a path (``--depth``) are named relative to ``base``."""
    lines: list[str] = []
    prefix = base.rstrip("/") + "/" if base else None
    entries = listing.entries
    size_width = max((len(str(e.size)) for e in entries), default=1)
    for e in entries:
        mtime = datetime.fromtimestamp(e.mtime, UTC) if e.mtime else None
        stamp = mtime.strftime("%Y-%m-%d %H:%M") if mtime else "-"
        shown = e.path.removeprefix(prefix) if prefix and e.path else e.name
        name = shown + ("/" if e.is_dir else "")
        lines.append(
            f"{format_mode_string(e.mode, e.is_dir)} {e.size:>{size_width}} {stamp} {name}"
        )
    if listing.truncated:
        lines.append(f"... {listing.total - len(entries)} more (listing capped at {len(entries)})")
    return "\n".join(lines)


def format_file_event(event: FileEvent) -> str:
    """``kiln file watch``: one line per change (``create  dir/name``)."""
    return f"{event.type:<7} {event.name}"


def format_file_stat(info: FileStat) -> str:
    """``kiln file stat``."""
    return format_fields(
        [
            ("path", info.path),
            ("type", "directory" if info.is_dir else "file"),
            ("size", f"{info.size} ({format_bytes(info.size)})"),
            ("mode", f"{info.mode} ({format_mode_string(info.mode, info.is_dir)})"),
        ]
    )


def format_secrets_table(secrets: Iterable[Secret], now: datetime) -> Table:
    table = _table("NAME", "CREATED", "UPDATED")
    for s in secrets:
        table.add_row(s.name, format_age(s.created_at, now), format_age(s.updated_at, now))
    return table


def format_nodes_table(nodes: Iterable[NodeInfo], now: datetime) -> Table:
    """``kiln node ls``: one row per node; CPUS and MEMORY are allocated/offered."""
    table = _table(
        "NAME",
        "STATUS",
        "ADDRESS",
        "ENGINES",
        "SANDBOXES",
        "CPUS",
        "MEMORY",
        "LOAD",
        "LEASE",
        "AGE",
    )
    for n in nodes:
        table.add_row(
            n.name,
            n.status,
            n.address,
            ",".join(n.engines) or "-",
            str(n.sandboxes),
            f"{n.cpus_allocated}/{n.cpus}",
            f"{format_mib(n.memory_allocated_mb)}/{format_mib(n.memory_mb)}",
            f"{n.load:.2f}",
            f"{n.lease_left_s:.0f}s" if n.lease_left_s >= 0 else "expired",
            format_age(n.registered_at, now),
        )
    return table


def format_volumes_table(volumes: Iterable[Volume], now: datetime) -> Table:
    table = _table("NAME", "SIZE", "ATTACHED TO", "AGE")
    for v in volumes:
        table.add_row(
            v.name, format_mib(v.size_mb), v.attached_to or "-", format_age(v.created_at, now)
        )
    return table


def _saved_contents(image: SavedImage) -> str:
    return "disk+memory" if image.memory else "disk"


def format_saved(image: SavedImage) -> str:
    what = "its disk and memory" if image.memory else "its files (no processes)"
    return (
        f"saved image {image.name} ({image.id}): {what}, {format_bytes(image.size_bytes)};"
        f" `kiln create --from-saved {image.name}` starts a sandbox from it"
    )


def format_saved_table(images: Iterable[SavedImage], now: datetime) -> Table:
    table = _table("NAME", "ENGINE", "IMAGE", "CPUS", "MEMORY", "HOLDS", "SIZE", "AGE")
    for i in images:
        table.add_row(
            i.name,
            i.engine,
            i.image,
            str(i.cpus),
            format_mib(i.memory_mb),
            _saved_contents(i),
            format_bytes(i.size_bytes),
            format_age(i.created_at, now),
        )
    return table


def format_templates_table(templates: Iterable[Template], now: datetime) -> Table:
    table = _table("NAME", "ID", "CPUS", "MEMORY", "IMAGE", "VOLUMES", "AGE")
    for t in templates:
        table.add_row(
            t.name,
            t.id,
            "-" if t.cpus is None else str(t.cpus),
            "-" if t.memory_mb is None else format_mib(t.memory_mb),
            t.image or "-",
            ", ".join(f"{v.name}:{v.mount}" for v in t.volumes) or "-",
            format_age(t.created_at, now),
        )
    return table


def absolute_url(url: str, base_url: str) -> str:
    """A daemon-relative path (``/sandboxes/…/proxy/3000/``) joined to the daemon's URL."""
    return url if "://" in url else base_url.rstrip("/") + url


def port_dicts(ports: Iterable[Port], base_url: str) -> list[dict[str, Any]]:
    """``kiln port list --json``: each port as the daemon says, plus ``url``, the
    absolute proxy URL the table shows."""
    return [{**p.to_dict(), "url": absolute_url(p.proxy_url, base_url)} for p in ports]


def format_ports_table(
    ports: Iterable[Port], base_url: str, *, with_sandbox: bool = False
) -> Table:
    """``kiln port list``: PORT, URL (proxy URL, needs the key), PUBLIC (published URL
    or ``-``); SANDBOX first when the ports of every sandbox are listed."""
    table = _table(*(("SANDBOX",) if with_sandbox else ()), "PORT", "URL", "PUBLIC")
    for p in ports:
        cells = [str(p.port), absolute_url(p.proxy_url, base_url), p.published_url or "-"]
        if with_sandbox:
            cells.insert(0, p.sandbox_name or p.sandbox_id or "-")
        table.add_row(*cells)
    return table


def format_publish_conflict(
    sandbox: str, port: int, alias: str | None, published: Iterable[PublishedPort], message: str
) -> str:
    """Why ``kiln port publish`` got a 409 (``message``, the daemon's words): the
    port's alias and URL when it is already published, else the alias is taken."""
    for rule in published:
        if rule.port == port:
            return f"port {port} of {sandbox} is already published as {rule.alias} ({rule.url})"
    return f"{message}; choose another with --alias" if alias is not None else message


def format_not_published(sandbox: str, port: int, published: Iterable[PublishedPort]) -> str:
    """``kiln port unpublish`` of a port that is not published: say which ones are."""
    ports = ", ".join(str(rule.port) for rule in published)
    return f"port {port} of {sandbox} is not published" + (
        f" (published: {ports})" if ports else ""
    )


def format_health(health: Health, url: str) -> str:
    """``kiln health``: the daemon, its default engine, and whether each engine can run
    sandboxes here (``ok``, or why not)."""
    default = health.engine or "-"
    if health.engines and health.engine:
        default += " (default for new sandboxes)"
    return format_fields(
        [
            ("daemon", url),
            ("status", health.status),
            ("engine", default),
            *((name, _availability(why)) for name, why in sorted(health.engines.items())),
            ("sandboxes", str(health.sandboxes)),
            ("uptime", format_duration(health.uptime_s)),
        ]
    )


def _availability(why: str) -> str:
    return why if why == "ok" else f"unavailable: {why}"


def user_dict(user: User) -> dict[str, Any]:
    """A store user as JSON-able data (``kiln user list --json``)."""
    return {
        "id": user.id,
        "name": user.name,
        "admin": user.is_admin,
        "max_sandboxes": user.quotas.max_sandboxes,
        "max_cpus": user.quotas.max_cpus,
        "max_memory_mb": user.quotas.max_memory_mb,
        "max_image_disk_mb": user.quotas.max_image_disk_mb,
        "created_at": datetime.fromtimestamp(user.created_at, UTC).isoformat(),
    }


def format_users_table(users: Iterable[User], now: datetime) -> Table:
    table = _table("NAME", "ID", "ADMIN", "QUOTAS", "AGE")
    for u in users:
        q = u.quotas
        quotas = ", ".join(
            f"{label} {value}"
            for label, value in (
                ("sandboxes", q.max_sandboxes),
                ("cpus", q.max_cpus),
                ("memory", None if q.max_memory_mb is None else format_mib(q.max_memory_mb)),
                (
                    "image disk",
                    None if q.max_image_disk_mb is None else format_mib(q.max_image_disk_mb),
                ),
            )
            if value is not None
        )
        table.add_row(
            u.name,
            u.id,
            "yes" if u.is_admin else "no",
            quotas or "-",
            format_age(u.created_at, now),
        )
    return table


def image_dict(image: Image) -> dict[str, Any]:
    return {
        "tier": image.tier,
        "digest": image.digest,
        "kernel_version": image.kernel_version,
        "size_bytes": image.size_bytes,
        "built_at": image.built_at.isoformat(),
        "path": str(image.path),
    }


def format_images_table(images: Iterable[Image], now: datetime) -> Table:
    table = _table("TIER", "DIGEST", "KERNEL", "DISK", "BUILT", "PATH")
    for i in images:
        table.add_row(
            i.tier,
            i.digest[:12],
            i.kernel_version,
            format_bytes(i.size_bytes),
            format_age(i.built_at, now),
            str(i.path),
        )
    return table


def format_catalog_table(images: Iterable[ImageInfo], now: datetime) -> Table:
    """``kiln image list``: the images a sandbox can start from."""
    table = _table("NAME", "KIND", "SCOPE", "PACKAGES", "DISK", "AGE")
    for i in images:
        extra = i.packages if i.kind != "tier" else ()
        table.add_row(
            i.name,
            i.kind,
            i.scope,
            ", ".join(extra) or "-",
            format_bytes(i.size_bytes) if i.size_bytes else "-",
            format_age(i.created_at, now) if i.created_at else "-",
        )
    return table


def format_image_detail(info: ImageInfo) -> str:
    """``kiln image inspect``: aligned ``key: value`` lines."""
    rows: list[tuple[str, str]] = [
        ("name", info.name),
        ("kind", info.kind),
        ("scope", info.scope),
        ("ref", info.ref or "-"),
        ("digest", info.digest[:16] or "-"),
        ("disk", format_bytes(info.size_bytes) if info.size_bytes else "-"),
        ("packages", ", ".join(info.packages) or "-"),
        ("files", ", ".join(info.files) or "-"),
        ("env", " ".join(f"{k}={v}" for k, v in sorted(info.env.items())) or "-"),
        ("created", info.created_at.isoformat() if info.created_at else "-"),
    ]
    return format_fields(rows)


def format_key_notice(user: str, key: str) -> str:
    """The one time an API key is shown."""
    return (
        f"API key for {user} (shown once; store it now):\n{key}\n"
        f"use it with: kiln setup --token ... or KILN_TOKEN=..."
    )


def format_detached(sandbox: str, session_id: str | None) -> str:
    """What ``kiln shell`` prints after Ctrl+\\ detaches."""
    if not session_id:
        return "kiln: detached (the session keeps running; see: kiln ps " + sandbox + ")"
    return (
        f"kiln: detached from session {session_id}; reattach with: "
        f"kiln shell {sandbox} --session {session_id}"
    )
