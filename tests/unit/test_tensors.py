"""Tensor-set I/O: reading every source kind, the canonical writer, and hostile files."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from crdtmerge.errors import InvalidInput, InvalidTensorFile, NotFound, StorageError
from crdtmerge.tensors import (
    DTYPES,
    INDEX_FILENAME,
    MAX_HEADER_BYTES,
    StreamingWriter,
    TensorInfo,
    canonical_header,
    dtype_code,
    open_tensors,
    torch_dtype,
    write_tensors,
)
from tests.models import make_model, randn


def raw_file(path: Path, header: dict | str | bytes, data: bytes = b"", prefix: int | None = None):
    """Write a safetensors file by hand: any header text, any length prefix."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if prefix is None else prefix
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MIXED = {
    "a.f16": torch.arange(3, dtype=torch.float16),  # 6 bytes: what follows is misaligned
    "b.f32": randn((2, 3), 1),
    "c.bf16": randn((5,), 2, torch.bfloat16),
    "d.bool": torch.tensor([True, False, True]),
    "e.i64": torch.arange(4, dtype=torch.int64).reshape(2, 2),
    "f.scalar": torch.tensor(7, dtype=torch.int32),
    "g.empty": torch.zeros(0, 4),
    "h.f8": torch.tensor([0.5, -1.0], dtype=torch.float8_e4m3fn),
    "i.u8": torch.tensor([1, 255], dtype=torch.uint8),
    "j.f64": torch.tensor([1.5], dtype=torch.float64),
}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.contiguous().view(torch.uint8).tolist() == b.contiguous().view(torch.uint8).tolist()
        if a.dim()
        else a.dtype == b.dtype
        and a.reshape(1).view(torch.uint8).tolist() == b.reshape(1).view(torch.uint8).tolist()
    )


# --- dtypes -----------------------------------------------------------------------------------


def test_dtype_table_round_trips() -> None:
    for code, dt in DTYPES.items():
        assert dtype_code(torch_dtype(code)) == code
        assert torch.empty(0, dtype=dt.torch).element_size() == dt.itemsize
    assert set(DTYPES) == {
        "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
    }  # fmt: skip


def test_unknown_dtype_is_named() -> None:
    with pytest.raises(InvalidTensorFile, match=r"unknown dtype 'C64'"):
        torch_dtype("C64")
    with pytest.raises(InvalidTensorFile, match=r"unsupported torch dtype torch.complex64"):
        dtype_code(torch.complex64)


# --- reading ----------------------------------------------------------------------------------


def test_reads_a_file_written_by_safetensors(tmp_path: Path) -> None:
    model = make_model(3)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(model, str(path), metadata={"format": "pt"})
    with open_tensors(path) as ts:
        assert ts.names() == sorted(model)
        assert ts.metadata == {"format": "pt"}
        for name, t in model.items():
            assert torch.equal(ts.tensor(name), t)
            assert ts.info(name) == TensorInfo(name, "F32", tuple(t.shape), t.numel() * 4)
            assert bytes(ts.buffer(name)) == t.numpy().tobytes()


def test_buffer_is_a_read_only_zero_copy_view(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_tensors(path, {"w": torch.ones(4)})
    with open_tensors(path) as ts:
        view = ts.buffer("w")
        assert view.readonly
        assert isinstance(view.obj, type(view.obj)) and type(view.obj).__name__ == "mmap"
        del view


def test_tensor_is_private_copy_on_write(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_tensors(path, {"w": torch.ones(4)})
    before = path.read_bytes()
    with open_tensors(path) as ts:
        t = ts.tensor("w")
        t.add_(1)  # callers must not, but if they do the file is untouched
        assert torch.equal(ts.tensor("w"), torch.ones(4))
    assert path.read_bytes() == before


def test_every_dtype_and_odd_layout_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_tensors(path, MIXED)
    official = safetensors.torch.load_file(str(path))
    with open_tensors(path) as ts:
        assert ts.names() == sorted(MIXED)
        for name, t in MIXED.items():
            assert same(ts.tensor(name), t), name
            assert same(official[name], t), name


def test_tensor_survives_close(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_tensors(path, {"w": torch.arange(6.0)})
    ts = open_tensors(path)
    t = ts.tensor("w")
    view = ts.buffer("w")  # an outstanding view must not make close() fail
    ts.close()
    assert t.tolist() == [0, 1, 2, 3, 4, 5]
    assert bytes(view) == torch.arange(6.0).numpy().tobytes()
    with pytest.raises(InvalidInput, match="is closed"):
        ts.tensor("w")


def test_unknown_name_is_not_found(tmp_path: Path) -> None:
    with open_tensors({"w": torch.ones(1)}) as ts, pytest.raises(NotFound, match="'x'"):
        ts.info("x")


def test_dict_source_accepts_non_contiguous_tensors() -> None:
    t = torch.arange(6.0).reshape(2, 3).t()
    with open_tensors({"t": t}) as ts:
        assert bytes(ts.buffer("t")) == t.contiguous().numpy().tobytes()
        assert ts.info("t").shape == (3, 2)


def test_dict_source_rejects_bad_values() -> None:
    with pytest.raises(InvalidInput, match="not a torch.Tensor"):
        open_tensors({"w": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(InvalidTensorFile, match="complex64"):
        open_tensors({"w": torch.zeros(2, dtype=torch.complex64)})


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        open_tensors(tmp_path / "nope.safetensors")


def test_directory_with_one_file(tmp_path: Path) -> None:
    write_tensors(tmp_path / "weights.safetensors", {"w": torch.ones(2)})
    with open_tensors(tmp_path) as ts:
        assert ts.names() == ["w"]


def test_directory_with_two_files_and_no_index(tmp_path: Path) -> None:
    write_tensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    write_tensors(tmp_path / "b.safetensors", {"v": torch.ones(2)})
    with pytest.raises(InvalidInput, match=r"2 \.safetensors files but no model\.safetensors"):
        open_tensors(tmp_path)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="holds no .safetensors file"):
        open_tensors(tmp_path)


# --- writing ----------------------------------------------------------------------------------


def test_canonical_header_layout() -> None:
    infos = [TensorInfo("b", "F32", (2,), 8), TensorInfo("a", "F16", (3,), 6)]
    header = canonical_header(infos, {"k": "v"})
    assert len(header) % 8 == 0
    expected = (
        b'{"__metadata__":{"k":"v"},"a":{"data_offsets":[0,6],"dtype":"F16","shape":[3]},'
        b'"b":{"data_offsets":[6,14],"dtype":"F32","shape":[2]}}'
    )
    assert len(expected) == 133
    assert header == expected + b" " * 3


def test_canonical_header_rejects_inconsistent_info() -> None:
    with pytest.raises(InvalidInput, match=r"needs 24 bytes, info says 20"):
        canonical_header([TensorInfo("w", "F32", (2, 3), 20)])
    with pytest.raises(InvalidInput, match="listed twice"):
        canonical_header([TensorInfo("w", "U8", (1,), 1)] * 2)


def test_write_is_order_invariant_and_pinned(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_tensors(a, {"x": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "y": torch.ones(1)})
    write_tensors(b, {"y": torch.ones(1), "x": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
    assert a.read_bytes() == b.read_bytes()
    header = (
        b'{"x":{"data_offsets":[0,16],"dtype":"F32","shape":[2,2]},'
        b'"y":{"data_offsets":[16,20],"dtype":"F32","shape":[1]}}'
    )
    header += b" " * (-len(header) % 8)
    assert a.read_bytes() == struct.pack("<Q", len(header)) + header + f32(1, 2, 3, 4, 1)


def test_writer_leaves_no_temp_files_and_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    infos = [TensorInfo("a", "F32", (2,), 8), TensorInfo("b", "F32", (2,), 8)]
    writer = StreamingWriter(path, infos)
    writer.write("a", torch.ones(2))
    assert not path.exists()  # nothing under the final name before close()
    writer.write("b", b"\0" * 8)
    assert writer.close() == [path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_writer_requires_sorted_order(tmp_path: Path) -> None:
    infos = [TensorInfo("a", "F32", (2,), 8), TensorInfo("b", "F32", (2,), 8)]
    with StreamingWriter(tmp_path / "m.safetensors", infos) as writer:
        with pytest.raises(InvalidInput, match="sorted name order: expected 'a', got 'b'"):
            writer.write("b", torch.ones(2))
        with pytest.raises(InvalidInput, match=r"declared F32 \[2\], got F16 \[2\]"):
            writer.write("a", torch.ones(2, dtype=torch.float16))
        with pytest.raises(InvalidInput, match="declared 8 bytes, got 7"):
            writer.write("a", b"\0" * 7)
        writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_closed_early_keeps_nothing(tmp_path: Path) -> None:
    infos = [TensorInfo("a", "F32", (2,), 8), TensorInfo("b", "F32", (2,), 8)]
    writer = StreamingWriter(tmp_path / "m.safetensors", infos)
    writer.write("a", torch.ones(2))
    with pytest.raises(InvalidInput, match=r"1 tensors not written \(next: 'b'\)"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_exception_in_block_keeps_nothing(tmp_path: Path) -> None:
    infos = [TensorInfo("a", "F32", (2,), 8)]
    with pytest.raises(RuntimeError), StreamingWriter(tmp_path / "out", infos) as writer:
        writer.write("a", torch.ones(2))
        raise RuntimeError("merge failed")
    assert list((tmp_path / "out").iterdir()) == []


def test_sharded_writer_makes_a_hugging_face_directory(tmp_path: Path) -> None:
    model = make_model(5)
    infos = [TensorInfo.of(n, t) for n, t in model.items()]
    writer = StreamingWriter(tmp_path, infos, {"format": "pt"}, max_shard_bytes=2048)
    for name in sorted(model):
        writer.write(name, model[name])
    paths = writer.close()
    shards = [p for p in paths if p.name != INDEX_FILENAME]
    assert len(shards) > 2
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert paths[-1].name == INDEX_FILENAME
    index = json.loads(paths[-1].read_text())
    loaded = {}
    for shard in shards:
        part = safetensors.torch.load_file(str(shard))
        assert all(index["weight_map"][n] == shard.name for n in part)
        loaded.update(part)
    assert loaded.keys() == model.keys()
    assert all(torch.equal(loaded[n], model[n]) for n in model)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.values())
    with open_tensors(tmp_path) as ts:
        assert ts.names() == sorted(model)
        assert ts.metadata == {"format": "pt"}
        assert all(torch.equal(ts.tensor(n), model[n]) for n in model)


def test_sharding_needs_a_directory(tmp_path: Path) -> None:
    infos = [TensorInfo("a", "U8", (8,), 8), TensorInfo("b", "U8", (8,), 8)]
    with pytest.raises(InvalidInput, match="give a directory, not a .safetensors path"):
        StreamingWriter(tmp_path / "m.safetensors", infos, max_shard_bytes=8)


# --- hostile files ----------------------------------------------------------------------------

GOOD_DATA = f32(1, 2)


@pytest.mark.parametrize(
    ("header", "data", "prefix", "message"),
    [
        (b"", b"", None, None),  # special-cased below: a 5-byte file
        ({"w": entry("F32", [2], 0, 8)}, GOOD_DATA, MAX_HEADER_BYTES + 1,
         f"header length {MAX_HEADER_BYTES + 1} exceeds the limit of {MAX_HEADER_BYTES} bytes"),
        ({"w": entry("F32", [2], 0, 8)}, b"", 10_000,
         "header length 10000 runs past the end of the file"),
        ('{"w": ', b"", None, "header is not valid JSON: Expecting value"),
        (b'{"w\xff": 1}', b"", None, "header is not valid UTF-8"),
        ("[1, 2]", b"", None, "header must be a JSON object, got list"),
        ("[" * 100_000, b"", None, "header is not valid JSON"),
        ({"w": entry("C64", [2], 0, 8)}, GOOD_DATA, None, "tensor 'w': unknown dtype 'C64'"),
        ({"w": entry("F32", [3], 0, 8)}, GOOD_DATA, None,
         "tensor 'w': shape [3] of F32 needs 12 bytes but data_offsets span 8"),
        ({"w": entry("F32", [2], 4, 12)}, GOOD_DATA, None,
         "tensor 'w': data_offsets [4, 12] lie outside the data region of 8 bytes"),
        ({"w": entry("F32", [2], 8, 0)}, GOOD_DATA, None,
         "data_offsets must be [begin, end] with 0 <= begin <= end"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}, GOOD_DATA, None,
         "tensors 'a' and 'b' overlap"),
        ({"a": entry("F32", [1], 4, 8)}, GOOD_DATA, None,
         "gap of 4 bytes before tensor 'a'"),
        ({"a": entry("F32", [1], 0, 4)}, GOOD_DATA, None,
         "tensors cover 4 bytes but the data region is 8 bytes"),
        ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
         '"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', GOOD_DATA, None,
         "duplicate key 'w' in header JSON"),
        ({"w": entry("F32", [-2], 0, 8)}, GOOD_DATA, None,
         "tensor 'w': shape must be a list of non-negative integers"),
        ({"w": entry("F32", [2.0], 0, 8)}, GOOD_DATA, None,  # type: ignore[list-item]
         "tensor 'w': shape must be a list of non-negative integers"),
        ({"w": entry("F32", [True, 2], 0, 8)}, GOOD_DATA, None,
         "tensor 'w': shape must be a list of non-negative integers"),
        ({"w": {**entry("F32", [2], 0, 8), "extra": 1}}, GOOD_DATA, None,
         "entry must have exactly the keys dtype, shape, data_offsets"),
        ({"w": 5}, GOOD_DATA, None, "tensor 'w': entry must be an object, got int"),
        ({"w": entry("F32", [2], 0, 8), "__metadata__": {"k": 1}}, GOOD_DATA, None,
         "__metadata__ must map strings to strings"),
        ('{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', GOOD_DATA, None,
         "NaN is not valid in a safetensors header"),
        ('{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', GOOD_DATA, None,
         "tensor name '\\ud800' is not valid UTF-8"),
    ],
    ids=[
        "shorter-than-8", "header-too-large", "header-past-eof", "bad-json", "bad-utf8",
        "not-object", "deep-nesting", "unknown-dtype", "shape-mismatch", "out-of-region",
        "reversed-offsets", "overlap", "gap", "trailing-bytes", "duplicate-name",
        "negative-dim", "float-dim", "bool-dim", "extra-key", "entry-not-object",
        "bad-metadata", "nan", "surrogate-name",
    ],
)  # fmt: skip
def test_hostile_file_is_rejected_with_a_clear_message(
    tmp_path: Path, header: object, data: bytes, prefix: int | None, message: str | None
) -> None:
    path = tmp_path / "bad.safetensors"
    if message is None:
        path.write_bytes(b"\x01\x02\x03\x04\x05")
        message = "file is 5 bytes, shorter than the 8-byte header length"
    else:
        raw_file(path, header, data, prefix)  # type: ignore[arg-type]
    with pytest.raises(InvalidTensorFile) as info:
        open_tensors(path).close()
    assert message in str(info.value)
    assert str(path) in str(info.value)


def _sharded(tmp_path: Path) -> Path:
    write_tensors(tmp_path / "s1.safetensors", {"a": torch.ones(2)})
    write_tensors(tmp_path / "s2.safetensors", {"b": torch.ones(2)})
    return tmp_path / INDEX_FILENAME


def test_index_pointing_at_a_missing_shard(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s3.safetensors"}}))
    with pytest.raises(
        InvalidTensorFile, match="weight_map points at missing shard 's3.safetensors'"
    ):
        open_tensors(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    write_tensors(tmp_path / "s2.safetensors", {"a": torch.ones(2), "b": torch.ones(2)})
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(InvalidTensorFile, match="tensor 'a' appears in two shards"):
        open_tensors(tmp_path)


def test_index_that_disagrees_with_the_shards(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(InvalidTensorFile, match="says tensor 'a' is in 's2.safetensors'"):
        open_tensors(tmp_path)
    write_tensors(tmp_path / "s1.safetensors", {"a": torch.ones(2), "c": torch.ones(2)})
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(InvalidTensorFile, match=r"tensors missing from weight_map: \['c'\]"):
        open_tensors(tmp_path)


def test_index_with_path_traversal(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "../s1.safetensors"}}))
    with pytest.raises(InvalidTensorFile, match="must be a plain file name"):
        open_tensors(tmp_path)


def test_index_that_is_not_json(tmp_path: Path) -> None:
    _sharded(tmp_path).write_text("{")
    with pytest.raises(InvalidTensorFile, match="index is not valid JSON"):
        open_tensors(tmp_path)
    (tmp_path / INDEX_FILENAME).write_text("[]")
    with pytest.raises(InvalidTensorFile, match='index needs a "weight_map"'):
        open_tensors(tmp_path)


def test_shards_disagreeing_on_contribution_metadata(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    write_tensors(tmp_path / "s1.safetensors", {"a": torch.ones(2)}, {"crdtmerge": "{}"})
    write_tensors(tmp_path / "s2.safetensors", {"b": torch.ones(2)}, {"crdtmerge": '{"x":1}'})
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(InvalidTensorFile, match=r"shards disagree on __metadata__\['crdtmerge'\]"):
        open_tensors(tmp_path)


def test_error_messages_stay_short_for_huge_or_deep_values(tmp_path: Path) -> None:
    deep = "[" * 900 + "]" * 900
    long_name = "n" * 1_000_000
    for header in (
        f'{{"w":{{"dtype":"F32","shape":{deep},"data_offsets":[0,8]}}}}',
        json.dumps({long_name: entry("C64", [2], 0, 8)}),
        json.dumps({"w": entry("F32", list(range(100_000)), 0, 8)}),
    ):
        path = raw_file(tmp_path / "bad.safetensors", header, GOOD_DATA)
        with pytest.raises(InvalidTensorFile) as info:
            open_tensors(path)
        assert len(info.value.detail) < 600, info.value.detail[:200]


def test_write_failures_are_storage_errors(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(StorageError, match="a-file/m.safetensors: cannot write"):
        write_tensors(tmp_path / "a-file" / "m.safetensors", {"w": torch.ones(1)})
    with pytest.raises(StorageError, match="cannot write"):
        StreamingWriter(tmp_path / "a-file" / "out", [TensorInfo("w", "U8", (1,), 1)])


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_release_pages_drops_resident_pages_and_keeps_the_values(tmp_path: Path) -> None:
    import gc

    from crdtmerge.tensors import reader as tensors_module
    from crdtmerge.tensors import release_pages

    values = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB
    path = tmp_path / "big.safetensors"
    write_tensors(path, {"w": values})
    with open_tensors(path) as src:
        t = src.tensor("w")
        before = _rss_file_kib()
        assert float(t.sum(dtype=torch.float64)) == float(values.sum(dtype=torch.float64))
        touched = _rss_file_kib()
        assert touched - before > 48 << 10  # the pass made the mapping resident
        release_pages(t, 0, t.numel())
        assert touched - _rss_file_kib() > 48 << 10  # and released it
        assert torch.equal(t, values)  # read again from the page cache
        heap = values.clone()
        release_pages(heap, 0, heap.numel())  # not a mapping: untouched
        assert torch.equal(heap, values)
        ptr = t.data_ptr()
        (key,) = [a for a, (_, n) in tensors_module._MAPPINGS.items() if a <= ptr < a + n]
        del t
        gc.collect()
        assert key not in tensors_module._MAPPINGS  # the entry left with its mapping


def test_written_files_get_the_mode_of_an_ordinary_new_file(tmp_path: Path) -> None:
    """Not mkstemp's 0600: a merged model must be readable as any file the user writes."""
    mask = os.umask(0o022)
    os.umask(mask)
    single = tmp_path / "one.safetensors"
    write_tensors(single, {"w": torch.ones(3)})
    infos = [TensorInfo.of("w", torch.ones(3))]
    with StreamingWriter(tmp_path / "dir", infos) as w:
        w.write("w", torch.ones(3))
    for path in (single, tmp_path / "dir" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_long_writes_sync_early_and_an_early_sync_error_fails_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every few MiB written a background fdatasync starts (so the final fsync has little
    left); if one fails, close raises that error and nothing appears under the final name."""
    from crdtmerge.tensors import writer as tensors_module

    monkeypatch.setattr(tensors_module, "_EARLY_SYNC_BYTES", 1 << 16)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    infos = [TensorInfo(f"w{i}", "F32", (1 << 15,), 1 << 17) for i in range(4)]
    with StreamingWriter(tmp_path / "ok.safetensors", infos) as w:
        for info in infos:
            w.write(info.name, torch.ones(1 << 15))
    assert synced  # early syncs ran
    with open_tensors(tmp_path / "ok.safetensors") as src:
        assert float(src.tensor("w3").sum()) == 1 << 15

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    writer = StreamingWriter(tmp_path / "bad.safetensors", infos)
    for info in infos:
        writer.write(info.name, torch.ones(1 << 15))
    with pytest.raises((OSError, StorageError)):
        writer.close()
    assert not (tmp_path / "bad.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ok.safetensors"]
