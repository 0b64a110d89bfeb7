"""The synchronous SDK is generated from the asyncio one: ``scripts/gen_sync_sdk``.

The first test fails when ``src/kiln/sdk/_sync.py`` is not what the script makes of
``_async.py`` today (someone edited the generated file, or edited ``_async.py`` and
did not regenerate). The others pin the rewrite rules on small inputs.
"""

from __future__ import annotations

import difflib
import importlib.util
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/gen_sync_sdk"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    # The script has no .py suffix (it is a command), so name its loader explicitly.
    loader = SourceFileLoader("gen_sync_sdk", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gen_sync_sdk", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_sync_sdk_is_generated_from_async() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--stdout"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    committed = (ROOT / "src/kiln/sdk/_sync.py").read_text()
    if done.stdout != committed:
        diff = difflib.unified_diff(
            committed.splitlines(keepends=True),
            done.stdout.splitlines(keepends=True),
            "src/kiln/sdk/_sync.py (committed)",
            "generated from _async.py",
        )
        pytest.fail(
            "src/kiln/sdk/_sync.py is stale or was edited by hand: edit _async.py and run "
            f"scripts/gen_sync_sdk (or make sdk).\n{''.join(list(diff)[:80])}"
        )


def test_code_keywords_and_names(gen: ModuleType) -> None:
    source = (
        "async def f(k: AsyncKiln) -> _AsyncThing:\n"
        "    async with httpx.AsyncClient() as c:\n"
        "        async for x in c.aiter_lines():\n"
        "            print(await anext(x), (await c.aread()))\n"
        "    await asyncio.sleep(1)\n"
        "    raise StopAsyncIteration\n"
    )
    assert gen.unasync(source) == (
        "def f(k: Kiln) -> _Thing:\n"
        "    with httpx.Client() as c:\n"
        "        for x in c.iter_lines():\n"
        "            print(next(x), (c.read()))\n"
        "    time.sleep(1)\n"
        "    raise StopIteration\n"
    )


def test_strings_and_comments_read_as_sync(gen: ModuleType) -> None:
    source = (
        '"""An asyncio client: leave the ``async with`` block or ``await close()``;\n'
        'see :meth:`AsyncSandbox.exec` and ``__aexit__``."""\n'
        "x = 'AsyncKiln(url=...)'  # async for event in AsyncExecStream\n"
    )
    assert gen.unasync(source) == (
        '"""An asyncio client: leave the ``with`` block or ``close()``;\n'
        'see :meth:`Sandbox.exec` and ``__exit__``."""\n'
        "x = 'Kiln(url=...)'  # for event in ExecStream\n"
    )


def test_markers_keep_one_side(gen: ModuleType) -> None:
    source = (
        "a = 1\n"
        "    # unasync: async-only\n"
        "    b = await x\n"
        "    # unasync: sync-only\n"
        "    # b = y\n"
        "    #\n"
        "    # # why\n"
        "    # unasync: end\n"
        "c = 3\n"
    )
    assert gen.resolve_markers(source) == "a = 1\n    b = y\n\n    # why\nc = 3\n"


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("# unasync: async-only\nx = 1\n", "never closed"),
        ("# unasync: end\n", "without an open block"),
        ("# unasync: sync-only\nx = 1\n# unasync: end\n", "must be a comment"),
        ("  # unasync: async-only\nx = 1\n# unasync: end\n", "indented unlike"),
    ],
)
def test_malformed_markers_are_refused(gen: ModuleType, source: str, error: str) -> None:
    with pytest.raises(gen.GenerateError, match=error):
        gen.resolve_markers(source)
