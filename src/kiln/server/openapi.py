"""What ``/openapi.json`` says beyond the route signatures: the error answers every
route may give, and the line schema of the NDJSON streams.

FastAPI documents a ``response_model`` under ``application/json`` only; a stream's
line model is documented here (:func:`ndjson`) and its schemas are added to the
components when the document is built (:func:`add_stream_schemas`).
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from kiln.api.responses import ErrorBody

NDJSON = "application/x-ndjson"
_REF = "#/components/schemas/{model}"

_ERROR_CODES = {
    400: "Bad input (malformed JSON, a bad query value)",
    401: "Missing or wrong API key",
    403: "Over quota, or not yours",
    404: "Unknown sandbox, template, secret, volume or session",
    409: "Conflict (name taken, volume in use, process finished)",
    413: "Body too large",
    422: "Invalid fields",
    503: "No engine can run sandboxes here",
}

#: Documented on every route, so the OpenAPI schema tells the truth about errors
#: (and replaces FastAPI's default 422 schema, which kiln never sends).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in _ERROR_CODES.items()
}

#: Component schemas the NDJSON contents refer to (filled as routes are declared).
_STREAM_SCHEMAS: dict[str, Any] = {}


def ndjson(line: Any, description: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entry for a 200 streaming NDJSON, one ``line`` (a model or a
    union of them) per line."""
    schema = TypeAdapter(line).json_schema(ref_template=_REF, mode="serialization")
    _STREAM_SCHEMAS.update(schema.pop("$defs", {}))
    title = schema.get("title")
    if schema.get("type") == "object" and isinstance(title, str):
        _STREAM_SCHEMAS[title] = schema  # a single model: referred to, as FastAPI does
        schema = {"$ref": _REF.format(model=title)}
    return {200: {"description": description, "content": {NDJSON: {"schema": schema}}}}


def add_stream_schemas(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (FastAPI's OpenAPI dict) with the NDJSON line schemas in its components."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in _STREAM_SCHEMAS.items():
        schemas.setdefault(name, schema)
    document["components"]["schemas"] = dict(sorted(schemas.items()))
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            content = operation.get("responses", {}).get("200", {}).get("content", {})
            if NDJSON in content and content.get("application/json") == {"schema": {}}:
                # Only a stream: FastAPI's default "any JSON" entry is not an answer.
                del content["application/json"]
    return document
