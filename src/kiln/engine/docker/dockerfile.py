"""Images from a Dockerfile, built by kiln's dockerd on top of kiln's own ``minimal``.

    check_from(text)                 every FROM must be ``minimal`` / ``kiln/minimal`` (else
                                     :class:`InvalidDefinition`, a 422); returns the steps
    build(client, definition, context, ref, image_dir=, log=)
                                     the Docker image ``kiln/<ref>:<key16>`` (labelled as
                                     the engine's import of the tier would be, so the
                                     engine finds it by the ref) and its tree exported into
                                     the image cache as the tier's base, from which
                                     :mod:`kiln.images.builder` makes the QEMU image with
                                     the same final step every image has

No registry is reachable: ``FROM minimal`` is rewritten to the reference under
which the Docker engine imported kiln's ``minimal`` base tree into this dockerd
(:func:`~kiln.engine.docker.images.ensure_image`). RUN steps have no network
(``network_mode="none"``). The classic builder's ``Step N/M : ...`` lines name
the step that failed; the whole output goes to the build log, which is kept.

What a sandbox honours of the image's configuration: ENV (as the image's
environment, like a package-list image's ``env``) and the final USER (a user
name: the sandbox's default user, as ``user`` on create would make it; none,
``sandbox`` or its uid: kiln's ``sandbox``) and the final WORKDIR (where the guest
agent starts commands that name no directory; none or ``/workspace``: kiln's
``/workspace``). A numeric or ``user:group`` USER, a CMD, ENTRYPOINT, EXPOSE,
VOLUME or HEALTHCHECK is refused rather than ignored, since sandboxes start the
guest agent, not the image's command.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import posixpath
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.images import cache, find_base
from kiln.images.builder import BASE_MANIFEST
from kiln.images.buildlog import BuildLog
from kiln.images.definition import USER_RE, Definition, InvalidDefinition
from kiln.images.errors import ImageError
from kiln.images.registry import PARENT_TIER, tier_of
from kiln.protocol import SANDBOX_UID, SANDBOX_USER

from . import images as docker_images
from .images import _SDK_ERRORS, DockerImageError

#: Largest build context accepted (the tar, before base64).
MAX_CONTEXT_BYTES = 16 << 20
#: The Dockerfile's name inside the context kiln sends to dockerd.
DOCKERFILE_NAME = ".kiln.Dockerfile"
WORKSPACE = "/workspace"
#: What dockerd writes into a container's tree (its own mounts) rather than the image's:
#: taken from kiln's base tree instead.
_CONTAINER_FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf")
_BASES = frozenset({PARENT_TIER, f"kiln/{PARENT_TIER}"})
_STEP_RE = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_BUILD_TIMEOUT = 3600
#: The PATH dockerd's builder gives an image whose base has none (kiln's import has
#: none): not the Dockerfile's, so not the image's environment.
DOCKER_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def logical_lines(text: str) -> list[str]:
    """The Dockerfile's instructions: comments dropped, ``\\`` continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((pending + line).strip())
        pending = ""
    if pending.strip():
        out.append(pending.strip())
    return out


def check_from(text: str) -> list[str]:
    """The instructions of ``text``; :class:`InvalidDefinition` unless every FROM is kiln's
    ``minimal`` (with an optional ``AS name``) and the first instruction is a FROM."""
    steps = logical_lines(text)
    if not steps or steps[0].split()[0].upper() != "FROM":
        raise InvalidDefinition("dockerfile: the first instruction must be FROM minimal")
    for number, step in enumerate(steps, 1):
        words = step.split()
        if words[0].upper() != "FROM":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        image = args[0] if args else ""
        if image.split(":", 1)[0] not in _BASES or len(args) not in (1, 3):
            raise InvalidDefinition(
                f"dockerfile: step {number} {step!r}: only FROM minimal (kiln's own base,"
                " kiln/minimal) is possible: no registry is reachable"
            )
    return steps


def _rewrite_from(text: str, reference: str) -> str:
    """``text`` with the image of each FROM replaced by ``reference``."""

    def replace(match: re.Match[str]) -> str:
        return f"{match.group(1)}{reference}"

    return re.sub(r"(?im)^(\s*FROM\s+(?:--\S+\s+)*)(?:kiln/)?minimal(?::\S*)?", replace, text)


def context_sha256(context: bytes) -> str:
    return hashlib.sha256(context).hexdigest()


def _build_context(context: bytes, dockerfile: str) -> bytes:
    """The tar dockerd gets: the caller's context plus the rewritten Dockerfile."""
    out = io.BytesIO()
    try:
        with (
            tarfile.open(fileobj=io.BytesIO(context)) as src,
            tarfile.open(fileobj=out, mode="w") as dst,
        ):
            for member in src.getmembers():
                if member.name.lstrip("./") == DOCKERFILE_NAME:
                    continue
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
            data = dockerfile.encode()
            info = tarfile.TarInfo(DOCKERFILE_NAME)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidDefinition(f"context: not a tar archive: {exc}") from None
    return out.getvalue()


def empty_context() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w"):
        pass
    return out.getvalue()


def build(
    client: Any,
    definition: Definition,
    context: bytes,
    ref: str,
    *,
    image_dir: Path,
    log: BuildLog,
) -> Definition:
    """Build ``definition`` (a Dockerfile one) as ``ref``: its Docker image and its tree.

    Returns the definition with ``env`` and ``user`` set to what the Dockerfile's ENV
    and final USER gave.
    Steps go to ``log`` (``docker-base``, ``docker-build``, ``export``); a failing
    RUN raises :class:`~kiln.images.buildlog.BuildFailed` naming the Dockerfile step.
    """
    if definition.dockerfile is None:
        raise ImageError(f"{definition.name} is not a Dockerfile definition")
    if len(context) > MAX_CONTEXT_BYTES:
        raise InvalidDefinition(f"context: larger than {MAX_CONTEXT_BYTES >> 20} MiB")
    steps = check_from(definition.dockerfile)
    tier = tier_of(definition, ref)
    key = tier.base.key()
    reference = f"{docker_images.REPOSITORY}/{ref}:{key[:16]}"
    with log.step("docker-base"):
        base_ref = docker_images.ensure_image(
            client, PARENT_TIER, image_dir=image_dir, progress=log
        )
        base_env = _env_of(_inspect(client, base_ref))
        base_tree = find_base(PARENT_TIER, image_dir)
        if base_tree is None:  # ensure_image found it a moment ago
            raise ImageError(f"the {PARENT_TIER} base tree disappeared from {image_dir}")
    with log.step("docker-build"):
        log(f"docker build ({len(steps)} steps) on {base_ref}, no network…")
        # The image's USER is the sandboxes' default user, not the user of the
        # container's PID 1: the guest agent runs as root, so the image ends as root.
        final_user = _final_user(steps)
        dockerfile = _rewrite_from(definition.dockerfile, base_ref).rstrip("\n")
        dockerfile += "\nUSER root\n"
        labels = {
            docker_images.LABEL_TIER: ref,
            docker_images.LABEL_BASE_KEY: key,
            docker_images.LABEL_IMPORT_VERSION: str(docker_images.IMPORT_VERSION),
        }
        _docker_build(
            client,
            _build_context(context, dockerfile),
            reference,
            labels=labels,
            count=len(steps),
            log=log,
        )
        config = _inspect(client, reference)
        env = _checked_config(config, base_env)
        user = _default_user(final_user)
        workdir = _workdir(config)
    final = image_dir / "base" / key
    # Under the image cache's build lock: a concurrent build of the same Dockerfile
    # finds this one's tree instead of replacing it under a QEMU build reading it.
    with log.step("export"), cache.build_lock(image_dir, log):
        if cache.read_manifest(final / BASE_MANIFEST) is not None:
            log(f"cached: the tree of {ref}")
        else:
            log(f"exporting {reference} into the image cache…")
            with cache.staging(image_dir, "base", key[:16]) as tmp:
                _export(client, reference, tmp / "root")
                for name in _CONTAINER_FILES:
                    target = tmp / "root" / name
                    target.unlink(missing_ok=True)
                    source = base_tree.root / name
                    if source.exists():
                        target.write_bytes(source.read_bytes())
                (tmp / "root" / ".dockerenv").unlink(missing_ok=True)
                cache.write_manifest(
                    tmp / BASE_MANIFEST,
                    {
                        "dockerfile": definition.dockerfile,
                        "context_sha256": definition.context_sha256,
                        "from": base_ref,
                        "docker_image": reference,
                        "built_at": _now(),
                    },
                )
                cache.publish(tmp, final)
    return Definition(
        name=definition.name,
        env=tuple(sorted(env.items())),
        dockerfile=definition.dockerfile,
        context_sha256=definition.context_sha256,
        user=user,
        workdir=workdir,
    )


def _now() -> str:
    from datetime import UTC, datetime  # noqa: PLC0415

    return datetime.now(UTC).isoformat(timespec="seconds")


def _inspect(client: Any, reference: str) -> dict[str, Any]:
    try:
        attrs: dict[str, Any] = client.api.inspect_image(reference)
    except _SDK_ERRORS as exc:
        raise DockerImageError(f"inspecting {reference}: {exc}") from exc
    return attrs.get("Config") or {}


def _env_of(config: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in config.get("Env") or []:
        name, _, value = str(item).partition("=")
        env[name] = value
    return env


def _final_user(steps: list[str]) -> str:
    """The argument of the final stage's last USER ("" without one)."""
    user = ""
    for step in steps:
        instruction, _, args = step.partition(" ")
        if instruction.upper() == "FROM":
            user = ""
        elif instruction.upper() == "USER":
            user = args.strip()
    if "$" in user:
        raise InvalidDefinition(
            f"dockerfile: USER {user}: the final USER must be written out (no variables)"
        )
    return user


def _checked_config(config: dict[str, Any], base_env: dict[str, str]) -> dict[str, str]:
    """The image's environment (what differs from the base's); refuses what kiln's
    sandboxes would not honour (module docstring)."""
    for field, instruction in (
        ("Cmd", "CMD"),
        ("Entrypoint", "ENTRYPOINT"),
        ("ExposedPorts", "EXPOSE"),
        ("Volumes", "VOLUME"),
        ("Healthcheck", "HEALTHCHECK"),
    ):
        if config.get(field):
            raise InvalidDefinition(
                f"dockerfile: {instruction} is not used by kiln sandboxes (they run the"
                " guest agent): remove it"
            )
    env = {k: v for k, v in _env_of(config).items() if base_env.get(k) != v}
    if "PATH" not in base_env and env.get("PATH") == DOCKER_DEFAULT_PATH:
        del env["PATH"]
    return env


def _workdir(config: dict[str, Any]) -> str | None:
    """The commands' directory for the image's final WORKDIR (None: /workspace)."""
    workdir = str(config.get("WorkingDir") or "")
    if workdir in ("", WORKSPACE):
        return None
    normal = posixpath.normpath(workdir)
    return normal if normal.startswith("/") else None


def _default_user(user: str) -> str | None:
    """The sandbox's default user for a final USER (None: kiln's sandbox user)."""
    if user in ("", SANDBOX_USER, str(SANDBOX_UID)):
        return None
    if user == "0":
        return "root"
    if not USER_RE.match(user):
        raise InvalidDefinition(
            f"dockerfile: the final USER is {user}: give a user name (a sandbox's default"
            " user is a login name; its group is the user's own)"
        )
    return user


def _docker_build(
    client: Any,
    context: bytes,
    reference: str,
    *,
    labels: dict[str, str],
    count: int,
    log: BuildLog,
) -> None:
    """``docker build``; a failure names the Dockerfile's step (of ``count``: dockerd
    counts the labels kiln adds as steps of their own, after the Dockerfile's)."""
    step = "FROM"
    failure: str | None = None
    try:
        stream = client.api.build(
            fileobj=io.BytesIO(context),
            custom_context=True,
            dockerfile=DOCKERFILE_NAME,
            tag=reference,
            labels=labels,
            network_mode="none",
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            timeout=_BUILD_TIMEOUT,
        )
        for chunk in stream:
            if "stream" in chunk:
                for raw in str(chunk["stream"]).splitlines():
                    if not raw.strip():
                        continue
                    line = raw
                    match = _STEP_RE.match(raw.strip())
                    if match:
                        number = int(match[1])
                        if number <= count:
                            step = f"step {number}/{count} {match[3]}"
                            line = f"Step {number}/{count} : {match[3]}"
                        else:
                            step = f"labelling the image ({match[3]})"
                            line = f"kiln: {match[3]}"
                    log(line.rstrip())
            elif "error" in chunk or "errorDetail" in chunk:
                detail = chunk.get("errorDetail") or {}
                message = str(detail.get("message") or chunk.get("error"))
                code = detail.get("code")
                reason = f"exit code {code}" if code else message
                log(f"docker build failed: {message}")
                # Read on to the stream's end: an abandoned stream keeps its socket open.
                failure = failure or f"{step}: {reason}"
    except _SDK_ERRORS as exc:
        explanation = getattr(exc, "explanation", None) or exc
        raise ImageError(f"{step}: docker build: {explanation}") from exc
    if failure is not None:
        raise ImageError(failure)


def _export(client: Any, reference: str, root: Path) -> None:
    """The image's file tree, as ``docker export`` of a created (never started) container
    gives it, unpacked by GNU tar (owners, modes, xattrs, devices kept)."""
    root.mkdir(parents=True)
    argv = [
        "tar",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "-xpf",
        "-",
        "-C",
        str(root),
    ]
    # tar's stderr goes to a file: a full stderr pipe would block it.
    with _created(client, reference) as container, tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=errors)
        assert proc.stdin is not None
        try:
            for chunk in client.api.export(container):
                proc.stdin.write(chunk)
        except _SDK_ERRORS as exc:  # BrokenPipeError (tar died) is an OSError
            proc.kill()
            proc.wait()
            raise DockerImageError(f"docker export of {reference}: {exc}") from exc
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        if proc.wait(timeout=600) != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-2000:]
            raise ImageError(f"tar -x of {reference}'s export failed: {tail}")


@contextlib.contextmanager
def _created(client: Any, reference: str) -> Iterator[str]:
    try:
        container = client.api.create_container(
            reference, command=["/bin/true"], network_disabled=True
        )["Id"]
    except _SDK_ERRORS as exc:
        raise DockerImageError(f"creating a container of {reference}: {exc}") from exc
    try:
        yield container
    finally:
        with contextlib.suppress(*_SDK_ERRORS):
            client.api.remove_container(container, force=True)
