"""The ``kiln`` command line (click + rich).

Layout: :mod:`.app` declares the commands (thin: parse, call, print);
:mod:`.format` and :mod:`.args` are pure and unit-tested; :mod:`.output` prints
(rich, on demand); :mod:`.execio` and :mod:`.terminal` hold the streaming exec
and the interactive shell; :mod:`.local` the commands that work on this
machine rather than through the API (serve, user, image).

Every error ends as one line on stderr, ``kiln: error: <message>``, and a
non-zero exit status that tells scripts what went wrong (:data:`EXIT_CODES`);
never a traceback (set ``KILN_DEBUG=1`` to see one). Heavy modules (httpx, rich,
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


#: Exit statuses by cause. ``kiln exec`` and ``kiln run`` exit with the command's
#: own status once it ran; these are for kiln's failures around it.
EXIT_CODES = {
    "error": 1,  # anything else the daemon or kiln refused
    "usage": 2,  # a bad option or argument (click)
    "not found": 3,  # 404: no such sandbox, volume, file, ...
    "conflict": 4,  # 409: a name taken, a volume in use, a port already published
    "unauthorized": 5,  # 401/403: a missing or wrong key, not yours, over quota
    "unreachable": 6,  # the daemon could not be reached or timed out
    "interrupted": 130,  # Ctrl+C
}

#: SDK error classes (kiln.sdk.errors) → cause; the first match along the MRO wins.
_SDK_CAUSES = {
    "NotFound": "not found",
    "Conflict": "conflict",
    "AuthenticationError": "unauthorized",
    "PermissionDenied": "unauthorized",
    "ConnectionError": "unreachable",
}


def exit_code_of(exc: BaseException) -> int:
    """The exit status for an error that reached the top (see :data:`EXIT_CODES`)."""
    for cls in type(exc).__mro__:
        if cls.__module__ == "kiln.sdk.errors" and cls.__name__ in _SDK_CAUSES:
            return EXIT_CODES[_SDK_CAUSES[cls.__name__]]
    return EXIT_CODES["error"]


class Failure(click.ClickException):
    """A one-line error with the exit status of its cause (a key of :data:`EXIT_CODES`)."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.exit_code = EXIT_CODES[cause]  # type: ignore[misc]  # click's is a class default


def _known_error(exc: BaseException) -> bool:
    for module_name, class_name in _ERROR_ROOTS:
        module = sys.modules.get(module_name)
        root = getattr(module, class_name, None) if module else None
        if isinstance(root, type) and isinstance(exc, root):
            return True
    return False


def _hint(exc: BaseException) -> str:
    # A key from an old config file (a daemon re-installed with a new data directory
    # has new keys) looks like any wrong key; say where to look.
    if type(exc).__name__ == "AuthenticationError":
        return " (`kiln config show` prints which key the CLI sends and where it came from)"
    return ""


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
        return _fail("aborted", EXIT_CODES["interrupted"])
    except BrokenPipeError:
        # `kiln list | head`: the reader went away; nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if os.environ.get("KILN_DEBUG"):
            raise
        if _known_error(exc):
            return _fail(str(exc) + _hint(exc), exit_code_of(exc))
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
