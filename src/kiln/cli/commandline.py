"""Commands that end in a command line to run: ``kiln exec`` and ``kiln run``.

kiln's own options may come anywhere before the command starts: before or after
the sandbox name. The command starts at ``--`` or at the first word that is
neither an option nor one of the fixed arguments, and from there on everything
is passed verbatim, a later ``--`` included (``kiln exec dev git diff -- a.py``).
So ``kiln exec dev --cwd /tmp -- ls`` runs ``ls`` in /tmp, as users of docker or
kubectl expect, and an unknown option before the command is an error instead of
silently becoming the command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import click


def split_command_line(
    args: Sequence[str], arity: Mapping[str, int], fixed: int
) -> tuple[list[str], list[str], list[str]]:
    """``args`` → (option tokens, the ``fixed`` leading arguments, the command line).

    ``arity`` maps every option name (``--cwd``, ``-w``) to the number of values
    it takes; a name missing from it is left among the options for click to
    report as unknown.
    """
    options: list[str] = []
    positionals: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return options, positionals, list(args[i + 1 :])
        if token.startswith("-") and token != "-":
            take = _values_taken(token, arity)
            options.extend(args[i : i + 1 + take])
            i += 1 + take
            continue
        if len(positionals) < fixed:
            positionals.append(token)
            i += 1
            continue
        return options, positionals, list(args[i:])
    return options, positionals, []


def _values_taken(token: str, arity: Mapping[str, int]) -> int:
    """How many of the following tokens belong to the option ``token``."""
    if token.startswith("--"):
        name, eq, _ = token.partition("=")
        return 0 if eq else arity.get(name, 0)
    # A cluster of short options (-dw DIR, -w/tmp): the first that takes a
    # value takes the rest of the token, or the next token when nothing is left.
    for pos, char in enumerate(token[1:], start=1):
        n = arity.get("-" + char)
        if n is None:
            return 0  # unknown: click reports it
        if n:
            return 0 if token[pos + 1 :] else n
    return 0


class CommandLineCommand(click.Command):
    """A click command whose last argument (``nargs=-1``) is a command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        arity: dict[str, int] = {}
        fixed = 0
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                takes = 0 if param.is_flag or param.count else param.nargs
                for name in (*param.opts, *param.secondary_opts):
                    arity[name] = takes
            elif isinstance(param, click.Argument) and param.nargs == 1:
                fixed += 1
        options, positionals, command = split_command_line(args, arity, fixed)
        # "--" right after the options: click then takes everything as arguments.
        return super().parse_args(ctx, [*options, "--", *positionals, *command])
