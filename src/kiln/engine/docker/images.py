"""Docker images of kiln's rootfs (interim version; replaced by the docker-images branch)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.images import agent as agent_mod
from kiln.images import builder, cache

from .errors import DockerdError


def ensure_image(
    client: Any,
    tier: str = "minimal",
    *,
    image_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> str:
    root = image_dir or cache.default_image_dir()
    inputs = builder.resolve_inputs(tier, root)
    if inputs is None:
        raise DockerdError("no kiln image inputs: run python -m kiln.images ensure")
    base = root / "base" / inputs.base_key / "root"
    ref = f"kiln/{tier}:{inputs.base_key[:16]}"
    try:
        client.images.get(ref)
        return ref
    except Exception:
        pass
    if not base.is_dir():
        raise DockerdError(f"no base tree at {base}: run python -m kiln.images ensure")
    with subprocess.Popen(
        ["tar", "--numeric-owner", "--xattrs", "-C", str(base), "-cf", "-", "."],
        stdout=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        repo, _, tag = ref.partition(":")
        client.api.import_image(src=proc.stdout, repository=repo, tag=tag)
    return ref


def agent_zipapp(state_dir: Path) -> Path:
    agents = state_dir / "agents"
    agents.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=agents) as tmp:
        built = agent_mod.build_agent(Path(tmp) / "agent.pyz")
        final = agents / f"{agent_mod.zipapp_digest(built)[:16]}.pyz"
        if not final.exists():
            os.replace(built, final)
    return final
