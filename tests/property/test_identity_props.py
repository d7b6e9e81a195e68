"""Property tests of identity and tensor-set I/O.

- the root is a function of the tensor set's meaning: it is the same for a dict, a canonical
  file, a random shard split and an incremental (write-time) hash;
- the manifest codec round-trips and every manifest verifies;
- any single-byte change of a tensor's data changes the root;
- hostile bytes: mutating a valid file never raises anything but ``InvalidTensorFile`` (and the
  file still hashes when the parser accepts it).
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

from crdtmerge.errors import IntegrityError, InvalidInput, InvalidTensorFile, UnsupportedVersion
from crdtmerge.identity import Manifest, TensorHasher, hash_tensors
from crdtmerge.tensors import StreamingWriter, TensorInfo, open_tensors, write_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@st.composite
def tensor_sets(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(
            st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6),
            max_size=5,
            unique=True,
        ).filter(lambda ns: "__metadata__" not in ns)
    )
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        data = draw(st.binary(min_size=n, max_size=n))
        if n:
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
        else:
            t = torch.zeros(shape, dtype=dtype)
        out[name] = t
    return out


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@settings(max_examples=40)
@given(ts=tensor_sets(), chunk=st.integers(1, 40), shard=st.integers(1, 200))
def test_root_is_the_same_for_every_layout(
    ts: dict[str, torch.Tensor], chunk: int, shard: int
) -> None:
    expected = hash_tensors(ts, {"w": 1}, chunk_size=chunk)
    expected.verify()
    with tempfile.TemporaryDirectory() as tmp:
        write_tensors(Path(tmp) / "one.safetensors", ts)
        assert hash_tensors(Path(tmp) / "one.safetensors", {"w": 1}, chunk_size=chunk) == expected
        infos = [TensorInfo.of(n, t) for n, t in ts.items()]
        writer = StreamingWriter(Path(tmp) / "sharded", infos, max_shard_bytes=shard)
        for name in sorted(ts):
            writer.write(name, ts[name])
        note(f"files: {[p.name for p in writer.close()]}")
        assert hash_tensors(Path(tmp) / "sharded", {"w": 1}, chunk_size=chunk) == expected
    entries = []
    for name in sorted(ts):
        hasher = TensorHasher(TensorInfo.of(name, ts[name]), chunk_size=chunk)
        data = _raw(ts[name])
        for off in range(0, len(data), 3):
            hasher.update(data[off : off + 3])
        entries.append(hasher.finish())
    assert Manifest.build(entries, {"w": 1}, chunk_size=chunk) == expected


@settings(max_examples=60)
@given(ts=tensor_sets(), chunk=st.integers(1, 40))
def test_manifest_codec_round_trips(ts: dict[str, torch.Tensor], chunk: int) -> None:
    manifest = hash_tensors(ts, {"params": {"weight": 0.5}}, chunk_size=chunk)
    assert Manifest.from_bytes(manifest.to_bytes(), expected_root=manifest.root) == manifest


@settings(max_examples=60)
@given(ts=tensor_sets().filter(lambda ts: any(t.numel() for t in ts.values())), data=st.data())
def test_any_byte_change_changes_the_root(ts: dict[str, torch.Tensor], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(n for n, t in ts.items() if t.numel())))
    raw = bytearray(_raw(ts[name]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    changed = dict(ts)
    changed[name] = (
        torch.frombuffer(raw, dtype=torch.uint8).view(ts[name].dtype).reshape(ts[name].shape)
    )
    assert hash_tensors(changed, chunk_size=4).root != hash_tensors(ts, chunk_size=4).root


def _valid_file() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        write_tensors(
            path,
            {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)},
            {"crdtmerge": '{"params":{"weight":1}}'},
        )
        return path.read_bytes()


VALID = _valid_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


@settings(max_examples=200)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6
    ),
    cut=st.none() | st.integers(0, len(VALID)),
    tail=st.binary(max_size=8),
)
@example(edits=[(0, 0x10)], cut=None, tail=b"")  # header length now 16 bytes too long
@example(edits=[(12, ord("x"))], cut=None, tail=b"")  # a dtype letter
@example(edits=[(1, 0)], cut=HEADER_END - 3, tail=b"")  # truncated header
def test_mutated_files_only_raise_invalid_tensor_file(
    tmp_path_factory, edits: list[tuple[int, int]], cut: int | None, tail: bytes
) -> None:
    data = bytearray(VALID)
    for pos, value in edits:
        data[pos] = value
    if cut is not None:
        data = data[:cut]
    data += tail
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(bytes(data))
    try:
        with open_tensors(path) as ts:
            for name in ts.names():
                ts.tensor(name)
        hash_tensors(path).verify()
    except InvalidTensorFile as exc:
        assert str(path) in exc.detail or "__metadata__" in exc.detail


MANIFEST = hash_tensors(
    {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(2, 2)},
    {"params": {"weight": 0.5}},
    chunk_size=16,
).to_bytes()


@settings(max_examples=200)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(MANIFEST) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.none() | st.integers(0, len(MANIFEST)),
)
def test_mutated_manifests_are_rejected_cleanly(
    edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(MANIFEST)
    for pos, value in edits:
        data[pos] = value
    if cut is not None:
        data = data[:cut]
    try:
        decoded = Manifest.from_bytes(bytes(data))
    except (InvalidInput, IntegrityError, UnsupportedVersion):
        return
    assert bytes(data) == MANIFEST  # the only bytes that decode are the original ones
    assert decoded.to_bytes() == MANIFEST
