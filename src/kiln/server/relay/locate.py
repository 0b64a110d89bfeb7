"""Which sandbox a request addresses, found the way the route that serves it would.

- ``/sandboxes/{ref}/…`` (kiln's API, the shell, the reverse proxy) and
  ``/e2b[/v2]/sandboxes/{ref}/…`` (E2B's control API): ``ref`` is an id or a
  name. An id is looked up directly; a name is per user, so the caller's key
  (``Authorization: Bearer``, E2B's ``X-API-Key``, a WebSocket's ``?token=``)
  names the user first.
- ``/e2b/envd/…``: the ``E2b-Sandbox-Id`` header, an id or a name; for a name,
  the sandbox whose envd access token the request carries.
- ``Host: <alias>.<publish domain>``: the published port's sandbox.

None means "not a sandbox's request, or none this node can tell": the request is
served here as it would be on a single daemon, and the route answers (401, 404,
…) itself.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.types import Scope

from kiln.store import NotFound, Sandbox, Store

from ..auth import bearer_token
from ..e2b.envd import PREFIX as ENVD_PREFIX
from ..e2b.envd import SANDBOX_HEADER, TOKEN_HEADER
from ..e2b.tokens import EnvdTokens
from ..publishing import PublishService

_SANDBOX_PATH = re.compile(r"^/(?:e2b/(?:v2/)?)?sandboxes/([^/]+)(?:/|$)")
#: How sandbox ids look (``sb-`` and 12 hex digits): anything else is a name.
_ID = re.compile(r"^sb-[0-9a-f]{12}$")


def addressed(
    scope: Scope, store: Store, publishing: PublishService, tokens: EnvdTokens
) -> Sandbox | None:
    """The live sandbox ``scope`` addresses (None: see the module's docstring)."""
    headers = Headers(scope=scope)
    alias = publishing.alias_of(headers.get("host", ""))
    if alias is not None:
        try:
            rule = store.publish_rule_by_alias(alias)
            return store.get_sandbox(rule.sandbox_id)
        except NotFound:
            return None
    path: str = scope["path"]
    if path.startswith(ENVD_PREFIX + "/"):
        return _by_envd_headers(headers, store, tokens)
    match = _SANDBOX_PATH.match(path)
    if match is None:
        return None
    ref = match.group(1)
    if _ID.match(ref):
        try:
            return store.get_sandbox(ref)
        except NotFound:
            pass  # a name that looks like an id: the user's, below
    for key in _keys(scope, headers):
        user = store.user_by_key(key)
        if user is not None:
            try:
                return store.find_sandbox(user.id, ref)
            except NotFound:
                return None
    return None


def _keys(scope: Scope, headers: Headers) -> list[str]:
    """The API keys the request may carry, in the order the routes look at them."""
    keys = []
    if scope["path"].startswith("/e2b/"):
        e2b_key = headers.get("x-api-key")
        if e2b_key:
            keys.append(e2b_key)
    bearer = bearer_token(headers)
    if bearer is not None:
        keys.append(bearer)
    if scope["type"] == "websocket":
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        keys.extend(query.get("token", [])[:1])
    return keys


def _by_envd_headers(headers: Headers, store: Store, tokens: EnvdTokens) -> Sandbox | None:
    ref = headers.get(SANDBOX_HEADER, "").strip()
    if not ref:
        return None
    try:
        return store.get_sandbox(ref)
    except NotFound:
        pass
    token = headers.get(TOKEN_HEADER)
    for candidate in store.list_live_sandboxes():
        if candidate.name == ref and tokens.verify(candidate.id, token):
            return candidate
    return None
