"""Commands that work on this machine, not through the HTTP API: serve, user, image.

``user`` opens the daemon's SQLite store in the data dir directly (the
daemon may be running: SQLite's WAL makes that safe), so an administrator can
create the first user before any key exists. ``image`` builds and lists VM
images in the image cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import format as fmt
from .groups import AliasedGroup
from .output import console, show

if TYPE_CHECKING:
    from kiln.config import Config
    from kiln.store import Store

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The daemon's data dir [default: /var/lib/kiln as root, else ~/.local/share/kiln].",
)
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The daemon's YAML config file.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _config(config_path: Path | None, **overrides: object) -> Config:
    from kiln.config import load_config  # noqa: PLC0415

    return load_config(config_path, overrides)


@click.command()
@data_dir_option
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on [127.0.0.1:8080].")
@click.option(
    "--engine",
    type=click.Choice(["auto", "qemu", "docker"]),
    help="The default engine for new sandboxes [auto: qemu]; both run side by side.",
)
@click.option(
    "--runtime",
    "docker_runtime",
    type=click.Choice(["runc", "runsc"]),
    help="The Docker engine's default runtime [runc].",
)
@click.option(
    "--store",
    metavar="PATH|URL",
    help="The store: a SQLite file, or postgresql://user:pass@host/db [DATA_DIR/kiln.db].",
)
@click.option(
    "--node",
    metavar="NAME",
    help="With a PostgreSQL store: this daemon's node name [the host name].",
)
@click.option(
    "--advertise",
    metavar="URL",
    help="With a PostgreSQL store: the URL other nodes reach this daemon at [--listen].",
)
@config_option
def serve(
    *,
    data_dir: Path | None,
    listen: str | None,
    engine: str | None,
    docker_runtime: str | None,
    store: str | None,
    node: str | None,
    advertise: str | None,
    config_path: Path | None,
) -> None:
    """Run the kiln daemon in the foreground. On a PostgreSQL store it is a node of
    a cluster: see `kiln node --help` and the README's "Nodes"."""
    config = _config(
        config_path,
        data_dir=data_dir,
        store=store,
        listen=listen,
        engine=engine,
        **{"docker.runtime": docker_runtime, "cluster.node": node, "cluster.advertise": advertise},
    )
    from kiln.server import run  # noqa: PLC0415 - FastAPI is slow to import

    run(config)


# -- users ----------------------------------------------------------------------------


@click.group(cls=AliasedGroup)
def user() -> None:
    """Manage users and API keys (the daemon's store, opened directly).

    Run on the daemon's host: the store the config names (`store:`; by default
    the SQLite file in the data dir) is opened directly.
    """


@contextmanager
def _store(data_dir: Path | None, config_path: Path | None) -> Iterator[Store]:
    from kiln.store import Store  # noqa: PLC0415

    config = _config(config_path, data_dir=data_dir)
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with Store.open(config.store_target) as store:
        yield store


@user.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An administrator.")
@click.option("--max-sandboxes", type=click.IntRange(min=0), help="Quota: live sandboxes.")
@click.option("--max-cpus", type=click.IntRange(min=1), help="Quota: vCPUs per sandbox.")
@click.option("--max-memory", "max_memory_mb", type=click.IntRange(min=1), help="Quota: MiB.")
@click.option(
    "--max-image-disk",
    "max_image_disk_mb",
    type=click.IntRange(min=0),
    help="Quota: MiB of disk for the user's own images together.",
)
@json_option
@data_dir_option
@config_option
def user_create(
    *,
    name: str,
    as_json: bool,
    admin: bool,
    max_sandboxes: int | None,
    max_cpus: int | None,
    max_memory_mb: int | None,
    max_image_disk_mb: int | None,
    data_dir: Path | None,
    config_path: Path | None,
) -> None:
    """Create a user and print their API key (once)."""
    from kiln.store import Quotas  # noqa: PLC0415

    quotas = Quotas(
        max_sandboxes=max_sandboxes,
        max_cpus=max_cpus,
        max_memory_mb=max_memory_mb,
        max_image_disk_mb=max_image_disk_mb,
    )
    with _store(data_dir, config_path) as store:
        created, key = store.create_user(name, admin=admin, quotas=quotas)
    if as_json:
        click.echo(fmt.format_json({**fmt.user_dict(created), "api_key": key}))
    else:
        click.echo(fmt.format_key_notice(created.name, key))


@user.command("list")
@json_option
@data_dir_option
@config_option
def user_list(as_json: bool, data_dir: Path | None, config_path: Path | None) -> None:
    """List users."""
    with _store(data_dir, config_path) as store:
        users = store.list_users()
    if as_json:
        click.echo(fmt.format_json([fmt.user_dict(u) for u in users]))
    else:
        show(fmt.format_users_table(users, datetime.now(UTC)))


@user.command("rotate-key")
@click.argument("name")
@json_option
@data_dir_option
@config_option
def user_rotate_key(
    name: str, as_json: bool, data_dir: Path | None, config_path: Path | None
) -> None:
    """Replace a user's API key (the old one stops working) and print the new one."""
    with _store(data_dir, config_path) as store:
        key = store.rotate_key(store.user_by_name(name).id)
    if as_json:
        click.echo(fmt.format_json({"name": name, "api_key": key}))
    else:
        click.echo(fmt.format_key_notice(name, key))


@user.command("delete")
@click.argument("name")
@json_option
@data_dir_option
@config_option
def user_delete(name: str, as_json: bool, data_dir: Path | None, config_path: Path | None) -> None:
    """Delete a user (refused while they have live sandboxes)."""
    with _store(data_dir, config_path) as store:
        store.delete_user(store.user_by_name(name).id)
    click.echo(fmt.format_json({"deleted": name}) if as_json else f"user {name} deleted")


# -- images ---------------------------------------------------------------------------

image_dir_option = click.option(
    "--image-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Image cache [default: the config's image_dir, $KILN_IMAGE_DIR, ~/.cache/kiln/images].",
)


def _image_dir(image_dir: Path | None, config_path: Path | None) -> Path | None:
    """--image-dir, else the daemon config's ``image_dir``, else kiln.images' default (None)."""
    if image_dir is not None or config_path is None:
        return image_dir
    return _config(config_path).image_dir


@click.group(cls=AliasedGroup)
def image() -> None:
    """Build, list and delete images (your own and the daemon's; `cached`: this machine's)."""


def build_tier_here(
    tier: str, force: bool, image_dir: Path | None, config_path: Path | None
) -> None:
    """``kiln image build [TIER]`` without ``-f``: a built-in tier, in this machine's cache."""
    from kiln.images import build_image  # noqa: PLC0415

    image_dir = _image_dir(image_dir, config_path)
    err = console(stderr=True)
    with err.status(f"Building the {tier} image…") as status:

        def progress(message: str) -> None:
            err.print(f"[dim]•[/dim] {message}", highlight=False, markup=True)
            status.update(message)

        built = build_image(tier, image_dir, progress, force=force)
    click.echo(f"{built.tier} image {built.digest[:12]} ready: {built.path}")


@image.command("cached")
@json_option
@image_dir_option
@config_option
def image_cached(as_json: bool, image_dir: Path | None, config_path: Path | None) -> None:
    """List the VM images in this machine's cache (every build, current or not)."""
    from kiln.images import list_images  # noqa: PLC0415

    images = list_images(_image_dir(image_dir, config_path))
    if as_json:
        click.echo(fmt.format_json([fmt.image_dict(i) for i in images]))
    else:
        show(fmt.format_images_table(images, datetime.now(UTC)))
