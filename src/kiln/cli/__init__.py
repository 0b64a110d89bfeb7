"""The ``kiln`` command line (click + rich).

Layout: :mod:`.app` declares the commands (thin: parse, call, print);
:mod:`.format` and :mod:`.args` are pure and unit-tested; :mod:`.output` prints
(rich, on demand); :mod:`.execio` and :mod:`.terminal` hold the streaming exec
and the interactive shell; :mod:`.local` the commands that work on this
machine rather than through the API (serve, user, image).

Every error ends as one line on stderr, ``kiln: error: <message>``, and a
non-zero exit status (1; 2 for usage errors; 130 on Ctrl+C); never a
traceback (set ``KILN_DEBUG=1`` to see one). Heavy modules (httpx, rich,
websockets, the server) are imported only by the commands that need them, so
``kiln version`` starts fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from .format import format_error

#: Known error roots, by module: an exception is only ever an instance of a class
#: whose module is loaded, so checking sys.modules costs no imports.
_ERROR_ROOTS = (
    ("kiln.sdk.errors", "KilnError"),
    ("kiln.config", "ConfigError"),
    ("kiln.store.errors", "StoreError"),
    ("kiln.images.errors", "ImageError"),
    ("kiln.server.daemon", "DaemonError"),
)


def _known_error(exc: BaseException) -> bool:
    for module_name, class_name in _ERROR_ROOTS:
        module = sys.modules.get(module_name)
        root = getattr(module, class_name, None) if module else None
        if isinstance(root, type) and isinstance(exc, root):
            return True
    return False


def _fail(message: str, code: int = 1) -> int:
    click.echo(format_error(message), err=True)
    return code


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv``; return the exit status (never raises, never a traceback)."""
    from .app import cli  # noqa: PLC0415 - keeps `import kiln.cli` cheap

    try:
        rv = cli.main(
            args=list(argv) if argv is not None else None, prog_name="kiln", standalone_mode=False
        )
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        return _fail(exc.format_message() + where, exc.exit_code)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except (click.Abort, KeyboardInterrupt):  # Ctrl+C, or end of input at a prompt
        return _fail("aborted", 130)
    except BrokenPipeError:
        # `kiln list | head`: the reader went away; nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if os.environ.get("KILN_DEBUG"):
            raise
        if _known_error(exc):
            return _fail(str(exc))
        if isinstance(exc, OSError):
            return _fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return _fail(
            f"internal error: {type(exc).__name__}: {exc} (KILN_DEBUG=1 shows a traceback)"
        )
    return rv if isinstance(rv, int) else 0


def main() -> None:
    """The ``kiln`` console script."""
    # httpx imports its own command line (click, rich, pygments: ~50 ms) unless that
    # import fails, which it handles; kiln never uses httpx's CLI.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    sys.exit(run())
