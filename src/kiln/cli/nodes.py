"""``kiln node ls|drain|undrain|rm``: the daemons of a cluster (admins only).

On a single daemon (a SQLite store) ``kiln node ls`` lists nothing and the others
answer that the daemon is not a cluster.
"""

from __future__ import annotations

import click

from . import format as fmt
from .app import State, _now, cli, json_option, pass_state
from .groups import AliasedGroup
from .output import show


@cli.group(cls=AliasedGroup)
def node() -> None:
    """See and drain the nodes of a cluster (admins)."""


@node.command("list")
@json_option
@pass_state
def node_list(state: State, as_json: bool) -> None:
    """List the nodes: status (active, draining, lost), what their sandboxes take, lease."""
    nodes = state.kiln().nodes.list()
    show(fmt.format_json(nodes) if as_json else fmt.format_nodes_table(nodes, _now()))


@node.command("drain")
@click.argument("name")
@json_option
@pass_state
def node_drain(state: State, name: str, as_json: bool) -> None:
    """Place no new sandbox on node NAME; its running sandboxes stay, its stopped ones
    move to other nodes (with a cluster.shared_dir)."""
    info = state.kiln().nodes.drain(name)
    show(fmt.format_json(info) if as_json else f"node {name} draining")


@node.command("undrain")
@click.argument("name")
@json_option
@pass_state
def node_undrain(state: State, name: str, as_json: bool) -> None:
    """Let node NAME take new sandboxes again."""
    info = state.kiln().nodes.undrain(name)
    show(fmt.format_json(info) if as_json else f"node {name} active")


@node.command("delete")
@click.argument("name")
@json_option
@pass_state
def node_delete(state: State, name: str, as_json: bool) -> None:
    """Forget node NAME (refused while sandboxes live there)."""
    state.kiln().nodes.delete(name)
    click.echo(fmt.format_json({"deleted": name}) if as_json else f"node {name} removed")
