"""``kiln mcp`` through the MCP SDK's stdio client, against a real daemon."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from cli.conftest import SRC, kiln_argv
from kiln.sdk import Kiln, NetworkPolicy, NotFound, Sandbox

from .conftest import Daemon, McpClient, mcp_client, unique

TOOLS = {
    "create_sandbox",
    "list_sandboxes",
    "destroy_sandbox",
    "exec",
    "start_process",
    "list_processes",
    "read_process_output",
    "send_process_input",
    "kill_process",
    "read_file",
    "write_file",
    "list_files",
    "publish_port",
    "unpublish_port",
    "list_ports",
}


@pytest.fixture
def sb(kiln: Kiln) -> Iterator[Sandbox]:
    sandbox = kiln.sandboxes.create(name=unique("mcp"))
    yield sandbox
    with suppress(NotFound):
        kiln.sandboxes.delete(sandbox.id)


# -- the tool list ----------------------------------------------------------------------


def test_lists_every_tool_with_a_description_and_schemas(mcp: McpClient) -> None:
    tools = mcp.tools()
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description, tool.name
        assert tool.input_schema["type"] == "object"
        assert tool.output_schema is not None, tool.name
    exec_schema = tools["exec"].input_schema
    assert set(exec_schema["required"]) == {"sandbox", "command"}
    props = exec_schema["properties"]
    assert {"cwd", "env", "as_root", "timeout_s", "max_output_chars"} <= set(props)
    # A command is a shell line or an argv list.
    assert {s["type"] for s in props["command"]["anyOf"]} == {"string", "array"}
    assert props["timeout_s"]["maximum"] == 3600
    assert "exit_code" in tools["exec"].output_schema["properties"]  # type: ignore[index]
    engine = tools["create_sandbox"].input_schema["properties"]["engine"]
    assert {"enum": ["qemu", "docker"], "type": "string"} in engine["anyOf"]
    create = tools["create_sandbox"].input_schema
    assert {"secrets", "template", "network"} <= set(create["properties"])
    [policy] = create["$defs"].values()
    assert policy["properties"]["egress"]["enum"] == ["allow", "deny"]
    assert policy["additionalProperties"] is False
    assert tools["destroy_sandbox"].annotations is not None
    assert tools["destroy_sandbox"].annotations.destructive_hint is True
    assert tools["list_sandboxes"].annotations is not None
    assert tools["list_sandboxes"].annotations.read_only_hint is True


# -- sandboxes --------------------------------------------------------------------------


def test_create_list_exec_destroy(mcp: McpClient, kiln: Kiln) -> None:
    name = unique("mcp")
    created = mcp.ok(
        "create_sandbox",
        {"name": name, "env": {"GREETING": "hello"}, "labels": {"by": "mcp"}, "ttl_s": 600},
    )
    try:
        assert created["name"] == name
        assert created["status"] == "running"
        assert created["labels"] == {"by": "mcp"}
        assert created["expires_at"] is not None
        assert kiln.sandboxes.get(name).id == created["id"]

        listed = mcp.ok("list_sandboxes", {"labels": {"by": "mcp"}})
        assert [s["id"] for s in listed["sandboxes"]] == [created["id"]]

        out = mcp.ok("exec", {"sandbox": name, "command": "echo $GREETING; echo oops >&2"})
        assert out["stdout"] == "hello\n"
        assert out["stderr"] == "oops\n"
        assert out["exit_code"] == 0
    finally:
        assert mcp.ok("destroy_sandbox", {"sandbox": created["id"]}) == {"destroyed": created["id"]}
    with pytest.raises(NotFound):
        kiln.sandboxes.get(name)
    assert "not found" in mcp.error("exec", {"sandbox": name, "command": "true"}).lower()


def test_create_with_secrets_a_template_and_an_egress_policy(mcp: McpClient, kiln: Kiln) -> None:
    secret = f"MCP_{unique('s').replace('-', '_').upper()}"
    kiln.secrets.set(secret, "from-secret")
    template = kiln.templates.create(unique("tpl"), cpus=2, env={"FROM_TEMPLATE": "yes"})
    created = None
    try:
        created = mcp.ok(
            "create_sandbox",
            {
                "name": unique("mcp"),
                "secrets": [secret],
                "template": template.name,
                "memory_mb": 256,  # the arguments override the template's settings
                "network": {"egress": "deny", "allow": ["pypi.org", "203.0.113.7"]},
            },
        )
        assert (created["cpus"], created["memory_mb"]) == (2, 256)
        # The policy as the daemon keeps it: an address becomes a /32.
        policy = {"egress": "deny", "allow": ["pypi.org", "203.0.113.7/32"], "deny": []}
        assert created["network"] == policy
        assert kiln.sandboxes.get(created["id"]).network == NetworkPolicy(
            "deny", ("pypi.org", "203.0.113.7/32"), ()
        )
        command = f"echo $FROM_TEMPLATE ${secret}"
        out = mcp.ok("exec", {"sandbox": created["id"], "command": command})
        assert out["stdout"] == "yes from-secret\n"
        listed = mcp.ok("list_sandboxes", {})
        [mine] = [s for s in listed["sandboxes"] if s["id"] == created["id"]]
        assert mine["network"] == policy
    finally:
        if created is not None:
            mcp.ok("destroy_sandbox", {"sandbox": created["id"]})
        kiln.templates.delete(template.id)
        kiln.secrets.delete(secret)


def test_create_options_the_daemon_refuses_are_tool_errors(mcp: McpClient) -> None:
    assert "not found" in mcp.error("create_sandbox", {"secrets": ["NO_SUCH_SECRET_X"]}).lower()
    assert "no-such-template" in mcp.error("create_sandbox", {"template": "no-such-template"})
    assert "not a host" in mcp.error("create_sandbox", {"network": {"allow": ["not a host"]}})
    # The schema refuses these before the daemon sees them.
    assert "egress" in mcp.error("create_sandbox", {"network": {"egress": "sometimes"}})
    assert "network.allow_all" in mcp.error("create_sandbox", {"network": {"allow_all": True}})
    assert "secrets" in mcp.error("create_sandbox", {"secrets": "NOT_A_LIST"})


def test_unknown_sandbox_is_a_tool_error_with_kilns_message(mcp: McpClient) -> None:
    for tool, args in [
        ("destroy_sandbox", {}),
        ("exec", {"command": "true"}),
        ("list_processes", {}),
        ("read_file", {"path": "/etc/hostname"}),
        ("publish_port", {"port": 8000}),
        ("unpublish_port", {"port": 8000}),
    ]:
        message = mcp.error(tool, {"sandbox": "no-such-sandbox", **args})
        assert "no-such-sandbox" in message, (tool, message)
        assert "not found" in message.lower(), (tool, message)
    mcp.ok("list_sandboxes")  # the server still serves


def test_input_the_daemon_refuses_is_a_tool_error_with_its_message(
    mcp: McpClient, sb: Sandbox
) -> None:
    assert "name: String should match pattern" in mcp.error("create_sandbox", {"name": "Bad Name!"})
    assert f"a sandbox named '{sb.name}' already exists" in mcp.error(
        "create_sandbox", {"name": sb.name}
    )
    assert "is a directory" in mcp.error("read_file", {"sandbox": sb.id, "path": "/"})
    assert "No such file or directory" in mcp.error(
        "list_files", {"sandbox": sb.id, "path": "/nonexistent"}
    )
    assert "command not found" in mcp.error(
        "start_process", {"sandbox": sb.id, "command": ["/no/such/binary"]}
    )


# -- exec -------------------------------------------------------------------------------


def test_exec_argv_cwd_env_and_exit_code(mcp: McpClient, sb: Sandbox, daemon: Daemon) -> None:
    workdir = daemon.workdir(sb.id)
    (workdir / "sub").mkdir()
    out = mcp.ok(
        "exec",
        {
            "sandbox": sb.name,
            "command": ["sh", "-c", 'pwd; echo "$A$B"; exit 3'],
            "cwd": str(workdir / "sub"),
            "env": {"A": "x", "B": "y"},
        },
    )
    assert out == {
        "exit_code": 3,
        "stdout": f"{workdir / 'sub'}\nxy\n",
        "stderr": "",
        "timed_out": False,
        "stdout_truncated": False,
        "stderr_truncated": False,
    }


def test_exec_timeout_kills_the_command(mcp: McpClient, sb: Sandbox) -> None:
    started = time.monotonic()
    out = mcp.ok("exec", {"sandbox": sb.id, "command": "echo begun; sleep 30", "timeout_s": 0.5})
    assert time.monotonic() - started < 15
    assert out["timed_out"] is True
    assert out["exit_code"] == 124
    assert out["stdout"] == "begun\n"


def test_exec_output_is_bounded_keeping_both_ends(mcp: McpClient, sb: Sandbox) -> None:
    out = mcp.ok(
        "exec",
        {
            "sandbox": sb.id,
            "command": "echo FIRST; seq 1 100000; echo LAST",
            "max_output_chars": 1000,
        },
    )
    assert out["stdout_truncated"] is True
    assert out["stderr_truncated"] is False
    assert len(out["stdout"]) < 1100
    assert out["stdout"].startswith("FIRST\n1\n")
    assert out["stdout"].endswith("100000\nLAST\n")
    assert "characters omitted" in out["stdout"]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ({"command": "true"}, "sandbox"),  # required argument missing
        ({"sandbox": "x"}, "command"),
        ({"sandbox": "x", "command": "true", "timeout_s": -1}, "timeout_s"),
        ({"sandbox": "x", "command": "true", "timeout_s": "soon"}, "timeout_s"),
        ({"sandbox": "x", "command": 42}, "command"),
    ],
)
def test_bad_arguments_are_tool_errors(
    mcp: McpClient, args: dict[str, object], complaint: str
) -> None:
    assert complaint in mcp.error("exec", args)


def test_an_empty_argv_is_refused(mcp: McpClient, sb: Sandbox) -> None:
    assert "empty" in mcp.error("exec", {"sandbox": sb.id, "command": []})


def test_unknown_tool_is_an_error(mcp: McpClient) -> None:
    assert "nonesuch" in mcp.error("nonesuch")


# -- background processes ---------------------------------------------------------------


def test_process_start_read_input_kill(mcp: McpClient, sb: Sandbox) -> None:
    started = mcp.ok(
        "start_process",
        {"sandbox": sb.id, "command": "echo ready; read line; echo got:$line; sleep 60"},
    )
    pid = started["pid"]
    assert started["running"] is True
    assert any(p["pid"] == pid for p in mcp.ok("list_processes", {"sandbox": sb.id})["processes"])

    # It waits for input: the wait for its exit runs out, with what it printed so far.
    started_at = time.monotonic()
    first = mcp.ok("read_process_output", {"sandbox": sb.id, "pid": pid, "wait_s": 1})
    assert time.monotonic() - started_at >= 1
    assert first["output"] == "ready\n"
    assert first["offset"] == 0
    assert first["running"] is True
    assert first["exit_code"] is None

    sent = mcp.ok("send_process_input", {"sandbox": sb.id, "pid": pid, "data": "ping\n"})
    assert sent == {"pid": pid, "bytes_sent": 5, "stdin_closed": False}
    later = _read_until(mcp, sb.id, pid, "got:ping\n", offset=first["next_offset"])
    assert later["offset"] == len("ready\n")
    assert later["next_offset"] == len("ready\ngot:ping\n")

    assert mcp.ok("kill_process", {"sandbox": sb.id, "pid": pid}) == {"pid": pid, "signal": "KILL"}
    ended = mcp.ok("read_process_output", {"sandbox": sb.id, "pid": pid, "wait_s": 10})
    assert ended["running"] is False
    assert ended["exit_code"] == 137
    assert ended["output"] == "ready\ngot:ping\n"
    # Finished: it takes no more input.
    message = mcp.error("send_process_input", {"sandbox": sb.id, "pid": pid, "data": "x"})
    assert message


def test_process_output_waits_pages_and_tails(mcp: McpClient, sb: Sandbox) -> None:
    pid = mcp.ok("start_process", {"sandbox": sb.id, "command": "sleep 0.3; seq 1 2000"})["pid"]
    done = mcp.ok("read_process_output", {"sandbox": sb.id, "pid": pid, "wait_s": 20})
    assert done["running"] is False
    assert done["exit_code"] == 0
    everything = "".join(f"{i}\n" for i in range(1, 2001))
    assert done["output"] == everything[: len(done["output"])]

    page = mcp.ok(
        "read_process_output", {"sandbox": sb.id, "pid": pid, "offset": 100, "max_bytes": 100}
    )
    assert page["output"] == everything[100:200]
    assert page["next_offset"] == 200
    assert page["more"] is True

    tail = mcp.ok("read_process_output", {"sandbox": sb.id, "pid": pid, "tail_lines": 3})
    assert tail["output"] == "1998\n1999\n2000\n"
    assert tail["next_offset"] == len(everything)
    assert tail["more"] is False


def test_unknown_process_is_a_tool_error(mcp: McpClient, sb: Sandbox) -> None:
    assert "999999" in mcp.error("read_process_output", {"sandbox": sb.id, "pid": 999999})
    assert mcp.error("kill_process", {"sandbox": sb.id, "pid": 999999, "signal": "TERM"})
    assert "signal" in mcp.error("kill_process", {"sandbox": sb.id, "pid": 1, "signal": "STOP"})


def _read_until(
    mcp: McpClient, sandbox: str, pid: int, expected: str, offset: int = 0
) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while True:
        out = mcp.ok("read_process_output", {"sandbox": sandbox, "pid": pid, "offset": offset})
        if out["output"] == expected or time.monotonic() > deadline:
            assert out["output"] == expected
            return out
        time.sleep(0.05)


# -- files ------------------------------------------------------------------------------


def test_write_read_and_list_files(mcp: McpClient, sb: Sandbox, daemon: Daemon) -> None:
    workdir = daemon.workdir(sb.id)
    path = str(workdir / "notes" / "hello.txt")
    written = mcp.ok(
        "write_file", {"sandbox": sb.id, "path": path, "content": "héllo\nworld\n", "mode": "600"}
    )
    assert written == {"path": path, "bytes_written": len("héllo\nworld\n".encode())}
    assert Path(path).read_text() == "héllo\nworld\n"
    assert Path(path).stat().st_mode & 0o777 == 0o600

    read = mcp.ok("read_file", {"sandbox": sb.id, "path": path})
    assert read == {
        "path": path,
        "content": "héllo\nworld\n",
        "size": 13,
        "truncated": False,
        "binary": False,
        "note": None,
    }
    second = mcp.ok("read_file", {"sandbox": sb.id, "path": path, "start_line": 2, "max_lines": 1})
    assert second["content"] == "world\n"

    listing = mcp.ok("list_files", {"sandbox": sb.id, "path": str(workdir / "notes")})
    assert listing["total"] == 1
    assert listing["truncated"] is False
    [entry] = listing["entries"]
    assert entry["name"] == "hello.txt"
    assert entry["type"] == "file"
    assert entry["size"] == 13

    for i in range(5):
        (workdir / "notes" / f"more-{i}").mkdir()
    capped = mcp.ok(
        "list_files", {"sandbox": sb.id, "path": str(workdir / "notes"), "max_entries": 2}
    )
    assert capped["total"] == 6
    assert capped["truncated"] is True
    assert [e["name"] for e in capped["entries"]] == ["hello.txt", "more-0"]
    assert capped["entries"][1]["type"] == "dir"


def test_read_file_bounds_and_binary(mcp: McpClient, sb: Sandbox, daemon: Daemon) -> None:
    workdir = daemon.workdir(sb.id)
    (workdir / "big.txt").write_text("é" * 5000)  # 10,000 bytes
    big = mcp.ok(
        "read_file", {"sandbox": sb.id, "path": str(workdir / "big.txt"), "max_bytes": 1001}
    )
    assert big["truncated"] is True
    assert big["size"] == 10_000
    assert big["content"] == "é" * 500  # the character cut in two is dropped
    assert "max_bytes" in big["note"]

    (workdir / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 10)
    blob = mcp.ok("read_file", {"sandbox": sb.id, "path": str(workdir / "blob.bin")})
    assert blob["binary"] is True
    assert blob["content"] == ""
    assert blob["size"] == 70
    assert "binary" in blob["note"]

    missing = mcp.error("read_file", {"sandbox": sb.id, "path": str(workdir / "nope.txt")})
    assert "nope.txt" in missing
    assert "mode" in mcp.error(
        "write_file", {"sandbox": sb.id, "path": str(workdir / "x"), "content": "", "mode": "rwx"}
    )


# -- ports ------------------------------------------------------------------------------


def test_publish_and_list_ports(mcp: McpClient, sb: Sandbox, daemon: Daemon) -> None:
    published = mcp.ok("publish_port", {"sandbox": sb.id, "port": 8123})
    assert published["port"] == 8123
    assert published["url"].startswith("http://")
    assert f"{sb.name}-8123" in published["url"]
    # Nothing listens yet: the published URL answers, but with an error from the proxy.
    assert daemon.visit(published["url"]).status_code >= 500

    ports = mcp.ok("list_ports", {"sandbox": sb.id})
    assert ports["published"] == [
        {"port": 8123, "alias": f"{sb.name}-8123", "url": published["url"]}
    ]
    assert isinstance(ports["listening"], list)
    assert "8123" in mcp.error("publish_port", {"sandbox": sb.id, "port": 8123})
    assert "port" in mcp.error("publish_port", {"sandbox": sb.id, "port": 70000})

    assert mcp.ok("unpublish_port", {"sandbox": sb.name, "port": 8123}) == {"unpublished": 8123}
    assert mcp.ok("list_ports", {"sandbox": sb.id})["published"] == []
    assert daemon.visit(published["url"]).status_code == 404
    assert "port 8123 is not published" in mcp.error(
        "unpublish_port", {"sandbox": sb.id, "port": 8123}
    )
    assert "port" in mcp.error("unpublish_port", {"sandbox": sb.id, "port": 0})


# -- the daemon out of reach ------------------------------------------------------------


def test_unreachable_daemon_is_a_tool_error_not_a_crash(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"KILN_URL": f"http://127.0.0.1:{port}", "KILN_TOKEN": "kiln_nothing"}
    with mcp_client(env, tmp_path) as client:
        message = client.error("list_sandboxes")
        assert "cannot reach the kiln daemon" in message
        assert f"127.0.0.1:{port}" in message
        assert set(client.tools()) == TOOLS  # still serving


def test_finds_the_daemon_through_the_config_file_and_reports_a_wrong_key(
    daemon: Daemon, tmp_path: Path
) -> None:
    config = tmp_path / ".kiln" / "config.yaml"
    config.parent.mkdir()
    config.write_text(f"url: {daemon.url}\ntoken: kiln_wrong\n")
    with mcp_client({}, tmp_path) as client:  # no KILN_URL/KILN_TOKEN
        # The daemon named in the file answered, and refused the key.
        assert "invalid API key" in client.error("list_sandboxes")


# -- the command ------------------------------------------------------------------------


def test_ends_quietly_when_the_client_closes_stdin(tmp_path: Path) -> None:
    proc = _kiln_mcp(tmp_path, input=b"")
    assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr.decode()


def test_an_unusable_daemon_url_fails_before_serving(tmp_path: Path) -> None:
    proc = _kiln_mcp(tmp_path, "--url", "ftp://example", input=b"")
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert proc.stderr.decode().startswith("kiln: error: invalid daemon URL 'ftp://example'")


def _kiln_mcp(home: Path, *options: str, input: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [*kiln_argv(), *options, "mcp"],
        input=input,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_the_cli_does_not_import_the_mcp_sdk_until_kiln_mcp_runs() -> None:
    # The MCP SDK takes seconds to import; `kiln --help` and every other command must
    # not pay for it.
    probe = (
        "import sys\n"
        "from kiln.cli import run\n"
        "assert run(['--help']) == 0\n"
        "assert run(['mcp', '--help']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'mcp_types')"
        " or m.startswith('kiln.mcp_server')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, env=env, timeout=60, check=True
    )
    assert proc.stdout.decode().splitlines()[-1] == "[]"


# -- the README -------------------------------------------------------------------------


def test_the_readme_section_matches_the_server(mcp: McpClient) -> None:
    readme = (SRC.parent / "README.md").read_text()
    section = readme.split("## Using kiln from an MCP client", 1)[1].split("\n## ", 1)[0]
    snippet = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    server = snippet["mcpServers"]["kiln"]
    assert (server["command"], server["args"]) == ("kiln", ["mcp"])
    assert set(server["env"]) == {"KILN_URL", "KILN_TOKEN"}
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    assert documented == set(mcp.tools()) == TOOLS
