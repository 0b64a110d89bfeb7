"""The API's OpenAPI document against a committed snapshot, so API changes are deliberate.

A change to a route, a model or an error shows up here as a failing test with
the paths that changed; when the change is meant, write the new snapshot with::

    KILN_UPDATE_OPENAPI=1 scripts/test tests/server/test_openapi_snapshot.py

and commit ``tests/server/openapi.json`` with the change, where a reviewer sees it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .test_fuzz_api import SCHEMA

SNAPSHOT = Path(__file__).with_name("openapi.json")


def render(doc: dict[str, Any]) -> str:
    # The version changes with every release; what is compared is the API.
    doc = {**doc, "info": {**doc["info"], "version": "-"}}
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def changed_parts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for section in ("paths", "components"):
        keys = set(old.get(section, {})) | set(new.get(section, {}))
        for key in sorted(keys):
            a, b = old.get(section, {}).get(key), new.get(section, {}).get(key)
            if a != b:
                what = "added" if a is None else "removed" if b is None else "changed"
                out.append(f"{section} {key}: {what}")
    return out


def test_openapi_matches_the_committed_snapshot() -> None:
    current = render(SCHEMA)
    if os.environ.get("KILN_UPDATE_OPENAPI"):
        SNAPSHOT.write_text(current)
    committed = SNAPSHOT.read_text()
    if committed != current:
        diff = changed_parts(json.loads(committed), json.loads(current)) or ["info/tags"]
        raise AssertionError(
            "the OpenAPI document differs from tests/server/openapi.json:\n  "
            + "\n  ".join(diff[:40])
            + "\nif this is meant: KILN_UPDATE_OPENAPI=1 scripts/test "
            "tests/server/test_openapi_snapshot.py, and commit the snapshot"
        )
