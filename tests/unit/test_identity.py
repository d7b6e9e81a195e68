"""Merkle identity: the construction, semantic invariance, sensitivity, manifests, chunks."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import multiprocessing.queues
import struct
from pathlib import Path

import blake3
import msgpack
import pytest
import torch

from crdtmerge.errors import (
    IntegrityError,
    InvalidInput,
    InvalidTensorFile,
    NotFound,
    UnsupportedVersion,
)
from crdtmerge.identity import (
    CHUNK_SIZE,
    Manifest,
    TensorHasher,
    chunk_leaf,
    contribution_metadata_header,
    hash_tensors,
    merkle_root,
    parse_root,
    read_contribution_metadata,
    root_hex,
    set_root,
    verify_chunk,
)
from crdtmerge.store import ObjectStore
from crdtmerge.tensors import StreamingWriter, TensorInfo, open_tensors, write_tensors
from tests.models import make_model, randn

VECTORS = Path(__file__).parents[1] / "vectors" / "identity.jsonl"


# --- an independent reference implementation of docs/architecture.md "Identity" -------------


def _h(tag: str, *parts: bytes) -> bytes:
    h = blake3.blake3()
    for part in (tag.encode(), *parts):
        h.update(struct.pack("<Q", len(part)) + part)
    return h.digest()


def _tree(leaves: list[bytes]) -> bytes:
    if not leaves:
        return _h("crdtmerge/v1/empty")
    while len(leaves) > 1:
        pairs = [
            _h("crdtmerge/v1/node", a, b) for a, b in zip(leaves[::2], leaves[1::2], strict=False)
        ]
        leaves = pairs + ([leaves[-1]] if len(leaves) % 2 else [])
    return leaves[0]


def reference_root(
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]], meta_packed: bytes, chunk_size: int
) -> bytes:
    """name -> (dtype, shape, raw bytes); metadata given already canonically packed."""
    leaves = []
    for name in sorted(tensors, key=lambda n: n.encode()):
        dtype, shape, data = tensors[name]
        chunks = [
            _h("crdtmerge/v1/chunk", struct.pack("<Q", i), data[off : off + chunk_size])
            for i, off in enumerate(range(0, len(data), chunk_size))
        ]
        shape_b = struct.pack(f"<{len(shape) + 1}Q", len(shape), *shape)
        leaves.append(
            _h(
                "crdtmerge/v1/tensor",
                name.encode(),
                dtype.encode(),
                shape_b,
                struct.pack("<Q", len(data)),
                _tree(chunks),
            )
        )
    return _h(
        "crdtmerge/v1/object",
        struct.pack("<Q", chunk_size),
        _h("crdtmerge/v1/meta", meta_packed),
        _tree(leaves),
    )


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_matches_the_reference_construction() -> None:
    model = make_model(1)
    model["scalar"] = torch.tensor(3, dtype=torch.int64)
    model["empty"] = torch.zeros(0, 2)
    for chunk_size in (7, 64, 1000, CHUNK_SIZE):
        expected = reference_root(
            {n: (("I64" if t.dtype == torch.int64 else "F32"), tuple(t.shape), raw(t))
             for n, t in model.items()},
            b"\x81\xa1k\x01",  # canonical msgpack of {"k": 1}
            chunk_size,
        )  # fmt: skip
        assert hash_tensors(model, {"k": 1}, chunk_size=chunk_size).root == expected


def test_merkle_tree_shape() -> None:
    a, b, c = (bytes([i]) * 32 for i in range(3))
    assert merkle_root([]) == _h("crdtmerge/v1/empty")
    assert merkle_root([a]) == a
    assert merkle_root([a, b, c]) == _h("crdtmerge/v1/node", _h("crdtmerge/v1/node", a, b), c)


def test_golden_vectors() -> None:
    lines = VECTORS.read_text().splitlines()
    assert len(lines) >= 5
    for line in lines:
        case = json.loads(line)
        tensors = {
            t["name"]: torch.frombuffer(bytearray.fromhex(t["data"]), dtype=torch.uint8)
            .view(_TORCH[t["dtype"]])
            .reshape(t["shape"])
            if t["data"]
            else torch.zeros(t["shape"], dtype=_TORCH[t["dtype"]])
            for t in case["tensors"]
        }
        manifest = hash_tensors(tensors, case["metadata"], chunk_size=case["chunk_size"])
        assert manifest.root_hex == case["root"], case["name"]
        # the manifest wire format is pinned too
        assert manifest.to_bytes().hex() == case["manifest"], case["name"]
        assert Manifest.from_bytes(bytes.fromhex(case["manifest"])) == manifest


_TORCH = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "U8": torch.uint8,
          "BF16": torch.bfloat16, "BOOL": torch.bool}  # fmt: skip


# --- identity is semantic ---------------------------------------------------------------------


def _hand_written(path: Path, model: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """A valid but non-canonical file: reversed data order, reversed header, spaced JSON."""
    header: dict = {}
    data = b""
    for name in sorted(model, reverse=True):
        b = raw(model[name])
        dtype = {torch.float32: "F32", torch.float16: "F16"}[model[name].dtype]
        header[name] = {
            "shape": list(model[name].shape),
            "data_offsets": [len(data), len(data) + len(b)],
            "dtype": dtype,
        }
        data += b
    if meta is not None:
        header["__metadata__"] = meta
    text = json.dumps(header, indent=3).encode() + b"\n\n"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_root_is_independent_of_file_layout(tmp_path: Path) -> None:
    model = make_model(2)
    model["half"] = randn((3, 5), 9, torch.float16)
    expected = hash_tensors(model, chunk_size=256).root
    _hand_written(tmp_path / "hand.safetensors", model)
    write_tensors(tmp_path / "canon.safetensors", model)
    infos = [TensorInfo.of(n, t) for n, t in model.items()]
    for shard_bytes, out in ((700, "shards-a"), (3000, "shards-b")):
        writer = StreamingWriter(tmp_path / out, infos, max_shard_bytes=shard_bytes)
        for name in sorted(model):
            writer.write(name, model[name])
        assert len(writer.close()) > 2
    sources = ["hand.safetensors", "canon.safetensors", "shards-a", "shards-b"]
    for src in sources:
        assert hash_tensors(tmp_path / src, chunk_size=256).root == expected, src
    with open_tensors(tmp_path / "hand.safetensors") as ts:
        assert hash_tensors(ts, chunk_size=256).root == expected
        ts.names()  # hash_tensors leaves a given source open


def test_dict_order_and_contiguity_do_not_matter() -> None:
    t = torch.arange(12.0).reshape(3, 4)
    a = hash_tensors({"x": t, "y": t.t().contiguous()})
    b = hash_tensors({"y": t.t(), "x": t.clone()})
    assert a.root == b.root


def test_metadata_key_order_does_not_matter(tmp_path: Path) -> None:
    model = make_model(1)
    m1 = {"params": {"weight": 0.5, "density": 0.2}, "signer": "k1"}
    m2 = {"signer": "k1", "params": {"density": 0.2, "weight": 0.5}}
    assert hash_tensors(model, m1).root == hash_tensors(model, m2).root
    # stored in the file, with free-form labels beside it that are not part of the root
    header = contribution_metadata_header(m2) | {"name": "my finetune", "format": "pt"}
    write_tensors(tmp_path / "m.safetensors", model, header)
    assert read_contribution_metadata(tmp_path / "m.safetensors") == m1
    assert hash_tensors(tmp_path / "m.safetensors").root == hash_tensors(model, m1).root


def test_integral_floats_and_ints_give_one_root(tmp_path: Path) -> None:
    # the same fine-tune pushed with "weight": 1 and "weight": 1.0 is one contribution
    model = make_model(1)
    as_int = {"params": {"weight": 1, "density": [{"filter": "mlp", "value": 2}]}}
    as_float = {"params": {"weight": 1.0, "density": [{"filter": "mlp", "value": 2.0}]}}
    assert hash_tensors(model, as_int).root == hash_tensors(model, as_float).root
    for i, meta in enumerate((as_int, as_float)):
        header = {"crdtmerge": json.dumps(meta)}  # as another tool would write it
        write_tensors(tmp_path / f"m{i}.safetensors", model, header)
        assert read_contribution_metadata(tmp_path / f"m{i}.safetensors") == as_int
        assert (
            type(read_contribution_metadata(tmp_path / f"m{i}.safetensors")["params"]["weight"])
            is int
        )
    # and the stored objects are the same bytes (their header comes from the manifest)
    stores = [ObjectStore.at(tmp_path / f"s{i}") for i in range(2)]
    roots = [s.ingest(tmp_path / f"m{i}.safetensors")[0] for i, s in enumerate(stores)]
    assert roots[0] == roots[1]
    assert stores[0].path(roots[0]).read_bytes() == stores[1].path(roots[1]).read_bytes()
    assert contribution_metadata_header(as_float) == contribution_metadata_header(as_int)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (0.0, -0.0),  # the sign of a zero can reach the output
        (0.5, 1),
        (2**53, 2.0**53),  # from 2**53 on, floats stay floats
        ("1", 1),
    ],
)
def test_values_that_are_not_the_same_number_keep_their_roots_apart(a, b) -> None:
    model = {"w": torch.ones(2)}
    assert hash_tensors(model, {"x": a}).root != hash_tensors(model, {"x": b}).root


def test_a_manifest_writing_an_integral_float_is_not_canonical() -> None:
    good = hash_tensors({"w": torch.ones(2)}, {"params": {"weight": 1}}, chunk_size=64)
    forged = dataclasses.replace(good, metadata={"params": {"weight": 1.0}})
    with pytest.raises(InvalidInput, match="integral number as a float"):
        Manifest.from_bytes(forged.to_bytes(), expected_root=good.root)


@pytest.mark.parametrize(
    "change",
    ["flip-bit", "rename", "dtype", "transpose-shape", "metadata", "chunk-size", "drop", "add"],
)
def test_any_change_changes_the_root(change: str) -> None:
    base = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    meta: dict = {"params": {"weight": 1.0}}
    chunk = 8
    other = dict(base)
    other_meta = meta
    other_chunk = chunk
    if change == "flip-bit":
        data = bytearray(raw(base["w"]))
        data[13] ^= 0x10
        other["w"] = torch.frombuffer(data, dtype=torch.float32).reshape(2, 3)
    elif change == "rename":
        other = {"w2": base["w"], "b": base["b"]}
    elif change == "dtype":  # the same bytes, reinterpreted
        other["w"] = base["w"].view(torch.int32)
    elif change == "transpose-shape":  # (2,3) -> (3,2) with identical bytes
        other["w"] = base["w"].reshape(3, 2)
    elif change == "metadata":
        other_meta = {"params": {"weight": 0.5}}
    elif change == "chunk-size":
        other_chunk = 16
    elif change == "drop":
        other = {"w": base["w"]}
    elif change == "add":
        other["z"] = torch.zeros(0)
    assert raw(base["w"]) == raw(other.get("w", base["w"])) or change == "flip-bit"
    a = hash_tensors(base, meta, chunk_size=chunk).root
    b = hash_tensors(other, other_meta, chunk_size=other_chunk).root
    assert a != b


def test_file_metadata_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(1)}, {"crdtmerge": "[1]"})
    with pytest.raises(InvalidTensorFile, match="must be a JSON object, got list"):
        hash_tensors(tmp_path / "m.safetensors")
    write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(1)}, {"crdtmerge": '{"a": NaN}'})
    with pytest.raises(InvalidTensorFile, match="is not valid JSON: NaN is not allowed"):
        hash_tensors(tmp_path / "m.safetensors")


def test_metadata_without_canonical_form_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="has no canonical encoding"):
        hash_tensors({"w": torch.ones(1)}, {"weight": float("nan")})
    with pytest.raises(InvalidInput, match="not JSON-representable"):
        contribution_metadata_header({"key": b"bytes"})


# --- manifests --------------------------------------------------------------------------------


def _manifest() -> Manifest:
    model = {"a": torch.arange(40, dtype=torch.float32), "b": torch.ones(3), "c": torch.zeros(0)}
    return hash_tensors(model, {"params": {"weight": 0.25}}, chunk_size=64)


def test_manifest_round_trip_and_verify() -> None:
    m = _manifest()
    m.verify()
    assert m.entry("a").chunks and len(m.entry("a").chunks) == 3  # 160 bytes / 64
    assert m.num_chunks == 3 + 1 + 0 and m.total_bytes == 160 + 12
    data = m.to_bytes()
    assert Manifest.from_bytes(data) == m
    assert Manifest.from_bytes(data, expected_root=m.root) == m
    assert json.loads(json.dumps(m.to_json()))["root"] == m.root_hex
    assert m.entry("a").info == TensorInfo("a", "F32", (40,), 160)
    with pytest.raises(NotFound, match="no tensor named 'z'"):
        m.entry("z")


def _tampered(m: Manifest, field: str) -> Manifest:
    a = m.entry("a")
    entries = list(m.tensors)
    if field == "root":
        return dataclasses.replace(m, root=bytes(32))
    if field == "metadata":
        return dataclasses.replace(m, metadata={"params": {"weight": 0.5}})
    if field == "chunk_size":
        return dataclasses.replace(m, chunk_size=80)  # 160 bytes are still 2 or 3 chunks...
    if field == "chunk_size_same_count":
        return dataclasses.replace(m, chunk_size=54)  # ...ceil(160/54) == 3: same chunk count
    if field == "drop_tensor":
        return dataclasses.replace(m, tensors=tuple(entries[1:]))
    if field == "order":
        return dataclasses.replace(m, tensors=tuple(reversed(entries)))
    changes = {
        "name": {"name": "a2"},
        "dtype": {"dtype": "I32"},
        "shape": {"shape": (4, 10)},
        "nbytes": {"nbytes": 128},
        "chunk_leaf": {"chunks": (a.chunks[1], a.chunks[0], a.chunks[2])},
        "chunk_count": {"chunks": a.chunks[:2]},
    }[field]
    entries[0] = dataclasses.replace(a, **changes)
    return dataclasses.replace(m, tensors=tuple(entries))


@pytest.mark.parametrize(
    "field",
    [
        "root", "metadata", "chunk_size", "chunk_size_same_count", "drop_tensor", "order",
        "name", "dtype", "shape", "nbytes", "chunk_leaf", "chunk_count",
    ],
)  # fmt: skip
def test_tampered_manifest_is_rejected(field: str) -> None:
    m = _manifest()
    bad = _tampered(m, field)
    with pytest.raises(IntegrityError):
        bad.verify()
    # and through the wire form, asking for the genuine root
    with pytest.raises((IntegrityError, InvalidInput)):
        Manifest.from_bytes(bad.to_bytes(), expected_root=m.root)


def test_manifest_for_another_root_is_rejected() -> None:
    m = _manifest()
    other = hash_tensors({"x": torch.ones(1)})
    with pytest.raises(IntegrityError, match=f"expected {m.root_hex}"):
        other.verify(expected_root=m.root)


def test_manifest_decoding_errors() -> None:
    m = _manifest()
    data = m.to_bytes()
    with pytest.raises(InvalidInput, match="not a crdtmerge manifest"):
        Manifest.from_bytes(b"\xc1garbage")
    with pytest.raises(InvalidInput, match="not a crdtmerge manifest"):
        Manifest.from_bytes(data[:-5])
    with pytest.raises(InvalidInput, match="missing tag"):
        Manifest.from_bytes(b"\x92\xa3abc\x01")
    future = data.replace(b"\x01\x84", b"\x02\x84", 1)  # version 1 -> 2 just after the tag
    assert future != data
    with pytest.raises(UnsupportedVersion, match="manifest format version 2 is not supported"):
        Manifest.from_bytes(future)
    with pytest.raises(InvalidInput, match="malformed crdtmerge manifest"):
        Manifest.from_bytes(b"\x93\xb2crdtmerge/manifest\x01\x80")


# --- chunks -----------------------------------------------------------------------------------


def test_large_tensor_verifies_chunk_by_chunk() -> None:
    t = randn((1000, 300), 4)  # 1.2 MB in 19 chunks of 64 KiB: hashed on the thread pool
    data = raw(t)
    chunk = 64 * 1024
    m = hash_tensors({"big": t, "small": torch.ones(2)}, chunk_size=chunk)
    assert len(m.entry("big").chunks) == 19
    for i in range(19):
        offset, length = m.chunk_span("big", i)
        assert offset == i * chunk and length == min(chunk, len(data) - offset)
        verify_chunk(m, "big", i, data[offset : offset + length])
    assert m.entry("big").chunks[5] == chunk_leaf(5, data[5 * chunk : 6 * chunk])


def test_tampered_chunk_is_rejected() -> None:
    t = torch.arange(100, dtype=torch.float32)
    data = bytearray(raw(t))
    m = hash_tensors({"w": t}, chunk_size=128)
    bad = bytearray(data[128:256])
    bad[7] ^= 1
    with pytest.raises(IntegrityError, match="chunk 1 of tensor 'w' does not hash to its leaf"):
        verify_chunk(m, "w", 1, bytes(bad))
    with pytest.raises(IntegrityError, match="chunk 3 of tensor 'w': expected 16 bytes, got 17"):
        verify_chunk(m, "w", 3, bytes(data[384:]) + b"\0")
    with pytest.raises(IntegrityError, match="does not hash to its leaf"):
        verify_chunk(m, "w", 2, bytes(data[128:256]))  # right bytes, wrong position
    with pytest.raises(NotFound, match="there is no chunk 4"):
        verify_chunk(m, "w", 4, b"")


def test_incremental_hasher_matches_any_split() -> None:
    t = randn((50, 40), 7)
    data = raw(t)
    expected = hash_tensors({"w": t}, chunk_size=300).entry("w")
    for step in (1, 299, 300, 301, 1999, len(data)):
        hasher = TensorHasher(TensorInfo.of("w", t), chunk_size=300)
        for off in range(0, len(data), step):
            hasher.update(data[off : off + step])
        assert hasher.finish() == expected, step


def test_incremental_hasher_checks_length() -> None:
    hasher = TensorHasher(TensorInfo("w", "U8", (4,), 4))
    hasher.update(b"abc")
    with pytest.raises(InvalidInput, match="got 3 of its 4 bytes"):
        hasher.finish()
    with pytest.raises(InvalidInput, match="got more than its 4 bytes"):
        hasher.update(b"de")


# --- roots as values --------------------------------------------------------------------------


def test_set_root_is_order_free() -> None:
    a, b, c = (hash_tensors({"w": torch.full((2,), float(i))}).root for i in range(3))
    assert set_root([a, b, c]) == set_root([c, a, b]) == set_root([a, b, c, a])
    assert set_root([a, b]) != set_root([a, b, c])
    assert set_root([a, b]) == _h("crdtmerge/v1/set", *sorted([a, b]))
    with pytest.raises(InvalidInput, match="a root is 32 bytes"):
        set_root([b"short"])


def test_root_text_round_trip() -> None:
    root = _manifest().root
    assert parse_root(root_hex(root)) == root
    assert parse_root(root_hex(root).upper()) == root
    for bad in ("ab", "zz" * 32, root_hex(root) + "0"):
        with pytest.raises(InvalidInput, match="a root is 64 hex characters"):
            parse_root(bad)
    with pytest.raises(InvalidInput, match="a root is 32 bytes"):
        root_hex(b"x")


_FORK_INPUT: dict[str, torch.Tensor] = {}


def _hash_in_child(queue: multiprocessing.queues.Queue) -> None:  # type: ignore[type-arg]
    # no torch kernels in the child: torch's own thread pool is not fork-safe either
    queue.put(hash_tensors(_FORK_INPUT, chunk_size=512 * 1024).root)


def test_hashing_works_after_fork() -> None:
    """Bug: the shared pool's threads do not survive fork(), so a child's hash hung."""
    _FORK_INPUT["w"] = torch.arange(1_000_000.0)
    expected = hash_tensors(_FORK_INPUT, chunk_size=512 * 1024).root  # starts the pool
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_hash_in_child, args=(queue,))
    child.start()
    child.join(timeout=30)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "hashing hung in a forked child"
    assert queue.get(timeout=5) == expected


def test_deeply_nested_metadata_is_rejected_cleanly(tmp_path: Path) -> None:
    """Bug: nesting ~500 deep made canonical encoding raise RecursionError (a crash)."""
    deep = "[" * 500 + "]" * 500
    write_tensors(
        tmp_path / "m.safetensors", {"w": torch.ones(1)}, {"crdtmerge": f'{{"a":{deep}}}'}
    )
    with pytest.raises(InvalidTensorFile, match="nested more than 32 levels deep"):
        hash_tensors(tmp_path / "m.safetensors")
    value: list = []
    for _ in range(40):
        value = [value]
    with pytest.raises(InvalidInput, match="nested more than 32 levels deep"):
        hash_tensors({"w": torch.ones(1)}, {"a": value})
    body = msgpack.packb(
        ["crdtmerge/manifest", 1, {"chunk_size": 1, "metadata": {"a": value}, "root": bytes(32),
                                   "tensors": []}]
    )  # fmt: skip
    with pytest.raises(InvalidInput, match="manifest metadata is nested more than 32 levels"):
        Manifest.from_bytes(body)
