"""Shared framing for the layer-1 binary encodings (private).

Every CRDT value encodes as ``tag byte | version byte | msgpack body``. The body only ever holds
arrays, unsigned integers, strings, byte strings and nil, for which plain msgpack packing is
already canonical (smallest integer form, fixed headers): it equals
:func:`crdtmerge.canonical.canonical_pack` of the same value, which a unit test pins. Decoding
is strict: after parsing, the value is re-encoded and must give back exactly the input bytes,
so two replicas never disagree about the bytes of one state.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..errors import InvalidInput, UnsupportedVersion

#: tag bytes of the layer-1 types (never reuse a retired tag).
TAG_VERSION_VECTOR = 0x01
TAG_ORSET = 0x02
TAG_LWW_REGISTER = 0x03
TAG_MERGE_DOCUMENT = 0x04
TAG_NODE_STATE = 0x05

#: the one encoding version this build reads and writes.
FORMAT_VERSION = 1

MALFORMED = "malformed_state"


def malformed(type_name: str, detail: str) -> InvalidInput:
    """The error raised for a structurally invalid or ill-formed encoded state."""
    return InvalidInput(f"malformed {type_name}: {detail}", code=MALFORMED)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame(tag: int, obj: Any) -> bytes:
    return bytes((tag, FORMAT_VERSION)) + pack(obj)


def unframe(data: bytes, tag: int, type_name: str) -> Any:
    """Check the tag and version bytes and parse the msgpack body.

    Raises:
        UnsupportedVersion: the version byte is not :data:`FORMAT_VERSION`.
        InvalidInput: (code ``malformed_state``) wrong tag, truncated or garbage body.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise malformed(type_name, f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 3:
        raise malformed(type_name, f"{len(data)} bytes is too short for tag, version and body")
    if data[0] != tag:
        raise malformed(type_name, f"tag byte is 0x{data[0]:02x}, expected 0x{tag:02x}")
    if data[1] != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"{type_name} encoding version {data[1]} is not supported; this build reads "
            f"version {FORMAT_VERSION} (upgrade the node that produced it, or this one)"
        )
    try:
        return msgpack.unpackb(data[2:], raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise malformed(type_name, f"body is not valid msgpack ({exc})") from exc


def expect_list(value: Any, type_name: str, what: str, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise malformed(type_name, f"{what} must be an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise malformed(type_name, f"{what} must have {length} items, got {len(value)}")
    return value


def expect_int(value: Any, type_name: str, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise malformed(type_name, f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value
