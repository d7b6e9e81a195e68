"""The chunk leaf of the content identity, in a module that does not import torch.

:mod:`crdtmerge.identity` defines the identity and re-exports these; they live here so that
:mod:`crdtmerge._prehash` can hash a command's inputs while torch is still being imported.
"""

from __future__ import annotations

import struct

import blake3

#: bytes per chunk leaf
CHUNK_SIZE = 4 * 1024 * 1024
#: the domain tag of a chunk leaf
CHUNK_TAG = "crdtmerge/v1/chunk"


def u64(value: int) -> bytes:
    """``value`` as 8 little-endian bytes."""
    return struct.pack("<Q", value)


def chunk_hasher(index: int, length: int) -> blake3.blake3:
    """A BLAKE3 state equal to ``domain_hash(CHUNK_TAG, u64 index, data)`` before ``data``."""
    tag = CHUNK_TAG.encode()
    h = blake3.blake3()
    h.update(u64(len(tag)) + tag + u64(8) + u64(index) + u64(length))
    return h


def chunk_leaf(index: int, data: bytes | bytearray | memoryview) -> bytes:
    """The leaf of chunk ``index`` of a tensor: ``H("crdtmerge/v1/chunk", u64 index, data)``.

    Args:
        index: the chunk's position in its tensor (0-based).
        data: the chunk's bytes (``chunk_size`` bytes, the last chunk may be shorter).

    Returns:
        The 32-byte leaf.
    """
    view = memoryview(data).cast("B")
    h = chunk_hasher(index, len(view))
    h.update(view)
    return h.digest()
