"""The HTTP API's bodies, one pydantic definition per shape, shared by the daemon
and the SDK: :mod:`.requests` (strict: unknown fields and loose types refused)
and :mod:`.responses` (lenient: unknown fields ignored).

The SDK imports :mod:`.responses` only; :mod:`.requests` carries the daemon's
limits (and imports what defines them).
"""
