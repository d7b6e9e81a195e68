"""Reading tensor sets: :func:`open_tensors` and the lazy, memory-mapped :class:`TensorSource`."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType

import torch

from ..errors import InvalidInput, InvalidTensorFile, NotFound, StorageError
from .format import (
    DTYPES,
    INDEX_FILENAME,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    _reject_constant,
    _short,
    parse_header,
    tensor_bytes,
)


class TensorSource:
    """A lazily read tensor set (use :func:`open_tensors`). A context manager.

    Attributes:
        metadata: the safetensors ``__metadata__`` (merged across shards); ``{}`` for a dict.
    """

    metadata: dict[str, str]

    def __init__(self) -> None:
        self.metadata = {}
        self._infos: dict[str, TensorInfo] = {}
        self._closed = False

    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._infos)

    def infos(self) -> list[TensorInfo]:
        """The :class:`TensorInfo` of every tensor, in sorted name order."""
        return [self._infos[n] for n in self.names()]

    def info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of one tensor.

        Raises:
            NotFound: no tensor of that name.
        """
        try:
            return self._infos[name]
        except KeyError:
            raise NotFound(f"no tensor named {_short(name)} in {self.label}") from None

    def buffer(self, name: str) -> memoryview:
        """The tensor's raw little-endian bytes (zero-copy where possible; read-only)."""
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor (lazy; may view a copy-on-write mapping -- do not mutate it)."""
        raise NotImplementedError

    def location(self, name: str) -> tuple[Path, int] | None:
        """``(file, offset)`` of the tensor's bytes when they are stored in a file as they
        are, else None."""
        self.info(name)
        return None

    @property
    def label(self) -> str:
        """A short description of the source for error messages."""
        return "tensor set"

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput(f"{self.label} is closed")

    def close(self) -> None:
        """Release files and mappings (tensors already returned stay valid)."""
        self._closed = True

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _DictSource(TensorSource):
    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self._tensors: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(name, str):
                raise InvalidInput(f"tensor names must be strings, got {_short(name)}")
            if not isinstance(t, torch.Tensor):
                raise InvalidInput(
                    f"tensor {_short(name)} is a {type(t).__name__}, not a torch.Tensor"
                )
            info = TensorInfo.of(name, t)
            info.check()
            self._infos[name] = info
            self._tensors[name] = t

    def buffer(self, name: str) -> memoryview:
        self._check_open()
        self.info(name)
        return tensor_bytes(self._tensors[name])

    def tensor(self, name: str) -> torch.Tensor:
        self._check_open()
        self.info(name)
        return self._tensors[name]

    @property
    def label(self) -> str:
        return "in-memory tensor set"


@dataclass
class _Shard:
    path: Path
    fd: int
    data_start: int
    mm: mmap.mmap


class _FileSource(TensorSource):
    """One file, or the shards of a Hugging Face directory."""

    def __init__(self, paths: Sequence[Path], label: str) -> None:
        super().__init__()
        self._label = label
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[int, int]] = {}  # name -> (shard index, absolute offset)
        try:
            for path in paths:
                self._add_shard(path)
        except BaseException:
            self.close()
            raise

    def _add_shard(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
        except OSError as exc:
            raise InvalidInput(f"{path}: cannot open: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            header = _read_header(fd, size, str(path))
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        index = len(self._shards)
        self._shards.append(_Shard(path, fd, header.data_start, mm))
        for name, (info, begin) in header.tensors.items():
            if name in self._infos:
                other = self._shards[self._where[name][0]].path.name
                raise InvalidTensorFile(
                    f"{self._label}: tensor {_short(name)} appears in two shards ({other} and "
                    f"{path.name}); each tensor must be stored once"
                )
            self._infos[name] = info
            self._where[name] = (index, header.data_start + begin)
        for key, value in header.metadata.items():
            if key not in self.metadata:
                self.metadata[key] = value
            elif key == "crdtmerge" and self.metadata[key] != value:
                raise InvalidTensorFile(
                    f"{self._label}: shards disagree on __metadata__['crdtmerge']"
                )

    @property
    def label(self) -> str:
        return self._label

    def shard_of(self, name: str) -> Path:
        """The file holding a tensor."""
        return self._location(name)[0]

    def location(self, name: str) -> tuple[Path, int] | None:
        return self._location(name)

    def _location(self, name: str) -> tuple[Path, int]:
        self.info(name)
        shard_index, start = self._where[name]
        return self._shards[shard_index].path, start

    def buffer(self, name: str) -> memoryview:
        self._check_open()
        info = self.info(name)
        shard_index, start = self._where[name]
        return memoryview(self._shards[shard_index].mm)[start : start + info.nbytes]

    def tensor(self, name: str) -> torch.Tensor:
        self._check_open()
        info = self.info(name)
        dt = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dt.torch)
        shard_index, start = self._where[name]
        shard = self._shards[shard_index]
        if start % dt.itemsize:
            # misaligned in the file: give torch an aligned private copy
            out = torch.empty(info.shape, dtype=dt.torch)
            src = torch.frombuffer(bytearray(self.buffer(name)), dtype=torch.uint8)
            out.reshape(-1).view(torch.uint8).copy_(src)
            return out
        base = start - start % mmap.ALLOCATIONGRANULARITY
        delta = start - base
        private = mmap.mmap(shard.fd, delta + info.nbytes, offset=base, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(
            private, dtype=dt.torch, count=info.nbytes // dt.itemsize, offset=delta
        )
        addr = flat.data_ptr() - delta
        _MAPPINGS[addr] = (weakref.ref(private, partial(_forget, addr)), delta + info.nbytes)
        return flat.reshape(info.shape)

    def close(self) -> None:
        for shard in self._shards:
            # A caller may still hold a buffer() view (BufferError): the mapping is then
            # released when the last view is garbage-collected. Nothing is lost by deferring.
            with contextlib.suppress(BufferError):
                shard.mm.close()
            os.close(shard.fd)
        self._shards = []
        super().close()


#: start address -> (the private file mapping behind a tensor from TensorSource.tensor, its
#: length); an entry leaves when its mapping is freed
_MAPPINGS: dict[int, tuple[weakref.ref[mmap.mmap], int]] = {}


def _forget(addr: int, ref: weakref.ref[mmap.mmap]) -> None:
    entry = _MAPPINGS.get(addr)
    if entry is not None and entry[0] is ref:  # not a newer mapping at a reused address
        _MAPPINGS.pop(addr, None)


def release_pages(t: torch.Tensor, start: int, stop: int) -> None:
    """Let go of this process's resident pages holding elements ``start .. stop - 1`` of the
    flat ``t`` when ``t`` is a read-only file mapping made by :meth:`TensorSource.tensor`
    (a no-op for any other tensor). The values stay valid: the next access maps the pages
    again from the page cache. Lets a pass over a large mapped input keep only a window of
    it resident. Only whole pages inside the range are released.
    """
    if stop <= start:
        return
    lo = t.data_ptr() + start * t.element_size()
    hi = t.data_ptr() + stop * t.element_size()
    for addr, (ref, length) in list(_MAPPINGS.items()):
        mm = ref()
        if mm is None:
            continue
        if addr <= lo and hi <= addr + length:
            page = mmap.PAGESIZE
            first = -(-(lo - addr) // page) * page
            last = (hi - addr) // page * page
            if last > first:
                mm.madvise(mmap.MADV_DONTNEED, first, last - first)
            return


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _read_header(fd: int, size: int, label: str) -> SafetensorsHeader:
    if size < 8:
        raise InvalidTensorFile(
            f"{label}: file is {size} bytes, shorter than the 8-byte header length; "
            "not a safetensors file"
        )
    (n,) = struct.unpack("<Q", _pread_exact(fd, 8, 0))
    if n > MAX_HEADER_BYTES:
        raise InvalidTensorFile(
            f"{label}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes; "
            "not a safetensors file or a hostile one"
        )
    if 8 + n > size:
        raise InvalidTensorFile(
            f"{label}: header length {n} runs past the end of the file ({size} bytes); "
            "the file is truncated or not safetensors"
        )
    raw = _pread_exact(fd, n, 8)
    return parse_header(raw, size - 8 - n, label)


def _parse_index(index_path: Path) -> dict[str, list[str]]:
    """shard file name -> tensor names, from a Hugging Face index."""
    label = str(index_path)
    try:
        if index_path.stat().st_size > MAX_HEADER_BYTES:
            raise InvalidTensorFile(f"{label}: index is larger than {MAX_HEADER_BYTES} bytes")
        obj = json.loads(index_path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except InvalidTensorFile as exc:
        if exc.detail.startswith(label):
            raise
        raise InvalidTensorFile(f"{label}: NaN/Infinity are not valid in the index") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidTensorFile(f"{label}: index is not valid JSON: {exc}") from None
    except OSError as exc:
        raise InvalidInput(f"{label}: cannot read: {exc.strerror}") from exc
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidTensorFile(f'{label}: index needs a "weight_map" of tensor name -> shard')
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise InvalidTensorFile(
                f"{label}: shard name {_short(shard)} for tensor {_short(name)} must be a plain file name "
                "in the same directory"
            )
        shards.setdefault(shard, []).append(name)
    return shards


def _open_directory(path: Path) -> TensorSource:
    index_path = path / INDEX_FILENAME
    if index_path.is_file():
        shards = _parse_index(index_path)
        for shard in sorted(shards):
            if not (path / shard).is_file():
                raise InvalidTensorFile(
                    f"{index_path}: weight_map points at missing shard {_short(shard)}"
                )
        source = _FileSource([path / s for s in sorted(shards)], str(path))
        try:
            for shard, names in shards.items():
                for name in names:
                    if name not in source or source.shard_of(name).name != shard:
                        raise InvalidTensorFile(
                            f"{index_path}: weight_map says tensor {_short(name)} is in {_short(shard)} "
                            "but that shard does not hold it"
                        )
            if len(source) != sum(len(n) for n in shards.values()):
                listed = {n for names in shards.values() for n in names}
                extra = sorted(set(source.names()) - listed)
                raise InvalidTensorFile(
                    f"{index_path}: shards hold tensors missing from weight_map: {extra[:5]}"
                )
        except BaseException:
            source.close()
            raise
        return source
    files = sorted(p for p in path.iterdir() if p.name.endswith(".safetensors") and p.is_file())
    if len(files) == 1:
        return _FileSource(files, str(files[0]))
    if not files:
        raise InvalidInput(f"{path}: directory holds no .safetensors file")
    raise InvalidInput(
        f"{path}: directory holds {len(files)} .safetensors files but no {INDEX_FILENAME}; "
        "point at one file or add the index"
    )


def open_tensors(src: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> TensorSource:
    """Open a tensor set lazily.

    Args:
        src: a ``.safetensors`` file; a directory with ``model.safetensors.index.json`` and its
            shards; a directory with exactly one ``.safetensors`` file; or a mapping of name to
            ``torch.Tensor``.

    Returns:
        A :class:`TensorSource`; close it (or use ``with``) to release the files.

    Raises:
        InvalidTensorFile: a malformed file or index (the message names the file and problem).
        NotFound: the path does not exist.
        InvalidInput: an unusable directory or mapping.

    Example:
        >>> with open_tensors({"w": torch.zeros(2, 3)}) as ts:
        ...     ts.info("w")
        TensorInfo(name='w', dtype='F32', shape=(2, 3), nbytes=24)
    """
    if isinstance(src, TensorSource):
        return src
    if isinstance(src, Mapping):
        return _DictSource(src)
    path = Path(src)
    if path.is_dir():
        return _open_directory(path)
    if not path.exists():
        raise NotFound(f"{path}: no such file or directory")
    return _FileSource([path], str(path))
