"""The engine conformance suite: :class:`EngineConformance`, one test class every engine passes.

Everything is checked at the real boundary, through the
:class:`~kiln.engine.base.Engine` interface and the agent client it hands out:
real sandboxes, real agents, real processes, real files. What a state change
leads to is never written down here; it is asked of :mod:`kiln.engine.states`
with the sandbox's own capabilities, so the suite holds every engine to the one
table. Two readings of that table are the suite's:

- ``Engine.stop`` is the table's COOL on a sandbox with snapshots and its STOP
  on one without (COOL is refused there, and only the user stops such a sandbox).
- A sandbox re-adopted cold is :data:`~kiln.engine.states.ADOPTED`\\ [SNAPSHOT]
  with snapshots; without, the table has no entry, and the suite expects
  ``stopped/cold`` (its files kept, startable), the state its stop left it in.

What a sandbox cannot do (``SandboxInfo.capabilities``) is skipped with the
reason, never passed. Boots are the expensive part, so a test class shares two
sandboxes of its engine's main home: ``main`` (the whole spec: env, files, init)
for everything inside a sandbox, ``cycled`` for pause, stop and start; each test
makes the sandbox hot first and leaves it hot, so the order of the tests does
not matter. Crash, destroy and the restart tests make their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import pytest
import pytest_asyncio

from kiln.agent_client import (
    AgentClient,
    AgentError,
    ExecResult,
    ForwardError,
    RemoteNotFound,
    Stdout,
    TtySession,
)

from ..base import (
    MAX_CPUS,
    MIN_MEMORY_MB,
    Capabilities,
    Engine,
    FileSpec,
    SandboxInfo,
    SandboxSpec,
    SavedImage,
    VolumeSpec,
    guest_hostname,
)
from ..boots import BootReason
from ..errors import (
    EngineError,
    ImageNotFound,
    InvalidSpec,
    InvalidState,
    SandboxCrashed,
    SandboxNotFound,
)
from ..states import ADOPTED, CREATED, Found, Op, State, Status, Thermal, lookup, plan
from .guest import ECHO_SERVER, PIDS_OF
from .kit import MAIN_HOME, RESTART_HOME, EngineKit

#: The spec of ``main``: its env, a file below its working directory, an init script.
SPEC_ENV: Final = {
    "KC_GREETING": "hello conformance",
    "KC_EMPTY": "",
    # Survives the trip through the engine's config (JSON, a drive, a container's env).
    "KC_TRICKY": "a=b 'c' \"d\" $e \\ ü\nsecond line",
}
SPEC_FILE: Final = "kc-spec/greeting.txt"
SPEC_FILE_CONTENT: Final = b"from the spec\n"
SPEC_FILE_MODE: Final = 0o640
SPEC_SCRIPT: Final = "kc-spec/run.sh"
SPEC_SCRIPT_CONTENT: Final = b'#!/bin/sh\necho "ran $1"\n'
INIT_MARK: Final = "kc-init-ran.txt"
INIT: Final = f'printf "%s\\n" "$KC_GREETING" > {INIT_MARK}'

#: What the saved-image tests put in the sandbox they save.
SAVED_FILE: Final = "kc-saved.txt"
SAVED_CONTENT: Final = b"saved with its sandbox\n"
SAVED_PORT: Final = 8719
#: GET of a URL from inside a sandbox: prints the body, fails if nothing answers.
HTTP_GET: Final = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
)

#: Bound on anything that should happen "soon" (a file the init script writes, a
#: detach the agent notices): generous, TCG guests on a busy 2-core host are slow.
SOON: Final = 30.0
#: How long a command in a paused sandbox is given to (not) run.
FROZEN_FOR: Final = 1.0


@dataclass(frozen=True, slots=True)
class Sandbox:
    """A sandbox a fixture made: its spec, what ``create`` returned, its working directory."""

    spec: SandboxSpec
    created: SandboxInfo
    workdir: str

    @property
    def id(self) -> str:
        return self.spec.sandbox_id


def new_id(what: str) -> str:
    """A sandbox id no earlier run used (ids and names: letters, digits, '-')."""
    return f"kc-{what}-{secrets.token_hex(3)}"


def after(op: Op, state: State, caps: Capabilities) -> State:
    """The state ``op`` leads to from ``state``, as the table says."""
    return plan(op, state, snapshots=caps.snapshots).next


def stop_op(caps: Capabilities) -> Op:
    """What ``Engine.stop`` is in the table for a sandbox with these capabilities."""
    return Op.COOL if caps.snapshots else Op.STOP


def adopted_cold(caps: Capabilities) -> State:
    """The state a sandbox its engine stopped is re-adopted in (see the module doc)."""
    return ADOPTED[Found.SNAPSHOT] if caps.snapshots else State(Status.STOPPED, Thermal.COLD)


def through_json(state: dict[str, Any]) -> dict[str, Any]:
    """What the daemon's store gives back: the exported state through JSON."""
    out = json.loads(json.dumps(state))
    assert isinstance(out, dict)
    return out


def ids(engine: Engine) -> set[str]:
    return {info.sandbox_id for info in engine.list()}


def sleep_argv() -> list[str]:
    """A background command recognisable by its argv alone (in any process table)."""
    return ["sleep", str(900_000 + secrets.randbelow(99_999))]


async def sh(client: AgentClient, script: str) -> str:
    """stdout of ``sh -c script``, which must succeed."""
    result = await client.exec(["sh", "-c", script], timeout=SOON)
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


async def pids_of(client: AgentClient, argv: list[str]) -> list[int]:
    """Pids of the processes running exactly ``argv``, seen from inside the sandbox."""
    result = await client.exec(["python3", "-c", PIDS_OF, *argv], timeout=SOON)
    assert result.exit_code == 0, result
    return [int(line) for line in result.stdout.split()]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = SOON) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)


async def read_until(tty: TtySession, pattern: bytes, within: float = SOON) -> bytes:
    """Terminal output up to the first match of regex ``pattern``."""
    seen = b""
    async with asyncio.timeout(within):
        async for chunk in tty:
            seen += chunk
            if re.search(pattern, seen):
                return seen
    raise AssertionError(f"the session ended before {pattern!r}; got {seen!r}")


async def no_leftovers(kit: EngineKit, engine: Engine, sandbox_id: str) -> None:
    """Nothing of the sandbox is left on the host (skips if the kit cannot tell)."""
    found = await kit.leftovers(engine, sandbox_id)
    if found is None:
        pytest.skip(f"{engine.name}: the kit cannot list what a sandbox leaves on the host")
    assert found == [], f"left of {sandbox_id}: {found}"


async def hot_caps(engine: Engine, sandbox_id: str) -> Capabilities:
    """Make the sandbox hot; its capabilities."""
    await engine.ensure_hot(sandbox_id)
    info = engine.info(sandbox_id)
    assert info.state == State(Status.RUNNING, Thermal.HOT), info
    return info.capabilities


async def clock_is_current(engine: Engine, sandbox_id: str, slack: float = 0.5) -> None:
    """The sandbox's wall clock reads the host's time (± ``slack``).

    Callers keep the sandbox paused or cold for longer than ``slack`` first, so a
    clock not set after the wake-up fails this.
    """
    client = await engine.agent(sandbox_id)
    before = time.time()
    result = await client.exec(["python3", "-c", "import time; print(time.time())"])
    after_ = time.time()
    guest = float(result.stdout)
    assert before - slack <= guest <= after_ + slack, (before, guest, after_)


async def exec_works(engine: Engine, sandbox_id: str) -> None:
    client = await engine.agent(sandbox_id)
    result = await client.exec(["echo", "awake"], timeout=SOON)
    assert (result.exit_code, result.stdout) == (0, b"awake\n"), result


def from_saved(kit: EngineKit, sandbox_id: str, image: SavedImage) -> SandboxSpec:
    """The kit's spec of a sandbox made from ``image``."""
    return kit.spec(sandbox_id, **image.spec_fields())


async def http_get(client: AgentClient, url: str) -> bytes | None:
    """The body at ``url`` fetched inside the sandbox, None if nothing answered."""
    result = await client.exec(["python3", "-c", HTTP_GET, url], timeout=SOON)
    return result.stdout if result.exit_code == 0 else None


async def destroy_quietly(engine: Engine, sandbox_ids: list[str]) -> None:
    for sid in sandbox_ids:
        with contextlib.suppress(EngineError):
            await engine.destroy(sid)


async def discard(kit: EngineKit, sandbox_id: str, state: dict[str, Any] | None) -> None:
    """Best effort, after a failed restart test: destroy what it left in RESTART_HOME."""
    async with kit.engine(RESTART_HOME) as engine:
        if state is not None:
            with contextlib.suppress(EngineError):
                await engine.import_state(state)
        with contextlib.suppress(EngineError):
            await engine.destroy(sandbox_id)


#: What :class:`EngineKit` declares (a kit module is not type-checked: say what is missing).
KIT_MEMBERS: Final = (
    "has_ip",
    "known_failures",
    "engine",
    "spec",
    "workdir",
    "kill_machine",
    "lose_disk",
    "leftovers",
)

BAD_SPECS: Final = [
    pytest.param({"name": "-leading-dash"}, "name", id="bad-name"),
    pytest.param({"name": "n" * 64}, "name", id="name-too-long"),
    pytest.param({"cpus": 0}, "cpus", id="cpus-0"),
    pytest.param({"cpus": MAX_CPUS + 1}, "cpus", id="too-many-cpus"),
    pytest.param({"memory_mb": MIN_MEMORY_MB - 1}, "memory", id="memory-too-small"),
    pytest.param({"env": {"A=B": "x"}}, "environment", id="env-name-with-equals"),
    pytest.param({"env": {"": "x"}}, "environment", id="env-empty-name"),
    pytest.param(
        {"volumes": (VolumeSpec("kc-one", "/kc", 8), VolumeSpec("kc-two", "/kc", 8))},
        "two volumes",
        id="two-volumes-one-mount",
    ),
]


class EngineConformance:
    """The suite. Subclass it in a test module that defines a ``kit`` fixture
    (an :class:`~kiln.engine.testing.kit.EngineKit`); see :mod:`kiln.engine.testing`."""

    pytestmark = [pytest.mark.asyncio(loop_scope="module")]

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture(autouse=True)
    def _kit_checks(self, request: pytest.FixtureRequest, kit: EngineKit) -> None:
        """A kit missing a member fails clearly; a known failure is an xfail."""
        missing = [member for member in KIT_MEMBERS if not hasattr(kit, member)]
        if missing:
            pytest.fail(f"{kit!r} is no EngineKit: it lacks {', '.join(missing)}")
        name = getattr(request.node, "originalname", request.node.name)
        reason = kit.known_failures.get(name)
        if reason is not None:
            request.applymarker(pytest.mark.xfail(reason=reason, strict=True))

    @pytest_asyncio.fixture(scope="class", loop_scope="module")
    @classmethod
    async def engine(cls, kit: EngineKit) -> AsyncIterator[Engine]:
        """The class's engine in the main home; destroys what it holds at the end."""
        async with kit.engine(MAIN_HOME) as engine:
            try:
                yield engine
            finally:
                for info in engine.list():
                    with contextlib.suppress(EngineError):
                        await engine.destroy(info.sandbox_id)

    @pytest_asyncio.fixture(scope="class", loop_scope="module")
    @classmethod
    async def main(cls, kit: EngineKit, engine: Engine) -> Sandbox:
        """A sandbox with the whole spec: env, a file, an init script."""
        sid = new_id("main")
        workdir = kit.workdir(engine, sid)
        files = (
            FileSpec(f"{workdir}/{SPEC_FILE}", SPEC_FILE_CONTENT, SPEC_FILE_MODE),
            FileSpec(f"{workdir}/{SPEC_SCRIPT}", SPEC_SCRIPT_CONTENT, 0o755),
        )
        spec = kit.spec(sid, env=SPEC_ENV, files=files, init=INIT)
        return Sandbox(spec, await engine.create(spec), workdir)

    @pytest_asyncio.fixture(scope="class", loop_scope="module")
    @classmethod
    async def cycled(cls, kit: EngineKit, engine: Engine) -> Sandbox:
        """The sandbox the thermal tests pause, stop and start."""
        sid = new_id("cycled")
        spec = kit.spec(sid)
        return Sandbox(spec, await engine.create(spec), kit.workdir(engine, sid))

    # ------------------------------------------------------------------ create

    async def test_create_reports_the_spec(
        self, kit: EngineKit, engine: Engine, main: Sandbox, cycled: Sandbox
    ) -> None:
        for box in (main, cycled):
            spec, created = box.spec, box.created
            assert created.sandbox_id == spec.sandbox_id and created.name == spec.name
            assert created.engine == engine.name and created.image == spec.image
            assert (created.cpus, created.memory_mb) == (spec.cpus, spec.memory_mb)
            assert created.keep_hot == spec.keep_hot
            assert created.state == CREATED.next
            if spec.runtime is not None:
                assert created.runtime == spec.runtime
            now = engine.info(spec.sandbox_id)
            assert (now.sandbox_id, now.name, now.engine, now.ip) == (
                created.sandbox_id,
                created.name,
                created.engine,
                created.ip,
            )
            assert engine.thermal(spec.sandbox_id) is now.thermal
            listed = [i for i in engine.list() if i.sandbox_id == spec.sandbox_id]
            assert listed == [engine.info(spec.sandbox_id)]
        if kit.has_ip:
            addresses = [ipaddress.ip_address(str(box.created.ip)) for box in (main, cycled)]
            assert addresses[0] != addresses[1]
        else:
            assert main.created.ip is None and cycled.created.ip is None

    async def test_creating_an_existing_id_is_refused(
        self, kit: EngineKit, engine: Engine, main: Sandbox
    ) -> None:
        with pytest.raises(InvalidState):
            await engine.create(kit.spec(main.id, name="kc-impostor"))
        assert engine.info(main.id).name == main.spec.name
        client = await engine.agent(main.id)
        assert await sh(client, 'printf %s "$KC_GREETING"') == SPEC_ENV["KC_GREETING"]

    async def test_sandboxes_do_not_share_files(
        self, engine: Engine, main: Sandbox, cycled: Sandbox
    ) -> None:
        name = f"kc-mine-{secrets.token_hex(3)}.txt"
        await (await engine.agent(main.id)).write_file(name, b"main's\n")
        other = await engine.agent(cycled.id)
        with pytest.raises(RemoteNotFound):
            await other.read_file(name)
        assert (await other.exec(["cat", name])).exit_code != 0

    async def test_prepare_creates_nothing(self, kit: EngineKit, engine: Engine) -> None:
        sid = new_id("prepared")
        before = ids(engine)
        await engine.prepare(kit.spec(sid))
        with pytest.raises(InvalidSpec):
            await engine.prepare(kit.spec(sid, cpus=0))
        assert ids(engine) == before
        with pytest.raises(SandboxNotFound):
            engine.info(sid)
        await no_leftovers(kit, engine, sid)

    @pytest.mark.parametrize(("overrides", "match"), BAD_SPECS)
    async def test_a_bad_spec_is_refused_before_anything_exists(
        self, kit: EngineKit, engine: Engine, overrides: dict[str, Any], match: str
    ) -> None:
        sid = new_id("bad")
        before = ids(engine)
        with pytest.raises(InvalidSpec, match=match):
            await engine.create(kit.spec(sid, **overrides))
        assert ids(engine) == before
        with pytest.raises(SandboxNotFound):
            engine.info(sid)
        await no_leftovers(kit, engine, sid)

    async def test_a_spec_for_another_engine_is_refused(
        self, kit: EngineKit, engine: Engine
    ) -> None:
        sid = new_id("foreign")
        try:
            with pytest.raises(InvalidSpec):
                await engine.create(kit.spec(sid, engine=f"not-{engine.name}"))
            assert sid not in ids(engine)
        finally:
            with contextlib.suppress(EngineError):
                await engine.destroy(sid)  # if it was taken anyway

    # ------------------------------------------------------------------ inside a sandbox

    async def test_exec_piped(self, engine: Engine, main: Sandbox) -> None:
        client = await engine.agent(main.id)
        result = await client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert result == ExecResult(3, b"out\n", b"err\n")
        assert (await client.exec(["cat"], stdin=b"piped in")).stdout == b"piped in"
        assert (await client.exec(["/no/such/program"])).exit_code == 127
        # The spec's env reaches every command; a request's env wins over it.
        greeting = await sh(client, 'printf "%s|%s" "$KC_GREETING" "${KC_EMPTY-unset}"')
        assert greeting == f"{SPEC_ENV['KC_GREETING']}|"
        assert await sh(client, 'printf %s "$KC_TRICKY"') == SPEC_ENV["KC_TRICKY"]
        overridden = await client.exec(
            ["sh", "-c", 'printf %s "$KC_GREETING"'], env={"KC_GREETING": "mine"}
        )
        assert overridden.stdout == b"mine"
        # Commands start in the working directory; cwd is relative to it.
        assert (await sh(client, "pwd")).strip() == main.workdir
        sub = await client.exec(["pwd"], cwd="kc-spec")
        assert sub.stdout.decode().strip() == f"{main.workdir}/kc-spec"

    async def test_spec_files_and_init_script(self, engine: Engine, main: Sandbox) -> None:
        client = await engine.agent(main.id)
        spec_file = await client.read_file(f"{main.workdir}/{SPEC_FILE}")
        assert spec_file.data == SPEC_FILE_CONTENT
        assert spec_file.mode == f"{SPEC_FILE_MODE:04o}"
        assert await sh(client, f"cat {SPEC_FILE}") == SPEC_FILE_CONTENT.decode()
        assert (await client.stat(SPEC_SCRIPT)).mode == "0755"
        assert await sh(client, f"./{SPEC_SCRIPT} conformance") == "ran conformance\n"

        async def init_ran() -> bool:
            try:
                mark = await client.read_file(INIT_MARK)
            except RemoteNotFound:
                return False
            return mark.data == f"{SPEC_ENV['KC_GREETING']}\n".encode()

        # The init script runs as TTY session "init", with the spec's env.
        await eventually(init_ran, "the init script wrote its mark")
        assert "init" in {s.session_id for s in await client.list_sessions()}

    async def test_exec_streams_while_it_runs(self, engine: Engine, main: Sandbox) -> None:
        client = await engine.agent(main.id)
        script = 'echo ready; read line; echo "got $line"; echo bye >&2; exit 7'
        async with client.exec_stream(["sh", "-c", script]) as proc:
            seen = b""
            async with asyncio.timeout(SOON):
                async for event in proc:
                    assert isinstance(event, Stdout), event
                    seen += event.data
                    if seen == b"ready\n":
                        break  # it waits for our line: this output came while it ran
            assert seen == b"ready\n"
            await proc.send_stdin(b"conformance\n")
            await proc.close_stdin()
            rest = await proc.wait()
        assert rest == ExecResult(7, b"got conformance\n", b"bye\n")
        assert proc.exit_code == 7

    async def test_tty_session(self, engine: Engine, main: Sandbox) -> None:
        client = await engine.agent(main.id)
        async with client.attach(["/bin/sh"], rows=24, cols=80) as tty:
            session_id = tty.session_id
            assert session_id is not None and tty.info is not None and tty.info.tty
            await tty.write(b"echo kc-$((6 * 7)); stty size\n")
            await read_until(tty, rb"kc-42\s+24 80")
            await tty.resize(40, 132)
            await tty.write(b"stty size\n")
            await read_until(tty, rb"40 132")
        # Detached: the shell keeps running.

        async def detached() -> bool:
            listed = {s.session_id: s for s in await client.list_sessions()}
            return listed[session_id].running and not listed[session_id].attached

        await eventually(detached, f"session {session_id} listed running and detached")
        async with client.attach(session_id=session_id) as tty:
            # The scrollback comes first: what the shell printed before the detach.
            scrollback = await read_until(tty, rb"40 132")
            assert b"kc-42" in scrollback
            await tty.write(b"echo kc-back-$((1 + 1))\n")
            await read_until(tty, rb"kc-back-2")
            await tty.write(b"exit 5\n")
            async with asyncio.timeout(SOON):
                assert await tty.wait() == 5

    async def test_files(self, engine: Engine, main: Sandbox) -> None:
        client = await engine.agent(main.id)
        folder = f"kc-files-{secrets.token_hex(3)}"
        blob = bytes(range(256)) * 300
        await client.write_file(f"{folder}/deep/blob.bin", blob, mode=0o600)  # parents made
        got = await client.read_file(f"{folder}/deep/blob.bin")
        assert (got.data, got.size, got.mode, got.truncated) == (blob, len(blob), "0600", False)
        # Relative paths are relative to the working directory.
        info = await client.stat(f"{main.workdir}/{folder}/deep/blob.bin")
        assert (info.size, info.is_dir, info.mode) == (len(blob), False, "0600")
        assert (await client.stat(f"{folder}/deep")).is_dir
        await client.write_file(f"{folder}/deep/a.txt", b"v1\n")
        listing = await client.ls(f"{folder}/deep")
        assert [e.name for e in listing.entries] == ["a.txt", "blob.bin"]
        assert await sh(client, f"cat {folder}/deep/a.txt") == "v1\n"  # commands see it
        # A write replaces the file in one step (a new inode renamed over the old one) ...
        # (The inode from python3: gVisor 2022 refuses coreutils 9's statx flags.)
        inode_of = f"python3 -c 'import os; print(os.stat(\"{folder}/deep/a.txt\").st_ino)'"
        inode = await sh(client, inode_of)
        await client.write_file(f"{folder}/deep/a.txt", b"v2\n")
        assert await sh(client, inode_of) != inode
        assert (await client.read_file(f"{folder}/deep/a.txt")).data == b"v2\n"

        # ... so a write that breaks off half-way leaves the old content and no debris.
        async def short_source() -> AsyncIterator[bytes]:
            yield b"x" * 1000

        with pytest.raises(ValueError, match="declared"):
            await client.write_file(f"{folder}/deep/a.txt", short_source(), size=10_000)

        async def no_debris() -> bool:
            names = [e.name for e in (await client.ls(f"{folder}/deep")).entries]
            return names == ["a.txt", "blob.bin"]

        await eventually(no_debris, "the broken write's temporary file is gone")
        assert (await client.read_file(f"{folder}/deep/a.txt")).data == b"v2\n"
        with pytest.raises(RemoteNotFound):
            await client.read_file(f"{folder}/missing")
        with pytest.raises(RemoteNotFound):
            await client.stat(f"{folder}/missing")

    async def test_background_processes(self, engine: Engine, main: Sandbox) -> None:
        client = await engine.agent(main.id)
        proc = await client.start_process(["sh", "-c", "echo kc-$((40 + 2)); exec sleep 100000"])
        assert proc.running and proc.pid > 0

        async def printed() -> bool:
            async with client.process_output(proc.pid, follow=False) as out:
                data = b"".join([e.data async for e in out if isinstance(e, Stdout)])
            return data == b"kc-42\n"

        await eventually(printed, "the background process's output is kept")
        assert proc.pid in {p.pid for p in await client.list_processes()}
        await client.signal_process(proc.pid, "TERM")

        async def ended() -> bool:
            return not (await client.get_process(proc.pid)).running

        await eventually(ended, "the process ended on SIGTERM")
        assert (await client.get_process(proc.pid)).exit_code == 128 + 15

    async def test_forward_to_a_server_in_the_sandbox(self, engine: Engine, main: Sandbox) -> None:
        client = await engine.agent(main.id)
        port_file = f"kc-port-{secrets.token_hex(3)}"
        server = await client.start_process(["python3", "-c", ECHO_SERVER, port_file])
        try:

            async def listening() -> bool:
                try:
                    await client.stat(port_file)
                except RemoteNotFound:
                    return False
                return True

            await eventually(listening, "the echo server is listening")
            port = int((await client.read_file(port_file)).data)
            payload = secrets.token_bytes(100_000)
            async with await client.forward(port) as stream:
                assert await stream.readexactly(6) == b"HELLO\n"
                await stream.send(payload)
                assert await stream.readexactly(len(payload)) == payload
        finally:
            await client.signal_process(server.pid, "KILL")

        async def server_gone() -> bool:
            return not (await client.get_process(server.pid)).running

        await eventually(server_gone, "the echo server ended")
        with pytest.raises(ForwardError):
            await client.forward(port)

    async def test_activity(self, engine: Engine, main: Sandbox) -> None:
        client = await engine.agent(main.id)
        before = await client.activity()
        await asyncio.sleep(0.05)
        await client.exec(["true"])
        after_exec = await client.activity()
        assert after_exec.last_activity_unix > before.last_activity_unix
        assert abs(after_exec.last_activity_unix - time.time()) < 10  # the guest's clock
        async with client.attach(["sleep", "100000"]) as tty:
            attached = await client.activity()
            assert attached.attached_sessions >= 1 and attached.running_sessions >= 1
            session_id = tty.session_id
        assert session_id is not None

        async def detached() -> bool:
            now = await client.activity()
            return now.attached_sessions <= before.attached_sessions

        await eventually(detached, "the detach shows in the activity")
        await client.kill_session(session_id)

        async def back() -> bool:
            return (await client.activity()).running_sessions <= before.running_sessions

        await eventually(back, "the killed session no longer counts as running")

    # ------------------------------------------------------------------ thermal

    async def test_pause_and_resume(self, engine: Engine, cycled: Sandbox) -> None:
        sid = cycled.id
        caps = await hot_caps(engine, sid)
        if not caps.pause:
            pytest.skip(f"{engine.name}: no pause for this sandbox")
        client = await engine.agent(sid)
        hot = engine.info(sid).state
        try:
            await engine.pause(sid)
            warm = after(Op.PAUSE, hot, caps)
            assert engine.info(sid).state == warm and engine.thermal(sid) is Thermal.WARM
            await engine.pause(sid)
            assert engine.info(sid).state == after(Op.PAUSE, warm, caps)
            # Frozen: a command does not even start.
            with pytest.raises((TimeoutError, AgentError)):
                await asyncio.wait_for(client.exec(["true"]), FROZEN_FOR)
            await engine.resume(sid)
            assert engine.info(sid).state == after(Op.RESUME, warm, caps)
            assert engine.thermal(sid) is Thermal.HOT
            await exec_works(engine, sid)
            await clock_is_current(engine, sid)  # it was paused for longer than the slack
            await engine.resume(sid)
            assert engine.info(sid).state == after(Op.RESUME, hot, caps)
        finally:
            await engine.ensure_hot(sid)

    async def test_stop_and_start_keep_processes(self, engine: Engine, cycled: Sandbox) -> None:
        sid = cycled.id
        caps = await hot_caps(engine, sid)
        if not caps.snapshots:
            pytest.skip(
                f"{engine.name}: no snapshots for this sandbox (its stop ends its processes; "
                "see test_stop_without_snapshots_keeps_files_only)"
            )
        client = await engine.agent(sid)
        mark = secrets.token_hex(8).encode()
        await client.write_file("kc-stop.txt", mark)
        argv = sleep_argv()
        proc = await client.start_process(argv)
        try:
            hot = engine.info(sid).state
            info = await engine.stop(sid)
            cold = after(stop_op(caps), hot, caps)
            assert info.state == cold and engine.info(sid).state == cold
            assert info.has_snapshot
            info = await engine.stop(sid)
            assert info.state == after(stop_op(caps), cold, caps)
            info = await engine.start(sid)
            assert info.state == after(Op.START, cold, caps)
            client = await engine.agent(sid)
            assert (await client.read_file("kc-stop.txt")).data == mark
            assert (await client.get_process(proc.pid)).running
            assert await pids_of(client, argv) == [proc.pid]
        finally:
            await engine.ensure_hot(sid)
            with contextlib.suppress(AgentError):
                await (await engine.agent(sid)).signal_process(proc.pid, "KILL")

    async def test_stop_without_snapshots_keeps_files_only(
        self, engine: Engine, cycled: Sandbox
    ) -> None:
        sid = cycled.id
        caps = await hot_caps(engine, sid)
        if caps.snapshots:
            pytest.skip(
                f"{engine.name}: this sandbox has snapshots (its stop keeps its processes; "
                "see test_stop_and_start_keep_processes)"
            )
        client = await engine.agent(sid)
        mark = secrets.token_hex(8).encode()
        await client.write_file("kc-stop.txt", mark)
        argv = sleep_argv()
        await client.start_process(argv)
        assert len(await pids_of(client, argv)) == 1
        try:
            hot = engine.info(sid).state
            info = await engine.stop(sid)
            stopped = after(stop_op(caps), hot, caps)
            assert info.state == stopped and engine.info(sid).state == stopped
            assert not info.has_snapshot
            info = await engine.stop(sid)
            assert info.state == after(stop_op(caps), stopped, caps)
            info = await engine.start(sid)
            assert info.state == after(Op.START, stopped, caps)
            client = await engine.agent(sid)
            assert (await client.read_file("kc-stop.txt")).data == mark
            running = [p for p in await client.list_processes() if p.running]
            assert tuple(argv) not in {p.cmd for p in running}
            assert await pids_of(client, argv) == []
        finally:
            await engine.ensure_hot(sid)

    async def test_ensure_hot_from_warm(self, engine: Engine, cycled: Sandbox) -> None:
        sid = cycled.id
        caps = await hot_caps(engine, sid)
        if not caps.pause:
            pytest.skip(f"{engine.name}: no pause for this sandbox, so never warm")
        await engine.pause(sid)
        warm = engine.info(sid).state
        assert warm.thermal is Thermal.WARM
        await engine.ensure_hot(sid)
        assert engine.info(sid).state == after(Op.ENSURE_HOT, warm, caps)
        await exec_works(engine, sid)
        # agent() wakes a warm sandbox too.
        await engine.pause(sid)
        client = await engine.agent(sid)
        assert engine.info(sid).state == after(Op.ENSURE_HOT, warm, caps)
        assert (await client.exec(["true"])).exit_code == 0

    async def test_ensure_hot_from_cold(self, engine: Engine, cycled: Sandbox) -> None:
        sid = cycled.id
        caps = await hot_caps(engine, sid)
        client = await engine.agent(sid)
        mark = secrets.token_hex(8).encode()
        await client.write_file("kc-cold.txt", mark)
        if caps.pause:
            await engine.pause(sid)  # so that this stop starts from warm
        before = engine.info(sid).state
        cold = (await engine.stop(sid)).state
        assert cold == after(stop_op(caps), before, caps)
        await asyncio.sleep(FROZEN_FOR)  # longer than clock_is_current's slack
        await engine.ensure_hot(sid)
        assert engine.info(sid).state == after(Op.ENSURE_HOT, cold, caps)
        client = await engine.agent(sid)
        assert (await client.read_file("kc-cold.txt")).data == mark
        await clock_is_current(engine, sid)
        # agent() wakes a cold sandbox too.
        await engine.stop(sid)
        client = await engine.agent(sid)
        assert engine.info(sid).state == after(Op.ENSURE_HOT, cold, caps)
        assert (await client.read_file("kc-cold.txt")).data == mark

    async def test_concurrent_wake_ups_wake_it_once(self, engine: Engine, cycled: Sandbox) -> None:
        sid = cycled.id
        caps = await hot_caps(engine, sid)
        client = await engine.agent(sid)
        argv = sleep_argv()
        await client.start_process(argv)
        cold = (await engine.stop(sid)).state
        woken = await asyncio.gather(
            engine.ensure_hot(sid), engine.agent(sid), engine.start(sid), engine.ensure_hot(sid)
        )
        assert engine.info(sid).state == after(Op.ENSURE_HOT, cold, caps)
        assert isinstance(woken[1], AgentClient)
        client = await engine.agent(sid)
        # One restore or boot, not one per caller: with snapshots the process lives on
        # (a second restore would have found the snapshot spent), without it is gone.
        assert len(await pids_of(client, argv)) == (1 if caps.snapshots else 0)
        assert (await client.exec(["true"])).exit_code == 0

    async def test_a_cold_sandbox_refuses_pause_and_resume(
        self, engine: Engine, cycled: Sandbox
    ) -> None:
        sid = cycled.id
        caps = await hot_caps(engine, sid)
        cold = (await engine.stop(sid)).state
        try:
            for op, method in ((Op.PAUSE, engine.pause), (Op.RESUME, engine.resume)):
                assert lookup(op, cold, snapshots=caps.snapshots) is None  # the table says so
                with pytest.raises(InvalidState):
                    await method(sid)
                assert engine.info(sid).state == cold
        finally:
            await engine.ensure_hot(sid)

    # ------------------------------------------------------------------ errors, crash, destroy

    async def test_an_unknown_sandbox_is_not_found(self, engine: Engine) -> None:
        sid = new_id("nobody")
        with pytest.raises(SandboxNotFound):
            engine.info(sid)
        with pytest.raises(SandboxNotFound):
            engine.thermal(sid)
        with pytest.raises(SandboxNotFound):
            engine.export_state(sid)
        calls: list[Callable[[str], Awaitable[object]]] = [
            engine.stop,
            engine.start,
            engine.pause,
            engine.resume,
            engine.ensure_hot,
            engine.agent,
        ]
        for call in calls:
            with pytest.raises(SandboxNotFound):
                await call(sid)
        await engine.destroy(sid)  # idempotent: nothing to destroy is no error
        assert sid not in ids(engine)

    async def test_a_machine_that_dies_boots_again_from_its_disks(
        self, kit: EngineKit, engine: Engine
    ) -> None:
        """A machine that dies while the engine runs, its disks intact, leaves the
        sandbox running and cold: its next use boots it again from its disks, like a
        machine that rebooted (files kept, processes lost)."""
        sid = new_id("crash")
        await engine.create(kit.spec(sid))
        try:
            client = await engine.agent(sid)
            mark = secrets.token_hex(8).encode()
            await client.write_file("kc-crash.txt", mark)
            # A crash loses what only the guest's page cache held, as a power cut does.
            await sh(client, "sync")
            argv = sleep_argv()
            await client.start_process(argv)
            assert len(await pids_of(client, argv)) == 1
            await kit.kill_machine(engine, sid)

            # An engine notices at once (info) or at the latest on the next operation.
            async def noticed() -> bool:
                return engine.info(sid).state == ADOPTED[Found.DISK]

            with contextlib.suppress(AssertionError):
                await eventually(noticed, "info shows the sandbox cold", within=5)
            if await noticed():
                info = engine.info(sid)
                assert not info.has_snapshot and info.problem is None, info
            try:
                await exec_works(engine, sid)  # the next use boots it ...
            except SandboxCrashed as exc:
                # ... or, if it is the one that notices, may fail saying that it will.
                assert "next use" in str(exc), exc
                await exec_works(engine, sid)
            info = engine.info(sid)
            assert info.state == State(Status.RUNNING, Thermal.HOT)
            assert info.last_boot is not None and info.last_boot.reason is BootReason.REBOOTED
            client = await engine.agent(sid)
            assert (await client.read_file("kc-crash.txt")).data == mark
            assert await pids_of(client, argv) == []
            # It is an ordinary sandbox again.
            caps = info.capabilities
            stopped = await engine.stop(sid)
            assert stopped.state == after(stop_op(caps), info.state, caps)
            await exec_works(engine, sid)
        finally:
            await engine.destroy(sid)
        with pytest.raises(SandboxNotFound):
            engine.info(sid)
        await no_leftovers(kit, engine, sid)

    async def test_a_machine_that_dies_with_its_disk_leaves_only_destroy(
        self, kit: EngineKit, engine: Engine
    ) -> None:
        sid = new_id("lost")
        await engine.create(kit.spec(sid))
        await exec_works(engine, sid)
        await kit.kill_machine(engine, sid)
        await kit.lose_disk(engine, sid)

        # Noticed at once (info) or by the next use, which cannot boot it.
        with contextlib.suppress(SandboxCrashed):
            await engine.ensure_hot(sid)
        crashed = engine.info(sid)
        assert crashed.status is Status.ERROR, crashed
        assert crashed.problem, "an engine says why a sandbox is in error"
        calls: list[Callable[[str], Awaitable[object]]] = [
            engine.pause,
            engine.resume,
            engine.stop,
            engine.start,
            engine.ensure_hot,
            engine.agent,
        ]
        for call in calls:
            with pytest.raises(SandboxCrashed):
                await call(sid)
        assert engine.info(sid).state == crashed.state
        await engine.destroy(sid)
        with pytest.raises(SandboxNotFound):
            engine.info(sid)
        await no_leftovers(kit, engine, sid)

    @pytest.mark.parametrize("thermal", [Thermal.HOT, Thermal.WARM, Thermal.COLD])
    async def test_destroy_frees_everything(
        self, kit: EngineKit, engine: Engine, thermal: Thermal
    ) -> None:
        sid = new_id(f"destroy-{thermal}")
        info = await engine.create(kit.spec(sid))
        if thermal is Thermal.WARM and not info.capabilities.pause:
            await engine.destroy(sid)
            pytest.skip(f"{engine.name}: no pause for this sandbox, so never warm")
        client = await engine.agent(sid)
        await client.start_process(sleep_argv())
        await client.write_file("kc-destroy.txt", b"gone soon\n")
        present = await kit.leftovers(engine, sid)
        if present is not None:
            assert present, "the kit sees nothing of a live sandbox: its check is blind"
        if thermal is Thermal.WARM:
            await engine.pause(sid)
        elif thermal is Thermal.COLD:
            await engine.stop(sid)
        assert engine.info(sid).thermal is thermal
        await engine.destroy(sid)
        with pytest.raises(SandboxNotFound):
            engine.info(sid)
        with pytest.raises(SandboxNotFound):
            engine.thermal(sid)
        assert sid not in ids(engine)
        await engine.destroy(sid)  # idempotent
        await no_leftovers(kit, engine, sid)

    # ------------------------------------------------------------------ saved images

    async def test_save_image_and_create_two_sandboxes_from_it(
        self, kit: EngineKit, engine: Engine
    ) -> None:
        src, image_id = new_id("saved-src"), new_id("img")
        made = [src]
        url = f"http://127.0.0.1:{SAVED_PORT}/{SAVED_FILE}"
        try:
            await engine.create(kit.spec(src))
            client = await engine.agent(src)
            await client.write_file(SAVED_FILE, SAVED_CONTENT)
            memory = engine.info(src).capabilities.save_memory
            if memory:
                # A server started before the save: it is in the image's memory.
                server = ["python3", "-m", "http.server", "--bind", "127.0.0.1", str(SAVED_PORT)]
                await client.start_process(server)

                async def serves() -> bool:
                    return await http_get(client, url) == SAVED_CONTENT

                await eventually(serves, "the source's server answers")
            saved = await engine.save_image(src, image_id)
            source = engine.info(src)
            assert saved.image_id == image_id and saved.engine == source.engine
            assert (saved.image, saved.cpus, saved.memory_mb) == (
                source.image,
                source.cpus,
                source.memory_mb,
            )
            assert saved.memory is memory and saved.size_bytes >= 0
            with pytest.raises(InvalidState):
                await engine.save_image(src, image_id)
            # The source goes on after the save; what it does now is not in the image.
            client = await engine.agent(src)
            await client.write_file("kc-after-save.txt", b"later\n")
            assert (await client.read_file(SAVED_FILE)).data == SAVED_CONTENT

            clones = [new_id("from-saved-a"), new_id("from-saved-b")]
            for sid in clones:
                made.append(sid)
                info = await engine.create(from_saved(kit, sid, saved))
                assert (info.sandbox_id, info.image, info.cpus, info.memory_mb) == (
                    sid,
                    saved.image,
                    saved.cpus,
                    saved.memory_mb,
                )
                assert info.state == CREATED.next
            for sid in clones:
                clone = await engine.agent(sid)
                assert (await clone.read_file(SAVED_FILE)).data == SAVED_CONTENT
                with pytest.raises(RemoteNotFound):
                    await clone.read_file("kc-after-save.txt")
                if memory:
                    assert await http_get(clone, url) == SAVED_CONTENT, f"no server in {sid}"
                if kit.has_ip:
                    assert (await sh(clone, "uname -n")).strip() == guest_hostname(sid)
            # Each its own sandbox: a file one writes is not in the other.
            await (await engine.agent(clones[0])).write_file("kc-only-a.txt", b"a\n")
            with pytest.raises(RemoteNotFound):
                await (await engine.agent(clones[1])).read_file("kc-only-a.txt")
            if kit.has_ip:
                addresses = {engine.info(sid).ip for sid in [src, *clones]}
                assert len(addresses) == 3, addresses

            # A create whose shape is not the image's, or from no image, is refused.
            with pytest.raises(InvalidSpec):
                await engine.create(
                    kit.spec(
                        new_id("wrong-shape"), **{**saved.spec_fields(), "cpus": saved.cpus + 1}
                    )
                )
            missing = new_id("missing")
            with pytest.raises(ImageNotFound):
                await engine.create(
                    kit.spec(missing, **{**saved.spec_fields(), "snapshot": "kc-none"})
                )
            with pytest.raises(SandboxNotFound):
                engine.info(missing)
            await no_leftovers(kit, engine, missing)

            await engine.delete_saved_image(image_id)
            await engine.delete_saved_image(image_id)  # idempotent
            with pytest.raises(ImageNotFound):
                await engine.create(from_saved(kit, new_id("deleted"), saved))
            # What was made from it does not need it.
            await exec_works(engine, clones[0])
        finally:
            await destroy_quietly(engine, made)
            with contextlib.suppress(EngineError):
                await engine.delete_saved_image(image_id)

    async def test_a_saved_image_outlives_its_engine(self, kit: EngineKit) -> None:
        src, sid, image_id = new_id("saved-first"), new_id("saved-then"), new_id("img")
        try:
            async with kit.engine(RESTART_HOME) as first:
                await first.create(kit.spec(src))
                client = await first.agent(src)
                await client.write_file(SAVED_FILE, SAVED_CONTENT)
                saved = await first.save_image(src, image_id)
                await first.destroy(src)  # the image does not need its sandbox either
            async with kit.engine(RESTART_HOME) as second:
                try:
                    await second.create(from_saved(kit, sid, saved))
                    clone = await second.agent(sid)
                    assert (await clone.read_file(SAVED_FILE)).data == SAVED_CONTENT
                finally:
                    await destroy_quietly(second, [sid])
                    await second.delete_saved_image(image_id)
        finally:
            async with kit.engine(RESTART_HOME) as last:
                await destroy_quietly(last, [src, sid])
                with contextlib.suppress(EngineError):
                    await last.delete_saved_image(image_id)

    async def test_saving_an_unknown_sandbox_is_not_found(self, engine: Engine) -> None:
        with pytest.raises(SandboxNotFound):
            await engine.save_image(new_id("nobody"), new_id("img"))

    # ------------------------------------------------------------------ daemon restart

    async def test_restart_readopts_a_running_sandbox(self, kit: EngineKit) -> None:
        sid = new_id("running")
        spec = kit.spec(sid)
        state: dict[str, Any] | None = None
        done = False
        try:
            async with kit.engine(RESTART_HOME) as first:
                await first.create(spec)
                client = await first.agent(sid)
                await client.write_file("kc-restart.txt", b"survived\n")
                proc = await client.start_process(sleep_argv())
                state = through_json(first.export_state(sid))
            # The daemon is gone; its sandbox is not.
            async with kit.engine(RESTART_HOME) as second:
                info = await second.import_state(state)
                assert info.state == ADOPTED[Found.RUNNING]
                assert (info.sandbox_id, info.name, info.cpus, info.memory_mb) == (
                    sid,
                    spec.name,
                    spec.cpus,
                    spec.memory_mb,
                )
                assert second.info(sid).state == info.state and sid in ids(second)
                client = await second.agent(sid)
                assert (await client.read_file("kc-restart.txt")).data == b"survived\n"
                assert (await client.get_process(proc.pid)).running  # no reboot either
                # Orphan cleanup after recovery leaves an adopted sandbox alone.
                removed = await second.cleanup_orphans()
                assert not any(sid in line for line in removed), removed
                assert (await client.get_process(proc.pid)).running
                await second.destroy(sid)
                done = True
                await no_leftovers(kit, second, sid)
        finally:
            if not done:
                await discard(kit, sid, state)

    async def test_restart_readopts_a_paused_sandbox(self, kit: EngineKit) -> None:
        sid = new_id("paused")
        state: dict[str, Any] | None = None
        done = False
        try:
            async with kit.engine(RESTART_HOME) as first:
                await first.create(kit.spec(sid))
                caps = first.info(sid).capabilities
                if not caps.pause:
                    await first.destroy(sid)
                    done = True
                    pytest.skip(f"{first.name}: no pause for this sandbox")
                await exec_works(first, sid)
                await first.pause(sid)
                state = through_json(first.export_state(sid))
            async with kit.engine(RESTART_HOME) as second:
                info = await second.import_state(state)
                assert info.state == ADOPTED[Found.PAUSED]
                await second.ensure_hot(sid)
                assert second.info(sid).state == after(Op.ENSURE_HOT, info.state, caps)
                await exec_works(second, sid)
                await second.destroy(sid)
                done = True
                await no_leftovers(kit, second, sid)
        finally:
            if not done:
                await discard(kit, sid, state)

    async def test_restart_readopts_a_stopped_sandbox(self, kit: EngineKit) -> None:
        sid = new_id("cold")
        spec = kit.spec(sid)
        state: dict[str, Any] | None = None
        done = False
        try:
            async with kit.engine(RESTART_HOME) as first:
                await first.create(spec)
                caps = first.info(sid).capabilities
                client = await first.agent(sid)
                await client.write_file("kc-restart.txt", b"kept on disk\n")
                await first.stop(sid)
                state = through_json(first.export_state(sid))
            async with kit.engine(RESTART_HOME) as second:
                info = await second.import_state(state)
                assert info.state == adopted_cold(caps)
                assert info.has_snapshot is caps.snapshots
                assert (info.sandbox_id, info.name) == (sid, spec.name)
                removed = await second.cleanup_orphans()  # its files are no orphan
                assert not any(sid in line for line in removed), removed
                info = await second.start(sid)
                assert info.state == after(Op.START, adopted_cold(caps), caps)
                client = await second.agent(sid)
                assert (await client.read_file("kc-restart.txt")).data == b"kept on disk\n"
                await second.destroy(sid)
                done = True
                await no_leftovers(kit, second, sid)
        finally:
            if not done:
                await discard(kit, sid, state)

    async def test_cleanup_orphans_removes_what_no_engine_knows(self, kit: EngineKit) -> None:
        sid = new_id("orphan")
        done = False
        try:
            async with kit.engine(RESTART_HOME) as first:
                await first.create(kit.spec(sid))
                client = await first.agent(sid)
                await client.start_process(sleep_argv())
            # The next daemon never hears of it (its store lost the row).
            async with kit.engine(RESTART_HOME) as second:
                present = await kit.leftovers(second, sid)
                if present is not None:
                    assert present, "the kit sees nothing of a live sandbox: its check is blind"
                removed = await second.cleanup_orphans()
                assert isinstance(removed, list) and all(isinstance(r, str) for r in removed)
                assert any(sid in line for line in removed), removed
                done = True
                with pytest.raises(SandboxNotFound):
                    second.info(sid)
                again = await second.cleanup_orphans()
                assert not any(sid in line for line in again), again
                await no_leftovers(kit, second, sid)
        finally:
            if not done:
                await discard(kit, sid, None)
