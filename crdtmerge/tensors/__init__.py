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

Modules: :mod:`.format` (dtypes, infos, header parsing and the canonical header, no I/O),
:mod:`.reader` and :mod:`.writer`. This package's names above are the public API.

Byte order: safetensors is little-endian; this package assumes a little-endian host.
"""

from __future__ import annotations

from .format import (
    DTYPES,
    INDEX_FILENAME,
    MAX_HEADER_BYTES,
    SINGLE_FILENAME,
    DType,
    SafetensorsHeader,
    TensorInfo,
    canonical_header,
    dtype_code,
    itemsize,
    parse_header,
    tensor_bytes,
    torch_dtype,
)
from .reader import TensorSource, open_tensors, release_pages
from .writer import StreamingWriter, write_tensors

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
