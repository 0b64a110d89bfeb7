"""Printing: rich consoles made on demand (rich is imported only when something is printed)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

#: Width for tables written to a pipe or file: whole rows, no wrapping at 80 columns.
PIPE_WIDTH = 200


def console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr)."""
    from rich.console import Console  # noqa: PLC0415

    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else PIPE_WIDTH, highlight=False)


def show(renderable: RenderableType | str) -> None:
    """Print text as is, or a rich renderable (a table) to stdout."""
    if isinstance(renderable, str):
        click.echo(renderable)
    else:
        console().print(renderable)


@contextmanager
def spinner(message: str) -> Iterator[None]:
    """A spinner on stderr while waiting (nothing when stderr is not a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    with console(stderr=True).status(message):
        yield
