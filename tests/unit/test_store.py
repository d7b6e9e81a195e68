"""The content-addressed object store: canonical storage, atomic visibility, crash leftovers,
and resumable partial objects verified chunk by chunk."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import crdtmerge.store as store_module
from crdtmerge.errors import IntegrityError, InvalidInput, InvalidTensorFile, NotFound, TooLarge
from crdtmerge.identity import contribution_metadata_header, hash_tensors
from crdtmerge.store import IngestLimits, ObjectStore, hash_file
from crdtmerge.tensors import open_tensors, write_tensors
from tests.models import make_model


def non_canonical_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """The same tensors in reverse name order, unpadded header, an extra free-form label."""
    header: dict = {"__metadata__": {**meta, "name": "my model"}}
    data = b""
    for name in sorted(tensors, reverse=True):
        raw = tensors[name].contiguous().numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore.at(tmp_path / "store")


def test_canonical_and_non_canonical_uploads_store_identical_bytes(store, tmp_path):
    tensors = make_model(3)
    meta = contribution_metadata_header({"params": {"weight": 0.5}})
    write_tensors(tmp_path / "canon.safetensors", tensors, meta)
    odd = non_canonical_file(tmp_path / "odd.safetensors", tensors, meta)
    assert odd.read_bytes() != (tmp_path / "canon.safetensors").read_bytes()

    root, created = store.ingest(odd)
    assert created
    assert root == hash_file(tmp_path / "canon.safetensors") == hash_file(odd)
    assert store.path(root).read_bytes() == (tmp_path / "canon.safetensors").read_bytes()
    assert store.metadata(root) == {"params": {"weight": 0.5}}  # the label is not kept

    again, created = store.ingest(tmp_path / "canon.safetensors")
    assert (again, created) == (root, False)
    assert store.list() == [root]
    assert list(store.tmp_dir.iterdir()) == []


def test_queries_and_delete(store, tmp_path):
    write_tensors(tmp_path / "a.safetensors", {"w": torch.arange(6.0).reshape(2, 3)})
    root, _ = store.ingest(tmp_path / "a.safetensors")
    assert store.has(root) and store.manifest(root).root == root
    assert store.tensor_schema(root) == {"w": ("F32", (2, 3))}
    assert store.info(root)["tensors"]["w"]["shape"] == [2, 3]
    with store.open(root) as src:
        assert torch.equal(src.tensor("w"), torch.arange(6.0).reshape(2, 3))
    assert store.size(root) == (tmp_path / "a.safetensors").stat().st_size
    assert store.delete(root) and not store.has(root) and store.list() == []
    assert not store.delete(root)
    with pytest.raises(NotFound):
        store.path(root)
    with pytest.raises(NotFound):
        store.manifest(root)


@pytest.mark.parametrize(
    "body",
    [b"", b"garbage!", struct.pack("<Q", 10**6) + b"{}", struct.pack("<Q", 2) + b"{}"],
)
def test_invalid_bytes_are_rejected_and_leave_nothing(store, body):
    with pytest.raises(InvalidTensorFile):
        store.ingest([body])
    assert store.list() == [] and list(store.tmp_dir.iterdir()) == []


def test_limits(store, tmp_path):
    write_tensors(tmp_path / "a.safetensors", make_model(1))
    data = (tmp_path / "a.safetensors").read_bytes()
    with pytest.raises(TooLarge):
        store.ingest([data[:100], data[100:]], IngestLimits(max_bytes=len(data) - 1))
    with pytest.raises(InvalidTensorFile, match="header"):
        store.ingest([data], IngestLimits(max_header_bytes=64))
    with pytest.raises(InvalidTensorFile, match="tensors"):
        store.ingest([data], IngestLimits(max_tensors=2))
    assert store.list() == [] and list(store.tmp_dir.iterdir()) == []


def test_prepare_then_discard_publishes_nothing(store, tmp_path):
    write_tensors(tmp_path / "a.safetensors", make_model(1))
    with open(tmp_path / "a.safetensors", "rb") as f:
        tmp = store.receive(f)
    prepared = store.prepare(tmp)
    assert prepared.canonical and not store.has(prepared.root)
    store.discard(prepared)
    assert store.list() == [] and list(store.tmp_dir.iterdir()) == []


def test_open_sweeps_crash_leftovers(tmp_path):
    store = ObjectStore.at(tmp_path / "s")
    write_tensors(tmp_path / "a.safetensors", make_model(1))
    root, _ = store.ingest(tmp_path / "a.safetensors")
    # a crash mid-upload, mid-rewrite, and between the data and manifest renames
    (store.tmp_dir / "upload-x.tmp").write_bytes(b"half an upload")
    shard = store.path(root).parent
    (shard / f".{'cd' * 32}.safetensors.abc.tmp").write_bytes(b"half a rewrite")
    orphan = shard / f"{'ef' * 32}.safetensors"
    orphan.write_bytes(b"data without manifest")

    reopened = ObjectStore.at(tmp_path / "s")
    assert reopened.list() == [root]
    assert sorted(p.name for p in shard.iterdir()) == sorted(
        [f"{root.hex()}.safetensors", f"{root.hex()}.manifest"]
    )
    assert list(reopened.tmp_dir.iterdir()) == []


def test_partial_object_verifies_resumes_and_appears_only_when_complete(tmp_path):
    src = tmp_path / "src"
    dst = tmp_path / "dst"
    tensors = {
        "big": torch.arange(3000, dtype=torch.float32),
        "empty": torch.zeros(0),
        "small": torch.ones(3),
    }
    meta = contribution_metadata_header({"params": {"weight": 2.0}})
    write_tensors(tmp_path / "m.safetensors", tensors, meta)
    manifest = hash_tensors(tmp_path / "m.safetensors", chunk_size=1024)
    sender = ObjectStore.at(src)
    # the sender stores the object; chunks are read at canonical offsets
    root, _ = sender.ingest(tmp_path / "m.safetensors")
    assert manifest.root != root  # chunk size is part of the root

    with open_tensors(tmp_path / "m.safetensors") as ts:
        whole = {n: bytes(ts.buffer(n)) for n in ts.names()}

    receiver = ObjectStore.at(dst)
    partial = receiver.begin_partial(manifest)
    todo = partial.missing()
    assert ("big", 0) in todo and len(todo) == 12 + 1  # 12000 bytes / 1024 + "small"
    with pytest.raises(IntegrityError):
        partial.write_chunk("big", 0, b"\0" * 1024)
    with pytest.raises(NotFound):
        partial.write_chunk("big", 99, b"")
    for name, index in todo[:5]:
        start, n = manifest.chunk_span(name, index)
        partial.write_chunk(name, index, whole[name][start : start + n])
    assert not receiver.has(manifest.root)
    with pytest.raises(InvalidInput):
        partial.complete()

    # crash: reopen the store and resume; only the missing chunks are asked for
    receiver = ObjectStore.at(dst)
    assert receiver.partials() == [manifest.root]
    resumed = receiver.begin_partial(manifest)
    assert resumed.missing() == todo[5:]
    for name, index in resumed.missing():
        start, n = manifest.chunk_span(name, index)
        resumed.write_chunk(name, index, whole[name][start : start + n])
    assert resumed.complete() == manifest.root
    assert receiver.has(manifest.root) and receiver.partials() == []
    assert receiver.path(manifest.root).read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    assert hash_tensors(receiver.path(manifest.root), chunk_size=1024).root == manifest.root
    start, n = manifest.chunk_span("big", 3)
    assert receiver.read_chunk(manifest.root, "big", 3) == whole["big"][start : start + n]


def test_a_crash_inside_complete_does_not_wedge_the_partial(tmp_path, monkeypatch):
    """Killed after the data was renamed into place but before its manifest was written: the
    next start sweeps the orphan data away, and the partial (bitmap all set, data gone) must
    start over instead of failing on every attempt (found by the Jepsen-lite run)."""
    tensors = {"w": torch.arange(3000, dtype=torch.float32)}
    write_tensors(tmp_path / "m.safetensors", tensors)
    manifest = hash_tensors(tmp_path / "m.safetensors", chunk_size=1024)
    with open_tensors(tmp_path / "m.safetensors") as ts:
        whole = bytes(ts.buffer("w"))

    def fill(partial):
        for name, index in partial.missing():
            start, n = manifest.chunk_span(name, index)
            partial.write_chunk(name, index, whole[start : start + n])

    receiver = ObjectStore.at(tmp_path / "dst")
    partial = receiver.begin_partial(manifest)
    fill(partial)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("kill -9")

    monkeypatch.setattr(store_module, "_write_atomic", killed)  # the final manifest
    with pytest.raises(KeyboardInterrupt):
        partial.complete()
    monkeypatch.undo()

    receiver = ObjectStore.at(tmp_path / "dst")  # restart: the orphan data is swept
    assert not receiver.has(manifest.root) and receiver.partials() == [manifest.root]
    resumed = receiver.begin_partial(manifest)
    assert len(resumed.missing()) == manifest.num_chunks  # starts over
    fill(resumed)
    assert resumed.complete() == manifest.root
    assert hash_tensors(receiver.path(manifest.root), chunk_size=1024).root == manifest.root


def test_partial_files_of_a_published_object_are_swept_at_start(tmp_path, monkeypatch):
    """Killed after complete() published the object but before it removed the partial."""
    write_tensors(tmp_path / "m.safetensors", {"w": torch.arange(100, dtype=torch.float32)})
    manifest = hash_tensors(tmp_path / "m.safetensors", chunk_size=1024)
    with open_tensors(tmp_path / "m.safetensors") as ts:
        whole = bytes(ts.buffer("w"))
    receiver = ObjectStore.at(tmp_path / "dst")
    partial = receiver.begin_partial(manifest)
    partial.write_chunk("w", 0, whole)
    monkeypatch.setattr(store_module.PartialObject, "abandon", lambda self: None)
    partial.complete()
    monkeypatch.undo()
    (receiver.partial_dir / "not-a-root.manifest").write_bytes(b"")  # foreign: left alone
    assert receiver.partials() == [manifest.root]
    receiver = ObjectStore.at(tmp_path / "dst")
    assert receiver.has(manifest.root) and receiver.partials() == []
    assert sorted(p.name for p in receiver.partial_dir.iterdir()) == ["not-a-root.manifest"]


def test_read_chunk_serves_the_sender_side(store, tmp_path):
    t = torch.arange(5_000_000, dtype=torch.float32)  # 20 MB: several 4 MiB chunks
    write_tensors(tmp_path / "a.safetensors", {"t": t})
    root, _ = store.ingest(tmp_path / "a.safetensors")
    manifest = store.manifest(root)
    raw = t.numpy().tobytes()
    for i in range(len(manifest.entry("t").chunks)):
        start, n = manifest.chunk_span("t", i)
        assert store.read_chunk(root, "t", i) == raw[start : start + n]
    with pytest.raises(NotFound):
        store.read_chunk(root, "t", 99)
