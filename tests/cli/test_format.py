"""Pure formatting: text and tables from values, rendered without a terminal."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from io import StringIO

from rich.console import Console

from kiln.cli import format as fmt
from kiln.cli.execio import exit_status, stdin_command
from kiln.cli.terminal import split_detach
from kiln.protocol.messages import FileInfo, FileListing
from kiln.sdk.models import (
    Capabilities,
    FileStat,
    Health,
    LastBoot,
    Port,
    PublishedPort,
    SandboxInfo,
    Secret,
    SessionInfo,
    Template,
    Volume,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def render(table: object) -> str:
    out = StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    return out.getvalue()


def sandbox(**changes: object) -> SandboxInfo:
    fields: dict[str, object] = {
        "id": "sb-0123456789ab",
        "name": "demo",
        "status": "running",
        "thermal": "hot",
        "ip": "10.88.0.2",
        "cpus": 2,
        "memory_mb": 1536,
        "keep_hot": True,
        "engine": "qemu",
        "image": "minimal",
        "created_at": NOW - timedelta(minutes=5),
        "last_active_at": None,
    }
    fields.update(changes)
    return SandboxInfo(**fields)  # type: ignore[arg-type]


def test_format_error_is_one_line() -> None:
    assert fmt.format_error("sandbox x\nnot found") == "kiln: error: sandbox x not found"
    assert fmt.format_error("") == "kiln: error: unknown error"


def test_format_age_and_duration() -> None:
    assert fmt.format_age(None, NOW) == "-"
    assert fmt.format_age(NOW - timedelta(seconds=42), NOW) == "42s"
    assert fmt.format_age(NOW - timedelta(hours=3, minutes=5), NOW) == "3h"
    assert fmt.format_age((NOW - timedelta(days=2)).timestamp(), NOW) == "2d"
    assert fmt.format_age(NOW + timedelta(seconds=5), NOW) == "0s"  # clock skew
    assert fmt.format_duration(59.9) == "59s"


def test_format_sizes() -> None:
    assert fmt.format_bytes(0) == "0B"
    assert fmt.format_bytes(1536) == "1.5K"
    assert fmt.format_mib(512) == "512M"
    assert fmt.format_mib(2048) == "2G"
    assert fmt.format_mib(1536) == "1.5G"


def test_sandbox_table() -> None:
    expiring = sandbox(name="b", ip=None, expires_at=NOW + timedelta(hours=1, seconds=-30))
    text = render(fmt.format_sandbox_table([sandbox(), expiring], NOW))
    lines = text.strip().splitlines()
    assert lines[0].split() == [
        "NAME", "ID", "STATUS", "THERMAL", "IP", "CPUS", "MEMORY", "ENGINE", "IMAGE", "AGE",
        "EXPIRES",
    ]  # fmt: skip
    row = next(line.split() for line in lines if line.startswith("demo"))
    assert row == ["demo", "sb-0123456789ab", "running", "hot", "10.88.0.2", "2", "1.5G",
                   "qemu", "minimal", "5m", "-"]  # fmt: skip
    row = next(line.split() for line in lines if line.startswith("b "))
    assert row[:5] == ["b", "sb-0123456789ab", "running", "hot", "-"]
    assert row[-2:] == ["in", "59m"]


def test_engine_column() -> None:
    assert fmt.format_engine(sandbox()) == "qemu"
    assert fmt.format_engine(sandbox(engine="docker", runtime="runc")) == "docker/runc"
    assert fmt.format_engine(sandbox(engine="docker", runtime="runsc")) == "docker/runsc"
    assert fmt.format_engine(sandbox(engine="")) == "-"
    rows = render(fmt.format_sandbox_table([sandbox(engine="docker", runtime="runsc")], NOW))
    assert "docker/runsc" in rows.splitlines()[-1].split()


def test_sandbox_fields_engine_runtime_capabilities() -> None:
    text = fmt.format_sandbox(sandbox(capabilities=Capabilities()), NOW)
    assert "engine:      qemu\n" in text
    assert "runtime:     -\n" in text
    assert "pause:       yes\n" in text
    assert "snapshots:   yes (cold and stopped keep its memory and processes)\n" in text
    text = fmt.format_sandbox(
        sandbox(engine="docker", runtime="runsc", capabilities=Capabilities(snapshots=False)),
        NOW,
    )
    assert "engine:      docker\nruntime:     runsc\n" in text
    assert "snapshots:   no (never cold; a stop keeps its files but ends its processes)" in text
    unknown = fmt.format_sandbox(sandbox(), NOW)  # an older daemon, or mid-transition
    assert "pause:       -\nsnapshots:   -\n" in unknown


def test_inspect_shows_the_last_boot() -> None:
    assert "last boot:   -\n" in fmt.format_sandbox(sandbox(), NOW)  # an older daemon
    rebooted = LastBoot("rebooted", NOW - timedelta(minutes=2))
    text = fmt.format_sandbox(sandbox(last_boot=rebooted), NOW)
    assert (
        "last boot:   rebooted (its machine was lost: booted from its disk, files kept,"
        " processes lost), 2024-05-01T11:58:00+00:00 (2m ago)\n"
    ) in text
    created = fmt.format_last_boot(LastBoot("created", NOW - timedelta(seconds=5)), NOW)
    assert created == "created, 2024-05-01T11:59:55+00:00 (5s ago)"
    restored = fmt.format_last_boot(LastBoot("restored", NOW), NOW)
    assert restored.startswith("restored (from its snapshot: processes kept), ")


def test_stopped_message_follows_the_capabilities() -> None:
    stopped = sandbox(status="stopped", thermal="cold")
    assert fmt.format_stopped(stopped) == "demo: stopped"
    assert (
        fmt.format_stopped(stopped.model_copy(update={"capabilities": Capabilities()}))
        == "demo: stopped"
    )
    # The capabilities decide, not the engine's name.
    for engine in ("docker", "qemu"):
        without = stopped.model_copy(
            update={"engine": engine, "capabilities": Capabilities(snapshots=False)}
        )
        assert fmt.format_stopped(without) == (
            "demo: stopped; its files are kept but its processes were ended (its engine has"
            " no snapshots); kiln start demo boots it again"
        )


def test_format_expires() -> None:
    assert fmt.format_expires(None, NOW) == "-"
    assert fmt.format_expires(NOW + timedelta(seconds=90), NOW) == "in 1m"
    assert fmt.format_expires(NOW + timedelta(days=2, hours=3), NOW) == "in 2d"
    assert fmt.format_expires(NOW + timedelta(seconds=0.5), NOW) == "now"
    assert fmt.format_expires(NOW - timedelta(seconds=5), NOW) == "now"


def test_sandbox_fields() -> None:
    text = fmt.format_sandbox(sandbox(), NOW)
    assert "name:        demo" in text
    assert "keep_hot:    yes" in text
    assert "created:     2024-05-01T11:55:00+00:00 (5m ago)" in text
    assert "last active: -" in text
    assert "labels:      -" in text
    assert "expires:     never" in text
    text = fmt.format_sandbox(
        sandbox(
            labels={"team": "ml", "env": "dev"},
            expires_at=NOW + timedelta(minutes=30),
            on_expire="stop",
        ),
        NOW,
    )
    assert "labels:      env=dev,team=ml" in text
    assert "expires:     2024-05-01T12:30:00+00:00 (in 30m, then stop)" in text


def test_json_of_models_and_lists() -> None:
    data = json.loads(fmt.format_json([sandbox()]))
    assert data[0]["name"] == "demo"
    assert data[0]["created_at"] == "2024-05-01T11:55:00+00:00"
    sessions = [SessionInfo(session_id="s1", argv="bash", tty=True, running=True)]
    assert json.loads(fmt.format_json(sessions))[0]["session_id"] == "s1"


def test_sessions_table() -> None:
    sessions = [
        SessionInfo(
            session_id="s1",
            argv="bash -l",
            tty=True,
            running=True,
            attached=True,
            created_at=(NOW - timedelta(seconds=30)).timestamp(),
        ),
        SessionInfo(session_id="s2", argv="make", created_at=NOW.timestamp(), exit_code=2),
    ]
    text = render(fmt.format_sessions_table(sessions, NOW))
    assert "s1 " in text and "running" in text and "30s" in text
    assert "exited (2)" in text


def test_file_listing() -> None:
    when = NOW.timestamp()
    listing = FileListing(
        (
            FileInfo("app.py", 12, "0644", False, when),
            FileInfo("src", 4096, "0755", True, when),
        ),
        truncated=True,
        total=5,
    )
    lines = fmt.format_file_listing(listing, NOW).splitlines()
    assert lines[0] == "-rw-r--r--   12 2024-05-01 12:00 app.py"
    assert lines[1] == "drwxr-xr-x 4096 2024-05-01 12:00 src/"
    assert lines[2] == "... 3 more (listing capped at 2)"
    assert fmt.format_file_listing(FileListing(()), NOW) == ""


def test_file_stat() -> None:
    text = fmt.format_file_stat(FileStat("/w/a", 2048, "0600", False))
    assert "type: file" in text and "2048 (2.0K)" in text and "0600 (-rw-------)" in text


def test_other_tables() -> None:
    secrets = render(
        fmt.format_secrets_table([Secret(name="TOKEN", created_at=NOW, updated_at=NOW)], NOW)
    )
    assert "TOKEN" in secrets
    volumes = render(
        fmt.format_volumes_table(
            [Volume(name="data", size_mb=1024, created_at=NOW, attached_to="sb-1")], NOW
        )
    )
    assert "data" in volumes and "1G" in volumes and "sb-1" in volumes
    templates = render(fmt.format_templates_table([Template(id="t-1", name="py", cpus=2)], NOW))
    assert "py" in templates and "t-1" in templates
    ports = render(
        fmt.format_ports_table(
            [Port(port=3000, proxy_url="/sandboxes/sb/proxy/3000/")], "http://h:1"
        )
    )
    assert "http://h:1/sandboxes/sb/proxy/3000/" in ports


def test_ports_table_and_json() -> None:
    published = Port(
        port=3000,
        proxy_url="/sandboxes/sb-1/proxy/3000/",
        sandbox_id="sb-1",
        sandbox_name="web",
        published_url="http://web-3000.l:1/",
    )
    plain = Port(
        port=8000, proxy_url="/sandboxes/sb-1/proxy/8000/", sandbox_id="sb-1", sandbox_name="web"
    )
    lines = [
        line.split()
        for line in render(fmt.format_ports_table([published, plain], "http://h:1/")).splitlines()
    ]
    assert lines[0] == ["PORT", "URL", "PUBLIC"]
    assert ["3000", "http://h:1/sandboxes/sb-1/proxy/3000/", "http://web-3000.l:1/"] in lines
    assert ["8000", "http://h:1/sandboxes/sb-1/proxy/8000/", "-"] in lines
    every = render(
        fmt.format_ports_table(
            [plain, Port(port=22, proxy_url="/p/", sandbox_id="sb-2")],
            "http://h:1",
            with_sandbox=True,
        )
    )
    rows = [line.split() for line in every.splitlines()]
    assert rows[0] == ["SANDBOX", "PORT", "URL", "PUBLIC"]
    assert ["web", "8000", "http://h:1/sandboxes/sb-1/proxy/8000/", "-"] in rows
    assert ["sb-2", "22", "http://h:1/p/", "-"] in rows  # no name: the id
    [entry] = fmt.port_dicts([published], "http://h:1")
    assert entry["url"] == "http://h:1/sandboxes/sb-1/proxy/3000/"
    assert entry["proxy_url"] == "/sandboxes/sb-1/proxy/3000/"
    assert entry["published_url"] == "http://web-3000.l:1/"


def test_publish_errors_name_the_port_and_the_sandbox() -> None:
    rule = PublishedPort(
        id="pub-1",
        sandbox_id="sb-1",
        port=3000,
        alias="web-3000",
        url="http://web-3000.l:1/",
        created_at=NOW,
    )
    daemon_says = "port 3000 is already published"
    assert fmt.format_publish_conflict("web", 3000, None, [rule], daemon_says) == (
        "port 3000 of web is already published as web-3000 (http://web-3000.l:1/)"
    )
    taken = "alias 'x' is already in use"
    assert fmt.format_publish_conflict("web", 8000, "x", [rule], taken) == (
        "alias 'x' is already in use; choose another with --alias"
    )
    assert fmt.format_not_published("web", 8000, []) == "port 8000 of web is not published"
    assert fmt.format_not_published("web", 8000, [rule]) == (
        "port 8000 of web is not published (published: 3000)"
    )


def test_health() -> None:
    text = fmt.format_health(
        Health(status="ok", sandboxes=3, uptime_s=7260.0, engine="qemu"), "http://h:1"
    )
    assert "uptime:    2h" in text and "sandboxes: 3" in text
    assert "engine:    qemu\n" in text  # an older daemon: one engine, nothing more to say


def test_health_shows_each_engine() -> None:
    engines = {"qemu": "ok", "docker": "no Docker engine here: dockerd is not installed"}
    text = fmt.format_health(
        Health(status="ok", sandboxes=0, uptime_s=5.0, engine="qemu", engines=engines), "http://h:1"
    )
    assert text.splitlines()[2:5] == [
        "engine:    qemu (default for new sandboxes)",
        "docker:    unavailable: no Docker engine here: dockerd is not installed",
        "qemu:      ok",
    ]


def test_detached_message_names_the_session() -> None:
    assert fmt.format_detached("demo", "s3") == (
        "kiln: detached from session s3; reattach with: kiln shell demo --session s3"
    )
    assert "kiln ps demo" in fmt.format_detached("demo", None)


def test_key_notice() -> None:
    assert "kiln_abc" in fmt.format_key_notice("alice", "kiln_abc")


def test_stdin_wrapper_and_exit_status() -> None:
    assert stdin_command("/tmp/f", ["cat", "-n"]) == [
        "sh",
        "-c",
        'exec <"$1" && rm -f -- "$1" && shift && exec "$@"',
        "kiln-stdin",
        "/tmp/f",
        "cat",
        "-n",
    ]
    assert [exit_status(c) for c in (0, 7, 255, 256, -1)] == [0, 7, 255, 255, 255]


def test_split_detach() -> None:
    assert split_detach(b"ls\r") == (b"ls\r", False)
    assert split_detach(b"ab\x1ccd") == (b"ab", True)
    assert split_detach(b"\x1c") == (b"", True)
