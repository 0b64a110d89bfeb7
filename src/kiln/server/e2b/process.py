"""envd's ``process.Process`` service on kiln's agent: processes by real guest pid."""

from __future__ import annotations

from .connect import Message, Service
from .envd import EnvdCall

service: Service[EnvdCall] = Service("process.Process")


@service.unary("List")
async def list_(call: EnvdCall, request: Message) -> Message:
    infos = await call.agent.list_processes()
    return {
        "processes": [
            {"pid": p.pid, "config": {"cmd": p.cmd[0], "args": list(p.cmd[1:])}}
            for p in infos
            if p.running
        ]
    }
