"""Writing canonical tensor sets: :class:`StreamingWriter` and :func:`write_tensors`, atomic
(temporary file, fsync, rename, directory fsync) and streaming (one tensor at a time)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import torch

from .._durable import fsync_path
from ..errors import InvalidInput, StorageError
from .format import (
    INDEX_FILENAME,
    SINGLE_FILENAME,
    TensorInfo,
    _check_metadata,
    _short,
    _sorted_infos,
    canonical_header,
    dtype_code,
    tensor_bytes,
)
from .reader import _DictSource


@contextlib.contextmanager
def _storage_errors(what: object) -> Iterator[None]:
    """Turn OS errors while writing (disk full, permissions, I/O) into ``StorageError``."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{what}: cannot write: {exc.strerror or exc}") from exc


def _umask() -> int:
    """The process umask (read once; setting it back at once is safe at import time)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: permissions of written files: what ``open(path, "w")`` would give (mkstemp makes 0600)
_FILE_MODE = 0o666 & ~_umask()


class _TempFile:
    """A temporary file next to its final name; committed by fsync + rename. It gets the
    permissions an ordinary new file would (0644 under the usual umask), not mkstemp's 0600.

    Every :data:`_EARLY_SYNC_BYTES` written, an ``fdatasync`` starts on a background thread
    (one at a time), so the data goes to disk while the rest is still being computed and the
    final ``fsync`` of :meth:`finish` has little left to wait for. An error of an early sync
    is raised by :meth:`finish` (the kernel reports a write-back error to one sync only).
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb", buffering=0)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _FILE_MODE)
        self._unsynced = 0
        self._sync: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._unsynced += len(view)
        while view:
            written = self.file.write(view)
            view = view[written:]
        if self._unsynced >= _EARLY_SYNC_BYTES and (
            self._sync is None or not self._sync.is_alive()
        ):
            self._unsynced = 0
            self._sync = threading.Thread(target=self._early_sync, daemon=True)
            self._sync.start()

    def _early_sync(self) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(self.file.fileno())
        except OSError as exc:
            self._sync_error = exc

    def _join(self) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None

    def finish(self) -> None:
        self._join()
        if self._sync_error is not None:
            raise self._sync_error
        os.fsync(self.file.fileno())
        self.file.close()

    def discard(self) -> None:
        self._join()
        if not self.file.closed:
            self.file.close()
        self.path.unlink(missing_ok=True)


#: written bytes between the early background syncs of a :class:`_TempFile`
_EARLY_SYNC_BYTES = 64 << 20


class StreamingWriter:
    """Write a canonical tensor set one tensor at a time, in sorted name order.

    Args:
        path_or_dir: a ``.safetensors`` path for a single file, or a directory (created if
            missing) that receives ``model.safetensors`` or, when sharded,
            ``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``.
        infos: every tensor that will be written (any order; written in sorted name order).
        metadata: the safetensors ``__metadata__`` (strings), repeated in every shard.
        max_shard_bytes: start a new shard before a tensor that would take the current shard
            over this many data bytes (a larger tensor gets a shard of its own). ``None``: one
            file.

    Nothing appears under a final name until :meth:`close` succeeds; on an exception inside a
    ``with`` block (or :meth:`abort`) the temporary files are removed.

    Raises:
        InvalidInput: bad infos or metadata; sharding requested for a ``.safetensors`` path.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> w = StreamingWriter(f"{d}/m.safetensors", [TensorInfo("w", "F32", (2,), 8)])
        >>> w.write("w", torch.ones(2))
        >>> [p.name for p in w.close()]
        ['m.safetensors']
    """

    def __init__(
        self,
        path_or_dir: str | os.PathLike[str],
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        max_shard_bytes: int | None = None,
    ) -> None:
        self._infos = _sorted_infos(infos)
        self._metadata = _check_metadata(metadata)
        if max_shard_bytes is not None and (
            type(max_shard_bytes) is not int or max_shard_bytes < 1
        ):
            raise InvalidInput(
                f"max_shard_bytes must be a positive integer, got {_short(max_shard_bytes)}"
            )
        target = Path(path_or_dir)
        plan: list[list[TensorInfo]] = [[]]
        size = 0
        for info in self._infos:
            if max_shard_bytes is not None and plan[-1] and size + info.nbytes > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append(info)
            size += info.nbytes
        is_file = target.suffix == ".safetensors" and not target.is_dir()
        with _storage_errors(target):
            self._setup(target, plan, is_file, max_shard_bytes)

    def _setup(
        self,
        target: Path,
        plan: list[list[TensorInfo]],
        is_file: bool,
        max_shard_bytes: int | None,
    ) -> None:
        if is_file and len(plan) > 1:
            raise InvalidInput(
                f"{target}: {sum(i.nbytes for i in self._infos)} bytes need {len(plan)} shards "
                f"of at most {max_shard_bytes} bytes; give a directory, not a .safetensors path"
            )
        if is_file:
            self._start([target], plan)
        else:
            target.mkdir(parents=True, exist_ok=True)
            n = len(plan)
            if n == 1:
                finals = [target / SINGLE_FILENAME]
            else:
                finals = [target / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            self._start(finals, plan)

    @classmethod
    def _single_file(
        cls, path: Path, infos: Sequence[TensorInfo], metadata: Mapping[str, str] | None
    ) -> StreamingWriter:
        """A writer whose target is one file at ``path``, whatever its suffix."""
        self = cls.__new__(cls)
        self._infos = _sorted_infos(infos)
        self._metadata = _check_metadata(metadata)
        with _storage_errors(path):
            self._start([path], [self._infos])
        return self

    def _start(self, finals: list[Path], plan: list[list[TensorInfo]]) -> None:
        finals[0].parent.mkdir(parents=True, exist_ok=True)
        self._finals = finals
        self._dir = finals[0].parent
        self._plan = plan
        self._shard = -1  # index of the shard being written
        self._left_in_shard = 0
        self._next = 0  # index into self._infos of the next tensor
        self._temps: list[_TempFile] = []
        self._done = False
        self._open_next_shard()

    def _open_next_shard(self) -> None:
        self._shard += 1
        temp = _TempFile(self._finals[self._shard])
        self._temps.append(temp)
        header = canonical_header(self._plan[self._shard], self._metadata)
        temp.write(struct.pack("<Q", len(header)))
        temp.write(header)
        self._left_in_shard = len(self._plan[self._shard])

    @property
    def expected_name(self) -> str | None:
        """The name :meth:`write` expects next (None when all are written)."""
        return self._infos[self._next].name if self._next < len(self._infos) else None

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Write the next tensor: a tensor of the declared dtype and shape, or its raw bytes.

        Raises:
            InvalidInput: out-of-order name, wrong dtype/shape/length, or a closed writer.
        """
        if self._done:
            raise InvalidInput("writer is closed")
        expected = self.expected_name
        if expected is None:
            raise InvalidInput(f"unexpected tensor {_short(name)}: all tensors have been written")
        if name != expected:
            raise InvalidInput(
                f"tensors must be written in sorted name order: expected {_short(expected)}, got {_short(name)}"
            )
        info = self._infos[self._next]
        if isinstance(data, torch.Tensor):
            got = (dtype_code(data.dtype), tuple(data.shape))
            if got != (info.dtype, info.shape):
                raise InvalidInput(
                    f"tensor {_short(name)}: declared {info.dtype} {_short(list(info.shape))}, "
                    f"got {got[0]} {_short(list(got[1]))}"
                )
            view = tensor_bytes(data)
        else:
            view = memoryview(data).cast("B")
            if len(view) != info.nbytes:
                raise InvalidInput(
                    f"tensor {_short(name)}: declared {info.nbytes} bytes, got {len(view)}"
                )
        with _storage_errors(self._finals[self._shard]):
            while self._left_in_shard == 0:
                self._temps[-1].finish()
                self._open_next_shard()
            self._temps[-1].write(view)
        self._left_in_shard -= 1
        self._next += 1

    def close(self) -> list[Path]:
        """Finish: fsync, rename into place (index last), fsync the directory.

        Returns:
            The final paths: the file, or the shards followed by the index.

        Raises:
            InvalidInput: some declared tensors were never written (nothing is kept).
        """
        if self._done:
            raise InvalidInput("writer is already closed")
        if self.expected_name is not None:
            missing = len(self._infos) - self._next
            self.abort()
            raise InvalidInput(
                f"writer closed with {missing} tensors not written (next: {_short(self.expected_name)})"
            )
        try:
            with _storage_errors(self._dir):
                while self._shard < len(self._plan) - 1:  # trailing shards hold no tensors
                    self._temps[-1].finish()
                    self._open_next_shard()
                self._temps[-1].finish()
                for temp in self._temps:
                    os.replace(temp.path, temp.final)
                paths = [t.final for t in self._temps]
                if len(self._plan) > 1:
                    paths.append(self._write_index())
                fsync_path(self._dir)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return paths

    def _write_index(self) -> Path:
        weight_map = {
            info.name: self._finals[i].name for i, shard in enumerate(self._plan) for info in shard
        }
        index = {
            "metadata": {"total_size": sum(i.nbytes for i in self._infos)},
            "weight_map": weight_map,
        }
        final = self._dir / INDEX_FILENAME
        temp = _TempFile(final)
        try:
            temp.write(json.dumps(index, sort_keys=True, indent=2, ensure_ascii=False).encode())
            temp.finish()
            os.replace(temp.path, final)
        except BaseException:
            temp.discard()
            raise
        return final

    def abort(self) -> None:
        """Remove the temporary files; nothing is written under a final name."""
        for temp in self._temps:
            temp.discard()
        self._temps = []
        self._done = True

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.close()


def write_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to one canonical safetensors file at ``path``, atomically.

    Args:
        path: the destination file (its directory is created if missing).
        tensors: name -> tensor (any order; any contiguity; CPU or not).
        metadata: the safetensors ``__metadata__`` (strings only).

    Raises:
        InvalidInput: unsupported dtype, non-string names or metadata.

    Example:
        >>> import tempfile
        >>> p = f"{tempfile.mkdtemp()}/m.safetensors"
        >>> write_tensors(p, {"b": torch.ones(2), "a": torch.zeros(3)})
        >>> open_tensors(p).names()
        ['a', 'b']
    """
    source = _DictSource(tensors)
    target = Path(path)
    if target.is_dir():
        raise InvalidInput(f"{target} is a directory; write_tensors writes one file")
    with StreamingWriter._single_file(target, source.infos(), metadata) as writer:
        for name in source.names():
            writer.write(name, source.tensor(name))
