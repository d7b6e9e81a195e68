"""The safetensors format: dtypes, tensor infos, strict header parsing and the canonical header.

Pure functions over bytes and descriptions; no files are opened here (see :mod:`.reader` and
:mod:`.writer`). Byte order: safetensors is little-endian; this package assumes a
little-endian host.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidInput, InvalidTensorFile

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
