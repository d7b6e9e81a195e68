"""The socket fetch path (``ObjectFetcher(direct=True)``, what a node uses against real peers)
against misbehaving peers on real TCP sockets: wrong bytes, a longer, compressed, truncated,
endless or missing answer. Nothing unverified is stored; the object comes from the honest peer;
a silent peer neither holds a fetch past the request timeout nor blocks shutdown."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import msgpack
import numpy as np
import pytest
from safetensors.numpy import save_file

from crdtmerge.store import ObjectStore, hash_file
from node.auth_cluster import HEADER_AUTH, HEADER_SIGNATURE, ClusterAuth, ClusterKey
from node.routes.replication import read_chunks
from node.transfer import ObjectFetcher

KEY = ClusterKey("a-cluster-secret-for-tests-0123")


class Peer(ThreadingHTTPServer):
    """A peer on loopback serving one store's manifests and chunk batches, honestly or not."""

    daemon_threads = True

    def __init__(self, store: ObjectStore, behaviour: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store = store
        self.behaviour = behaviour
        self.chunk_requests = 0
        self.release = threading.Event()  # ends a "silent" answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Peer

    def log_message(self, *args: object) -> None:
        pass

    def _root(self) -> bytes:
        return bytes.fromhex(self.path.split("/")[4])

    def _answer(self, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        for k, v in {"content-length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # the manifest, signed as a cluster member would
        body = self.server.store.manifest(self._root()).to_bytes()
        nonce = self.headers[HEADER_AUTH].split(" ")[3]
        self._answer(body, {HEADER_SIGNATURE: KEY.response_mac(nonce, 200, body)})

    def do_POST(self) -> None:
        request = self.rfile.read(int(self.headers["content-length"]))
        refs = [tuple(c) for c in msgpack.unpackb(request)["chunks"]]
        data = read_chunks(self.server.store, self._root(), refs)
        self.server.chunk_requests += 1
        how = self.server.behaviour
        if how == "wrong-bytes":
            self._answer(bytes(len(data)))
        elif how == "longer":
            self._answer(data + bytes(4096))
        elif how == "gzip":
            self._answer(gzip.compress(data), {"content-encoding": "gzip"})
        elif how == "truncated":
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
        elif how == "endless":  # no length: the body would run until the peer hangs up
            self.send_response(200)
            self.send_header("connection", "close")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(bytes(1 << 16))
            except OSError:
                self.close_connection = True
        elif how == "drops-idle":  # closes after each answer without saying so (idle timeout)
            self._answer(data)
            self.close_connection = True
        elif how == "silent":
            self.server.release.wait(30)
            self.close_connection = True
        else:
            self._answer(data)


@pytest.fixture
def source(tmp_path) -> tuple[ObjectStore, bytes]:
    store = ObjectStore.at(tmp_path / "src")
    rng = np.random.Generator(np.random.PCG64(1))
    path = tmp_path / "o.safetensors"
    # two 4 MiB chunks and a tail: several batches at 4 MiB
    save_file({"w": rng.standard_normal((2_300_000,), dtype=np.float32)}, str(path))
    return store, store.ingest(path)[0]


def _serve(store: ObjectStore, behaviour: str) -> Iterator[Peer]:
    peer = Peer(store, behaviour)
    thread = threading.Thread(target=peer.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        peer.release.set()
        peer.shutdown()
        peer.server_close()


@pytest.fixture
def peers(source):
    store, _ = source
    made: list[Iterator[Peer]] = []

    def make(behaviour: str) -> Peer:
        gen = _serve(store, behaviour)
        made.append(gen)
        return next(gen)

    yield make
    for gen in made:
        gen.close()


def _fetcher(dest: ObjectStore, urls: list[str], **kw) -> ObjectFetcher:
    return ObjectFetcher(
        dest,
        httpx.AsyncClient(timeout=10),
        lambda: urls,
        auth=ClusterAuth(KEY, "me"),
        direct=True,
        concurrency=1,
        batch_bytes=4 << 20,
        **kw,
    )


def _fetch(fetcher: ObjectFetcher, root: bytes, attempts: int = 3) -> bool:
    async def run() -> bool:
        try:
            for _ in range(attempts):  # the gossip driver retries failed fetches
                if await fetcher.fetch(root):
                    return True
            return False
        finally:
            await fetcher.close()

    return asyncio.run(run())


def test_honest_peer_over_sockets(source, peers, tmp_path):
    _, root = source
    good = peers("good")
    dest = ObjectStore.at(tmp_path / "dest")
    fetcher = _fetcher(dest, [good.url])
    assert _fetch(fetcher, root)
    assert hash_file(dest.path(root)) == root
    assert good.chunk_requests == 3  # 4 MiB + 4 MiB + tail (and one connection reused)
    assert fetcher.stats.bad_peers == {} and dest.partials() == []


def test_a_keep_alive_connection_the_peer_closed_is_replaced_without_blame(source, peers, tmp_path):
    _, root = source
    peer = peers("drops-idle")
    dest = ObjectStore.at(tmp_path / "dest")
    fetcher = _fetcher(dest, [peer.url])
    failures: list[str] = []
    fetcher.scores.failed = lambda p, now: failures.append(p)  # type: ignore[method-assign]
    assert _fetch(fetcher, root, attempts=1)
    assert hash_file(dest.path(root)) == root
    assert peer.chunk_requests == 3
    assert failures == []  # no request failed: the peer was never backed off


@pytest.mark.parametrize(
    ("how", "bad"),
    [
        ("wrong-bytes", True),
        ("longer", True),
        ("gzip", True),
        ("endless", True),
        ("truncated", False),  # a transport failure: backed off, not blamed
    ],
)
def test_bad_answers_never_reach_the_store(source, peers, tmp_path, how, bad):
    _, root = source
    evil, good = peers(how), peers("good")
    dest = ObjectStore.at(tmp_path / "dest")
    fetcher = _fetcher(dest, [evil.url])
    assert not _fetch(fetcher, root, attempts=1)
    assert not dest.has(root) and dest.list() == []
    assert evil.chunk_requests >= 1
    assert (evil.url in fetcher.stats.bad_peers) is bad
    # what the partial holds was verified: an honest peer completes it
    fetcher = _fetcher(dest, [evil.url, good.url])
    assert _fetch(fetcher, root)
    assert hash_file(dest.path(root)) == root


def test_a_silent_peer_times_out_and_another_serves(source, peers, tmp_path):
    _, root = source
    silent, good = peers("silent"), peers("good")
    dest = ObjectStore.at(tmp_path / "dest")
    fetcher = _fetcher(dest, [silent.url, good.url], timeout=0.5)
    fetcher.rng.seed(3)
    assert _fetch(fetcher, root)
    assert hash_file(dest.path(root)) == root


def test_closing_the_fetcher_unblocks_a_request_to_a_silent_peer(source, peers, tmp_path):
    _, root = source
    silent = peers("silent")
    dest = ObjectStore.at(tmp_path / "dest")
    fetcher = _fetcher(dest, [silent.url], timeout=30)

    async def run() -> float:
        task = asyncio.ensure_future(fetcher.fetch(root))
        deadline = time.monotonic() + 10
        while silent.chunk_requests == 0:  # the chunk request is in flight
            assert time.monotonic() < deadline, "the chunk request never arrived"
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await fetcher.close()
        assert task.done()
        # the blocked fetch thread itself returns (its socket was shut down), long before the
        # 30 s request timeout or the peer's own 30 s silence
        while any(t.name.startswith("crdtmerge-fetch") for t in threading.enumerate()):
            assert time.monotonic() - t0 < 5.0, "a fetch thread is still blocked"
            await asyncio.sleep(0.01)
        return time.monotonic() - t0

    assert asyncio.run(run()) < 5.0
    assert not dest.has(root)
