"""The API's routes, one module per concept; :func:`kiln.server.app.create_app` mounts them."""
