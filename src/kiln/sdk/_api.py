"""The HTTP API as data: each endpoint is a function returning a :class:`Call`.

A :class:`Call` says what to send and how to read the answer; it does no I/O.
The sync and async clients both execute the same calls, so the request
building and response parsing exist once. :class:`map_exceptions` is the one
place httpx exceptions become :mod:`kiln.sdk.errors`.
"""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from kiln.api.responses import ArchiveExtracted

from . import models
from .errors import ConnectionError, InvalidResponse, KilnError, Timeout, error_for_status
from .models import (
    ExecResult,
    FileContent,
    FileStat,
    Health,
    ImageInfo,
    NetworkPolicy,
    NewVolume,
    NodeInfo,
    Port,
    ProcessInfo,
    PublishedPort,
    SandboxInfo,
    SavedImage,
    Secret,
    SessionInfo,
    Template,
    Volume,
    VolumeMount,
)

if TYPE_CHECKING:
    from kiln.protocol.messages import FileInfo, FileListing

T = TypeVar("T")

#: Read timeout for calls that boot, snapshot or restore a VM (slow under TCG).
SLOW_TIMEOUT_S = 600.0
NDJSON = "application/x-ndjson"


class _Unset:
    def __repr__(self) -> str:
        return "DEFAULT"


#: "Use the client's default timeout."
DEFAULT: Any = _Unset()


class _Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


#: "Leave this field as it is" where ``None`` means something (``ttl_s=None``: no expiry).
UNCHANGED: Any = _Unchanged()

#: Query parameters: pairs when a key repeats (``?label=a=1&label=b=2``).
Params = Mapping[str, str] | tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One HTTP request and the parser of its response."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Params | None = None
    json: Any = None
    headers: Mapping[str, str] | None = None
    #: Read timeout in seconds; ``None`` waits forever; DEFAULT is the client's.
    timeout: float | None = DEFAULT


# -- retries -----------------------------------------------------------------------

#: Methods that may be sent twice: a retry cannot do something twice.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: Statuses of a daemon restarting or a proxy in front of it without a backend.
RETRY_STATUSES = frozenset({502, 503, 504})
#: Retries after the first attempt, by default.
DEFAULT_RETRIES = 3
BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0


def never_sent(exc: KilnError) -> bool:
    """Whether the request failed before reaching the daemon (connection refused or
    reset while connecting), so that sending it again cannot repeat anything."""
    return isinstance(exc.__cause__, httpx.ConnectError)


def retry_failure(method: str, exc: KilnError) -> bool:
    """Whether a failed request may be sent again: one that never reached the daemon,
    or an idempotent one whose connection closed before any answer (a kept-alive
    connection the server was closing just then)."""
    if never_sent(exc):
        return True
    return method.upper() in IDEMPOTENT_METHODS and isinstance(
        exc.__cause__, httpx.RemoteProtocolError
    )


def retry_status(method: str, status_code: int) -> bool:
    return method.upper() in IDEMPOTENT_METHODS and status_code in RETRY_STATUSES


def backoff_s(attempt: int, resp: httpx.Response | None = None) -> float:
    """How long to wait before retry number ``attempt`` (0-based): the daemon's
    ``Retry-After`` seconds when it sent one, else exponential with jitter."""
    if resp is not None:
        try:
            return min(max(float(resp.headers.get("retry-after", "")), 0.0), MAX_BACKOFF_S)
        except ValueError:
            pass
    base = min(BACKOFF_S * 2.0**attempt, MAX_BACKOFF_S)
    return base / 2 + random.uniform(0, base / 2)


# -- exception and status translation ------------------------------------------------


@contextmanager
def map_exceptions(url: str = "") -> Iterator[None]:
    """Translate httpx exceptions raised in the block into :mod:`kiln.sdk.errors`."""
    where = f" at {url}" if url else ""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise Timeout(f"the kiln daemon{where} did not answer in time ({exc!r})") from exc
    except httpx.ConnectError as exc:
        raise ConnectionError(f"cannot reach the kiln daemon{where}: {exc}") from exc
    except httpx.TransportError as exc:
        raise ConnectionError(f"connection to the kiln daemon{where} failed: {exc!r}") from exc
    except httpx.HTTPError as exc:
        raise KilnError(f"HTTP error talking to the kiln daemon{where}: {exc}") from exc


def error_message(status_code: int, body: bytes, reason: str = "") -> str:
    """The daemon's ``{"error": ...}`` text, or the best short description of the body."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        if isinstance(data.get("error"), str):
            return str(data["error"])
        detail = data.get("detail")  # a framework's own validation error
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                    parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            if parts:
                return "; ".join(parts)
    text = body.decode("utf-8", "replace").strip()
    if text and len(text) <= 200 and "\n" not in text:
        return text
    return f"HTTP {status_code} {reason}".strip()


def raise_for_status(resp: httpx.Response) -> None:
    """Raise the :class:`~kiln.sdk.errors.APIError` for an error response (body already read)."""
    if resp.status_code >= 400:
        message = error_message(resp.status_code, resp.content, resp.reason_phrase)
        raise error_for_status(resp.status_code, message)


def _json(resp: httpx.Response) -> Any:
    raise_for_status(resp)
    try:
        return resp.json()
    except ValueError:
        raise InvalidResponse(
            f"{resp.request.method} {resp.request.url.path}: the answer is not JSON"
        ) from None


def _parser(kind: type[T], what: str) -> Callable[[httpx.Response], T]:
    return lambda resp: models.parse(kind, _json(resp), what)


def _list_parser(kind: type[T], what: str) -> Callable[[httpx.Response], list[T]]:
    return lambda resp: models.parse(list[kind], _json(resp), what)  # type: ignore[valid-type]


def _no_content(resp: httpx.Response) -> None:
    raise_for_status(resp)


def _seg(value: str) -> str:
    """One path segment, percent-encoded (a name never contains '/', but be safe)."""
    if not value:
        raise ValueError("an id or name must not be empty")
    return quote(value, safe="")


def sandbox_path(id_or_name: str, *rest: str) -> str:
    return "/".join(("/sandboxes", _seg(id_or_name), *rest))


# -- health -------------------------------------------------------------------------


def health() -> Call[Health]:
    return Call("GET", "/health", _parser(Health, "health"))


# -- nodes (admins) -----------------------------------------------------------------


def list_nodes() -> Call[list[NodeInfo]]:
    return Call("GET", "/nodes", _list_parser(NodeInfo, "node list"))


def get_node(name: str) -> Call[NodeInfo]:
    return Call("GET", f"/nodes/{_seg(name)}", _parser(NodeInfo, "node"))


def set_node_draining(name: str, draining: bool) -> Call[NodeInfo]:
    action = "drain" if draining else "undrain"
    return Call("POST", f"/nodes/{_seg(name)}/{action}", _parser(NodeInfo, "node"))


def delete_node(name: str) -> Call[None]:
    return Call("DELETE", f"/nodes/{_seg(name)}", _no_content)


# -- sandboxes ----------------------------------------------------------------------


def _volume_mounts(volumes: Mapping[str, str] | Sequence[VolumeMount]) -> list[dict[str, str]]:
    if isinstance(volumes, Mapping):
        return [{"name": name, "mount": mount} for name, mount in volumes.items()]
    return [{"name": v.name, "mount": v.mount} for v in volumes]


def sandbox_spec(
    *,
    name: str | None = None,
    cpus: int | None = None,
    memory_mb: int | None = None,
    env: Mapping[str, str] | None = None,
    secrets: Sequence[str] | None = None,
    init: str | None = None,
    keep_hot: bool | None = None,
    image: str | None = None,
    template: str | None = None,
    volumes: Mapping[str, str] | Sequence[VolumeMount] | None = None,
    new_volumes: Sequence[NewVolume] | None = None,
    labels: Mapping[str, str] | None = None,
    ttl_s: float | None = None,
    on_expire: str | None = None,
    engine: str | None = None,
    runtime: str | None = None,
    network: NetworkPolicy | Mapping[str, Any] | None = None,
    saved_image: str | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /sandboxes``: only the fields given, so daemon defaults apply."""
    body: dict[str, Any] = {}
    for key, value in (
        ("name", name),
        ("cpus", cpus),
        ("memory_mb", memory_mb),
        ("init", init),
        ("keep_hot", keep_hot),
        ("image", image),
        ("template_id", template),
        ("ttl_s", ttl_s),
        ("on_expire", on_expire),
        ("engine", engine),
        ("runtime", runtime),
        ("saved_image", saved_image),
    ):
        if value is not None:
            body[key] = value
    if labels:
        body["labels"] = dict(labels)
    if env:
        body["env"] = dict(env)
    if secrets:
        body["secrets"] = list(secrets)
    if volumes:
        body["volumes"] = _volume_mounts(volumes)
    if new_volumes:
        body["new_volumes"] = [v.to_dict() for v in new_volumes]
    if network is not None:
        body["network"] = network.to_dict() if isinstance(network, NetworkPolicy) else dict(network)
    return body


def create_sandbox(spec: Mapping[str, Any]) -> Call[SandboxInfo]:
    return Call(
        "POST", "/sandboxes", _parser(SandboxInfo, "sandbox"), json=spec, timeout=SLOW_TIMEOUT_S
    )


def list_sandboxes(labels: Mapping[str, str] | None = None) -> Call[list[SandboxInfo]]:
    """Every sandbox, or those carrying all of ``labels`` (``?label=k=v`` per label)."""
    params = tuple(("label", f"{k}={v}") for k, v in (labels or {}).items())
    return Call(
        "GET",
        "/sandboxes",
        _list_parser(SandboxInfo, "sandbox list"),
        params=params or None,
    )


def get_sandbox(id_or_name: str) -> Call[SandboxInfo]:
    return Call("GET", sandbox_path(id_or_name), _parser(SandboxInfo, "sandbox"))


def update_sandbox(
    id_or_name: str,
    *,
    name: str | None = None,
    keep_hot: bool | None = None,
    labels: Mapping[str, str] | None = None,
    ttl_s: float | None = UNCHANGED,
    on_expire: str | None = None,
) -> Call[SandboxInfo]:
    """``PATCH``: only what is given; ``labels`` replaces the set, ``ttl_s=None`` removes
    the expiry (and any other ``ttl_s`` counts from now)."""
    body: dict[str, Any] = {}
    for key, value in (("name", name), ("keep_hot", keep_hot), ("on_expire", on_expire)):
        if value is not None:
            body[key] = value
    if labels is not None:
        body["labels"] = dict(labels)
    if ttl_s is not UNCHANGED:
        body["ttl_s"] = ttl_s
    return Call("PATCH", sandbox_path(id_or_name), _parser(SandboxInfo, "sandbox"), json=body)


def delete_sandbox(id_or_name: str) -> Call[None]:
    return Call("DELETE", sandbox_path(id_or_name), _no_content, timeout=SLOW_TIMEOUT_S)


def stop_sandbox(id_or_name: str) -> Call[SandboxInfo]:
    return Call(
        "POST",
        sandbox_path(id_or_name, "stop"),
        _parser(SandboxInfo, "sandbox"),
        timeout=SLOW_TIMEOUT_S,
    )


def fork_sandbox(id_or_name: str, name: str | None = None) -> Call[SandboxInfo]:
    """``POST .../fork``: a new sandbox copying this one's disk, memory and processes."""
    return Call(
        "POST",
        sandbox_path(id_or_name, "fork"),
        _parser(SandboxInfo, "sandbox"),
        json={} if name is None else {"name": name},
        timeout=SLOW_TIMEOUT_S,
    )


def save_sandbox(id_or_name: str, name: str) -> Call[SavedImage]:
    """``POST .../save``: the sandbox as a saved image ``name`` of the caller."""
    return Call(
        "POST",
        sandbox_path(id_or_name, "save"),
        _parser(SavedImage, "saved image"),
        json={"name": name},
        timeout=SLOW_TIMEOUT_S,
    )


def list_saved_images() -> Call[list[SavedImage]]:
    return Call("GET", "/saved-images", _list_parser(SavedImage, "saved image list"))


def get_saved_image(name: str) -> Call[SavedImage]:
    return Call("GET", f"/saved-images/{_seg(name)}", _parser(SavedImage, "saved image"))


def delete_saved_image(name: str) -> Call[None]:
    return Call("DELETE", f"/saved-images/{_seg(name)}", _no_content)


def start_sandbox(id_or_name: str) -> Call[SandboxInfo]:
    return Call(
        "POST",
        sandbox_path(id_or_name, "start"),
        _parser(SandboxInfo, "sandbox"),
        timeout=SLOW_TIMEOUT_S,
    )


# -- exec ---------------------------------------------------------------------------


def exec_body(
    cmd: Sequence[str] | str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float | None = None,
    encoding: str | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /sandboxes/{id}/exec``. A string ``cmd`` runs via ``sh -c``.

    ``user``: ``"root"``, or None for the sandbox user (sent only when given,
    so a daemon without the field still takes a body that does not use it).
    """
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    if not argv:
        raise ValueError("cmd must not be empty")
    body: dict[str, Any] = {"cmd": argv}
    if env:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    if encoding is not None:
        body["encoding"] = encoding
    if user is not None:
        body["user"] = user
    return body


def exec_read_timeout(timeout_s: float | None) -> float | None:
    """How long to wait for an exec's answer: the command's own timeout plus slack."""
    return None if timeout_s is None else timeout_s + SLOW_TIMEOUT_S


def exec_buffered(id_or_name: str, body: Mapping[str, Any]) -> Call[ExecResult]:
    return Call(
        "POST",
        sandbox_path(id_or_name, "exec"),
        _parser(ExecResult, "exec result"),
        json=body,
        timeout=exec_read_timeout(body.get("timeout_s")),
    )


def exec_streamed(id_or_name: str, body: Mapping[str, Any]) -> Call[None]:
    """The streamed exec request; the caller reads the NDJSON body itself."""
    return Call(
        "POST",
        sandbox_path(id_or_name, "exec"),
        _no_content,
        json=body,
        headers={"Accept": NDJSON},
        timeout=None,
    )


# -- background processes -----------------------------------------------------------


def process_body(
    cmd: Sequence[str] | str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    stdin: bool = True,
    tag: str | None = None,
    tty: bool = False,
    rows: int | None = None,
    cols: int | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /sandboxes/{id}/processes``: an exec's, without its
    timeout or encoding (a background process has neither), with its own options
    (sent only when not the default)."""
    body = exec_body(cmd, env=env, cwd=cwd, user=user)
    if not stdin:
        body["stdin"] = False
    if tag is not None:
        body["tag"] = tag
    if tty:
        body["tty"] = True
    if rows is not None:
        body["rows"] = rows
    if cols is not None:
        body["cols"] = cols
    return body


def _pid(pid: int) -> str:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"a pid is a positive integer, got {pid!r}")
    return str(pid)


def process_path(id_or_name: str, pid: int, *rest: str) -> str:
    return sandbox_path(id_or_name, "processes", _pid(pid), *rest)


def start_process(id_or_name: str, body: Mapping[str, Any]) -> Call[ProcessInfo]:
    return Call(
        "POST", sandbox_path(id_or_name, "processes"), _parser(ProcessInfo, "process"), json=body
    )


def list_processes(id_or_name: str) -> Call[list[ProcessInfo]]:
    return Call(
        "GET",
        sandbox_path(id_or_name, "processes"),
        _list_parser(ProcessInfo, "process list"),
    )


def get_process(id_or_name: str, pid: int) -> Call[ProcessInfo]:
    return Call("GET", process_path(id_or_name, pid), _parser(ProcessInfo, "process"))


def process_output(
    id_or_name: str, pid: int, *, follow: bool = True, timeout: float | None = None
) -> Call[None]:
    """The output stream request (NDJSON, base64 chunks); the caller reads the body.

    ``timeout`` bounds each wait for the next line (``None``: forever)."""
    params = {"encoding": "base64"}
    if not follow:
        params["follow"] = "false"
    return Call(
        "GET", process_path(id_or_name, pid, "output"), _no_content, params=params, timeout=timeout
    )


def process_stdin(id_or_name: str, pid: int, *, close: bool = False) -> Call[None]:
    """Raw bytes to the process's stdin; the caller supplies the body."""
    return Call(
        "POST",
        process_path(id_or_name, pid, "stdin"),
        _no_content,
        params={"close": "true"} if close else None,
        headers={"Content-Type": "application/octet-stream"},
    )


def signal_process(id_or_name: str, pid: int, signal: str) -> Call[None]:
    if not isinstance(signal, str) or not signal:
        raise ValueError(f"a signal is a name such as 'TERM', got {signal!r}")
    return Call(
        "POST", process_path(id_or_name, pid, "signal"), _no_content, json={"signal": signal}
    )


def resize_process(id_or_name: str, pid: int, rows: int, cols: int) -> Call[None]:
    return Call(
        "POST",
        process_path(id_or_name, pid, "resize"),
        _no_content,
        json={"rows": rows, "cols": cols},
    )


def stdin_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


# -- files --------------------------------------------------------------------------


def _int_header(resp: httpx.Response, name: str) -> int:
    value = resp.headers.get(name)
    try:
        return int(value) if value is not None else -1
    except ValueError:
        raise InvalidResponse(f"header {name} is not an integer: {value!r}") from None


def _file_content(resp: httpx.Response) -> FileContent:
    raise_for_status(resp)
    data = resp.content
    size = _int_header(resp, "X-File-Size")
    if size < 0:
        size = len(data)
    # The contract: Content-Length only when the read was not cut short.
    truncated = "content-length" not in resp.headers or len(data) < size
    return FileContent(data=data, size=size, truncated=truncated)


def read_file(
    id_or_name: str, path: str, *, offset: int = 0, limit: int = 0, max_bytes: int = 0
) -> Call[FileContent]:
    params = {"path": path}
    for key, value in (("offset", offset), ("limit", limit), ("max_bytes", max_bytes)):
        if value < 0:
            raise ValueError(f"{key} must not be negative")
        if value:
            params[key] = str(value)
    return Call("GET", sandbox_path(id_or_name, "files"), _file_content, params=params)


def _file_listing(resp: httpx.Response) -> FileListing:
    raise_for_status(resp)
    return models.parse_file_listing(resp.content)


def list_files(id_or_name: str, path: str, depth: int | None = None) -> Call[FileListing]:
    params = {"path": path, "ls": "true"}
    if depth is not None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        params["depth"] = str(depth)
    return Call("GET", sandbox_path(id_or_name, "files"), _file_listing, params=params)


def make_dir(id_or_name: str, path: str, parents: bool, mode: int | str | None) -> Call[bool]:
    """``POST files/mkdir``: True when created, False when the directory existed."""
    body: dict[str, Any] = {"path": path, "parents": parents}
    octal = file_mode(mode)
    if octal is not None:
        body["mode"] = octal

    def parse(resp: httpx.Response) -> bool:
        return bool(_json(resp).get("created"))

    return Call("POST", sandbox_path(id_or_name, "files/mkdir"), parse, json=body)


def move_file(id_or_name: str, source: str, destination: str, overwrite: bool) -> Call[FileInfo]:
    body = {"source": source, "destination": destination, "overwrite": overwrite}
    return Call("POST", sandbox_path(id_or_name, "files/move"), _file_info, json=body)


def _file_info(resp: httpx.Response) -> FileInfo:
    return models.parse_file_info(_json(resp))


def remove_file(id_or_name: str, path: str, recursive: bool) -> Call[None]:
    params = {"path": path, "recursive": "true" if recursive else "false"}
    return Call("DELETE", sandbox_path(id_or_name, "files"), _no_content, params=params)


def watch_files(id_or_name: str, path: str, recursive: bool) -> Call[None]:
    """``GET files/watch``: NDJSON events, read by the clients' watch streams."""
    params = {"path": path, "recursive": "true" if recursive else "false"}
    return Call(
        "GET", sandbox_path(id_or_name, "files/watch"), _no_content, params=params, timeout=None
    )


def stat_file(id_or_name: str, path: str) -> Call[FileStat]:
    def parse(resp: httpx.Response) -> FileStat:
        if resp.status_code == 404:  # HEAD has no body to carry the daemon's message
            raise error_for_status(404, f"no such file: {path}")
        raise_for_status(resp)
        is_dir = resp.headers.get("X-File-IsDir", "false").lower() in ("true", "1", "yes")
        return FileStat(
            path=path,
            size=max(_int_header(resp, "X-File-Size"), 0),
            mode=resp.headers.get("X-File-Mode", ""),
            is_dir=is_dir,
        )

    return Call("HEAD", sandbox_path(id_or_name, "files"), parse, params={"path": path})


def archive_stat(resp: httpx.Response, path: str) -> tuple[FileStat, str]:
    """The stat headers of a ``GET archive`` answer and its top member's name."""
    is_dir = resp.headers.get("X-File-IsDir", "false").lower() in ("true", "1", "yes")
    stat = FileStat(
        path=path,
        size=max(_int_header(resp, "X-File-Size"), 0),
        mode=resp.headers.get("X-File-Mode", ""),
        is_dir=is_dir,
    )
    return stat, resp.headers.get("X-Archive-Root", "")


def download_archive(id_or_name: str, path: str) -> Call[None]:
    """``GET archive``: a tar stream, read by the clients' archive downloads."""
    return Call(
        "GET",
        sandbox_path(id_or_name, "archive"),
        _no_content,
        params={"path": path},
        timeout=SLOW_TIMEOUT_S,
    )


def upload_archive(id_or_name: str, path: str) -> Call[int]:
    """``PUT archive`` of a tar stream (the caller supplies the body): members extracted."""

    def parse(resp: httpx.Response) -> int:
        return models.parse(ArchiveExtracted, _json(resp), "archive upload").members

    return Call(
        "PUT",
        sandbox_path(id_or_name, "archive"),
        parse,
        params={"path": path},
        headers={"Content-Type": "application/x-tar"},
        timeout=SLOW_TIMEOUT_S,
    )


def archive_body(data: bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes]) -> Any:
    """A request body for ``PUT archive``: bytes as they are, anything else streamed
    (chunked: the length need not be known)."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if hasattr(data, "read"):
        stream: IO[bytes] = data  # type: ignore[assignment]
        return iter(lambda: stream.read(UPLOAD_CHUNK), b"")
    return iter(data)


def file_mode(mode: int | str | None) -> str | None:
    """``0o644`` or ``"644"`` or ``"0644"`` → ``"0644"``."""
    if mode is None:
        return None
    if isinstance(mode, int):
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"file mode {mode:o} is out of range")
        return f"{mode:04o}"
    text = mode.removeprefix("0o")
    if not text or text.strip("01234567") or int(text, 8) > 0o7777:
        raise ValueError(f"file mode {mode!r} is not an octal number like 0644")
    return f"{int(text, 8):04o}"


def write_file(id_or_name: str, path: str, size: int, mode: int | str | None) -> Call[None]:
    """``PUT`` of ``size`` bytes; the caller supplies the body."""
    params = {"path": path}
    octal = file_mode(mode)
    if octal is not None:
        params["mode"] = octal
    return Call(
        "PUT",
        sandbox_path(id_or_name, "files"),
        _no_content,
        params=params,
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        timeout=SLOW_TIMEOUT_S,
    )


# -- sessions, ports, publish -----------------------------------------------------


def _sessions(resp: httpx.Response) -> list[SessionInfo]:
    return models.parse(list[SessionInfo], _json(resp), "session list")


def list_sessions(id_or_name: str) -> Call[list[SessionInfo]]:
    return Call("GET", sandbox_path(id_or_name, "sessions"), _sessions)


def kill_session(id_or_name: str, session_id: str) -> Call[None]:
    return Call("DELETE", sandbox_path(id_or_name, "sessions", _seg(session_id)), _no_content)


def sandbox_ports(id_or_name: str) -> Call[list[Port]]:
    return Call("GET", sandbox_path(id_or_name, "ports"), _list_parser(Port, "ports"))


def all_ports() -> Call[list[Port]]:
    return Call("GET", "/ports", _list_parser(Port, "ports"))


def proxy_url(base_url: str, id_or_name: str, port: int) -> str:
    """``<base_url>/sandboxes/{id}/proxy/{port}/``: the path the daemon relays to
    ``port`` inside the sandbox (pure; the request needs the API key)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port!r}: expected an integer in 1..65535")
    return base_url.rstrip("/") + sandbox_path(id_or_name, "proxy", str(port), "")


def _published_url(resp: httpx.Response) -> str:
    return models.parse(PublishedPort, _json(resp), "published port").url


def publish(id_or_name: str, port: int, alias: str | None) -> Call[str]:
    """``POST .../publish`` → the published URL."""
    body: dict[str, Any] = {"port": port}
    if alias is not None:
        body["alias"] = alias
    return Call("POST", sandbox_path(id_or_name, "publish"), _published_url, json=body)


def list_published(id_or_name: str) -> Call[list[PublishedPort]]:
    return Call(
        "GET",
        sandbox_path(id_or_name, "publish"),
        _list_parser(PublishedPort, "published ports"),
    )


def unpublish(id_or_name: str, port: int) -> Call[None]:
    return Call("DELETE", sandbox_path(id_or_name, "publish", str(port)), _no_content)


# -- secrets ------------------------------------------------------------------------


def _secret_or_none(resp: httpx.Response) -> Secret | None:
    raise_for_status(resp)
    if not resp.content.strip():
        return None
    try:
        return models.parse(Secret, resp.json(), "secret")
    except (ValueError, InvalidResponse):
        return None  # the contract does not promise a body here


def set_secret(name: str, value: str) -> Call[Secret | None]:
    return Call("POST", "/secrets", _secret_or_none, json={"name": name, "value": value})


def list_secrets() -> Call[list[Secret]]:
    return Call("GET", "/secrets", _list_parser(Secret, "secret list"))


def delete_secret(name: str) -> Call[None]:
    return Call("DELETE", f"/secrets/{_seg(name)}", _no_content)


# -- volumes ------------------------------------------------------------------------


def create_volume(name: str, size_mb: int) -> Call[Volume]:
    return Call(
        "POST",
        "/volumes",
        _parser(Volume, "volume"),
        json={"name": name, "size_mb": size_mb},
        timeout=SLOW_TIMEOUT_S,
    )


def list_volumes() -> Call[list[Volume]]:
    return Call("GET", "/volumes", _list_parser(Volume, "volume list"))


def get_volume(name: str) -> Call[Volume]:
    return Call("GET", f"/volumes/{_seg(name)}", _parser(Volume, "volume"))


def delete_volume(name: str) -> Call[None]:
    return Call("DELETE", f"/volumes/{_seg(name)}", _no_content)


# -- images -------------------------------------------------------------------------


def image_body(
    name: str,
    packages: Sequence[str] = (),
    files: Sequence[Mapping[str, str]] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    dockerfile: str | None = None,
    context: bytes | None = None,
) -> dict[str, Any]:
    """The body of ``POST /images``: ``files`` are ``{path, content, mode?}`` mappings;
    a Dockerfile's ``context`` (a tar archive) is sent as base64."""
    body: dict[str, Any] = {
        "name": name,
        "packages": list(packages),
        "files": [dict(f) for f in files or ()],
        "env": dict(env or {}),
    }
    if dockerfile is not None:
        body["dockerfile"] = dockerfile
    if context is not None:
        body["context"] = base64.b64encode(context).decode()
    return body


def build_image(body: Mapping[str, Any]) -> Call[ImageInfo]:
    """A build answered once it is done (a build may take minutes: no read timeout)."""
    return Call("POST", "/images", _parser(ImageInfo, "image"), json=dict(body), timeout=None)


def build_image_streamed(body: Mapping[str, Any]) -> Call[None]:
    """The streamed build request; the caller reads the NDJSON progress itself."""
    return Call(
        "POST", "/images", _no_content, json=dict(body), headers={"Accept": NDJSON}, timeout=None
    )


def parse_build_event(line: str) -> dict[str, Any] | None:
    """One line of a streamed build: ``{"type": "progress" | "image" | "error", ...}``."""
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise InvalidResponse(f"a build progress line is not JSON: {line[:200]!r}") from exc
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise InvalidResponse(f"a build progress line has no type: {line[:200]!r}")
    return event


def build_result(event: Mapping[str, Any]) -> ImageInfo:
    """The image of a stream's last line, or the error it reports (as the status would)."""
    if event.get("type") == "image":
        return models.parse(ImageInfo, event.get("image"), "image")
    status = event.get("status")
    message = str(event.get("message") or "the build failed")
    raise error_for_status(status if isinstance(status, int) else 500, message)


def list_images() -> Call[list[ImageInfo]]:
    return Call("GET", "/images", _list_parser(ImageInfo, "image list"))


def _owner(owner: str | None) -> dict[str, str] | None:
    return None if owner is None else {"owner": owner}


def get_image(name: str, owner: str | None = None) -> Call[ImageInfo]:
    return Call("GET", f"/images/{_seg(name)}", _parser(ImageInfo, "image"), _owner(owner))


def delete_image(name: str, owner: str | None = None) -> Call[None]:
    return Call(
        "DELETE", f"/images/{_seg(name)}", _no_content, _owner(owner), timeout=SLOW_TIMEOUT_S
    )


# -- templates ----------------------------------------------------------------------


def template_spec(
    *,
    name: str,
    cpus: int | None = None,
    memory_mb: int | None = None,
    env: Mapping[str, str] | None = None,
    init: str | None = None,
    image: str | None = None,
    volumes: Mapping[str, str] | Sequence[VolumeMount] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name}
    for key, value in (("cpus", cpus), ("memory_mb", memory_mb), ("init", init), ("image", image)):
        if value is not None:
            body[key] = value
    if env:
        body["env"] = dict(env)
    if volumes:
        body["volumes"] = _volume_mounts(volumes)
    return body


def create_template(spec: Mapping[str, Any]) -> Call[Template]:
    return Call("POST", "/templates", _parser(Template, "template"), json=spec)


def list_templates() -> Call[list[Template]]:
    return Call("GET", "/templates", _list_parser(Template, "template list"))


def get_template(template_id: str) -> Call[Template]:
    return Call("GET", f"/templates/{_seg(template_id)}", _parser(Template, "template"))


def delete_template(template_id: str) -> Call[None]:
    return Call("DELETE", f"/templates/{_seg(template_id)}", _no_content)


# -- shell (WebSocket) --------------------------------------------------------------


def shell_url(
    base_url: str,
    id_or_name: str,
    *,
    session_id: str | None = None,
    rows: int | None = None,
    cols: int | None = None,
    cmd: str | None = None,
    user: str | None = None,
) -> str:
    """``ws://host/sandboxes/{id}/ws?...`` for the daemon at ``base_url`` (http → ws)."""
    scheme, rest = base_url.split("://", 1)
    ws_scheme = "wss" if scheme == "https" else "ws"
    params = (
        ("session_id", session_id),
        ("rows", rows),
        ("cols", cols),
        ("cmd", cmd),
        ("user", user),
    )
    query = [f"{key}={quote(str(value), safe='')}" for key, value in params if value is not None]
    url = f"{ws_scheme}://{rest}{sandbox_path(id_or_name, 'ws')}"
    return f"{url}?{'&'.join(query)}" if query else url


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# -- request bodies for file uploads ------------------------------------------------

UPLOAD_CHUNK = 256 * 1024


def remaining_size(stream: IO[bytes]) -> int | None:
    """Bytes left in a seekable binary stream from its current position; ``None`` if unknown."""
    try:
        pos = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(pos)
    except (OSError, ValueError, AttributeError):
        return None
    return max(end - pos, 0)


def iter_upload(stream: IO[bytes], size: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes of ``stream`` in chunks (a file growing meanwhile is cut)."""
    left = size
    while left > 0:
        chunk = stream.read(min(UPLOAD_CHUNK, left))
        if not chunk:
            raise ValueError(f"the file ended {left} bytes before its announced size")
        left -= len(chunk)
        yield chunk


def upload_body(data: bytes | bytearray | memoryview | str | IO[bytes]) -> tuple[int, Any]:
    """``(size, content)`` for ``files.write``: bytes as they are, a stream chunked."""
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        return len(raw), raw
    size = remaining_size(data)
    if size is None:  # a pipe or socket: the length must be known up front
        raw = data.read()
        return len(raw), raw
    return size, iter_upload(data, size)
