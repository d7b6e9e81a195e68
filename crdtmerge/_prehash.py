"""Hash a command's input files while torch is still being imported.

Importing torch takes about two seconds of one core at the start of every ``crdtmerge merge``,
and the inputs must be hashed (their roots order the contributions and seed the generator)
before merging starts. Hashing needs no torch, so the command hands the input paths to
:func:`start` first: a background thread reads each ``.safetensors`` file's header and computes
the chunk leaves of every tensor (:func:`crdtmerge._leaf.chunk_leaf`, on two pool threads;
BLAKE3 runs without the GIL) on the otherwise idle core. :func:`lookup` then hands those
leaves to :func:`crdtmerge.engine.hash_source`.

This is a cache, never a second definition: leaves are keyed by the file's identity and
version (device, inode, size, modification time) and the tensor's byte range, a file that
changed while it was read gives none, and anything this reader cannot parse is simply not
cached. ``hash_source`` validates the file with the real reader, asks for the byte range that
reader found, and hashes the tensor itself when there is no entry. This module imports only
the standard library and ``blake3``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ._leaf import CHUNK_SIZE, chunk_leaf

__all__ = ["lookup", "start"]

FileKey = tuple[int, int, int, int]
Leaves = dict[tuple[int, int], tuple[bytes, ...]]

_lock = threading.Lock()
#: file identity -> the leaves of its tensors by (file offset, length), when done
_files: dict[FileKey, Future[Leaves]] = {}

#: a header larger than this is left to the real reader
_MAX_HEADER = 100 << 20


def _key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _tensor_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.glob("*.safetensors"))
    return []


def start(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Start hashing the ``.safetensors`` files at ``paths`` (files, or directories of
    shards) in the background. Returns at once."""
    jobs = []
    with _lock:
        for path in paths:
            for file in _tensor_files(Path(path)):
                try:
                    key = _key(os.stat(file))
                except OSError:
                    continue
                if key not in _files:
                    _files[key] = Future()
                    jobs.append((file, key, _files[key]))
    if jobs:
        threading.Thread(target=_run, args=(jobs,), name="crdtmerge-prehash", daemon=True).start()


def lookup(path: str | os.PathLike[str], offset: int, length: int) -> tuple[bytes, ...] | None:
    """The chunk leaves of bytes ``offset .. offset + length - 1`` of the file at ``path`` as
    it is now, if :func:`start` hashed that range (waiting for the file to finish); else
    None."""
    if not _files:
        return None
    try:
        key = _key(os.stat(path))
    except OSError:
        return None
    future = _files.get(key)
    if future is None:
        return None
    return future.result().get((offset, length))


def _run(jobs: list[tuple[Path, FileKey, Future[Leaves]]]) -> None:
    with ThreadPoolExecutor(2, thread_name_prefix="crdtmerge-prehash") as pool:
        for file, key, future in jobs:
            try:
                leaves = _hash_file(file, key, pool)
            except (OSError, ValueError, TypeError, KeyError, IndexError, BufferError):
                leaves = {}  # the real reader will report whatever is wrong
            future.set_result(leaves)


def _hash_file(file: Path, key: FileKey, pool: ThreadPoolExecutor) -> Leaves:
    out: Leaves = {}
    with open(file, "rb") as fh:
        if _key(os.fstat(fh.fileno())) != key:
            return {}
        (size,) = struct.unpack("<Q", fh.read(8))
        if size > _MAX_HEADER:
            return {}
        header = json.loads(fh.read(size))
        start = 8 + size
        ranges = sorted(
            {
                (
                    start + int(v["data_offsets"][0]),
                    int(v["data_offsets"][1] - v["data_offsets"][0]),
                )
                for name, v in header.items()
                if name != "__metadata__"
            }
        )
        for offset, length in ranges:
            if length <= 0 or offset + length > key[2]:
                continue
            out[(offset, length)] = _leaves(fh.fileno(), offset, length, pool)
        if _key(os.fstat(fh.fileno())) != key:
            return {}
    return out


def _leaves(fd: int, offset: int, length: int, pool: ThreadPoolExecutor) -> tuple[bytes, ...]:
    """Leaves of one tensor's bytes, from a mapping of just that range (so the process holds
    one tensor's pages at a time)."""
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, offset - base + length, offset=base, access=mmap.ACCESS_READ)
    try:
        view = memoryview(mm)[offset - base :]
        pieces = [view[o : o + CHUNK_SIZE] for o in range(0, length, CHUNK_SIZE)]
        try:
            return tuple(pool.map(chunk_leaf, range(len(pieces)), pieces))
        finally:
            for piece in pieces:
                piece.release()
            view.release()
    finally:
        mm.close()
