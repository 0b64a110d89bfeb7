"""``kiln mcp`` run as a real subprocess and driven by the MCP SDK's own stdio client.

The server talks to the SDK tests' real daemon (tests/sdk/conftest.py: real
HTTP, real SQLite, test-mode guest agents). Tests are plain functions: an anyio
blocking portal runs the client's event loop in a thread and keeps the session
open across calls, so one server process serves a whole test module.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_types import CallToolResult, TextContent, Tool

from cli.conftest import SRC, kiln_argv
from sdk.conftest import Daemon, kiln, running_daemon, unique

__all__ = ["Daemon", "McpClient", "daemon", "kiln", "mcp_client", "unique"]


@dataclass
class McpClient:
    """A connected MCP session to one ``kiln mcp`` process, usable from sync tests."""

    portal: BlockingPortal
    session: ClientSession
    stderr: Path

    def tools(self) -> dict[str, Tool]:
        listing = self.portal.call(self.session.list_tools)
        return {t.name: t for t in listing.tools}

    def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> CallToolResult:
        return self.portal.call(self.session.call_tool, name, dict(arguments or {}))

    def ok(self, name: str, arguments: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Call a tool that must succeed; its structured result."""
        result = self.call(name, arguments)
        assert not result.is_error, (name, error_text(result), self.stderr.read_text())
        assert result.structured_content is not None
        # The text content carries the same JSON, for clients that ignore structure.
        assert json.loads(error_text(result)) == result.structured_content
        return result.structured_content

    def error(self, name: str, arguments: Mapping[str, Any] | None = None) -> str:
        """Call a tool that must fail; the error text the agent sees."""
        result = self.call(name, arguments)
        assert result.is_error, (name, result.structured_content)
        return error_text(result)


def error_text(result: CallToolResult) -> str:
    [content] = result.content
    assert isinstance(content, TextContent)
    return content.text


@asynccontextmanager
async def _session(env: Mapping[str, str], errlog: IO[str]) -> AsyncIterator[ClientSession]:
    command, *args = kiln_argv()
    params = StdioServerParameters(command=command, args=[*args, "mcp"], env=dict(env))
    async with (
        stdio_client(params, errlog=errlog) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


@contextmanager
def mcp_client(env: Mapping[str, str], home: Path) -> Iterator[McpClient]:
    """Start ``kiln mcp`` with ``env`` (over a clean HOME) and connect to it."""
    full_env = {"HOME": str(home), "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(SRC)}
    full_env.update(env)
    stderr = home / "mcp-stderr.log"
    with (
        stderr.open("w") as errlog,
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(_session(full_env, errlog)) as session,
    ):
        yield McpClient(portal, session, stderr)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("mcp-daemon")) as d:
        yield d


@pytest.fixture(scope="module")
def mcp(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpClient]:
    env = {"KILN_URL": daemon.url, "KILN_TOKEN": daemon.token}
    with mcp_client(env, tmp_path_factory.mktemp("mcp-home")) as client:
        yield client
