"""Reading and writing proto3 JSON messages held as dicts.

The proto3 JSON mapping as the E2B SDK's codec writes and reads it: field names
in lowerCamelCase (the original snake_case name is accepted too, as the spec
asks), 32-bit integers as numbers (numeric strings accepted), 64-bit integers
as strings, bytes as standard base64 (URL-safe accepted), enums by name
(numbers accepted), a oneof as whichever one of its fields is present, and a
field at its default value left out. A field of the wrong type is an
``invalid_argument`` Connect error naming it; unknown fields are ignored, as
the SDK's own codec ignores them.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from .connect import Code, ConnectError, Message

__all__ = [
    "b64",
    "boolean",
    "data",
    "enum",
    "invalid",
    "message",
    "oneof",
    "str_map",
    "string",
    "strings",
    "uint32",
]

_UINT32_MAX = (1 << 32) - 1


def invalid(text: str) -> ConnectError:
    return ConnectError(Code.INVALID_ARGUMENT, text)


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _get(msg: Message, name: str) -> Any:
    """The value of field ``name`` (camelCase), or None when absent or null."""
    value = msg.get(name)
    if value is None:
        value = msg.get(_snake(name))
    return value


def string(msg: Message, name: str) -> str | None:
    value = _get(msg, name)
    if value is None or isinstance(value, str):
        return value
    raise invalid(f"field {name!r} must be a string, got {type(value).__name__}")


def boolean(msg: Message, name: str) -> bool | None:
    value = _get(msg, name)
    if value is None or isinstance(value, bool):
        return value
    raise invalid(f"field {name!r} must be true or false, got {type(value).__name__}")


def uint32(msg: Message, name: str) -> int | None:
    value = _get(msg, name)
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32_MAX:
        raise invalid(f"field {name!r} must be an unsigned 32-bit integer, got {value!r}")
    return value


def strings(msg: Message, name: str) -> list[str]:
    value = _get(msg, name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(f"field {name!r} must be a list of strings")
    return value


def str_map(msg: Message, name: str) -> dict[str, str]:
    value = _get(msg, name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid(f"field {name!r} must be an object of strings")
    return value


def message(msg: Message, name: str) -> Message | None:
    value = _get(msg, name)
    if value is None or isinstance(value, dict):
        return value
    raise invalid(f"field {name!r} must be an object, got {type(value).__name__}")


def data(msg: Message, name: str) -> bytes | None:
    """A bytes field (base64; the URL-safe alphabet and missing padding accepted)."""
    value = _get(msg, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"field {name!r} must be a base64 string, got {type(value).__name__}")
    text = value.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"field {name!r} is not valid base64") from None


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def enum(msg: Message, name: str, values: Mapping[str, int]) -> str | None:
    """An enum field's value name (a number is mapped to its name); None if unset."""
    value = _get(msg, name)
    if value is None:
        return None
    if isinstance(value, str) and value in values:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        for key, number in values.items():
            if number == value:
                return key
    raise invalid(f"field {name!r}: unknown value {value!r}")


def oneof(msg: Message, names: tuple[str, ...]) -> tuple[str, Any] | None:
    """Which field of a oneof is set, and its raw value; more than one is an error."""
    present = [(n, _get(msg, n)) for n in names if _get(msg, n) is not None]
    if len(present) > 1:
        raise invalid(f"only one of {', '.join(names)} may be set")
    return present[0] if present else None
