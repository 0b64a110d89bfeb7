"""Pure parsers for command-line values: ``K=V``, ``NAME:/mount``, sizes, modes, durations,
published-port aliases, the engine of a new sandbox.

Each raises :class:`ValueError` with a message fit for ``kiln: error: ...``;
the command layer turns it into a usage error naming the option.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MIB_PER_UNIT = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: The daemon's ``ALIAS_PATTERN`` (kiln.api.requests; a test keeps them equal),
#: checked here to say what is wrong instead of echoing the daemon's regex.
ALIAS_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_ALIAS_RE = re.compile(ALIAS_PATTERN)
#: What ``--ttl`` accepts to mean "no expiry" (``kiln edit``).
NO_TTL = ("none", "never", "0")


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    """``["A=1", "B=x=y"]`` → ``{"A": "1", "B": "x=y"}``; a later key wins."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        if "\x00" in key or "\x00" in value:
            raise ValueError(f"NUL byte in {pair!r}")
        env[key] = value
    return env


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """``["team=ml", "note=a=b", "flag="]`` → ``{"team": "ml", "note": "a=b", "flag": ""}``.

    The daemon checks lengths and characters; here only the shape.
    """
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"30m"``, ``"1h"``, ``"2d"``, ``"1h30m"``, ``"1.5h"``."""
    compact = text.strip().lower()
    try:
        seconds = float(compact)
    except ValueError:
        parts = _DURATION_PART_RE.findall(compact)
        if not parts or "".join(n + u for n, u in parts) != compact:
            raise ValueError(
                f"invalid duration {text!r}: use seconds (90) or units (90s, 30m, 1h, 2d)"
            ) from None
        seconds = sum(float(n) * _SECONDS_PER_UNIT[u] for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"invalid duration {text!r}: must be more than 0 seconds")
    return seconds


def parse_ttl(text: str) -> float | None:
    """A duration, or None for ``none``/``never``/``0`` (remove the expiry)."""
    if text.strip().lower() in NO_TTL:
        return None
    return parse_duration(text)


def parse_volume(spec: str) -> tuple[str, str]:
    """``"data:/mnt/data"`` → ``("data", "/mnt/data")``."""
    name, sep, mount = spec.partition(":")
    if not sep or not name or not mount:
        raise ValueError(f"expected NAME:/MOUNT, got {spec!r}")
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid volume name {name!r}")
    if not mount.startswith("/"):
        raise ValueError(f"mount point must be an absolute path, got {mount!r}")
    return name, mount


def parse_new_volume(spec: str) -> tuple[str, int, str]:
    """``"cache:1G:/cache"`` → ``("cache", 1024, "/cache")`` (size in MiB, or with a unit)."""
    name, sep, rest = spec.partition(":")
    size_text, sep2, mount = rest.partition(":")
    if not (sep and sep2 and name and size_text and mount):
        raise ValueError(f"expected NAME:SIZE:/MOUNT, got {spec!r}")
    parse_volume(f"{name}:{mount}")
    return name, parse_size_mb(size_text), mount


def parse_size_mb(text: str) -> int:
    """A size in MiB: ``"512"``, ``"512M"``, ``"1G"``, ``"1.5GiB"`` → 512, 512, 1024, 1536."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}: use MiB (512) or a unit (512M, 2G)")
    mib = float(match.group(1)) * _MIB_PER_UNIT[match.group(2).lower()]
    if mib < 1 or mib != int(mib):
        raise ValueError(f"invalid size {text!r}: must be a whole number of MiB")
    return int(mib)


#: Control characters a detach key may be, by the name after "ctrl-".
_CTRL_PUNCTUATION = {"@": 0x00, "[": 0x1B, "\\": 0x1C, "]": 0x1D, "^": 0x1E, "_": 0x1F}


def parse_detach_key(text: str) -> bytes:
    """``ctrl-\\`` (the default), ``ctrl-q``, ``ctrl-]``, ... → the byte the terminal sends.

    >>> parse_detach_key("ctrl-q")
    b'\\x11'
    """
    name = text.strip().lower()
    key = name.removeprefix("ctrl-") if name.startswith("ctrl-") else None
    if key is not None and len(key) == 1:
        if "a" <= key <= "z":
            return bytes([ord(key) - ord("a") + 1])
        if key in _CTRL_PUNCTUATION:
            return bytes([_CTRL_PUNCTUATION[key]])
    raise ValueError(
        f"invalid detach key {text!r}: expected ctrl-<letter> or one of "
        + ", ".join(f"ctrl-{c}" for c in _CTRL_PUNCTUATION)
    )


def parse_mode(text: str) -> int:
    """An octal file mode: ``"644"``, ``"0644"``, ``"0o644"`` → ``0o644``."""
    digits = text.removeprefix("0o")
    if not digits or digits.strip("01234567") or len(digits) > 5:
        raise ValueError(f"invalid file mode {text!r}: expected octal like 0644")
    mode = int(digits, 8)
    if mode > 0o7777:
        raise ValueError(f"invalid file mode {text!r}: out of range")
    return mode


def parse_alias(text: str) -> str:
    """A published port's alias: one lowercase DNS label (``web``, ``my-app-3000``)."""
    if not _ALIAS_RE.match(text):
        raise ValueError(
            f"invalid alias {text!r}: use 1 to 63 lowercase letters, digits and '-',"
            " not starting or ending with '-'"
        )
    return text


def engine_for(engine: str | None, runtime: str | None) -> str | None:
    """The engine a create asks for: ``--engine`` as given; a ``--runtime`` alone means
    Docker (only Docker has runtimes); neither leaves it to the daemon (``None``).

    ``--engine qemu --runtime runsc`` goes to the daemon as it is, which refuses it.
    """
    if engine is None and runtime is not None:
        return "docker"
    return engine


def parse_session_command(argv: Iterable[str]) -> list[str]:
    """The command after ``SANDBOX [--]`` (the separator already taken out), never empty."""
    cmd = list(argv)
    if not cmd:
        raise ValueError("missing the command to run (kiln exec SANDBOX -- CMD [ARGS...])")
    return cmd


def parse_copy_location(arg: str) -> tuple[str | None, str]:
    """A ``kiln cp`` operand → ``(sandbox, path)``; ``sandbox`` is None for a local
    path or ``-`` (stdin/stdout). ``NAME:PATH`` names a sandbox (by name or id) when
    NAME has no ``/``; a path starting with ``/``, ``.`` or ``~`` is always local
    (write ``./a:b`` for a local file with a colon in its name)."""
    if arg == "-" or arg.startswith(("/", ".", "~")):
        return None, arg
    head, sep, tail = arg.partition(":")
    if not sep or not head or "/" in head:
        return None, arg
    if not _NAME_RE.match(head):
        raise ValueError(f"{head!r} is not a sandbox name or id (in {arg!r})")
    if not tail:
        raise ValueError(f"give a path after '{head}:' (e.g. {head}:/workspace)")
    if tail == "-":
        raise ValueError("'-' is a local stream; it takes no sandbox")
    return head, tail
