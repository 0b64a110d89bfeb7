"""Command groups that answer to the names people type: ``ls`` or ``list``, ``rm`` or ``delete``."""

from __future__ import annotations

import click

#: Names that mean the same thing in every group; a group answers to any name of
#: a set when it has a command under one of them (``kiln volume ls``, ``kiln file list``).
SYNONYMS = (
    ("list", "ls"),
    ("delete", "rm", "destroy", "remove"),
    ("shell", "sh"),
)


class AliasedGroup(click.Group):
    """A click group that also resolves the synonyms of its commands' names."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        for names in SYNONYMS:
            if cmd_name in names:
                for other in names:
                    command = super().get_command(ctx, other)
                    if command is not None:
                        return command
        return None

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd else name), cmd, rest
