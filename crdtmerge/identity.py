"""Merkle identity of tensor sets: chunk leaves, tensor leaves, the object root, manifests.

An object's **root** (DESIGN section 2) is a BLAKE3 Merkle root that depends only on what the
tensor set *means* -- names, dtypes, shapes, raw little-endian bytes, and the merge-relevant
metadata -- never on file layout, header order or shard split. Every hash is a
:func:`~crdtmerge.canonical.domain_hash` (a length-prefixed domain tag, then length-prefixed
parts), so a chunk leaf is never a node, a node never a tensor leaf, and so on:

- A tensor's bytes are cut into ``chunk_size`` pieces (default :data:`CHUNK_SIZE`, 4 MiB).
  ``chunk leaf = H("crdtmerge/v1/chunk", u64 index, chunk bytes)``.
- The chunk leaves form a binary Merkle tree, ``node = H("crdtmerge/v1/node", left, right)``,
  built level by level; an odd last node is promoted unchanged. No leaves (a zero-byte tensor)
  gives ``H("crdtmerge/v1/empty")``; one leaf is its own root.
- ``tensor leaf = H("crdtmerge/v1/tensor", utf-8 name, dtype code, u64 ndim || u64 dims...,
  u64 nbytes, chunk-tree root)`` -- the shape is length-prefixed, so ``(2,3)`` and ``(3,2)``
  differ even with equal bytes.
- ``metadata leaf = H("crdtmerge/v1/meta", canonical_pack(metadata))``, the metadata first
  normalised: every integral float is written as an int (:func:`normalise_metadata`).
- ``root = H("crdtmerge/v1/object", u64 chunk_size, metadata leaf, tensor-tree root)``, where
  the tensor tree is the same binary construction over tensor leaves sorted by name (UTF-8
  byte order equals code-point order). Committing ``chunk_size`` means every field of a
  :class:`Manifest` is bound by the root.

Integers are little-endian. The whole construction is pinned by ``tests/vectors/identity.jsonl``.

A :class:`Manifest` carries everything needed to recompute the root without the bytes
(metadata, and per tensor the name, dtype, shape, size and chunk leaves), so a receiver checks
the manifest against the root once, then each chunk against its leaf as it arrives
(:func:`verify_chunk`), and can resume anywhere.

Speed: chunk leaves are independent, so :func:`hash_tensors` hashes them on a small thread pool
(one worker per CPU; BLAKE3 releases the GIL) straight from zero-copy ``memoryview`` slices of
the memory-mapped file; no Python code runs per element.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import blake3

from ._leaf import CHUNK_SIZE, chunk_leaf
from ._leaf import chunk_hasher as _chunk_hasher
from ._leaf import u64 as _u64
from .canonical import canonical_pack, canonical_unpack, domain_hash
from .errors import (
    IntegrityError,
    InvalidInput,
    InvalidTensorFile,
    NotFound,
    UnsupportedVersion,
)
from .tensors import TensorInfo, TensorSource, open_tensors
from .tensors.format import _short

__all__ = [
    "CHUNK_SIZE",
    "MANIFEST_VERSION",
    "Manifest",
    "Root",
    "TensorEntry",
    "TensorHasher",
    "chunk_leaf",
    "contribution_metadata_header",
    "hash_tensors",
    "merkle_root",
    "metadata_leaf",
    "normalise_metadata",
    "object_root",
    "parse_root",
    "read_contribution_metadata",
    "root_hex",
    "set_root",
    "tensor_leaf",
    "verify_chunk",
]

#: a 32-byte object root
Root = bytes
#: the format version written by :meth:`Manifest.to_bytes`
MANIFEST_VERSION = 1
MANIFEST_TAG = "crdtmerge/manifest"
#: the ``__metadata__`` key holding a contribution's merge-relevant metadata (JSON)
METADATA_KEY = "crdtmerge"

_NODE = "crdtmerge/v1/node"
_EMPTY = "crdtmerge/v1/empty"
_TENSOR = "crdtmerge/v1/tensor"
_META = "crdtmerge/v1/meta"
_OBJECT = "crdtmerge/v1/object"
_SET = "crdtmerge/v1/set"

# chunks smaller than this are hashed inline; larger ones go to the pool
_INLINE_BYTES = 256 * 1024
# how many bytes of chunk jobs are handed to the pool at once (bounds copies of dict tensors)
_BATCH_BYTES = 256 * 1024 * 1024


#: deepest nesting accepted in merge-relevant metadata (real metadata is 2-3 levels deep)
MAX_METADATA_DEPTH = 32


def _check_depth(value: Any, what: str = "metadata") -> None:
    """Reject nesting deeper than :data:`MAX_METADATA_DEPTH` (iteratively: no recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth >= MAX_METADATA_DEPTH:
                raise InvalidInput(f"{what} is nested more than {MAX_METADATA_DEPTH} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def normalise_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` with every integral float written as an int (``1.0`` -> ``1``).

    JSON and YAML do not keep ``1`` and ``1.0`` apart reliably, and every parameter a strategy
    reads goes through :meth:`~crdtmerge.strategies.base.ParamSpec.check`, which coerces both to
    the same value, so the two must give one root (otherwise the same fine-tune pushed twice
    counts twice). Kept as floats: ``-0.0`` (its sign can reach the output) and magnitudes of
    2**53 and above (not every such float is an exact int in JSON readers).

    Raises:
        InvalidInput: nesting deeper than :data:`MAX_METADATA_DEPTH`.
    """
    _check_depth(metadata)
    return cast("dict[str, Any]", _integral_as_int(dict(metadata)))


def _integral_as_int(value: Any) -> Any:
    if isinstance(value, float):
        negative_zero = value == 0.0 and math.copysign(1.0, value) < 0
        if value.is_integer() and abs(value) < 2**53 and not negative_zero:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: _integral_as_int(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_integral_as_int(v) for v in value]
    return value


def _pack_metadata(metadata: Mapping[str, Any]) -> bytes:
    return canonical_pack(normalise_metadata(metadata))


def _checked_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`normalise_metadata`, checked to have a canonical encoding (``InvalidInput``)."""
    value = normalise_metadata(metadata)
    canonical_pack(value)
    return value


# ---------------------------------------------------------------------------------------------
# Roots as text


def root_hex(root: bytes) -> str:
    """The 64-character lowercase hex form of a root.

    Raises:
        InvalidInput: ``root`` is not 32 bytes.
    """
    if not isinstance(root, bytes | bytearray) or len(root) != 32:
        raise InvalidInput(f"a root is 32 bytes, got {_short(root)}")
    return bytes(root).hex()


def parse_root(text: str) -> bytes:
    """Parse a root from 64 hex characters (either case).

    Raises:
        InvalidInput: anything else.

    Example:
        >>> parse_root("00" * 32) == bytes(32)
        True
    """
    if not isinstance(text, str) or len(text) != 64:
        raise InvalidInput(f"a root is 64 hex characters, got {_short(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidInput(f"a root is 64 hex characters, got {_short(text)}") from None


# ---------------------------------------------------------------------------------------------
# The hash construction


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The binary Merkle root of ``leaves`` (odd node promoted; ``[]`` gives the empty hash).

    Args:
        leaves: 32-byte hashes, in order.

    Returns:
        ``leaves[0]`` for one leaf; else the root of ``H("crdtmerge/v1/node", left, right)``
        pairs built level by level.

    Example:
        >>> merkle_root([b"a" * 32]) == b"a" * 32
        True
    """
    level = list(leaves)
    if not level:
        return domain_hash(_EMPTY)
    while len(level) > 1:
        nxt = [domain_hash(_NODE, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _shape_bytes(shape: Sequence[int]) -> bytes:
    return _u64(len(shape)) + b"".join(_u64(d) for d in shape)


def tensor_leaf(
    name: str, dtype: str, shape: Sequence[int], nbytes: int, chunk_root: bytes
) -> bytes:
    """The leaf of one tensor.

    Args:
        name: the tensor name (hashed as UTF-8).
        dtype: the safetensors dtype code.
        shape: the shape (hashed as ``u64 ndim`` then each ``u64`` dimension).
        nbytes: the tensor's size in bytes.
        chunk_root: :func:`merkle_root` of its chunk leaves.

    Returns:
        ``H("crdtmerge/v1/tensor", name, dtype, shape, nbytes, chunk_root)``.
    """
    return domain_hash(
        _TENSOR,
        name.encode("utf-8"),
        dtype.encode("ascii"),
        _shape_bytes(shape),
        _u64(nbytes),
        chunk_root,
    )


def metadata_leaf(metadata: Mapping[str, Any]) -> bytes:
    """``H("crdtmerge/v1/meta", canonical_pack(metadata))`` (key order never matters).

    Raises:
        InvalidInput: metadata that has no canonical encoding (NaN, non-string keys ...).
    """
    return domain_hash(_META, _pack_metadata(metadata))


def object_root(
    metadata: Mapping[str, Any],
    tensor_leaves_sorted: Sequence[bytes],
    *,
    chunk_size: int = CHUNK_SIZE,
) -> bytes:
    """The root of an object.

    Args:
        metadata: the merge-relevant metadata.
        tensor_leaves_sorted: :func:`tensor_leaf` of every tensor, in sorted name order.
        chunk_size: the chunk size the leaves were computed with (committed in the root).

    Returns:
        ``H("crdtmerge/v1/object", u64 chunk_size, metadata leaf, tensor-tree root)``.

    Raises:
        InvalidInput: metadata with no canonical encoding.
    """
    return domain_hash(
        _OBJECT, _u64(chunk_size), metadata_leaf(metadata), merkle_root(tensor_leaves_sorted)
    )


def set_root(roots: Iterable[bytes]) -> bytes:
    """The root of a set of object roots: ``H("crdtmerge/v1/set", *sorted(roots))``.

    Duplicates count once (it is a set). Used to derive merge seeds.

    Args:
        roots: 32-byte object roots, in any order.

    Returns:
        The 32-byte set root.

    Raises:
        InvalidInput: a root that is not 32 bytes.
    """
    unique = set()
    for root in roots:
        if not isinstance(root, bytes) or len(root) != 32:
            raise InvalidInput(f"a root is 32 bytes, got {_short(root)}")
        unique.add(root)
    return domain_hash(_SET, *sorted(unique))


def _num_chunks(nbytes: int, chunk_size: int) -> int:
    return -(-nbytes // chunk_size)


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a manifest: its info and the leaves of its chunks, in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[bytes, ...]

    def leaf(self) -> bytes:
        """The tensor leaf."""
        return tensor_leaf(self.name, self.dtype, self.shape, self.nbytes, merkle_root(self.chunks))

    @property
    def info(self) -> TensorInfo:
        """The :class:`~crdtmerge.tensors.TensorInfo` of this tensor."""
        return TensorInfo(self.name, self.dtype, self.shape, self.nbytes)

    def _check(self, chunk_size: int) -> None:
        try:
            self.info.check()
        except InvalidInput as exc:
            raise IntegrityError(f"manifest: {exc.detail}") from None
        expected = _num_chunks(self.nbytes, chunk_size)
        if len(self.chunks) != expected:
            raise IntegrityError(
                f"manifest: tensor {_short(self.name)} of {self.nbytes} bytes needs {expected} chunks "
                f"of {chunk_size} bytes, the manifest lists {len(self.chunks)}"
            )
        if not all(isinstance(c, bytes) and len(c) == 32 for c in self.chunks):
            raise IntegrityError(
                f"manifest: tensor {_short(self.name)} has a chunk leaf that is not 32 bytes"
            )


@dataclass(frozen=True)
class Manifest:
    """Everything needed to recompute an object's root without its bytes.

    Attributes:
        root: the object root (32 bytes).
        metadata: the merge-relevant metadata (part of the root).
        tensors: one :class:`TensorEntry` per tensor, sorted by name.
        chunk_size: bytes per chunk (part of the root).
    """

    root: bytes
    metadata: dict[str, Any]
    tensors: tuple[TensorEntry, ...]
    chunk_size: int = CHUNK_SIZE

    @classmethod
    def build(
        cls,
        entries: Iterable[TensorEntry],
        metadata: Mapping[str, Any] | None = None,
        *,
        chunk_size: int = CHUNK_SIZE,
    ) -> Manifest:
        """Compute the root of ``entries`` (any order) and ``metadata`` and wrap them.

        Raises:
            InvalidInput: duplicate tensor names or metadata with no canonical encoding.
        """
        ordered = tuple(sorted(entries, key=lambda e: e.name))
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a.name == b.name:
                raise InvalidInput(f"tensor {_short(a.name)} appears twice")
        meta = normalise_metadata(metadata or {})
        root = object_root(meta, [e.leaf() for e in ordered], chunk_size=chunk_size)
        return cls(root, meta, ordered, chunk_size)

    @property
    def root_hex(self) -> str:
        """The root as 64 hex characters."""
        return self.root.hex()

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' byte sizes."""
        return sum(e.nbytes for e in self.tensors)

    @property
    def num_chunks(self) -> int:
        """Number of chunk leaves over all tensors."""
        return sum(len(e.chunks) for e in self.tensors)

    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return list(self._names)

    @functools.cached_property
    def _names(self) -> list[str]:
        return [e.name for e in self.tensors]

    def entry(self, name: str) -> TensorEntry:
        """The entry of one tensor.

        Raises:
            NotFound: no tensor of that name.
        """
        names = self._names
        i = bisect.bisect_left(names, name)
        if i < len(names) and names[i] == name and self.tensors[i].name == name:
            return self.tensors[i]
        for e in self.tensors:  # an unsorted (unverified) manifest: fall back to a scan
            if e.name == name:
                return e
        raise NotFound(f"object {self.root.hex()[:12]} has no tensor named {_short(name)}")

    def chunk_span(self, name: str, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index`` within tensor ``name``'s bytes.

        Raises:
            NotFound: no such tensor or chunk index.
        """
        entry = self.entry(name)
        if not 0 <= index < len(entry.chunks):
            raise NotFound(
                f"tensor {_short(name)} has {len(entry.chunks)} chunks; there is no chunk {index}"
            )
        start = index * self.chunk_size
        return start, min(self.chunk_size, entry.nbytes - start)

    def verify(self, expected_root: bytes | None = None) -> None:
        """Recompute the root from the entries and check it.

        Args:
            expected_root: when given, the root the manifest must have (e.g. the one asked for).

        Raises:
            IntegrityError: the manifest is inconsistent or does not hash to its root.
        """
        if type(self.chunk_size) is not int or self.chunk_size < 1:
            raise IntegrityError(f"manifest: chunk_size {_short(self.chunk_size)} is not positive")
        names = [e.name for e in self.tensors]
        if any(a >= b for a, b in zip(names, names[1:], strict=False)):
            raise IntegrityError("manifest: tensors are not sorted by name without duplicates")
        for e in self.tensors:
            e._check(self.chunk_size)
        try:
            computed = object_root(
                self.metadata, [e.leaf() for e in self.tensors], chunk_size=self.chunk_size
            )
        except InvalidInput as exc:
            raise IntegrityError(f"manifest: {exc.detail}") from None
        if computed != self.root:
            raise IntegrityError(
                f"manifest claims root {self.root.hex()} but its entries hash to "
                f"{computed.hex()}; it was altered or corrupted"
            )
        if expected_root is not None and self.root != expected_root:
            raise IntegrityError(
                f"manifest is for root {self.root.hex()}, expected {bytes(expected_root).hex()}"
            )

    def to_bytes(self) -> bytes:
        """Canonical msgpack: ``[tag, version, {root, chunk_size, metadata, tensors}]``.

        Each tensor is ``[name, dtype, shape, nbytes, concatenated chunk leaves]``.
        """
        body = {
            "root": self.root,
            "chunk_size": self.chunk_size,
            "metadata": self.metadata,
            "tensors": [
                [e.name, e.dtype, list(e.shape), e.nbytes, b"".join(e.chunks)] for e in self.tensors
            ],
        }
        return canonical_pack([MANIFEST_TAG, MANIFEST_VERSION, body])

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_root: bytes | None = None) -> Manifest:
        """Decode :meth:`to_bytes` output and :meth:`verify` it.

        Args:
            data: the encoded manifest.
            expected_root: when given, the root the manifest must have (the one asked for).

        Returns:
            A manifest whose entries hash to its root.

        Raises:
            InvalidInput: not a manifest, malformed, or not in canonical form.
            UnsupportedVersion: a manifest format version this code does not know.
            IntegrityError: it does not hash to its root, or not to ``expected_root``.
        """
        try:
            obj = canonical_unpack(bytes(data))
        except (InvalidInput, TypeError, RecursionError) as exc:
            raise InvalidInput(f"not a crdtmerge manifest: {exc}") from None
        if not isinstance(obj, list) or len(obj) < 2 or obj[0] != MANIFEST_TAG:
            raise InvalidInput("not a crdtmerge manifest (missing tag)")
        if obj[1] != MANIFEST_VERSION:
            raise UnsupportedVersion(
                f"manifest format version {_short(obj[1])} is not supported (this code reads "
                f"version {MANIFEST_VERSION}); upgrade crdtmerge"
            )
        try:
            manifest = cls._from_body(obj)
            canonical = manifest.to_bytes()
        except InvalidInput:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(f"malformed crdtmerge manifest: {exc}") from None
        if canonical != bytes(data):
            raise InvalidInput("crdtmerge manifest is not in canonical form")
        manifest.verify(expected_root)
        return manifest

    @classmethod
    def _from_body(cls, obj: list[Any]) -> Manifest:
        if len(obj) != 3 or not isinstance(obj[2], dict):
            raise ValueError("expected [tag, version, body]")
        body = obj[2]
        if set(body) != {"root", "chunk_size", "metadata", "tensors"}:
            raise ValueError(f"unexpected fields {_short(sorted(body))}")
        root, chunk_size, metadata = body["root"], body["chunk_size"], body["metadata"]
        if not isinstance(root, bytes) or len(root) != 32:
            raise ValueError("root must be 32 bytes")
        if type(chunk_size) is not int or chunk_size < 1:
            raise ValueError("chunk_size must be a positive integer")
        if not isinstance(metadata, dict):
            raise ValueError("metadata must be a map")
        _check_depth(metadata, "manifest metadata")
        if canonical_pack(metadata) != canonical_pack(_integral_as_int(metadata)):
            raise ValueError("metadata writes an integral number as a float (1.0 for 1)")
        entries = []
        for item in body["tensors"]:
            name, dtype, shape, nbytes, leaves = item
            if not (
                isinstance(name, str)
                and isinstance(dtype, str)
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(nbytes) is int
                and isinstance(leaves, bytes)
                and len(leaves) % 32 == 0
            ):
                raise ValueError(f"bad tensor entry {_short(item)}")
            chunks = tuple(leaves[i : i + 32] for i in range(0, len(leaves), 32))
            entries.append(TensorEntry(name, dtype, tuple(shape), nbytes, chunks))
        return cls(root, metadata, tuple(entries), chunk_size)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (hex for hashes), e.g. for ``crdtmerge hash --manifest``."""
        return {
            "root": self.root.hex(),
            "chunk_size": self.chunk_size,
            "metadata": self.metadata,
            "tensors": [
                {
                    "name": e.name,
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "nbytes": e.nbytes,
                    "chunks": [c.hex() for c in e.chunks],
                }
                for e in self.tensors
            ],
        }


def verify_chunk(
    manifest: Manifest, tensor_name: str, index: int, data: bytes | bytearray | memoryview
) -> None:
    """Check that ``data`` is chunk ``index`` of ``tensor_name`` in a (verified) manifest.

    Args:
        manifest: a manifest already checked against the wanted root.
        tensor_name: the tensor the chunk belongs to.
        index: the chunk's position in that tensor.
        data: the received bytes.

    Raises:
        IntegrityError: wrong length or the bytes do not hash to the chunk's leaf.
        NotFound: no such tensor or chunk index.
    """
    entry = manifest.entry(tensor_name)
    _, length = manifest.chunk_span(tensor_name, index)
    view = memoryview(data).cast("B")
    if len(view) != length:
        raise IntegrityError(
            f"chunk {index} of tensor {_short(tensor_name)}: expected {length} bytes, got {len(view)}"
        )
    if chunk_leaf(index, view) != entry.chunks[index]:
        raise IntegrityError(
            f"chunk {index} of tensor {_short(tensor_name)} does not hash to its leaf in manifest "
            f"{manifest.root.hex()[:12]}; the bytes are corrupt"
        )


# ---------------------------------------------------------------------------------------------
# Hashing

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_fork_hook = False


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _forget_pool() -> None:
    """After ``fork`` the child has no pool threads: start a fresh pool on next use."""
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """The shared hashing pool, created on first use (no threads at import time)."""
    global _pool, _fork_hook
    with _pool_lock:
        if _pool is None:
            if not _fork_hook and hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_forget_pool)
                _fork_hook = True
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="crdtmerge-hash")
        return _pool


def _leaf_job(job: tuple[int, memoryview]) -> bytes:
    index, view = job
    return chunk_leaf(index, view)


def _chunk_leaves(view: memoryview, chunk_size: int, first_index: int = 0) -> list[bytes]:
    """Leaves of the consecutive chunks of ``view``; large ones hashed in parallel."""
    jobs = [
        (first_index + i, view[off : off + chunk_size])
        for i, off in enumerate(range(0, len(view), chunk_size))
    ]
    if len(jobs) > 1 and len(view) > _INLINE_BYTES:
        return list(_hash_pool().map(_leaf_job, jobs))
    return [_leaf_job(j) for j in jobs]


def _check_chunk_size(chunk_size: int) -> None:
    if type(chunk_size) is not int or chunk_size < 1:
        raise InvalidInput(f"chunk_size must be a positive integer, got {_short(chunk_size)}")


class TensorHasher:
    """Hash one tensor incrementally while its bytes are produced (e.g. written).

    Feed the tensor's raw little-endian bytes in order with :meth:`update` (any split), then
    call :meth:`finish` for its :class:`TensorEntry`. Full chunks inside one ``update`` are
    hashed in parallel; a partial chunk is carried to the next call. Memory: one chunk state.

    Example:
        >>> h = TensorHasher(TensorInfo("w", "U8", (3,), 3))
        >>> h.update(b"ab"); h.update(b"c")
        >>> h.finish().chunks == (chunk_leaf(0, b"abc"),)
        True
    """

    def __init__(self, info: TensorInfo, *, chunk_size: int = CHUNK_SIZE) -> None:
        _check_chunk_size(chunk_size)
        info.check()
        self.info = info
        self._chunk_size = chunk_size
        self._leaves: list[bytes] = []
        self._seen = 0
        self._partial: blake3.blake3 | None = None  # hasher of an unfinished chunk
        self._partial_len = 0

    def _chunk_len(self, index: int) -> int:
        return min(self._chunk_size, self.info.nbytes - index * self._chunk_size)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next bytes of the tensor.

        Raises:
            InvalidInput: more bytes than the tensor has.
        """
        view = memoryview(data).cast("B")
        if self._seen + len(view) > self.info.nbytes:
            raise InvalidInput(
                f"tensor {_short(self.info.name)}: got more than its {self.info.nbytes} bytes"
            )
        self._seen += len(view)
        if self._partial is not None:
            index = len(self._leaves)
            take = min(len(view), self._chunk_len(index) - self._partial_len)
            self._partial.update(view[:take])
            self._partial_len += take
            view = view[take:]
            if self._partial_len == self._chunk_len(index):
                self._leaves.append(self._partial.digest())
                self._partial = None
        if not view:
            return
        full = len(view) - len(view) % self._chunk_size
        if self._seen == self.info.nbytes:
            full = len(view)  # the tail is the (short) last chunk
        if full:
            self._leaves.extend(_chunk_leaves(view[:full], self._chunk_size, len(self._leaves)))
        if full < len(view):
            index = len(self._leaves)
            self._partial = _chunk_hasher(index, self._chunk_len(index))
            self._partial.update(view[full:])
            self._partial_len = len(view) - full

    def finish(self) -> TensorEntry:
        """The tensor's entry.

        Raises:
            InvalidInput: fewer bytes were fed than the tensor has.
        """
        if self._seen != self.info.nbytes:
            raise InvalidInput(
                f"tensor {_short(self.info.name)}: got {self._seen} of its {self.info.nbytes} bytes"
            )
        i = self.info
        return TensorEntry(i.name, i.dtype, i.shape, i.nbytes, tuple(self._leaves))


def read_contribution_metadata(source: TensorSource | Any) -> dict[str, Any]:
    """The merge-relevant metadata stored in ``__metadata__["crdtmerge"]`` (JSON), or ``{}``.

    Args:
        source: a :class:`~crdtmerge.tensors.TensorSource` (or anything :func:`open_tensors`
            accepts).

    Raises:
        InvalidTensorFile: the value is not a JSON object with a canonical encoding.
    """
    if not isinstance(source, TensorSource):
        with open_tensors(source) as opened:
            return read_contribution_metadata(opened)
    text = source.metadata.get(METADATA_KEY)
    if text is None:
        return {}

    def reject(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    try:
        value = json.loads(text, parse_constant=reject)
    except (ValueError, RecursionError) as exc:
        raise InvalidTensorFile(
            f"{source.label}: __metadata__[{_short(METADATA_KEY)}] is not valid JSON: {exc}"
        ) from None
    if not isinstance(value, dict):
        raise InvalidTensorFile(
            f"{source.label}: __metadata__[{_short(METADATA_KEY)}] must be a JSON object, "
            f"got {type(value).__name__}"
        )
    try:
        value = _checked_metadata(value)
    except InvalidInput as exc:
        raise InvalidTensorFile(
            f"{source.label}: __metadata__[{_short(METADATA_KEY)}]: {exc}"
        ) from None
    return value


def contribution_metadata_header(meta: Mapping[str, Any]) -> dict[str, str]:
    """The ``__metadata__`` entry that stores ``meta``: ``{"crdtmerge": canonical JSON}``.

    Raises:
        InvalidInput: ``meta`` is not JSON-representable with a canonical encoding.

    Example:
        >>> contribution_metadata_header({"params": {"weight": 0.5}})
        {'crdtmerge': '{"params":{"weight":0.5}}'}
    """
    value = _checked_metadata(meta)
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"contribution metadata is not JSON-representable: {exc}") from None
    return {METADATA_KEY: text}


def hash_tensors(
    src: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> Manifest:
    """Hash a tensor set into its :class:`Manifest` (and root).

    Args:
        src: a path (file or Hugging Face directory), a mapping of tensors, or an open
            :class:`~crdtmerge.tensors.TensorSource` (left open).
        metadata: the merge-relevant metadata; ``None`` reads ``__metadata__["crdtmerge"]``
            from the source (``{}`` when absent).
        chunk_size: bytes per chunk leaf (tests use small values; the network uses the default).

    Returns:
        The manifest; ``manifest.root`` is the object root.

    Raises:
        InvalidTensorFile: a malformed file. InvalidInput: bad metadata or chunk size.

    Example:
        >>> import torch
        >>> m = hash_tensors({"w": torch.zeros(2, 3)})
        >>> len(m.root_hex), m.total_bytes
        (64, 24)
    """
    _check_chunk_size(chunk_size)
    if isinstance(src, TensorSource):
        return _hash_source(src, metadata, chunk_size)
    with open_tensors(src) as source:
        return _hash_source(source, metadata, chunk_size)


def _hash_source(
    source: TensorSource, metadata: Mapping[str, Any] | None, chunk_size: int
) -> Manifest:
    # normalised and checked before hashing gigabytes
    meta = read_contribution_metadata(source) if metadata is None else _checked_metadata(metadata)
    infos = source.infos()
    leaves: list[list[bytes]] = [[] for _ in infos]
    batch: list[tuple[int, int, memoryview]] = []  # (tensor position, chunk index, bytes)
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch_bytes
        results = list(_hash_pool().map(_leaf_job, [(i, v) for _, i, v in batch]))
        for (pos, _, _), leaf in zip(batch, results, strict=True):
            leaves[pos].append(leaf)
        batch.clear()
        batch_bytes = 0

    for pos, info in enumerate(infos):
        view = source.buffer(info.name)
        for index, off in enumerate(range(0, info.nbytes, chunk_size)):
            chunk = view[off : off + chunk_size]
            if len(chunk) <= _INLINE_BYTES and not batch:
                leaves[pos].append(chunk_leaf(index, chunk))
                continue
            batch.append((pos, index, chunk))
            batch_bytes += len(chunk)
        if batch_bytes >= _BATCH_BYTES:
            flush()
    if batch:
        flush()
    entries = [
        TensorEntry(i.name, i.dtype, i.shape, i.nbytes, tuple(leaves[pos]))
        for pos, i in enumerate(infos)
    ]
    return Manifest.build(entries, meta, chunk_size=chunk_size)
