"""User-defined images: a small YAML file of Debian packages and files on top of ``minimal``.

::

    name: node                  # [a-z][a-z0-9-]*, at most 40 characters
    packages: [nodejs, npm]     # Debian package names, added to the minimal tier's
    files:                      # written into the tree after the packages (owner root)
      - path: /etc/motd
        content: "welcome\\n"
        mode: "0644"            # octal string or integer; default 0644
      - path: /usr/local/bin/hello
        source: hello.sh        # read from a file, relative to the YAML file
        mode: "0755"
    env:                        # the environment of its sandboxes (under a template's
      NODE_ENV: development     # and the create request's own)

The definition is stored and sent as JSON (:meth:`Definition.to_json`; a
``source`` is read into ``content`` when the YAML is parsed). Everything a
definition says is in its :meth:`Definition.digest`, and an image built from it
is registered under a *reference* (:func:`image_ref`) that carries the digest:
a changed definition is a new reference, so an engine that cached the image of
a reference never runs a stale one.

A *Dockerfile* definition (``dockerfile`` set, no ``packages`` or ``files``)
is built by the Docker engine's dockerd on top of kiln's own ``minimal``
(:mod:`kiln.engine.docker.dockerfile`); its digest is that of the Dockerfile,
its build context (``context_sha256``) and the ``minimal`` base it starts
from. Its ``env`` and ``user`` are what the Dockerfile's ENV and final USER
set, filled in by the build.

Every mistake raises :class:`InvalidDefinition` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ImageError

NAME_RE = re.compile(r"^[a-z](?:[a-z0-9]|-(?=[a-z0-9])){0,39}$")
# Debian policy 5.6.1: lower case letters, digits, + - . ; at least two characters.
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
MAX_PACKAGES = 200
MAX_FILES = 100
MAX_FILE_BYTES = 1 << 20
MAX_TOTAL_BYTES = 4 << 20
DEFAULT_MODE = 0o644
#: Where a file may not go: the kernel's file systems and what kiln itself puts there.
FORBIDDEN_PREFIXES = ("/proc", "/sys", "/dev", "/run", "/usr/lib/kiln")
_KEYS = frozenset(
    {"name", "packages", "files", "env", "dockerfile", "context_sha256", "user", "workdir"}
)
#: A Dockerfile's final USER, as the sandbox's default user (a login name).
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
MAX_DOCKERFILE_BYTES = 64 << 10
#: Bump when a Dockerfile build puts something else into its tree or image.
DOCKERFILE_BUILD_VERSION = 2
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ENV = 100
_FILE_KEYS = frozenset({"path", "content", "source", "mode"})


class InvalidDefinition(ImageError):
    """An image definition that cannot be built as written (the message names the field)."""


@dataclass(frozen=True, slots=True)
class FileSpec:
    path: str
    content: str
    mode: int = DEFAULT_MODE

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "content": self.content, "mode": f"{self.mode:04o}"}


@dataclass(frozen=True, slots=True)
class Definition:
    name: str
    packages: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()
    #: Applied by the daemon to every sandbox of the image (not built into the tree).
    env: tuple[tuple[str, str], ...] = ()
    #: A Dockerfile definition's text (the image is built by dockerd, not from packages).
    dockerfile: str | None = None
    #: sha256 of the Dockerfile's build context (a tar), part of the digest.
    context_sha256: str | None = None
    #: A Dockerfile image's default user (its final USER), when not the sandbox user.
    user: str | None = None
    #: A Dockerfile image's commands' directory (its final WORKDIR), when not /workspace.
    workdir: str | None = None

    @property
    def kind(self) -> str:
        return "packages" if self.dockerfile is None else "dockerfile"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "packages": list(self.packages),
            "files": [f.to_json() for f in self.files],
            "env": dict(self.env),
        }
        if self.dockerfile is not None:
            doc["dockerfile"] = self.dockerfile
            doc["context_sha256"] = self.context_sha256
        if self.user is not None:
            doc["user"] = self.user
        if self.workdir is not None:
            doc["workdir"] = self.workdir
        return doc

    def digest(self) -> str:
        """sha256 of what the image is (the name is not part of it)."""
        if self.dockerfile is not None:
            # ENV is the Dockerfile's: env is derived from it, not an input.
            from .tiers import TIERS  # noqa: PLC0415 (tiers -> rootfs is heavier)

            recipe: dict[str, Any] = {
                "dockerfile": self.dockerfile,
                "context": self.context_sha256,
                "from": TIERS["minimal"].base.key(),
                "build": DOCKERFILE_BUILD_VERSION,
            }
            return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        doc: dict[str, Any] = {
            "packages": sorted(self.packages),
            "files": [f.to_json() for f in self.files],
        }
        if self.env:
            doc["env"] = dict(self.env)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def image_ref(definition: Definition, owner: str | None) -> str:
    """The name engines and the image cache know the image by.

    ``<name>.<digest12>`` for a global image, ``<owner>.<name>.<digest12>`` for a
    user's: lower case, dots and dashes only, so it is also a valid Docker
    repository name (``kiln/<ref>``).
    """
    tail = f"{definition.name}.{definition.digest()[:12]}"
    return tail if owner is None else f"{owner.lower()}.{tail}"


def parse_yaml(text: str, *, base_dir: Path | None = None, name: str | None = None) -> Definition:
    """A definition from YAML text; ``source`` files are read relative to ``base_dir``.

    ``name`` (a command line's) overrides the file's ``name``.
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidDefinition(f"not valid YAML: {exc}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InvalidDefinition("the definition must be a mapping (name, packages, files)")
    if name is not None:
        doc = {**doc, "name": name}
    return from_json(doc, base_dir=base_dir)


def load_yaml_file(path: Path, *, name: str | None = None) -> Definition:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidDefinition(f"cannot read {path}: {exc}") from None
    return parse_yaml(text, base_dir=path.parent, name=name)


def from_json(doc: Mapping[str, Any], *, base_dir: Path | None = None) -> Definition:
    """A checked definition from a mapping; ``source`` needs a ``base_dir`` to read from."""
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise InvalidDefinition(
            f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_KEYS))})"
        )
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidDefinition(
            f"name: {name!r} is not an image name (lower case letters, digits and single "
            "dashes, starting with a letter, at most 40 characters)"
        )
    packages = _packages(doc.get("packages", []))
    files = _files(doc.get("files", []), base_dir)
    env = _env(doc.get("env", {}))
    dockerfile = doc.get("dockerfile")
    user = doc.get("user")
    workdir = doc.get("workdir")
    if dockerfile is None:
        if doc.get("context_sha256") is not None:
            raise InvalidDefinition("context_sha256: only a Dockerfile definition has a context")
        if user is not None:
            raise InvalidDefinition("user: only a Dockerfile definition has one (its USER)")
        if workdir is not None:
            raise InvalidDefinition("workdir: only a Dockerfile definition has one (its WORKDIR)")
        return Definition(name=name, packages=packages, files=files, env=env)
    if user is not None and (not isinstance(user, str) or not USER_RE.match(user)):
        raise InvalidDefinition(f"user: {user!r} is not a user name")
    if workdir is not None and not _is_workdir(workdir):
        raise InvalidDefinition(f"workdir: {workdir!r} is not an absolute path")
    if packages or files:
        raise InvalidDefinition(
            "dockerfile: a Dockerfile image has no packages or files (RUN and COPY them)"
        )
    if not isinstance(dockerfile, str) or not dockerfile.strip() or "\0" in dockerfile:
        raise InvalidDefinition("dockerfile: must be the Dockerfile's text")
    if len(dockerfile.encode()) > MAX_DOCKERFILE_BYTES:
        raise InvalidDefinition(f"dockerfile: larger than {MAX_DOCKERFILE_BYTES >> 10} KiB")
    context = doc.get("context_sha256")
    if not isinstance(context, str) or not _SHA256_RE.match(context):
        raise InvalidDefinition("context_sha256: must be the sha256 (64 hex) of the context tar")
    return Definition(
        name=name,
        env=env,
        dockerfile=dockerfile,
        context_sha256=context,
        user=user,
        workdir=workdir,
    )


def _is_workdir(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value.startswith("/")
        and "\0" not in value
        and len(value) <= 1024
        and posixpath.normpath(value) == value
    )


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidDefinition("env: must be a mapping of variable names to text")
    if len(value) > MAX_ENV:
        raise InvalidDefinition(f"env: at most {MAX_ENV} variables, got {len(value)}")
    for key, text in value.items():
        if not isinstance(key, str) or not ENV_NAME_RE.match(key):
            raise InvalidDefinition(f"env: {key!r} is not a variable name")
        if not isinstance(text, str) or "\0" in text:
            raise InvalidDefinition(f"env.{key}: must be text without NUL (quote numbers)")
    return tuple(sorted(value.items()))


def _packages(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidDefinition("packages: must be a list of Debian package names")
    if len(value) > MAX_PACKAGES:
        raise InvalidDefinition(f"packages: at most {MAX_PACKAGES}, got {len(value)}")
    for i, pkg in enumerate(value):
        if not isinstance(pkg, str) or not PACKAGE_RE.match(pkg):
            raise InvalidDefinition(f"packages[{i}]: {pkg!r} is not a Debian package name")
    return tuple(sorted(set(value)))


def _files(value: Any, base_dir: Path | None) -> tuple[FileSpec, ...]:
    if not isinstance(value, list):
        raise InvalidDefinition("files: must be a list of {path, content | source, mode}")
    if len(value) > MAX_FILES:
        raise InvalidDefinition(f"files: at most {MAX_FILES}, got {len(value)}")
    out: dict[str, FileSpec] = {}
    total = 0
    for i, item in enumerate(value):
        spec = _file(f"files[{i}]", item, base_dir)
        if spec.path in out:
            raise InvalidDefinition(f"files[{i}].path: {spec.path} is listed twice")
        total += len(spec.content.encode())
        if total > MAX_TOTAL_BYTES:
            raise InvalidDefinition(f"files: more than {MAX_TOTAL_BYTES >> 20} MiB in all")
        out[spec.path] = spec
    return tuple(out[p] for p in sorted(out))


def _file(where: str, item: Any, base_dir: Path | None) -> FileSpec:
    if not isinstance(item, dict):
        raise InvalidDefinition(f"{where}: must be a mapping with path, content or source, mode")
    unknown = sorted(set(item) - _FILE_KEYS)
    if unknown:
        raise InvalidDefinition(f"{where}: unknown field(s) {', '.join(unknown)}")
    path = _path(f"{where}.path", item.get("path"))
    has_content, has_source = "content" in item, "source" in item
    if has_content == has_source:
        raise InvalidDefinition(f"{where}: give exactly one of content and source")
    if has_content:
        content = item["content"]
        if not isinstance(content, str):
            raise InvalidDefinition(f"{where}.content: must be text")
    else:
        content = _source(f"{where}.source", item["source"], base_dir)
    if len(content.encode()) > MAX_FILE_BYTES:
        raise InvalidDefinition(f"{where}: larger than {MAX_FILE_BYTES >> 20} MiB")
    return FileSpec(path=path, content=content, mode=_mode(f"{where}.mode", item.get("mode")))


def _path(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidDefinition(f"{where}: must be an absolute path, got {value!r}")
    if "\0" in value or any(part in ("..", ".") for part in value.split("/")):
        raise InvalidDefinition(f"{where}: {value!r} must not contain '.', '..' or NUL")
    norm = posixpath.normpath(value)
    if norm == "/" or value.endswith("/"):
        raise InvalidDefinition(f"{where}: {value!r} names a directory, not a file")
    for prefix in FORBIDDEN_PREFIXES:
        if norm == prefix or norm.startswith(prefix + "/"):
            raise InvalidDefinition(f"{where}: files under {prefix} are not allowed")
    return norm


def _mode(where: str, value: Any) -> int:
    if value is None:
        return DEFAULT_MODE
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value):
        mode = int(value, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise InvalidDefinition(f'{where}: {value!r} is not an octal mode such as "0755"')
    if not 0 <= mode <= 0o7777:
        raise InvalidDefinition(f"{where}: {value!r} is out of range (0000-7777)")
    return mode


def _source(where: str, value: Any, base_dir: Path | None) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidDefinition(f"{where}: must be a file name")
    if base_dir is None:
        raise InvalidDefinition(f"{where}: only a YAML file may name a source; send content")
    path = base_dir / value
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InvalidDefinition(f"{where}: {path} is larger than {MAX_FILE_BYTES >> 20} MiB")
        return path.read_text()
    except UnicodeDecodeError:
        raise InvalidDefinition(f"{where}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise InvalidDefinition(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
