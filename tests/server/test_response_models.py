"""The response models (kiln.api.responses) describe every answer of the kiln API.

The schema walk checks that ``/openapi.json`` documents what each route answers:
a schema for every success body (JSON, NDJSON lines, bytes), headers for HEAD,
``ErrorBody`` for errors. The view checks guard the other direction: FastAPI
filters an answer through its ``response_model``, so a field the daemon builds
and the model lacks would silently vanish; every view must carry exactly the
model's fields.
"""

from __future__ import annotations

from typing import Any

from kiln.api.requests import CreateTemplate, CreateVolume, PublishPort, PutSecret
from kiln.api.responses import (
    FileEntry,
    Health,
    Port,
    ProcessInfo,
    PublishedPort,
    SandboxInfo,
    Secret,
    SessionInfo,
    Template,
    Volume,
)
from kiln.protocol import FileInfo
from kiln.protocol import ProcessInfo as AgentProcess
from kiln.protocol import SessionInfo as AgentSession
from kiln.server.publishing import Origin
from kiln.server.routes.processes import process_view
from kiln.server.services import _port_entry

from .conftest import ApiUser
from .harness import LiveServer
from .test_fuzz_api import SCHEMA

ERROR = {"$ref": "#/components/schemas/ErrorBody"}
NDJSON_ROUTES = {
    "post /sandboxes/{sandbox}/exec",
    "get /sandboxes/{sandbox}/processes/{pid}/output",
    "get /sandboxes/{sandbox}/files/watch",
    "post /images",
}


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    resolved: dict[str, Any] = SCHEMA["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return resolved


def _describes_a_body(schema: dict[str, Any]) -> bool:
    """A model, a list of models, a union of models, or bytes: never 'any JSON'."""
    schema = _resolve(schema)
    if schema.get("type") == "array":
        return _describes_a_body(schema["items"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return all(_describes_a_body(s) for s in schema[key])
    if schema.get("type") == "string":
        return schema.get("format") == "binary"
    return schema.get("type") == "object" and bool(schema.get("properties"))


def _kiln_operations() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{method} {path}", operation)
        for path, operations in SCHEMA["paths"].items()
        if not path.startswith("/e2b")
        for method, operation in operations.items()
    ]


def test_every_kiln_route_documents_its_answer() -> None:
    undocumented = []
    for label, operation in _kiln_operations():
        for status, response in operation["responses"].items():
            content = response.get("content", {})
            if status == "204":
                ok = not content
            elif label.startswith("head ") and status == "200":
                ok = bool(response.get("headers")) and not content
            elif status.startswith("2"):
                ok = bool(content) and all(
                    _describes_a_body(media.get("schema", {})) for media in content.values()
                )
            else:
                ok = content == {"application/json": {"schema": ERROR}}
            if not ok:
                undocumented.append(f"{label} {status}: {response}")
    assert undocumented == []


def test_streams_document_their_line_model() -> None:
    operations = dict(_kiln_operations())
    streams = {
        label
        for label, operation in operations.items()
        if "application/x-ndjson" in operation["responses"].get("200", {}).get("content", {})
    }
    assert streams == NDJSON_ROUTES
    exec_lines = operations["post /sandboxes/{sandbox}/exec"]["responses"]["200"]["content"]
    kinds = exec_lines["application/x-ndjson"]["schema"]["discriminator"]["mapping"]
    assert set(kinds) == {"stdout", "stderr", "exit", "error"}
    assert "application/json" in exec_lines  # the buffered answer


def test_routes_with_a_body_declare_errors() -> None:
    for label, operation in _kiln_operations():
        if label == "get /health":
            continue
        codes = set(operation["responses"])
        assert {"400", "401", "404", "422"} <= codes, label


# -- views ------------------------------------------------------------------------------


def _fields(model: type[Any]) -> set[str]:
    return set(model.model_fields)


def test_resource_views_are_their_models(server: LiveServer, api: ApiUser) -> None:
    services = server.services
    tpl = services.templates.create(api.user, CreateTemplate(name="tv", volumes=None))
    assert set(tpl) == _fields(Template)
    secret = services.secrets.put(api.user, PutSecret(name="TV", value="x"))
    assert set(secret) == _fields(Secret)
    vol = services.volumes.create(api.user, CreateVolume(name="tv", size_mb=8))
    assert set(vol) == _fields(Volume)
    assert set(services.health()) == _fields(Health)


def test_sandbox_views_are_their_models(server: LiveServer, api: ApiUser) -> None:
    created = api.sandbox(name="views", labels={"a": "b"})
    assert set(created) == _fields(SandboxInfo)  # what went over the wire
    view = server.services.sandboxes.get(api.user, "views")
    assert set(view) == _fields(SandboxInfo)  # what the daemon built
    origin = Origin("http", 8080)
    published = server.services.publishing.publish(api.user, "views", PublishPort(port=80), origin)
    assert set(published) == _fields(PublishedPort)
    row = server.services.sandboxes.find(api.user, "views")
    assert set(_port_entry(row, 80, {})) == _fields(Port)
    SandboxInfo.model_validate(view)
    PublishedPort.model_validate(published)


def test_agent_views_are_their_models() -> None:
    process = AgentProcess(pid=7, cmd=("sleep", "1"), running=True, started_at=1.5)
    assert set(process_view(process)) == _fields(ProcessInfo)
    session = AgentSession(
        session_id="s", argv="sh", tty=True, running=True, attached=False, created_at=1.0
    )
    assert set(session.to_json()) == _fields(SessionInfo)
    # FileInfo leaves out what it does not know; everything it can send is a field.
    full = FileInfo(
        name="a",
        size=1,
        mode="0644",
        is_dir=False,
        mtime=1.0,
        path="/a",
        type="symlink",
        symlink=True,
        target="/b",
        uid=0,
        gid=0,
        owner="root",
        group="root",
        permissions="-rw-r--r--",
    )
    assert set(full.to_json()) == _fields(FileEntry)
    entry = FileEntry.model_validate(full.to_json())
    assert entry.model_dump(mode="json", exclude_unset=True) == full.to_json()
