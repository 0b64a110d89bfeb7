"""The ``kiln`` command tree. Commands parse, call the SDK, and print what :mod:`.format` returns.

Imports of httpx (through :mod:`kiln.sdk`), rich and the server happen inside
the commands that need them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import Failure, exit_code_of
from . import args as parse
from . import format as fmt
from .commandline import CommandLineCommand
from .groups import AliasedGroup
from .output import show, spinner

if TYPE_CHECKING:
    from kiln.sdk import Kiln, SandboxRef
    from kiln.sdk.models import SandboxInfo

T = TypeVar("T")


@dataclass
class State:
    """Per-invocation state: global options and the lazily made client."""

    url: str | None = None
    token: str | None = None
    _kiln: Kiln | None = field(default=None, repr=False)

    def kiln(self) -> Kiln:
        if self._kiln is None:
            from kiln.sdk import Kiln  # noqa: PLC0415 - httpx is slow to import

            self._kiln = Kiln(self.url, self.token)
            click.get_current_context().call_on_close(self._kiln.close)
        return self._kiln

    def sandbox(self, id_or_name: str) -> SandboxRef:
        return self.kiln().sandboxes.ref(id_or_name)


pass_state = click.make_pass_decorator(State, ensure=True)


def _now() -> datetime:
    return datetime.now(UTC)


def _converter(fn: Callable[[str], T]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback applying a pure parser to one value or to each of many."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            if value is None:
                return None
            if isinstance(value, tuple):
                return [fn(v) for v in value]
            return fn(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def _env_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    try:
        return parse.parse_env(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _labels_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    try:
        return parse.parse_labels(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
label_option = click.option(
    "-l",
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_labels_callback,
    help="Label (repeatable).",
)
ttl_option = click.option(
    "--ttl",
    "ttl_s",
    metavar="DURATION",
    callback=_converter(parse.parse_duration),
    help="Lifetime: 90s, 30m, 1h, 2d or seconds; then --on-expire happens [default: none].",
)
on_expire_option = click.option(
    "--on-expire",
    type=click.Choice(["destroy", "stop"]),
    help="What the daemon does when the ttl is up [default: destroy].",
)
# The sandbox spec options `create` and `run` share.
name_option = click.option("--name", help="Sandbox name (generated when absent).")
cpus_option = click.option("--cpus", type=click.IntRange(1, 64), help="vCPUs [default: 1].")
memory_option = click.option(
    "--memory",
    "memory_mb",
    metavar="SIZE",
    callback=_converter(parse.parse_size_mb),
    help="Memory in MiB or with a unit (512, 2G) [default: 512].",
)
env_option = click.option(
    "-e",
    "--env",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_env_callback,
    help="Environment variable of the sandbox (repeatable).",
)
image_option = click.option("--image", help="Image tier [default: the daemon's default].")
engine_option = click.option(
    "--engine",
    type=click.Choice(["qemu", "docker"]),
    help="qemu: a microVM with its own kernel; docker: a container [default: the daemon's].",
)
runtime_option = click.option(
    "--runtime",
    type=click.Choice(["runc", "runsc"]),
    help="Docker runtime: runc, or runsc (gVisor); implies --engine docker"
    " [default: the daemon's].",
)
egress_option = click.option(
    "--egress",
    type=click.Choice(["allow", "deny"]),
    help="Connections outside kiln not matched by --allow/--deny [default: the daemon's, allow].",
)
allow_option = click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="CIDR|DOMAIN",
    help="Always reachable, e.g. --egress deny --allow pypi.org (repeatable).",
)
deny_option = click.option(
    "--deny",
    "deny",
    multiple=True,
    metavar="CIDR|DOMAIN",
    help="Never reachable, unless also in --allow (repeatable).",
)


def _network(egress: str | None, allow: tuple[str, ...], deny: tuple[str, ...]) -> Any:
    """The egress policy the options ask for; None (the daemon's default) when none is given."""
    if egress is None and not allow and not deny:
        return None
    from kiln.sdk import NetworkPolicy  # noqa: PLC0415

    return NetworkPolicy(egress or "allow", allow, deny)


# The command options `exec` and `run` share.
cwd_option = click.option(
    "-w", "--cwd", metavar="DIR", help="Working directory [default: /workspace]."
)
timeout_option = click.option(
    "--timeout",
    metavar="SECONDS",
    type=click.FloatRange(min=0, min_open=True),
    help="Kill the command after SECONDS (exit code 124).",
)
stdin_option = click.option(
    "--stdin/--no-stdin",
    "stdin",
    default=None,
    help="Forward stdin [default: when it is a pipe or a file].",
)


# -- the group ------------------------------------------------------------------------


@click.group(cls=AliasedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    metavar="URL",
    help="Daemon URL [precedence: flag > $KILN_URL > ~/.kiln/config.yaml > http://127.0.0.1:8080].",
)
@click.option(
    "--token",
    metavar="KEY",
    help="API key [flag > $KILN_TOKEN > ~/.kiln/config.yaml].",
)
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None) -> None:
    """kiln: self-hosted microVM sandboxes for AI coding agents."""
    ctx.obj = State(url=url, token=token)


@cli.command()
def version() -> None:
    """Print the kiln version."""
    from kiln import __version__  # noqa: PLC0415

    click.echo(f"kiln {__version__}")


@cli.command()
@click.option("--url", "url_opt", metavar="URL", help="Daemon URL (prompted when interactive).")
@click.option("--token", "token_opt", metavar="KEY", help="API key (prompted, masked).")
@pass_state
def setup(state: State, url_opt: str | None, token_opt: str | None) -> None:
    """Save the daemon URL and API key to ~/.kiln/config.yaml.

    The file is written with mode 0600. The key is checked against the daemon
    with an authenticated call first; nothing is written when that fails.
    Without --token the key is asked for (hidden) or, when stdin is not a
    terminal, read from stdin.
    """
    from kiln.sdk import Kiln  # noqa: PLC0415
    from kiln.sdk.config import load_settings, write_config_file  # noqa: PLC0415

    url = url_opt or state.url
    token = token_opt or state.token
    interactive = sys.stdin.isatty()
    if url is None:
        current = load_settings().url
        url = click.prompt("Daemon URL", default=current) if interactive else current
    if token is None:
        if interactive:
            token = click.prompt("API key", hide_input=True)
        else:
            token = sys.stdin.readline().strip()
    if not token:
        raise click.UsageError("no API key given (use --token, or type it at the prompt)")
    with spinner(f"Checking the key against {url}"), Kiln(url, token) as k:
        k.sandboxes.list()  # an authenticated call: a wrong key fails here
        checked_url = k.url
    path = write_config_file(checked_url, token)
    click.echo(f"kiln: key accepted by {checked_url}; saved to {path}")


@cli.group("config", cls=AliasedGroup)
def config_group() -> None:
    """The client's own settings: which daemon and key it uses."""


@config_group.command("show")
@json_option
@pass_state
def config_show(state: State, as_json: bool) -> None:
    """Print the daemon URL and key the CLI would use, and where each came from.

    Precedence: --url/--token, then $KILN_URL/$KILN_TOKEN, then
    ~/.kiln/config.yaml, then http://127.0.0.1:8080. The key is shown masked.
    """
    from kiln.sdk.config import config_path, load_settings  # noqa: PLC0415

    settings = load_settings(state.url, state.token)
    path = config_path()
    info = {
        "url": settings.url,
        "url_source": settings.url_source,
        "token": mask_key(settings.token),
        "token_source": settings.token_source,
        "config_file": str(path),
        "config_file_exists": path.is_file(),
    }
    if as_json:
        show(fmt.format_json(info))
        return
    file_note = "" if info["config_file_exists"] else " (not present)"
    show(
        f"url:          {settings.url}  [{settings.url_source}]\n"
        f"token:        {info['token'] or '-'}  [{settings.token_source or 'none'}]\n"
        f"config file:  {path}{file_note}"
    )


def mask_key(token: str | None) -> str | None:
    """Enough of a key to tell two apart, not enough to use it."""
    if token is None:
        return None
    return token[:9] + "…" + token[-4:] if len(token) > 16 else "…"


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(kiln completion bash)"      (e.g. in ~/.bashrc)
    zsh:   eval "$(kiln completion zsh)"       (e.g. in ~/.zshrc)
    fish:  kiln completion fish > ~/.config/fish/completions/kiln.fish
    """
    from click.shell_completion import get_completion_class  # noqa: PLC0415

    completer = get_completion_class(shell)
    assert completer is not None  # click ships all three
    click.echo(completer(cli, {}, "kiln", "_KILN_COMPLETE").source())


@cli.command()
@json_option
@pass_state
def health(state: State, as_json: bool) -> None:
    """Show the daemon's status (no key needed)."""
    k = state.kiln()
    info = k.health()
    show(fmt.format_json(info) if as_json else fmt.format_health(info, k.url))


@cli.command()
@pass_state
def mcp(state: State) -> None:
    """Serve kiln's tools to an AI agent over MCP (stdio).

    An MCP client starts this command and speaks JSON-RPC on its stdin and
    stdout: tools to create, list and destroy sandboxes, run commands, start
    and read background processes, read, write and list files, and publish
    ports. It talks to the daemon --url/--token name (or $KILN_URL/$KILN_TOKEN,
    ~/.kiln/config.yaml) and ends when the client closes stdin.
    """
    from kiln.mcp_server import serve  # noqa: PLC0415 - the MCP SDK is slow to import

    serve(state.url, state.token)


# -- sandboxes ------------------------------------------------------------------------


@cli.command()
@name_option
@cpus_option
@memory_option
@env_option
@click.option(
    "--secret", "secrets", multiple=True, metavar="NAME", help="Secret to add to env (repeatable)."
)
@click.option("--init", metavar="SCRIPT", help="Shell script run as TTY session 'init'.")
@click.option("--keep-hot", is_flag=True, default=None, help="Never pause or snapshot it.")
@image_option
@engine_option
@runtime_option
@egress_option
@allow_option
@deny_option
@click.option("--template", metavar="ID", help="Start from a template (id or name).")
@click.option(
    "--from-saved",
    "saved_image",
    metavar="NAME",
    help="Start from your saved image NAME (see `kiln save`).",
)
@click.option(
    "-v",
    "--volume",
    "volumes",
    multiple=True,
    metavar="NAME:/MOUNT",
    callback=_converter(parse.parse_volume),
    help="Attach an existing volume (repeatable).",
)
@click.option(
    "--new-volume",
    "new_volumes",
    multiple=True,
    metavar="NAME:SIZE:/MOUNT",
    callback=_converter(parse.parse_new_volume),
    help="Create and attach a volume (repeatable).",
)
@label_option
@ttl_option
@on_expire_option
@json_option
@pass_state
def create(
    state: State,
    *,
    name: str | None,
    cpus: int | None,
    memory_mb: int | None,
    env: dict[str, str],
    secrets: tuple[str, ...],
    init: str | None,
    keep_hot: bool | None,
    image: str | None,
    engine: str | None,
    runtime: str | None,
    egress: str | None,
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    template: str | None,
    saved_image: str | None,
    volumes: list[tuple[str, str]],
    new_volumes: list[tuple[str, int, str]],
    labels: dict[str, str],
    ttl_s: float | None,
    on_expire: str | None,
    as_json: bool,
) -> None:
    """Create a sandbox and print it.

    --engine qemu makes a microVM (its own kernel, snapshots: it can go cold
    and a stop keeps its memory); --engine docker a container (host speed,
    no snapshots: a stop keeps its files but ends its processes), on runc or
    on runsc (gVisor) with --runtime.

    --egress, --allow and --deny set where it may connect outside kiln; it never
    reaches the host, cloud metadata or other users' sandboxes whatever they say.

    With --ttl the daemon destroys it (or stops it: --on-expire stop) once the
    time is up, even if the daemon was down meanwhile; `kiln edit --ttl`
    restarts or removes the countdown.

    --from-saved starts it from a sandbox you saved with `kiln save`: its files,
    and on QEMU its running processes; it has that sandbox's image, shape, engine,
    env and init (giving others is an error).
    """
    from kiln.sdk import NewVolume, VolumeMount  # noqa: PLC0415

    k = state.kiln()
    with spinner("Creating sandbox…"):
        sb = k.sandboxes.create(
            name=name,
            cpus=cpus,
            memory_mb=memory_mb,
            env=env,
            secrets=list(secrets),
            init=init,
            keep_hot=keep_hot,
            image=image,
            template=template,
            volumes=[VolumeMount(n, m) for n, m in volumes],
            new_volumes=[NewVolume(n, size, m) for n, size, m in new_volumes],
            labels=labels,
            ttl_s=ttl_s,
            on_expire=on_expire,
            engine=parse.engine_for(engine, runtime),
            runtime=runtime,
            network=_network(egress, allow, deny),
            saved_image=saved_image,
        )
    show(fmt.format_json(sb) if as_json else fmt.format_sandbox(sb, _now()))


@cli.command("list")
@json_option
@click.option("-q", "--quiet", is_flag=True, help="Print ids only.")
@click.option(
    "-l",
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_labels_callback,
    help="Only sandboxes with this label (repeatable: all must match).",
)
@pass_state
def list_(state: State, as_json: bool, quiet: bool, labels: dict[str, str]) -> None:
    """List your sandboxes (alias: ls).

    ENGINE is qemu, or docker/RUNTIME; EXPIRES is when a sandbox's --ttl runs
    out ("-": never); --label keeps only the sandboxes carrying every label given.
    """
    sandboxes = state.kiln().sandboxes.list(labels=labels)
    if as_json:
        show(fmt.format_json(sandboxes))
    elif quiet:
        for sb in sandboxes:
            click.echo(sb.id)
    else:
        show(fmt.format_sandbox_table(sandboxes, _now()))


@cli.command()
@click.argument("sandboxes", nargs=-1, required=True)
@json_option
@pass_state
def inspect(state: State, sandboxes: tuple[str, ...], as_json: bool) -> int:
    """Show sandboxes (by id or name); --json: an object for one, an array for several."""
    found, status = for_each(sandboxes, state.kiln().sandboxes.get)
    if as_json:
        show(fmt.format_json(found[0] if len(sandboxes) == 1 and found else found))
    else:
        show("\n\n".join(fmt.format_sandbox(sb, _now()) for sb in found))
    return status


@cli.command()
@click.argument("sandbox")
@click.option("--name", "new_name", help="New name.")
@click.option(
    "--keep-hot/--allow-cold", default=None, help="Pin it hot, or let it pause and snapshot."
)
@click.option(
    "-l",
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_labels_callback,
    help="Replace the labels with these (repeatable).",
)
@click.option("--clear-labels", is_flag=True, help="Remove every label.")
@click.option(
    "--ttl",
    "ttl",
    metavar="DURATION",
    help="Expire DURATION from now (90s, 30m, 1h, 2d); 'none' never expires.",
)
@on_expire_option
@json_option
@pass_state
def edit(
    state: State,
    *,
    sandbox: str,
    new_name: str | None,
    keep_hot: bool | None,
    labels: dict[str, str],
    clear_labels: bool,
    ttl: str | None,
    on_expire: str | None,
    as_json: bool,
) -> None:
    """Change a sandbox: name, keep-hot, labels, expiry."""
    from kiln.sdk._api import UNCHANGED  # noqa: PLC0415

    if labels and clear_labels:
        raise click.UsageError("--label and --clear-labels do not go together")
    if not (new_name or keep_hot is not None or labels or clear_labels or ttl or on_expire):
        raise click.UsageError(
            "nothing to change: give --name, --keep-hot/--allow-cold, --label, --clear-labels,"
            " --ttl or --on-expire"
        )
    try:
        ttl_s = UNCHANGED if ttl is None else parse.parse_ttl(ttl)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--ttl'") from None
    sb = state.sandbox(sandbox).update(
        name=new_name,
        keep_hot=keep_hot,
        labels={} if clear_labels else (labels or None),
        ttl_s=ttl_s,
        on_expire=on_expire,
    )
    show(fmt.format_json(sb) if as_json else fmt.format_sandbox(sb, _now()))


@cli.command()
@click.argument("sandbox")
@click.option("--name", "name", metavar="NAME", help="The copy's name (default: its id).")
@json_option
@pass_state
def fork(state: State, sandbox: str, name: str | None, as_json: bool) -> None:
    """Fork a sandbox: a new one whose disk, memory and running processes are a
    copy of SANDBOX's now, with its own address, hostname and token. Both go on
    independently. Needs an engine that can (QEMU) and no volumes attached."""
    with spinner(f"Forking {sandbox}…"):
        sb = state.sandbox(sandbox).fork(name=name)
    show(fmt.format_json(sb) if as_json else fmt.format_sandbox(sb, _now()))


@cli.command()
@click.argument("sandbox")
@click.argument("name")
@json_option
@pass_state
def save(state: State, sandbox: str, name: str, as_json: bool) -> None:
    """Save SANDBOX as an image called NAME, private to you.

    The image holds its disk and, on QEMU, its memory: sandboxes created from it
    (`kiln create --from-saved NAME`) start with its processes running and its
    caches warm. SANDBOX goes on running (it stands still for a moment). The
    image stays until `kiln saved delete NAME`.
    """
    with spinner(f"Saving {sandbox}…"):
        saved = state.sandbox(sandbox).save_image(name)
    show(fmt.format_json(saved) if as_json else fmt.format_saved(saved))


@cli.command()
@click.argument("sandboxes", nargs=-1, required=True)
@json_option
@pass_state
def stop(state: State, sandboxes: tuple[str, ...], as_json: bool) -> int:
    """Stop sandboxes.

    A sandbox with snapshots (QEMU) is saved to disk, memory and processes
    included, and `kiln start` restores it as it was. One without (Docker)
    keeps its files but its processes end; `kiln start` boots it again.
    """

    def one(ref: str) -> SandboxInfo:
        with spinner(f"Stopping {ref}…"):
            sb = state.sandbox(ref).stop()
        if not as_json:
            click.echo(fmt.format_stopped(sb))
        return sb

    stopped, status = for_each(sandboxes, one)
    if as_json:
        show(fmt.format_json(stopped))
    return status


@cli.command()
@click.argument("sandboxes", nargs=-1, required=True)
@json_option
@pass_state
def start(state: State, sandboxes: tuple[str, ...], as_json: bool) -> int:
    """Start stopped sandboxes: restored from their snapshots, or booted again."""

    def one(ref: str) -> SandboxInfo:
        with spinner(f"Starting {ref}…"):
            sb = state.sandbox(ref).start()
        if not as_json:
            click.echo(f"{sb.name}: {sb.status}")
        return sb

    started, status = for_each(sandboxes, one)
    if as_json:
        show(fmt.format_json(started))
    return status


@cli.command()
@click.argument("sandboxes", nargs=-1, required=True)
@json_option
@pass_state
def destroy(state: State, sandboxes: tuple[str, ...], as_json: bool) -> int:
    """Destroy sandboxes and free their resources (alias: rm)."""

    def one(ref: str) -> str:
        state.sandbox(ref).delete()
        if not as_json:
            click.echo(f"destroyed {ref}")
        return ref

    destroyed, status = for_each(sandboxes, one)
    if as_json:
        show(fmt.format_json([{"deleted": ref} for ref in destroyed]))
    return status


def for_each(refs: tuple[str, ...], action: Callable[[str], T]) -> tuple[list[T], int]:
    """Apply ``action`` to every sandbox, going on past failures (one line each on stderr).

    Returns the results and the exit status: 0, or that of the last failure.
    """
    from kiln.sdk import KilnError  # noqa: PLC0415

    results: list[T] = []
    status = 0
    for ref in refs:
        try:
            results.append(action(ref))
        except KilnError as exc:
            status = exit_code_of(exc)
            click.echo(fmt.format_error(f"{ref}: {exc}"), err=True)
    return results, status


@cli.command(cls=CommandLineCommand)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--rm", is_flag=True, help="Destroy the sandbox afterwards (also on Ctrl+C).")
@name_option
@image_option
@engine_option
@runtime_option
@egress_option
@allow_option
@deny_option
@cpus_option
@memory_option
@env_option
@label_option
@ttl_option
@on_expire_option
@cwd_option
@timeout_option
@stdin_option
@pass_state
def run(
    state: State,
    *,
    cmd: tuple[str, ...],
    rm: bool,
    name: str | None,
    image: str | None,
    engine: str | None,
    runtime: str | None,
    egress: str | None,
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    cpus: int | None,
    memory_mb: int | None,
    env: dict[str, str],
    labels: dict[str, str],
    ttl_s: float | None,
    on_expire: str | None,
    cwd: str | None,
    timeout: float | None,
    stdin: bool | None,
) -> int:
    """Run a command in a new sandbox (--rm: destroyed afterwards).

    kiln run [--rm] [OPTIONS] -- CMD [ARGS...]

    Output streams live and kiln exits with the command's exit code. With --rm
    the sandbox is destroyed afterwards, however the command ends (exit, error,
    Ctrl+C); without it the sandbox stays and its name is printed on stderr.
    """
    from .execio import forward_stdin_wanted  # noqa: PLC0415
    from .run import run_in_new_sandbox  # noqa: PLC0415

    argv = list(cmd)
    if not argv:
        raise click.UsageError("missing the command to run (kiln run [--rm] -- CMD [ARGS...])")
    spec = {
        "name": name,
        "image": image,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "env": env,
        "labels": labels,
        "ttl_s": ttl_s,
        "on_expire": on_expire,
        "engine": parse.engine_for(engine, runtime),
        "runtime": runtime,
        "network": _network(egress, allow, deny),
    }
    return run_in_new_sandbox(
        state.kiln(),
        argv,
        spec=spec,
        rm=rm,
        cwd=cwd,
        timeout_s=timeout,
        stdin=sys.stdin.buffer if forward_stdin_wanted(stdin) else None,
        announce=lambda sandbox_name: click.echo(f"kiln: sandbox {sandbox_name}", err=True),
    )


# -- exec and shell -------------------------------------------------------------------


@cli.command(cls=CommandLineCommand)
@click.argument("sandbox")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "-e",
    "--env",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_env_callback,
    help="Set a variable.",
)
@cwd_option
@click.option(
    "-u",
    "--user",
    metavar="USER",
    help="Run as USER: root, or sandbox (the default, who may also sudo).",
)
@timeout_option
@stdin_option
@click.option(
    "-d",
    "--detach",
    is_flag=True,
    help="Run it in the background and print its pid (see: kiln ps, logs, kill).",
)
@click.option("--json", "as_json", is_flag=True, help="With -d: print the process as JSON.")
@pass_state
def exec(
    state: State,
    *,
    sandbox: str,
    cmd: tuple[str, ...],
    env: dict[str, str],
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    stdin: bool | None,
    detach: bool,
    as_json: bool,
) -> int:
    """Run a command in a sandbox: kiln exec [OPTIONS] SANDBOX [OPTIONS] [--] CMD [ARGS...]

    kiln's options go anywhere before the command; the command starts at "--"
    or at its first word, and everything after that is passed on verbatim.

    Output streams live; stdout and stderr stay apart, byte for byte; kiln
    exits with the command's exit code. Piped stdin is read to its end, then
    uploaded to a temporary file in the sandbox that becomes the command's
    stdin (the HTTP API has no live stdin for exec). Commands run as the
    sandbox user, who may also use sudo; -u root runs them as root.

    With -d the command runs in the background, detached from kiln: its pid is
    printed and kiln exits at once; piped stdin is sent to it and then closed.
    Its output is kept (last 1 MiB of each stream): kiln logs SANDBOX PID [-f].
    """
    from .execio import forward_stdin_wanted, run_exec  # noqa: PLC0415

    try:
        argv = parse.parse_session_command(cmd)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not detach:
        if as_json:
            raise click.UsageError("--json goes with -d (a foreground exec prints its output)")
        return run_exec(
            state.sandbox(sandbox),
            argv,
            env=env,
            cwd=cwd,
            timeout_s=timeout,
            user=user,
            stdin=sys.stdin.buffer if forward_stdin_wanted(stdin) else None,
        )
    if timeout is not None:
        raise click.UsageError("--timeout does not go with -d (stop it with: kiln kill)")
    processes = state.sandbox(sandbox).processes
    proc = processes.start(argv, env=env, cwd=cwd, user=user)
    if forward_stdin_wanted(stdin):
        processes.stdin(proc.pid, sys.stdin.buffer.read(), close=True)
    show(fmt.format_json(proc) if as_json else str(proc.pid))
    return 0


@cli.command()
@click.argument("sandbox")
@click.option("--session", "session_id", metavar="ID", help="Reattach to a session (scrollback).")
@click.option("--cmd", metavar="CMD", help="Command for a new session [default: login shell].")
@click.option(
    "-u",
    "--user",
    metavar="USER",
    help="Start the new session as USER: root, or sandbox (the default).",
)
@click.option(
    "--detach-key",
    "detach_key",
    metavar="KEY",
    envvar="KILN_DETACH_KEY",
    default="ctrl-\\",
    show_default=True,
    callback=_converter(parse.parse_detach_key),
    help="The key that detaches: ctrl-<letter>, ctrl-], ... [env: KILN_DETACH_KEY]",
)
@pass_state
def shell(
    state: State,
    *,
    sandbox: str,
    session_id: str | None,
    cmd: str | None,
    user: str | None,
    detach_key: bytes,
) -> int:
    """Open an interactive terminal in a sandbox (alias: sh).

    Ctrl+\\ (or --detach-key) detaches and prints the session id; the session keeps running and
    `kiln shell SANDBOX --session ID` reattaches, replaying its scrollback.
    `kiln shell -u root SANDBOX` opens a root shell.
    """
    from .terminal import run_shell  # noqa: PLC0415

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise click.UsageError("kiln shell needs a terminal; use kiln exec for scripts")
    k = state.kiln()
    return run_shell(
        k.url, k._token, sandbox, session_id=session_id, cmd=cmd, user=user, detach_key=detach_key
    )


@cli.command()
@click.argument("sandbox")
@json_option
@pass_state
def ps(state: State, sandbox: str, as_json: bool) -> None:
    """List a sandbox's background processes and TTY sessions.

    Running and recently finished ones: PID, SESSION (TTY sessions only),
    STATUS (running, exited N), STARTED and COMMAND.
    """
    procs = state.sandbox(sandbox).processes.list()
    infos = [p.info for p in procs]
    show(fmt.format_json(infos) if as_json else fmt.format_processes_table(infos, _now()))


@cli.command()
@click.argument("sandbox")
@click.argument("pid", type=click.IntRange(min=1))
@click.option("-f", "--follow", is_flag=True, help="Follow live output until the process exits.")
@pass_state
def logs(state: State, sandbox: str, pid: int, follow: bool) -> int:
    """Print a background process's output (-f: follow it until it exits).

    Stdout goes to stdout, stderr to stderr, byte for byte. Without -f: the
    output kept so far (the last 1 MiB of each stream), exit status 0. With -f:
    then live output until the process exits, and kiln exits with the process's
    exit code.
    """
    from .procio import run_logs  # noqa: PLC0415

    return run_logs(state.sandbox(sandbox), pid, follow=follow)


@cli.command()
@click.argument("sandbox")
@click.argument("target", metavar="PID|SESSION")
@click.option(
    "-s",
    "--signal",
    "signal_name",
    metavar="SIGNAL",
    help="TERM, KILL, INT, HUP, QUIT, USR1 or USR2 [default: TERM for a pid].",
)
@pass_state
def kill(state: State, sandbox: str, target: str, signal_name: str | None) -> None:
    """Signal a background process (by pid), or kill a session (by id).

    A pid gets SIGTERM unless -s says otherwise; the signal goes to its whole
    process group. A session id (such as init or s1, from kiln ps or kiln
    shell) gets SIGKILL, as before, or with -s that signal.
    """
    ref = state.sandbox(sandbox)
    if target.isdigit():
        ref.processes.signal(int(target), signal_name or "TERM")
        click.echo(f"sent {(signal_name or 'TERM').upper()} to {target}")
        return
    if signal_name is None:
        ref.sessions.kill(target)
        click.echo(f"killed {target}")
        return
    pids = [p.pid for p in ref.processes.list() if p.session_id == target and p.running]
    if not pids:
        raise Failure(f"no running session {target!r} in {sandbox}", "not found")
    ref.processes.signal(pids[0], signal_name)
    click.echo(f"sent {signal_name.upper()} to session {target} (pid {pids[0]})")


# -- ports ----------------------------------------------------------------------------

port_argument = click.argument("port_number", metavar="PORT", type=click.IntRange(1, 65535))


@cli.group(cls=AliasedGroup)
def port() -> None:
    """List, publish and unpublish the ports sandboxes listen on.

    Every listening port is reachable through the daemon at its proxy URL,
    with the API key. A published port also gets a public URL,
    http://ALIAS.localhost:8080/ by default, that needs no key: open it in a
    browser. Requests to either wake the sandbox; WebSockets work too.
    """


def _list_ports(state: State, sandbox: str | None, as_json: bool) -> None:
    k = state.kiln()
    found = state.sandbox(sandbox).ports() if sandbox else k.ports()
    if as_json:
        show(fmt.format_json(fmt.port_dicts(found, k.url)))
    else:
        show(fmt.format_ports_table(found, k.url, with_sandbox=sandbox is None))


@port.command("list")
@click.argument("sandbox", required=False)
@json_option
@pass_state
def port_list(state: State, sandbox: str | None, as_json: bool) -> None:
    """List listening ports (alias: ls).

    PORT; URL, the proxy URL (needs the API key); PUBLIC, the published URL
    (no key) or - . Of one sandbox (waking it), or without SANDBOX of all
    your hot or warm ones, with a SANDBOX column.
    """
    _list_ports(state, sandbox, as_json)


@port.command("publish")
@click.argument("sandbox")
@port_argument
@click.option(
    "--alias",
    metavar="ALIAS",
    callback=_converter(parse.parse_alias),
    help="Host name label, lowercase [default: SANDBOX-PORT].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the published port as JSON.")
@pass_state
def port_publish(
    state: State, sandbox: str, port_number: int, alias: str | None, as_json: bool
) -> None:
    """Publish PORT of SANDBOX at a URL that needs no API key, and print the URL.

    Anyone who can reach the daemon can use it. Nothing needs to listen on
    PORT yet; kiln port unpublish takes it back.
    """
    from kiln.sdk import Conflict  # noqa: PLC0415 - the SDK is imported by state.kiln()

    ref = state.sandbox(sandbox)
    try:
        url = ref.publish(port_number, alias=alias)
    except Conflict as exc:
        published = ref.published()
        message = fmt.format_publish_conflict(sandbox, port_number, alias, published, exc.message)
        raise Failure(message, "conflict") from None
    if as_json:
        # The whole rule (id, alias, created_at); just the URL if it is already gone again.
        rule = next((r for r in ref.published() if r.port == port_number), None)
        show(fmt.format_json(rule or {"port": port_number, "url": url}))
    else:
        click.echo(url)


@port.command("unpublish")
@click.argument("sandbox")
@port_argument
@pass_state
def port_unpublish(state: State, sandbox: str, port_number: int) -> None:
    """Stop publishing PORT of SANDBOX: its public URL answers 404 from now on."""
    from kiln.sdk import NotFound  # noqa: PLC0415 - the SDK is imported by state.kiln()

    ref = state.sandbox(sandbox)
    try:
        ref.unpublish(port_number)
    except NotFound:
        # The sandbox exists (or this raises its own NotFound): the port is not published.
        message = fmt.format_not_published(sandbox, port_number, ref.published())
        raise Failure(message, "not found") from None
    click.echo(f"unpublished port {port_number} of {sandbox}")


@cli.command(hidden=True)
@click.argument("sandbox", required=False)
@json_option
@pass_state
def ports(state: State, sandbox: str | None, as_json: bool) -> None:
    """Same as kiln port list (kept for scripts)."""
    _list_ports(state, sandbox, as_json)


# -- files ----------------------------------------------------------------------------


@cli.group(cls=AliasedGroup)
def file() -> None:
    """Read, write, list, move, remove and watch files in a sandbox."""


@cli.command("cp")
@click.argument("source", metavar="SRC")
@click.argument("dest", metavar="DST")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@pass_state
def cp(state: State, source: str, dest: str, quiet: bool) -> None:
    """Copy files and directories between this machine and a sandbox, like docker cp.

    \b
      kiln cp dev:/etc/hosts ./hosts      a file out of sandbox "dev"
      kiln cp ./src dev:/workspace/       a directory into an existing one
      kiln cp ./src dev:/workspace/app    ... or to a new path, created
      kiln cp dev:/workspace/. ./out      a directory's content
      kiln cp dev:/var/log - | tar -t     a tar stream on stdout (- as SRC: stdin)

    One side is SANDBOX:PATH (by name or id; relative paths start in the
    sandbox's working directory), the other a local path or -. Symlinks stay
    symlinks and modes are kept; files copied in belong to the sandbox user,
    files copied out to you. Archives reaching outside the destination
    (absolute names, .., symlinks pointing out) are refused. A progress bar
    shows on stderr for transfers over 1 MiB.
    """
    from .copy import download, upload  # noqa: PLC0415

    try:
        src_box, src_path = parse.parse_copy_location(source)
        dst_box, dst_path = parse.parse_copy_location(dest)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if (src_box is None) == (dst_box is None):
        where = "local" if src_box is None else "in sandboxes"
        raise click.UsageError(
            f"SRC and DST are both {where}: one must be SANDBOX:PATH, the other local or -"
        )
    if src_box is not None:
        download(state.sandbox(src_box), src_path, dst_path, quiet=quiet)
    else:
        assert dst_box is not None
        upload(state.sandbox(dst_box), src_path, dst_path, quiet=quiet)


@file.command("read")
@click.argument("sandbox")
@click.argument("path")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="First line (1-based).")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Maximum lines.")
@click.option("--max-bytes", type=click.IntRange(min=0), default=0, help="Maximum bytes.")
@pass_state
def file_read(
    state: State, *, sandbox: str, path: str, offset: int, limit: int, max_bytes: int
) -> None:
    """Write a file's content to stdout (raw bytes)."""
    content = state.sandbox(sandbox).files.read(
        path, offset=offset, limit=limit, max_bytes=max_bytes
    )
    out = sys.stdout.buffer
    out.write(content.data)
    out.flush()


@file.command("write")
@click.argument("sandbox")
@click.argument("path")
@click.argument("local", required=False, default="-")
@click.option("--mode", callback=_converter(parse.parse_mode), help="File mode, octal (0644).")
@pass_state
def file_write(state: State, sandbox: str, path: str, local: str, mode: int | None) -> None:
    """Write LOCAL (a file, or - for stdin) to PATH in the sandbox, atomically."""
    files = state.sandbox(sandbox).files
    if local == "-":
        if sys.stdin.isatty():
            raise click.UsageError("no input: give a LOCAL file or pipe data to stdin")
        from .execio import spooled_stdin  # noqa: PLC0415

        with spooled_stdin(sys.stdin.buffer) as data:
            files.write(path, data, mode=mode)
    else:
        with open(local, "rb") as data:
            files.write(path, data, mode=mode)


@file.command("ls")
@click.argument("sandbox")
@click.argument("path", default="/workspace")
@click.option(
    "--depth",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="Also list subdirectories, down to this many levels.",
)
@json_option
@pass_state
def file_ls(state: State, sandbox: str, path: str, depth: int | None, as_json: bool) -> None:
    """List a directory in the sandbox [default: /workspace]."""
    listing = state.sandbox(sandbox).files.ls(path, depth=depth)
    if as_json:
        show(fmt.format_json(list(listing.entries)))
    else:
        base = path if depth is not None else None
        text = fmt.format_file_listing(listing, _now(), base)
        if text:
            click.echo(text)


@file.command("stat")
@click.argument("sandbox")
@click.argument("path")
@json_option
@pass_state
def file_stat(state: State, sandbox: str, path: str, as_json: bool) -> None:
    """Show a path's size, mode and type."""
    info = state.sandbox(sandbox).files.stat(path)
    show(fmt.format_json(info) if as_json else fmt.format_file_stat(info))


@file.command("mkdir")
@click.argument("sandbox")
@click.argument("path")
@click.option("--mode", callback=_converter(parse.parse_mode), help="Mode, octal (0755).")
@click.option("--no-parents", is_flag=True, help="Fail when the parent does not exist.")
@pass_state
def file_mkdir(state: State, sandbox: str, path: str, mode: int | None, no_parents: bool) -> None:
    """Create a directory (and its missing parents); an existing one is fine."""
    created = state.sandbox(sandbox).files.mkdir(path, parents=not no_parents, mode=mode)
    if not created:
        click.echo(f"{path}: already exists", err=True)


@file.command("mv")
@click.argument("sandbox")
@click.argument("source")
@click.argument("destination")
@click.option("-f", "--force", is_flag=True, help="Replace an existing destination.")
@pass_state
def file_mv(state: State, sandbox: str, source: str, destination: str, force: bool) -> None:
    """Move or rename SOURCE to DESTINATION (missing parents are created)."""
    state.sandbox(sandbox).files.move(source, destination, overwrite=force)


@file.command("rm")
@click.argument("sandbox")
@click.argument("paths", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Remove directories and their content.")
@pass_state
def file_rm(state: State, sandbox: str, paths: tuple[str, ...], recursive: bool) -> None:
    """Remove files (and with -r directory trees)."""
    files = state.sandbox(sandbox).files
    for path in paths:
        files.remove(path, recursive=recursive)


@file.command("watch")
@click.argument("sandbox")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True, help="Also watch subdirectories.")
@json_option
@pass_state
def file_watch(state: State, sandbox: str, path: str, recursive: bool, as_json: bool) -> None:
    """Print a directory's changes as they happen, until interrupted or it is removed."""
    with state.sandbox(sandbox).files.watch(path, recursive=recursive) as watch:
        for event in watch:
            line = fmt.format_json_line(event) if as_json else fmt.format_file_event(event)
            click.echo(line)


# -- secrets, volumes, templates ------------------------------------------------------


@cli.group(cls=AliasedGroup)
def secret() -> None:
    """Manage secrets (use them with: kiln create --secret NAME)."""


@secret.command("set")
@click.argument("name")
@click.option("--value", help="The value on the command line (visible in `ps`; avoid).")
@json_option
@pass_state
def secret_set(state: State, name: str, value: str | None, as_json: bool) -> None:
    """Create or replace a secret; the value comes from stdin or a hidden prompt."""
    if value is not None:
        click.echo(
            "kiln: warning: --value exposes the secret in your shell history and process list",
            err=True,
        )
    elif sys.stdin.isatty():
        value = click.prompt(f"Value for {name}", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.read()
        if value.endswith("\n"):  # `echo x | kiln secret set` adds one newline
            value = value[:-1]
    if not value:
        raise click.UsageError("the secret's value is empty")
    state.kiln().secrets.set(name, value)
    click.echo(fmt.format_json({"name": name}) if as_json else f"secret {name} set")


@secret.command("list")
@json_option
@pass_state
def secret_list(state: State, as_json: bool) -> None:
    """List secret names (values are never shown)."""
    secrets = state.kiln().secrets.list()
    show(fmt.format_json(secrets) if as_json else fmt.format_secrets_table(secrets, _now()))


@secret.command("delete")
@click.argument("name")
@json_option
@pass_state
def secret_delete(state: State, name: str, as_json: bool) -> None:
    """Delete a secret."""
    state.kiln().secrets.delete(name)
    click.echo(fmt.format_json({"deleted": name}) if as_json else f"secret {name} deleted")


@cli.group(cls=AliasedGroup)
def volume() -> None:
    """Manage persistent volumes."""


@volume.command("create")
@click.argument("name")
@click.option(
    "--size",
    "size_mb",
    required=True,
    metavar="SIZE",
    callback=_converter(parse.parse_size_mb),
    help="Size in MiB or with a unit (512, 10G).",
)
@json_option
@pass_state
def volume_create(state: State, name: str, size_mb: int, as_json: bool) -> None:
    """Create an empty volume."""
    vol = state.kiln().volumes.create(name, size_mb=size_mb)
    show(fmt.format_json(vol) if as_json else f"volume {vol.name} created ({vol.size_mb} MiB)")


@volume.command("list")
@json_option
@pass_state
def volume_list(state: State, as_json: bool) -> None:
    """List volumes."""
    volumes = state.kiln().volumes.list()
    show(fmt.format_json(volumes) if as_json else fmt.format_volumes_table(volumes, _now()))


@volume.command("delete")
@click.argument("name")
@json_option
@pass_state
def volume_delete(state: State, name: str, as_json: bool) -> None:
    """Delete a volume (refused while a sandbox uses it)."""
    state.kiln().volumes.delete(name)
    click.echo(fmt.format_json({"deleted": name}) if as_json else f"volume {name} deleted")


@cli.group(cls=AliasedGroup)
def saved() -> None:
    """Manage your saved images (made by `kiln save`)."""


@saved.command("list")
@json_option
@pass_state
def saved_list(state: State, as_json: bool) -> None:
    """List your saved images."""
    images = state.kiln().saved_images.list()
    show(fmt.format_json(images) if as_json else fmt.format_saved_table(images, _now()))


@saved.command("delete")
@click.argument("name")
@json_option
@pass_state
def saved_delete(state: State, name: str, as_json: bool) -> None:
    """Delete a saved image; sandboxes made from it go on."""
    state.kiln().saved_images.delete(name)
    click.echo(fmt.format_json({"deleted": name}) if as_json else f"saved image {name} deleted")


@cli.group(cls=AliasedGroup)
def template() -> None:
    """Manage sandbox templates."""


@template.command("create")
@click.argument("name")
@click.option("--cpus", type=click.IntRange(1, 64))
@click.option("--memory", "memory_mb", metavar="SIZE", callback=_converter(parse.parse_size_mb))
@click.option("-e", "--env", multiple=True, metavar="KEY=VALUE", callback=_env_callback)
@click.option("--init", metavar="SCRIPT")
@click.option("--image")
@click.option(
    "-v",
    "--volume",
    "volumes",
    multiple=True,
    metavar="NAME:/MOUNT",
    callback=_converter(parse.parse_volume),
)
@json_option
@pass_state
def template_create(
    state: State,
    *,
    name: str,
    cpus: int | None,
    memory_mb: int | None,
    env: dict[str, str],
    init: str | None,
    image: str | None,
    volumes: list[tuple[str, str]],
    as_json: bool,
) -> None:
    """Save a sandbox spec as a template (use: kiln create --template NAME)."""
    tpl = state.kiln().templates.create(
        name,
        cpus=cpus,
        memory_mb=memory_mb,
        env=env,
        init=init,
        image=image,
        volumes=dict(volumes),
    )
    show(fmt.format_json(tpl) if as_json else f"template {tpl.name} created ({tpl.id})")


@template.command("list")
@json_option
@pass_state
def template_list(state: State, as_json: bool) -> None:
    """List templates."""
    templates = state.kiln().templates.list()
    show(fmt.format_json(templates) if as_json else fmt.format_templates_table(templates, _now()))


@template.command("delete")
@click.argument("template_ref", metavar="TEMPLATE")
@json_option
@pass_state
def template_delete(state: State, template_ref: str, as_json: bool) -> None:
    """Delete a template (by id or name)."""
    state.kiln().templates.delete(template_ref)
    if as_json:
        click.echo(fmt.format_json({"deleted": template_ref}))
    else:
        click.echo(f"template {template_ref} deleted")


# -- local administration (data dir) ----------------------------------------------------

from .local import image, serve, user  # noqa: E402 - registered after the group exists

cli.add_command(serve)
cli.add_command(user)
cli.add_command(image)

from . import images as _images  # noqa: E402, F401 - adds the API commands to `image`
from . import nodes as _nodes  # noqa: E402, F401 - adds `kiln node`
