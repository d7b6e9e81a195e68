"""Object transfer: verified chunks, bad peers penalised, resume after a crash, batching."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from safetensors.numpy import save_file

from crdtmerge.errors import StorageError
from crdtmerge.store import ObjectStore, hash_file
from node.routes.replication import ChunkReader, read_chunks
from node.transfer import ObjectFetcher, PeerScores, plan_batches


def _make_object(store: ObjectStore, tmp: Path) -> bytes:
    rng = np.random.Generator(np.random.PCG64(5))
    tensors = {
        "big": rng.standard_normal((5 * 1024 * 1024 // 4 + 123,), dtype=np.float32),  # 2 chunks
        **{f"small.{i}": rng.standard_normal((17, 3), dtype=np.float32) for i in range(40)},
    }
    path = tmp / "obj.safetensors"
    save_file(tensors, str(path))
    root, _ = store.ingest(path)
    return root


class Peers:
    """A mock network: each host serves from a store; some hosts misbehave."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self.flip: set[str] = set()
        self.missing: set[str] = set()
        self.down: set[str] = set()
        self.fail_after: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.chunks_served: dict[str, int] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.requests[host] = self.requests.get(host, 0) + 1
        if host in self.down:
            raise httpx.ConnectError("down", request=request)
        root = bytes.fromhex(request.url.path.split("/")[4])
        if host in self.missing or not self.store.has(root):
            return httpx.Response(404, json={"error": "not_found", "detail": ""})
        if request.url.path.endswith("/manifest"):
            return httpx.Response(200, content=self.store.manifest(root).to_bytes())
        refs = [tuple(c) for c in msgpack.unpackb(request.content)["chunks"]]
        served = self.chunks_served.get(host, 0)
        if host in self.fail_after and served >= self.fail_after[host]:
            raise httpx.ReadError("connection lost", request=request)
        self.chunks_served[host] = served + len(refs)
        data = bytearray(read_chunks(self.store, root, refs))
        if host in self.flip:
            data[len(data) // 2] ^= 0x10
        return httpx.Response(200, content=bytes(data))


@pytest.fixture
def source(tmp_path):
    store = ObjectStore.at(tmp_path / "src")
    return store, _make_object(store, tmp_path)


def test_chunk_reader_is_read_once(source):
    """Iterating closes the file: a second pass is a clear StorageError (it once called
    ``os.pread(None, ...)``, a TypeError)."""
    store, root = source
    refs = [("small.0", 0), ("big", 1)]
    reader = ChunkReader(store, root, refs)
    assert b"".join(reader) == read_chunks(store, root, refs)
    with pytest.raises(StorageError, match="closed"):
        list(reader)


def _fetcher(dest: ObjectStore, net: Peers, hosts: list[str], **kw) -> ObjectFetcher:
    client = httpx.AsyncClient(transport=httpx.MockTransport(net.handler))
    kw.setdefault("batch_bytes", 4 << 20)  # the 5 MiB object travels in several batches
    return ObjectFetcher(dest, client, lambda: [f"http://{h}" for h in hosts], **kw)


def test_fetch_completes_and_object_rehashes_to_its_root(source, tmp_path):
    src, root = source
    dest = ObjectStore.at(tmp_path / "dest")
    net = Peers(src)
    fetcher = _fetcher(dest, net, ["a", "b"])
    assert asyncio.run(fetcher.fetch(root)) is True
    assert dest.has(root)
    assert hash_file(dest.path(root)) == root
    assert dest.path(root).read_bytes() == src.path(root).read_bytes()
    assert fetcher.stats.chunks == src.manifest(root).num_chunks
    assert dest.partials() == []


def test_bad_bytes_are_never_stored_and_the_chunk_comes_from_another_peer(source, tmp_path):
    src, root = source
    dest = ObjectStore.at(tmp_path / "dest")
    net = Peers(src)
    net.flip.add("evil")
    fetcher = _fetcher(dest, net, ["evil", "good"], concurrency=1)
    assert asyncio.run(fetcher.fetch(root)) is True
    assert hash_file(dest.path(root)) == root
    assert fetcher.stats.bad_peers == {"http://evil": 1}
    assert fetcher.scores.bad_bytes("http://evil") == 1
    # once penalised, the evil peer is ordered last
    assert fetcher.scores.order(["http://evil", "http://good"], 0.0)[0] == "http://good"


def test_only_bad_peers_leave_nothing_visible(source, tmp_path):
    src, root = source
    dest = ObjectStore.at(tmp_path / "dest")
    net = Peers(src)
    net.flip.add("evil")
    fetcher = _fetcher(dest, net, ["evil"])
    assert asyncio.run(fetcher.fetch(root)) is False
    assert not dest.has(root)
    # whatever the partial holds was verified: completing it from a good peer works
    fetcher2 = _fetcher(dest, net, ["good"])
    assert asyncio.run(fetcher2.fetch(root)) is True
    assert hash_file(dest.path(root)) == root


def test_fetch_resumes_after_an_interrupted_transfer(source, tmp_path):
    src, root = source
    dest = ObjectStore.at(tmp_path / "dest")
    net = Peers(src)
    net.fail_after["a"] = 1  # serves the first batch, then the connection breaks
    fetcher = _fetcher(dest, net, ["a"], concurrency=1, scores=PeerScores(backoff_s=0.01))
    assert asyncio.run(fetcher.fetch(root)) is False
    assert not dest.has(root)
    first = fetcher.stats.chunks
    assert first >= 1
    # "restart": a new store handle and fetcher over the same directory
    dest2 = ObjectStore.at(tmp_path / "dest")
    assert dest2.partials() == [root]
    fetcher2 = _fetcher(dest2, net, ["b"])
    assert asyncio.run(fetcher2.fetch(root)) is True
    assert fetcher2.stats.resumed_chunks == first
    assert fetcher2.stats.chunks == src.manifest(root).num_chunks - first
    assert hash_file(dest2.path(root)) == root


def test_peers_without_the_object_or_down_are_skipped(source, tmp_path):
    src, root = source
    dest = ObjectStore.at(tmp_path / "dest")
    net = Peers(src)
    net.missing.add("empty")
    net.down.add("dead")
    fetcher = _fetcher(dest, net, ["empty", "dead", "full"])
    assert asyncio.run(fetcher.fetch(root)) is True
    assert net.chunks_served.keys() == {"full"}


def test_concurrent_fetches_of_one_root_are_deduplicated(source, tmp_path):
    src, root = source
    dest = ObjectStore.at(tmp_path / "dest")
    net = Peers(src)
    fetcher = _fetcher(dest, net, ["a"])

    async def both():
        return await asyncio.gather(fetcher.fetch(root), fetcher.fetch(root))

    assert asyncio.run(both()) == [True, True]
    assert fetcher.stats.objects == 1


def test_small_chunks_are_batched_and_big_ones_travel_alone(source):
    src, root = source
    manifest = src.manifest(root)
    refs = [(e.name, i) for e in manifest.tensors for i in range(len(e.chunks))]
    batches = plan_batches(manifest, refs, 4 << 20)
    assert sorted(r for b in batches for r in b) == sorted(refs)
    # big#0 (4 MiB) alone; big#1 (1 MiB) and the 40 small tensors together
    assert [len(b) for b in batches] == [1, 41]
