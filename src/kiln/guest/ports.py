"""The agent's TCP ports in a VM or a container (a module of its own: the command
line needs them before it imports the agent)."""

CONTROL_PORT = 1024
FORWARD_PORT = 1025
