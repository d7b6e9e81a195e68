"""Canonical encoding and domain-separated hashing.

Everything that is hashed into an identity (object metadata, recipes, state digests, seeds) is
first turned into bytes by :func:`canonical_pack`: msgpack with map keys sorted by their encoded
bytes, floats always as float64, tuples as arrays, and no NaN/Inf (they have no canonical form
and are rejected). The same value always encodes to the same bytes, on every replica.

:func:`domain_hash` is BLAKE3 over a length-prefixed domain tag followed by length-prefixed
parts, so hashes of different kinds of things never collide (a leaf is never a node, a recipe
never a metadata block).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import blake3
import msgpack

from .errors import InvalidInput

__all__ = ["canonical_pack", "canonical_unpack", "domain_hash"]


class _Map(list[tuple[str | bytes, Any]]):
    """A normalised mapping: a list of (key, value) pairs, encoded as a msgpack map."""


def _normalise(value: Any, path: str) -> Any:
    if value is None or isinstance(value, bool | str | bytes):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise InvalidInput(f"{path or 'value'}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{path or 'value'}: {value!r} has no canonical encoding")
        return value
    if isinstance(value, list | tuple):
        return [_normalise(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = _Map()
        for k, v in value.items():
            if not isinstance(k, str | bytes):
                raise InvalidInput(f"{path or 'value'}: map key {k!r} is not a string")
            label = k if isinstance(k, str) else repr(k)  # what f"{k}" gave for a bytes key
            items.append((k, _normalise(v, f"{path}.{label}" if path else label)))
        return items
    raise InvalidInput(f"{path or 'value'}: {type(value).__name__} cannot be encoded canonically")


def _encode(packer: msgpack.Packer, value: Any, out: list[bytes]) -> None:
    if isinstance(value, _Map):
        encoded = sorted((packer.pack(k), v) for k, v in value)
        for i in range(1, len(encoded)):
            if encoded[i][0] == encoded[i - 1][0]:
                raise InvalidInput("duplicate map key in canonical encoding")
        out.append(_map_header(len(encoded)))
        for kb, v in encoded:
            out.append(kb)
            _encode(packer, v, out)
    elif isinstance(value, list):
        out.append(_array_header(len(value)))
        for v in value:
            _encode(packer, v, out)
    elif isinstance(value, float):
        out.append(b"\xcb" + struct.pack(">d", value))
    else:
        out.append(packer.pack(value))


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 2**16:
        return b"\xde" + struct.pack(">H", n)
    return b"\xdf" + struct.pack(">I", n)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 2**16:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def canonical_pack(value: Any) -> bytes:
    """Encode ``value`` (None, bool, int, float, str, bytes, lists, string-keyed maps) canonically.

    Raises:
        InvalidInput: for NaN/Inf, non-string map keys, or unsupported types.

    Example:
        >>> canonical_pack({"b": 1, "a": 0.5}) == canonical_pack({"a": 0.5, "b": 1})
        True
    """
    packer = msgpack.Packer(use_bin_type=True)
    normalised = _normalise(value, "")
    out: list[bytes] = []
    _encode(packer, normalised, out)
    return b"".join(out)


def canonical_unpack(data: bytes) -> Any:
    """Decode bytes made by :func:`canonical_pack` (maps come back as dicts)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise InvalidInput(f"not a valid canonical msgpack value: {exc}") from exc


def domain_hash(domain: str, *parts: bytes, length: int = 32) -> bytes:
    """BLAKE3 of a domain tag and length-prefixed parts.

    Example:
        >>> domain_hash("a", b"bc") != domain_hash("ab", b"c")
        True
    """
    h = blake3.blake3()
    tag = domain.encode()
    h.update(struct.pack("<Q", len(tag)))
    h.update(tag)
    for part in parts:
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.digest(length=length)
