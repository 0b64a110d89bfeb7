"""``kiln image build|list|inspect|delete``: the daemon's image catalog through its API.

``kiln image build NAME -f FILE.yaml`` sends a package-list definition
(:mod:`kiln.images.definition`; ``source`` files are read here and sent as
content) and shows the build's progress: on a terminal a status line over the
finished steps, otherwise one line per step on stderr, each with the elapsed
time. Without ``-f`` it builds a built-in tier in this machine's cache, as it
always did (:func:`kiln.cli.local.build_tier_here`).

``kiln image build NAME -f Dockerfile`` (any file not ending in .yaml/.yml)
sends the Dockerfile and, as its build context, a tar of the directory it is
in (at most 16 MiB); the daemon's Docker engine builds it ``FROM minimal``.
"""

from __future__ import annotations

import io
import sys
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import format as fmt
from .app import State, _now, json_option, pass_state
from .local import build_tier_here, config_option, image, image_dir_option
from .output import console, show

#: As the daemon's limit (kiln.engine.docker.dockerfile.MAX_CONTEXT_BYTES), checked here
#: before sending: the CLI must not import the docker SDK.
MAX_CONTEXT_BYTES = 16 << 20

if TYPE_CHECKING:
    from kiln.sdk.models import ImageInfo


@image.command("build")
@click.argument("name", default="minimal")
@click.option(
    "-f",
    "--file",
    "definition",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A package-list definition (.yaml) or a Dockerfile (its directory is the build"
    " context): build NAME through the daemon.",
)
@click.option("--force", is_flag=True, help="Without -f: rebuild every step even if cached.")
@image_dir_option
@config_option
@json_option
@pass_state
def image_build(  # noqa: PLR0917 - click passes every option
    state: State,
    name: str,
    definition: Path | None,
    force: bool,
    image_dir: Path | None,
    config_path: Path | None,
    as_json: bool,
) -> None:
    """Build image NAME from -f FILE.yaml or -f Dockerfile through the daemon (yours;
    global if you are an admin). Without -f: build the built-in tier NAME [minimal]
    in this machine's cache (needs root and the network)."""
    if definition is None:
        build_tier_here(name, force, image_dir, config_path)
        return
    if definition.suffix in (".yaml", ".yml"):
        from kiln.images.definition import load_yaml_file  # noqa: PLC0415

        body = load_yaml_file(definition, name=name).to_json()
    else:
        body = _dockerfile_body(definition)
    started = time.monotonic()
    built = _build_with_progress(state, name, body, started)
    if as_json:
        show(fmt.format_json(built))
    else:
        size = fmt.format_bytes(built.size_bytes)
        took = time.monotonic() - started
        click.echo(f"image {built.name} ready ({built.scope}, {size}, {took:.1f} s)")


def _dockerfile_body(dockerfile: Path) -> dict[str, Any]:
    """The Dockerfile's text and, as its context, a tar of its directory."""
    try:
        text = dockerfile.read_text()
        context = _tar_directory(dockerfile.parent)
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {dockerfile}: {exc}") from None
    if len(context) > MAX_CONTEXT_BYTES:
        raise click.ClickException(
            f"the build context {dockerfile.parent} is larger than"
            f" {MAX_CONTEXT_BYTES >> 20} MiB: put the Dockerfile in a smaller directory"
        )
    return {"packages": [], "files": [], "env": {}, "dockerfile": text, "context": context}


def _tar_directory(directory: Path) -> bytes:
    """A tar of ``directory`` (sorted, owners root: what COPY gives is the file alone)."""

    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name, filter=as_root)
    return out.getvalue()


def _build_with_progress(
    state: State, name: str, body: dict[str, Any], started: float
) -> ImageInfo:
    images = state.kiln().images
    packages, files, env = body["packages"], body["files"], body["env"]
    extra = {k: body[k] for k in ("dockerfile", "context") if k in body}
    if not sys.stderr.isatty():

        def log_line(message: str) -> None:
            click.echo(f"[{time.monotonic() - started:6.1f} s] {message}", err=True)

        return images.build(
            name, packages=packages, files=files, env=env, progress=log_line, **extra
        )
    err = console(stderr=True)
    with err.status(f"Building image {name}…") as status:

        def progress(message: str) -> None:
            err.print(f"[dim]•[/dim] {message}", highlight=False, markup=True)
            status.update(f"{message} ({time.monotonic() - started:.0f} s)")

        return images.build(
            name, packages=packages, files=files, env=env, progress=progress, **extra
        )


@image.command("list")
@json_option
@pass_state
def image_list(state: State, as_json: bool) -> None:
    """List the images you can start sandboxes from: tiers, global ones, your own."""
    images = state.kiln().images.list()
    show(fmt.format_json(images) if as_json else fmt.format_catalog_table(images, _now()))


owner_option = click.option(
    "--owner", metavar="USER", help="Admins: the user (id or name) whose image is meant."
)


@image.command("inspect")
@click.argument("name")
@owner_option
@json_option
@pass_state
def image_inspect(state: State, name: str, owner: str | None, as_json: bool) -> None:
    """Show one image: kind, scope, packages, files, env, size."""
    info = state.kiln().images.get(name, owner=owner)
    show(fmt.format_json(info) if as_json else fmt.format_image_detail(info))


@image.command("delete")
@click.argument("name")
@owner_option
@json_option
@pass_state
def image_delete(state: State, name: str, owner: str | None, as_json: bool) -> None:
    """Delete your image (admins: a global one, or --owner's); refused while a sandbox
    uses it."""
    state.kiln().images.delete(name, owner=owner)
    click.echo(fmt.format_json({"deleted": name}) if as_json else f"image {name} deleted")
