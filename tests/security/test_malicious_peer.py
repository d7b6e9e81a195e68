"""A malicious cluster member serving objects cannot make a replica store bad data or run it
out of memory: wrong bytes for a root, a manifest for another root, an oversized or endless
manifest, an endless or compressed chunk stream, an object over the size limit or the disk
reserve. Answers are cluster-signed here (the peer knows the secret), so only the content
checks stand between it and the store."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import httpx
import msgpack
import numpy as np
import pytest
from safetensors.numpy import save_file

import node.transfer as transfer
from crdtmerge.errors import StorageError
from crdtmerge.store import ObjectStore, hash_file
from node.auth_cluster import HEADER_AUTH, HEADER_SIGNATURE, ClusterAuth, ClusterKey
from node.routes.replication import read_chunks
from node.transfer import ObjectFetcher

KEY = ClusterKey("a-cluster-secret-for-tests-0123")


class Endless(httpx.AsyncByteStream):
    """An answer that never ends; counts what was pulled from it."""

    def __init__(self) -> None:
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            self.pulled += 1 << 16
            yield b"\0" * (1 << 16)


def _signed(request: httpx.Request, content: bytes, **kw) -> httpx.Response:
    nonce = request.headers[HEADER_AUTH].split(" ")[3]
    mac = KEY.response_mac(nonce, 200, content)
    return httpx.Response(200, content=content, headers={HEADER_SIGNATURE: mac, **kw})


class Cluster:
    """Hosts serving one store; ``behaviour[host]`` makes a host misbehave."""

    def __init__(self, store: ObjectStore, other_root: bytes) -> None:
        self.store = store
        self.other_root = other_root
        self.behaviour: dict[str, str] = {}
        self.endless: dict[str, Endless] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        how = self.behaviour.get(host, "good")
        root = bytes.fromhex(request.url.path.split("/")[4])
        if request.url.path.endswith("/manifest"):
            if how == "endless-manifest":
                self.endless[host] = stream = Endless()
                return httpx.Response(200, stream=stream)
            if how == "other-manifest":
                return _signed(request, self.store.manifest(self.other_root).to_bytes())
            return _signed(request, self.store.manifest(root).to_bytes())
        refs = [tuple(c) for c in msgpack.unpackb(request.content)["chunks"]]
        data = read_chunks(self.store, root, refs)
        if how == "endless-chunks":
            self.endless[host] = stream = Endless()
            return httpx.Response(200, stream=stream)
        if how == "wrong-bytes":
            data = bytes(len(data))
        if how == "longer":
            data += b"\0" * 4096
        if how == "gzip":
            return _signed(request, gzip.compress(data), **{"content-encoding": "gzip"})
        return _signed(request, data)


def _object(store: ObjectStore, tmp, seed: int) -> bytes:
    rng = np.random.Generator(np.random.PCG64(seed))
    path = tmp / f"o{seed}.safetensors"
    save_file({"w": rng.standard_normal((300_000,), dtype=np.float32)}, str(path))
    return store.ingest(path)[0]


@pytest.fixture
def cluster(tmp_path):
    src = ObjectStore.at(tmp_path / "src")
    root = _object(src, tmp_path, 1)
    return Cluster(src, _object(src, tmp_path, 2)), root


def _fetch(
    tmp_path, cluster: Cluster, root: bytes, hosts: list[str], attempts: int = 2, **kw
) -> tuple:
    dest = ObjectStore.at(tmp_path / "dest")
    http = httpx.AsyncClient(transport=httpx.MockTransport(cluster.handler))
    fetcher = ObjectFetcher(
        dest,
        http,
        lambda: [f"http://{h}" for h in hosts],
        auth=ClusterAuth(KEY, "me"),
        concurrency=1,
        **kw,
    )
    fetcher.rng.seed(0)

    async def run() -> bool:
        # a failed attempt is retried (as the gossip driver does); a penalised peer goes last
        for _ in range(attempts):
            if await fetcher.fetch(root):
                return True
        return False

    return asyncio.run(run()), dest, fetcher


@pytest.mark.parametrize("how", ["wrong-bytes", "longer", "endless-chunks", "gzip"])
def test_bad_chunk_answers_are_never_stored_and_the_peer_is_dropped(cluster, tmp_path, how):
    net, root = cluster
    net.behaviour["evil"] = how
    ok, dest, fetcher = _fetch(tmp_path, net, root, ["evil", "good"])
    assert ok and hash_file(dest.path(root)) == root
    if fetcher.stats.bad_peers:  # the evil peer was asked (order is shuffled) and dropped
        assert set(fetcher.stats.bad_peers) == {"http://evil"}
    # an endless answer is cut off after about one batch, not read forever
    if "evil" in net.endless:
        assert net.endless["evil"].pulled <= 2 * (4 << 20) + (1 << 16)


@pytest.mark.parametrize("how", ["wrong-bytes", "endless-chunks", "other-manifest"])
def test_a_lone_malicious_peer_leaves_nothing_visible(cluster, tmp_path, how):
    net, root = cluster
    net.behaviour["evil"] = how
    ok, dest, _ = _fetch(tmp_path, net, root, ["evil"])
    assert not ok and not dest.has(root) and dest.list() == []


def test_an_endless_manifest_is_cut_off(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "MAX_MANIFEST_BYTES", 1 << 20)
    net, root = cluster
    net.behaviour["evil"] = "endless-manifest"
    ok, dest, fetcher = _fetch(tmp_path, net, root, ["evil"])
    assert not ok and dest.list() == []
    assert net.endless["evil"].pulled <= (1 << 20) + (1 << 16)
    assert set(fetcher.stats.bad_peers) == {"http://evil"}  # once per attempt
    # with an honest holder as well, the object still arrives
    ok, dest, _ = _fetch(tmp_path, net, root, ["evil", "good"])
    assert ok and hash_file(dest.path(root)) == root


def test_objects_over_the_size_limit_or_the_disk_reserve_are_not_fetched(cluster, tmp_path):
    net, root = cluster
    size = net.store.manifest(root).total_bytes
    ok, dest, _ = _fetch(tmp_path, net, root, ["good"], max_object_bytes=size - 1)
    assert not ok and dest.list() == [] and dest.partials() == []

    def no_space(n: int) -> None:
        raise StorageError(f"{n} bytes would not fit", code="insufficient_storage")

    ok, dest, _ = _fetch(tmp_path, net, root, ["good"], check_disk=no_space)
    assert not ok and dest.list() == [] and dest.partials() == []


def test_an_endless_gossip_answer_is_cut_off_and_counts_as_a_failed_send(tmp_path, monkeypatch):
    import warnings

    import node.auth_cluster as auth_cluster
    from node.app import create_app
    from node.settings import Settings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    monkeypatch.setattr(auth_cluster, "MAX_RESPONSE_BYTES", 1 << 20)
    endless = Endless()
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, stream=endless))
    )
    settings = Settings(
        data_dir=tmp_path / "n",
        cluster_secret="a-cluster-secret-for-tests-0123",
        extra={"gossip_loop": False},
    ).validated()
    with TestClient(create_app(settings, http=http)) as client:
        rep = client.app.state.replication  # type: ignore[attr-defined]
        rep.directory.learn("evil", "http://evil", configured=True)
        rep._sync_core_peers()
        before = rep.runtime.replica.state.state_hash()
        client.portal.call(rep.round)
        client.portal.call(rep.quiesce)
        assert rep.runtime.replica.counters.get("send_failures") == 1
        assert rep.runtime.replica.state.state_hash() == before
        assert endless.pulled <= (1 << 20) + (1 << 16)
