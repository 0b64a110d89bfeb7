"""``kiln port list/publish/unpublish`` (and the older ``kiln ports``) as real processes.

The port is the real web service of ``tests/server/upstream.py``, "inside"
every sandbox because test-mode agents share the test's network; a published
URL is visited as a browser would, with its ``Host`` and no key
(:meth:`Daemon.visit`).
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from kiln.cli import EXIT_CODES
from kiln.sdk import Kiln, Sandbox
from server.upstream import Upstream

from .conftest import Cli, Daemon, unique
from .test_commands import assert_one_line_error


def table_rows(text: str) -> list[list[str]]:
    """A rich table printed to a pipe → the header's and each row's cells."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    return [cells for cells in lines if not cells[0].startswith("─")]


def test_publish_list_and_unpublish(
    cli: Cli, daemon: Daemon, sb: Sandbox, upstream: Upstream
) -> None:
    port = str(upstream.port)
    proxy = f"{daemon.url}/sandboxes/{sb.id}/proxy/{port}/"

    url = cli.ok("port", "publish", sb.name, port).strip()
    assert urlsplit(url).netloc == f"{sb.name}-{port}.localhost:{urlsplit(daemon.url).port}"
    resp = daemon.visit(url, "/echo/from-cli")
    assert resp.status_code == 200, resp.text
    assert resp.json()["raw_path"] == "/echo/from-cli"

    header, *rows = table_rows(cli.ok("port", "ls", sb.name))
    assert header == ["PORT", "URL", "PUBLIC"]
    assert [port, proxy, url] in rows
    # Other ports listening in the test's network are there too, unpublished.
    assert all(row[2] == "-" for row in rows if row[0] != port)

    header, *rows = table_rows(cli.ok("port", "list"))
    assert header == ["SANDBOX", "PORT", "URL", "PUBLIC"]
    assert [sb.name, port, proxy, url] in rows

    [entry] = [
        e
        for e in json.loads(cli.ok("port", "ls", "--json"))
        if e["sandbox_id"] == sb.id and e["port"] == upstream.port
    ]
    assert (entry["url"], entry["published_url"], entry["sandbox_name"]) == (proxy, url, sb.name)

    assert cli.ok("port", "unpublish", sb.name, port) == f"unpublished port {port} of {sb.name}\n"
    assert daemon.visit(url, "/echo/").status_code == 404
    _, *rows = table_rows(cli.ok("port", "ls", sb.name))
    assert [port, proxy, "-"] in rows


def test_the_old_ports_command_still_lists(
    cli: Cli, daemon: Daemon, sb: Sandbox, upstream: Upstream
) -> None:
    url = sb.publish(upstream.port)
    proxy = f"{daemon.url}/sandboxes/{sb.id}/proxy/{upstream.port}/"
    _, *rows = table_rows(cli.ok("ports", sb.name))
    assert [str(upstream.port), proxy, url] in rows
    [entry] = [
        e for e in json.loads(cli.ok("ports", sb.name, "--json")) if e["port"] == upstream.port
    ]
    assert entry["published_url"] == url
    # Hidden: kiln port list is the one documented.
    listed = [line.split()[0] for line in cli.ok("--help").splitlines() if line.startswith("  ")]
    assert "port" in listed and "ports" not in listed


def test_publish_with_an_alias_and_json(
    cli: Cli, daemon: Daemon, sb: Sandbox, upstream: Upstream
) -> None:
    alias = unique("app")
    rule = json.loads(
        cli.ok("port", "publish", sb.name, str(upstream.port), "--alias", alias, "--json")
    )
    assert (rule["alias"], rule["port"], rule["sandbox_id"]) == (alias, upstream.port, sb.id)
    assert urlsplit(rule["url"]).hostname == f"{alias}.localhost"
    assert daemon.visit(rule["url"], "/echo/json").json()["raw_path"] == "/echo/json"


def test_publish_errors(cli: Cli, kiln: Kiln, sb: Sandbox, upstream: Upstream) -> None:
    port = str(upstream.port)
    url = cli.ok("port", "publish", sb.name, port).strip()
    alias = f"{sb.name}-{port}"

    again = cli("port", "publish", sb.name, port)
    assert again.returncode == EXIT_CODES["conflict"]
    assert_one_line_error(
        again, f"port {port} of {sb.name} is already published as {alias} ({url})"
    )

    with kiln.sandboxes.create(name=unique("other")) as other:
        taken = cli("port", "publish", other.name, port, "--alias", alias)
        assert taken.returncode == EXIT_CODES["conflict"]
        assert_one_line_error(
            taken, f"alias '{alias}' is already in use; choose another with --alias"
        )
        assert other.published() == []

    bad_alias = cli("port", "publish", sb.name, "8000", "--alias", "My_App")
    assert bad_alias.returncode == 2
    assert_one_line_error(bad_alias, "invalid alias 'My_App'", "lowercase")
    for bad_port in ("0", "65536", "http"):
        proc = cli("port", "publish", sb.name, bad_port)
        assert proc.returncode == 2
        assert_one_line_error(proc, "PORT")
    assert_one_line_error(cli("port", "publish", "no-such-sandbox", port), "no-such-sandbox")
    assert [p.port for p in sb.published()] == [upstream.port]


def test_unpublish_errors(cli: Cli, sb: Sandbox, upstream: Upstream) -> None:
    not_yet = cli("port", "unpublish", sb.name, "8000")
    assert not_yet.returncode == EXIT_CODES["not found"]
    assert_one_line_error(not_yet, f"port 8000 of {sb.name} is not published")
    assert "published:" not in not_yet.stderr.decode()

    sb.publish(upstream.port)
    other_port = cli("port", "unpublish", sb.name, "8000")
    assert_one_line_error(
        other_port, f"port 8000 of {sb.name} is not published (published: {upstream.port})"
    )

    missing = cli("port", "unpublish", "no-such-sandbox", "8000")
    assert missing.returncode == EXIT_CODES["not found"]
    assert_one_line_error(missing, "sandbox 'no-such-sandbox' not found")
