"""``kiln mcp``: kiln's sandboxes as tools for AI agents, over the Model Context Protocol.

An MCP client (Claude Desktop, an IDE, an agent framework) starts ``kiln mcp``
and talks JSON-RPC to it on stdin/stdout; the tools (:mod:`.tools`) act through
kiln's async SDK on the daemon the CLI would use (``--url``/``--token``,
``KILN_URL``/``KILN_TOKEN``, ``~/.kiln/config.yaml``). Results are bounded
(:mod:`.bounds`) so a command's output cannot flood the agent's context.

Nothing here is imported by ``kiln --help``: the MCP SDK (pydantic, starlette)
takes a while to import.
"""

from __future__ import annotations


def serve(url: str | None = None, token: str | None = None) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin."""
    from kiln.sdk.config import load_settings  # noqa: PLC0415

    # A broken URL or config file fails here, before seconds of importing the MCP SDK.
    settings = load_settings(url, token)

    import anyio  # noqa: PLC0415 - see the module docstring

    from kiln.sdk import AsyncKiln  # noqa: PLC0415

    from .tools import build_server  # noqa: PLC0415

    async def main() -> None:
        async with AsyncKiln(settings.url, settings.token) as kiln:
            await build_server(kiln).run_stdio_async()

    anyio.run(main)
