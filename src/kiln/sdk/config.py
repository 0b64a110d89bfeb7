"""Where the daemon is and which key to use: one resolution shared by the SDK and the CLI.

Precedence, for the URL and the token independently:

1. an explicit argument (``Kiln(url=...)``, ``kiln --url ...``);
2. the environment: ``KILN_URL``, ``KILN_TOKEN``;
3. the client config file ``~/.kiln/config.yaml`` (written by ``kiln setup``);
4. the default URL ``http://127.0.0.1:8080`` (no default token).

The environment beats the file as it does for docker, kubectl and aws: a
variable set for one shell (a second daemon, a CI job) must not lose to a file
written once for the everyday daemon.

The config file is YAML with two keys::

    url: http://127.0.0.1:8080
    token: kiln_...

This module imports neither httpx nor (until a config file exists) yaml.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8080"
ENV_URL = "KILN_URL"
ENV_TOKEN = "KILN_TOKEN"


def config_path() -> Path:
    """The client config file: ``~/.kiln/config.yaml`` (``$HOME`` decides where ``~`` is)."""
    return Path.home() / ".kiln" / "config.yaml"


@dataclass(frozen=True, slots=True)
class Settings:
    """A resolved URL and token, and where each came from (for error messages)."""

    url: str
    token: str | None
    url_source: str = "default"
    token_source: str | None = None


def normalize_url(url: str) -> str:
    """``host:port`` → ``http://host:port``; strip a trailing ``/``; reject other schemes.

    >>> normalize_url("127.0.0.1:8080/")
    'http://127.0.0.1:8080'
    """
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"invalid daemon URL {url!r}: expected http://HOST:PORT")
    return url.rstrip("/")


def resolve(
    *,
    arg_url: str | None,
    arg_token: str | None,
    file: Mapping[str, str],
    env: Mapping[str, str],
) -> Settings:
    """Apply the precedence rule to values already read (pure)."""
    url, url_source = DEFAULT_URL, "default"
    for value, source in (
        (arg_url, "argument"),
        (env.get(ENV_URL), ENV_URL),
        (file.get("url"), "config file"),
    ):
        if value:
            url, url_source = value, source
            break
    token: str | None = None
    token_source: str | None = None
    for value, source in (
        (arg_token, "argument"),
        (env.get(ENV_TOKEN), ENV_TOKEN),
        (file.get("token"), "config file"),
    ):
        if value:
            token, token_source = value, source
            break
    return Settings(normalize_url(url), token, url_source, token_source)


def load_settings(
    url: str | None = None, token: str | None = None, *, path: Path | None = None
) -> Settings:
    """Resolve the URL and token from arguments, the config file and the environment.

    The config file is read only when an argument is missing.
    """
    file = {} if url and token else read_config_file(path or config_path())
    return resolve(arg_url=url, arg_token=token, file=file, env=os.environ)


def parse_config(text: str, where: str = "config file") -> dict[str, str]:
    """Parse the config file's YAML into ``{"url"?, "token"?}``; unknown keys are ignored."""
    import yaml  # noqa: PLC0415 - only when there is a config file

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a YAML mapping with 'url' and 'token'")
    out: dict[str, str] = {}
    for key in ("url", "token"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key!r} must be a string")
        out[key] = value
    return out


def read_config_file(path: Path) -> dict[str, str]:
    """The config file's ``url``/``token``; ``{}`` when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return parse_config(text, str(path))


def write_config_file(url: str, token: str, path: Path | None = None) -> Path:
    """Write ``url`` and ``token`` to the config file atomically, mode 0600 (dir 0700)."""
    import yaml  # noqa: PLC0415

    path = path or config_path()
    text = yaml.safe_dump({"url": normalize_url(url), "token": token}, sort_keys=False)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".tmp")
        try:
            # mkstemp creates the file 0600: the key is never readable by others.
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    return path
