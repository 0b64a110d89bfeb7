"""The E2B-compatible API: the unmodified ``e2b`` SDK drives kiln sandboxes.

Two surfaces, both under the daemon's own port: the control plane (``/e2b``,
E2B's REST API for sandboxes) and the in-sandbox service "envd" (``/e2b/envd``,
Connect RPC with the JSON codec plus ``/files``), routed by the
``E2b-Sandbox-Id`` header the SDK sends when ``E2B_SANDBOX_URL`` is set.
"""
