"""Tensor-set I/O: lazy, validated safetensors reading and a canonical, atomic, streaming writer.

A *tensor set* (DESIGN section 1) arrives as one ``.safetensors`` file, a Hugging Face directory
(``model.safetensors.index.json`` plus shards), a directory holding one ``.safetensors`` file, or
an in-memory ``dict`` of tensors. :func:`open_tensors` turns any of them into a
:class:`TensorSource` that reads one tensor at a time.

Reading. The safetensors layout is an 8-byte little-endian header length ``n``, ``n`` bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the data region; offsets are relative to the data region. We parse the header ourselves
and validate it strictly before any tensor is touched: the length prefix is present and at most
:data:`MAX_HEADER_BYTES`, the header fits in the file, is UTF-8 JSON without duplicate keys, every
dtype is known, ``end - begin == prod(shape) * itemsize``, offsets lie inside the data region,
and the tensors tile the data region exactly (no overlap, no gap, no trailing bytes -- the same
rule as the reference implementation). Every violation raises
:class:`~crdtmerge.errors.InvalidTensorFile` naming the file, the tensor and what was expected.
The file is then memory-mapped read-only: :meth:`TensorSource.buffer` returns zero-copy
``memoryview`` slices (used for hashing), and :meth:`TensorSource.tensor` maps just that
tensor's pages copy-on-write so torch gets a writable (but private) view without a copy.

Writing. :func:`canonical_header` lays tensors out in sorted-name order with contiguous offsets,
serialises the header as JSON with sorted keys and compact separators, and pads it with spaces
to a multiple of 8 bytes, so equal tensor sets give equal files. :class:`StreamingWriter` takes
the tensors one at a time in sorted-name order, never holding more than the current tensor, and
splits into Hugging Face style shards when the total exceeds ``max_shard_bytes``. Every file is
written to a temporary file in the destination directory, fsynced, renamed into place (shards
first, the index last) and the directory is fsynced, so a crash never leaves a partial file
under a final name.

Byte order: safetensors is little-endian; this module assumes a little-endian host.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import reprlib
import struct
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from ._durable import fsync_path
from .errors import InvalidInput, InvalidTensorFile, NotFound, StorageError

__all__ = [
    "DTYPES",
    "INDEX_FILENAME",
    "MAX_HEADER_BYTES",
    "SINGLE_FILENAME",
    "DType",
    "SafetensorsHeader",
    "StreamingWriter",
    "TensorInfo",
    "TensorSource",
    "canonical_header",
    "dtype_code",
    "itemsize",
    "open_tensors",
    "parse_header",
    "release_pages",
    "tensor_bytes",
    "torch_dtype",
    "write_tensors",
]

#: the largest JSON header we accept (a header this big describes millions of tensors)
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: the Hugging Face index of a sharded checkpoint
INDEX_FILENAME = "model.safetensors.index.json"
#: the file name used when a single-file tensor set is written into a directory
SINGLE_FILENAME = "model.safetensors"

_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 100
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8
_REPR.maxlevel = 3


def _short(value: object) -> str:
    """A bounded ``repr`` for error messages (hostile input may hold huge or deep values)."""
    return _REPR.repr(value)


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its code, the torch dtype, and its item size in bytes."""

    code: str
    torch: torch.dtype
    itemsize: int


#: safetensors dtype code -> :class:`DType` (the dtypes crdtmerge reads and writes)
DTYPES: dict[str, DType] = {
    d.code: d
    for d in (
        DType("F64", torch.float64, 8),
        DType("F32", torch.float32, 4),
        DType("F16", torch.float16, 2),
        DType("BF16", torch.bfloat16, 2),
        DType("I64", torch.int64, 8),
        DType("I32", torch.int32, 4),
        DType("I16", torch.int16, 2),
        DType("I8", torch.int8, 1),
        DType("U8", torch.uint8, 1),
        DType("BOOL", torch.bool, 1),
        DType("F8_E4M3", torch.float8_e4m3fn, 1),
        DType("F8_E5M2", torch.float8_e5m2, 1),
    )
}
_CODE_OF_TORCH: dict[torch.dtype, str] = {d.torch: d.code for d in DTYPES.values()}


def _dtype(code: str) -> DType:
    try:
        return DTYPES[code]
    except (KeyError, TypeError):
        raise InvalidTensorFile(
            f"unknown dtype {_short(code)}; supported: {', '.join(DTYPES)}"
        ) from None


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code.

    Args:
        code: a key of :data:`DTYPES`, e.g. ``"BF16"``.

    Returns:
        The torch dtype, e.g. ``torch.bfloat16``.

    Raises:
        InvalidTensorFile: ``code`` is not in :data:`DTYPES`.
    """
    return _dtype(code).torch


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code (raises like :func:`torch_dtype`)."""
    return _dtype(code).itemsize


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype.

    Args:
        dtype: a torch dtype, e.g. ``torch.float8_e4m3fn``.

    Returns:
        Its code, e.g. ``"F8_E4M3"``.

    Raises:
        InvalidTensorFile: the dtype has no entry in :data:`DTYPES` (e.g. complex types).
    """
    try:
        return _CODE_OF_TORCH[dtype]
    except KeyError:
        raise InvalidTensorFile(
            f"unsupported torch dtype {dtype}; supported: {', '.join(DTYPES)}"
        ) from None


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: name, safetensors dtype code, shape, byte size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorInfo:
        """The info of an in-memory tensor (raises ``InvalidTensorFile`` for an unknown dtype)."""
        code = dtype_code(tensor.dtype)
        return cls(name, code, tuple(tensor.shape), tensor.numel() * DTYPES[code].itemsize)

    def check(self) -> None:
        """Check the fields agree with each other.

        Raises:
            InvalidInput: bad name, unknown dtype, bad shape, or ``nbytes`` not
                ``prod(shape) * itemsize``.
        """
        if not isinstance(self.name, str) or self.name == "__metadata__":
            raise InvalidInput(f"invalid tensor name {_short(self.name)}")
        _check_utf8(self.name, "tensor name")
        if self.dtype not in DTYPES:
            raise InvalidInput(f"tensor {_short(self.name)}: unknown dtype {_short(self.dtype)}")
        if not isinstance(self.shape, tuple) or not all(
            type(d) is int and d >= 0 for d in self.shape
        ):
            raise InvalidInput(
                f"tensor {_short(self.name)}: shape {_short(self.shape)} is not non-negative ints"
            )
        expected = math.prod(self.shape) * DTYPES[self.dtype].itemsize
        if self.nbytes != expected:
            raise InvalidInput(
                f"tensor {_short(self.name)}: {self.dtype} {_short(list(self.shape))} needs {expected} bytes, "
                f"info says {self.nbytes}"
            )


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} {_short(text)} is not valid UTF-8 (lone surrogate)") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous on CPU.

    Args:
        tensor: any tensor of a dtype in :data:`DTYPES`.

    Returns:
        A byte ``memoryview`` (format ``B``). Non-contiguous or non-CPU tensors are copied once
        into a contiguous CPU tensor; the view keeps that storage alive.
    """
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
    return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]


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


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    Attributes:
        tensors: name -> (info, offset of its first byte within the data region).
        metadata: the ``__metadata__`` map.
        data_start: file offset of the data region (``8 + header length``).
    """

    tensors: dict[str, tuple[TensorInfo, int]]
    metadata: dict[str, str]
    data_start: int


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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidTensorFile(f"duplicate key {_short(key)} in header JSON")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise InvalidTensorFile(f"{name} is not valid in a safetensors header")


def _is_uint(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**64


def parse_header(raw: bytes, data_len: int, label: str = "safetensors header") -> SafetensorsHeader:
    """Validate a safetensors JSON header against a data region of ``data_len`` bytes.

    Args:
        raw: the header bytes (after the 8-byte length prefix).
        data_len: the size of the data region that follows the header.
        label: names the file in error messages.

    Returns:
        The validated :class:`SafetensorsHeader`.

    Raises:
        InvalidTensorFile: with a message naming the file, the tensor and the problem.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidTensorFile(f"{label}: header is not valid UTF-8 ({exc.reason})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except InvalidTensorFile as exc:
        raise InvalidTensorFile(f"{label}: {exc.detail}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidTensorFile(f"{label}: header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidTensorFile(f"{label}: header must be a JSON object, got {type(obj).__name__}")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidTensorFile(f"{label}: __metadata__ must map strings to strings")
    for key, value in metadata.items():
        _check_file_text(key, label, "__metadata__ key")
        _check_file_text(value, label, "__metadata__ value")
    tensors: dict[str, tuple[TensorInfo, int]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in obj.items():
        _check_file_text(name, label, "tensor name")
        info, begin, end = _parse_entry(name, entry, data_len, label)
        tensors[name] = (info, begin)
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    previous = None
    for begin, end, name in spans:
        if begin < position:
            raise InvalidTensorFile(
                f"{label}: tensors {_short(previous)} and {_short(name)} overlap (offset {begin} < "
                f"{position}); each byte must belong to one tensor"
            )
        if begin > position:
            raise InvalidTensorFile(
                f"{label}: gap of {begin - position} bytes before tensor {_short(name)} (offset "
                f"{position}..{begin} belongs to no tensor)"
            )
        position = end
        previous = name
    if position != data_len:
        raise InvalidTensorFile(
            f"{label}: tensors cover {position} bytes but the data region is {data_len} bytes; "
            "the file has trailing bytes"
        )
    return SafetensorsHeader(tensors, dict(metadata), 8 + len(raw))


def _check_file_text(text: str, label: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTensorFile(f"{label}: {what} {_short(text)} is not valid UTF-8") from None


def _parse_entry(name: str, entry: Any, data_len: int, label: str) -> tuple[TensorInfo, int, int]:
    where = f"{label}: tensor {_short(name)}"
    if not isinstance(entry, dict):
        raise InvalidTensorFile(f"{where}: entry must be an object, got {type(entry).__name__}")
    if set(entry) != _TENSOR_KEYS:
        raise InvalidTensorFile(
            f"{where}: entry must have exactly the keys dtype, shape, data_offsets; "
            f"got {_short(sorted(entry))}"
        )
    code = entry["dtype"]
    if code not in DTYPES if isinstance(code, str) else True:
        raise InvalidTensorFile(
            f"{where}: unknown dtype {_short(code)}; supported: {', '.join(DTYPES)}"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise InvalidTensorFile(
            f"{where}: shape must be a list of non-negative integers, got {_short(shape)}"
        )
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InvalidTensorFile(
            f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {_short(offsets)}"
        )
    begin, end = offsets
    if end > data_len:
        raise InvalidTensorFile(
            f"{where}: data_offsets [{begin}, {end}] lie outside the data region of "
            f"{data_len} bytes; the file is truncated or corrupt"
        )
    expected = math.prod(shape) * DTYPES[code].itemsize
    if end - begin != expected:
        raise InvalidTensorFile(
            f"{where}: shape {_short(shape)} of {code} needs {expected} bytes but data_offsets span "
            f"{end - begin}"
        )
    return TensorInfo(name, code, tuple(shape), expected), begin, end


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


# --------------------------------------------------------------------------------------------
# Writing


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(metadata or {})
    for key, value in out.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput(
                f"safetensors __metadata__ maps strings to strings; got {_short(key)}: {_short(value)}"
            )
        _check_utf8(key, "__metadata__ key")
        _check_utf8(value, "__metadata__ value")
    return out


def _sorted_infos(infos: Sequence[TensorInfo]) -> list[TensorInfo]:
    ordered = sorted(infos, key=lambda i: i.name)
    for i, info in enumerate(ordered):
        if not isinstance(info, TensorInfo):
            raise InvalidInput(f"expected TensorInfo, got {type(info).__name__}")
        info.check()
        if i and ordered[i - 1].name == info.name:
            raise InvalidInput(f"tensor {_short(info.name)} listed twice")
    return ordered


def canonical_header(
    infos: Sequence[TensorInfo], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The canonical safetensors JSON header for ``infos`` (without the 8-byte length prefix).

    Tensors are laid out in sorted-name order with contiguous offsets; keys are sorted,
    separators compact, non-ASCII kept as UTF-8, and the result is padded with spaces to a
    multiple of 8 bytes. ``__metadata__`` is omitted when empty.

    Raises:
        InvalidInput: inconsistent infos, duplicate names, or non-string metadata.
    """
    header: dict[str, Any] = {}
    offset = 0
    for info in _sorted_infos(infos):
        header[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    meta = _check_metadata(metadata)
    if meta:
        header["__metadata__"] = meta
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    data = raw.encode("utf-8")
    return data + b" " * (-len(data) % 8)


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
