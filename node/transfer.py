"""Verified object transfer between nodes: manifest first, then chunks from any peer.

Objects move separately from the CRDT index (DESIGN §6). When a node learns of a root it lacks
(a live contribution or a recipe's base), :class:`ObjectFetcher` fetches it:

1. **Manifest.** Ask peers (best score first) for ``GET /v1/replication/objects/{root}/manifest``
   and decode it with the wanted root (:meth:`Manifest.from_bytes` with ``expected_root``): the
   manifest must hash to the root we asked for, so nothing a peer says is trusted. A peer that
   answers 404 does not hold the object and is skipped for it.
2. **Resume.** :meth:`ObjectStore.begin_partial` starts, or resumes after a crash, a partial
   object whose bitmap says which chunks are already verified and fsynced on disk; only the
   missing chunks are fetched again.
3. **Chunks.** Missing chunks are grouped into batches of about ``batch_bytes`` (one 4 MiB chunk,
   or many small tensors' chunks: a model has hundreds of small tensors, and one request per
   tensor would be all overhead) and fetched by ``concurrency`` workers with
   ``POST /v1/replication/objects/{root}/chunks``. Each worker spreads its batches over the peers
   that hold the object. Every chunk is verified against its leaf
   (:meth:`PartialObject.write_chunk`) *before* it is written; a batch of the wrong length or a
   chunk that does not hash to its leaf penalises the peer that served it (it is not asked for
   this object again, and is avoided for ``penalty_s`` seconds for other objects) and the chunk
   goes back to the queue for another peer. A transport error or 5xx backs the peer off.
4. **Complete.** When every chunk is present, :meth:`PartialObject.complete` renames the object
   into place; only then does ``store.has(root)`` become true (so the node advertises and merges
   only complete objects), and ``on_complete(root)`` is called.

Nothing unverified ever reaches the store. Verified chunks are committed (data ``fdatasync``,
then their bitmap bytes, fsynced) every :data:`COMMIT_BYTES` and when the fetch ends, so a crash
refetches at most that much.
Fetches of the same root are deduplicated; :meth:`ObjectFetcher.ensure` starts background
fetches and returns at once (the gossip driver calls it after every join).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import inspect
import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgpack

from crdtmerge.errors import (
    CrdtMergeError,
    IntegrityError,
    InvalidInput,
    NotFound,
    RemoteProtocolError,
    TooLarge,
    Unauthorized,
    UnsupportedVersion,
)
from crdtmerge.identity import Manifest
from crdtmerge.store import ObjectStore, PartialObject

from .auth_cluster import RESPONSE_LIMIT, UNSIGNED_RESPONSE, ClusterAuth

__all__ = ["ChunkRef", "FetchStats", "ObjectFetcher", "PeerScores", "plan_batches"]

log = logging.getLogger(__name__)

ChunkRef = tuple[str, int]  # (tensor name, chunk index)

#: chunk-batch request format version (in the msgpack body)
CHUNKS_VERSION = 1
#: most chunks in one batch request (small tensors are one chunk each)
MAX_BATCH_CHUNKS = 1024
#: largest manifest read from a peer (a 100k-tensor, 1 TB model's is a few MiB)
MAX_MANIFEST_BYTES = 64 << 20


def plan_batches(
    manifest: Manifest, missing: Sequence[ChunkRef], batch_bytes: int
) -> list[list[ChunkRef]]:
    """Group missing chunks, in order, into batches of at most ``batch_bytes`` bytes (a chunk
    larger than that travels alone) and at most :data:`MAX_BATCH_CHUNKS` chunks."""
    batches: list[list[ChunkRef]] = []
    current: list[ChunkRef] = []
    size = 0
    for ref in missing:
        _, n = manifest.chunk_span(*ref)
        if current and (size + n > batch_bytes or len(current) >= MAX_BATCH_CHUNKS):
            batches.append(current)
            current, size = [], 0
        current.append(ref)
        size += n
    if current:
        batches.append(current)
    return batches


@dataclass
class _PeerState:
    failures: int = 0
    bad_bytes: int = 0
    backoff_until: float = 0.0  # after transport failures: wait before asking again
    penalty_until: float = 0.0  # after bad bytes: ask others first


class PeerScores:
    """Per-peer transfer health: backoff after failures, penalty after bad bytes."""

    def __init__(
        self, *, penalty_s: float = 30.0, backoff_s: float = 0.5, max_backoff_s: float = 10.0
    ) -> None:
        self.penalty_s = penalty_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._peers: dict[str, _PeerState] = {}

    def _get(self, peer: str) -> _PeerState:
        return self._peers.setdefault(peer, _PeerState())

    def ok(self, peer: str) -> None:
        self._get(peer).failures = 0

    def failed(self, peer: str, now: float) -> None:
        st = self._get(peer)
        st.failures += 1
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (st.failures - 1))
        st.backoff_until = max(st.backoff_until, now + delay)

    def served_bad_bytes(self, peer: str, now: float) -> None:
        st = self._get(peer)
        st.bad_bytes += 1
        st.penalty_until = max(st.penalty_until, now + self.penalty_s)

    def bad_bytes(self, peer: str) -> int:
        return self._get(peer).bad_bytes

    def ready_in(self, peers: Sequence[str], now: float) -> float:
        """Seconds until the first of ``peers`` is no longer avoided (0 if one is usable now)."""
        if not peers:
            return 0.0
        return max(0.0, min(self._get(p).backoff_until for p in peers) - now)

    def order(self, peers: Iterable[str], now: float) -> list[str]:
        """Peers to try, healthy first (fewest bad bytes, then fewest failures); peers that are
        backed off or penalised come last rather than never (they may be the only holders)."""
        return sorted(
            peers,
            key=lambda p: (
                self._get(p).penalty_until > now,
                self._get(p).backoff_until > now,
                self._get(p).bad_bytes,
                self._get(p).failures,
            ),
        )


@dataclass
class FetchStats:
    objects: int = 0
    chunks: int = 0
    bytes: int = 0
    bad_chunks: int = 0
    resumed_chunks: int = 0
    failures: int = 0
    seconds: float = 0.0
    bad_peers: dict[str, int] = field(default_factory=dict)


class _NoHolder(Exception):
    """No peer can serve this object right now."""


class _PeerFailed(Exception):
    """A transport error or a 5xx from one peer (not its fault necessarily: back off)."""


class _BadBytes(Exception):
    """A peer's answer failed a content check (length, encoding, a chunk's leaf)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _Connections:
    """Keep-alive ``http.client`` connections to peers, for the fetch threads.

    An idle connection is reused for :data:`IDLE_REUSE_S` at most: servers close idle
    keep-alive connections (uvicorn after 5 s), and a request on a connection the peer already
    closed fails for no fault of the peer. :meth:`close` shuts every socket down, so a thread
    blocked on a silent peer returns at once (with an error) instead of after the request
    timeout.
    """

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._idle: dict[str, list[tuple[http.client.HTTPConnection, float]]] = {}
        self._busy: set[http.client.HTTPConnection] = set()
        self._closed = False

    def take(self, peer: str, *, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to ``peer`` (a new one with ``fresh``) and whether it is reused."""
        stale = []
        with self._lock:
            if self._closed:
                raise _PeerFailed("the fetcher is closing")
            idle = [] if fresh else self._idle.get(peer, [])
            conn = None
            while idle and conn is None:
                candidate, since = idle.pop()
                if self.clock() - since <= IDLE_REUSE_S:
                    conn = candidate
                else:
                    stale.append(candidate)
            reused = conn is not None
            if conn is None:
                url = urlsplit(peer)
                cls = (
                    http.client.HTTPSConnection
                    if url.scheme == "https"
                    else http.client.HTTPConnection
                )
                conn = cls(url.hostname or "", url.port, timeout=self.timeout)
            self._busy.add(conn)
        for old in stale:
            old.close()
        return conn, reused

    def give(self, peer: str, conn: http.client.HTTPConnection, keep: bool) -> None:
        with self._lock:
            self._busy.discard(conn)
            if keep and not self._closed:
                self._idle.setdefault(peer, []).append((conn, self.clock()))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [*self._busy, *(c for idle in self._idle.values() for c, _ in idle)]
            self._idle.clear()
        for conn in conns:
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()


def _batch_request(batch: list[ChunkRef]) -> bytes:
    return msgpack.packb({"v": CHUNKS_VERSION, "chunks": [list(c) for c in batch]})


def _read_exact(resp: http.client.HTTPResponse, view: memoryview) -> None:
    """Fill ``view`` from the answer body; a shorter body is a transport failure."""
    pos = 0
    while pos < len(view):
        got = resp.readinto(view[pos:])
        if not got:
            raise _PeerFailed(f"answer ended after {pos} of {len(view)} bytes")
        pos += got


#: peers chunks of one object are fetched from (at most)
MAX_SOURCES = 3
#: consecutive failed requests after which a peer is not asked again during one fetch
MAX_STRIKES = 3
#: seconds to wait for one peer's manifest before asking the next (manifests are small and
#: served from disk; a black-holed peer must not hold a fetch for the whole request timeout)
MANIFEST_TIMEOUT_S = 5.0
#: verified bytes written between two commits (one ``fdatasync`` + bitmap fsync) of a partial
#: object: a crash refetches at most this much, and an object of this size pays one flush
COMMIT_BYTES = 256 << 20
#: seconds an idle keep-alive connection to a peer is reused (below uvicorn's 5 s)
IDLE_REUSE_S = 2.0


class ObjectFetcher:
    """Fetches missing objects from peers into the store (see the module docstring).

    Args:
        store: the node's object store.
        http: the shared outgoing client.
        peers: returns the current peer base URLs (no trailing slash).
        auth: the cluster ``httpx.Auth`` signing every request.
        on_complete: called (in the event loop) with each root that became complete.
        concurrency: batches in flight per object.
        batch_bytes: target bytes per chunk-batch request.
        commit_bytes: verified bytes written between two commits of a partial object.
        timeout: seconds per request.
        direct: fetch chunks from ``http(s)://`` peers over plain keep-alive sockets in
            ``concurrency`` threads, each chunk read straight into a reused buffer, verified and
            written, instead of through ``http`` (which the manifest and in-process transports
            keep using). A node talking to real peers sets it: the ``httpx`` path tops out
            well below the disk.
        manifest_timeout: seconds to wait for one peer's manifest before trying the next.
    """

    def __init__(
        self,
        store: ObjectStore,
        http: httpx.AsyncClient,
        peers: Callable[[], Sequence[str]],
        *,
        auth: httpx.Auth | None = None,
        on_complete: Callable[[bytes], Any] | None = None,
        concurrency: int = 4,
        batch_bytes: int = 32 << 20,
        commit_bytes: int = COMMIT_BYTES,
        timeout: float = 30.0,
        manifest_timeout: float = MANIFEST_TIMEOUT_S,
        scores: PeerScores | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        max_object_bytes: int | None = None,
        check_disk: Callable[[int], None] | None = None,
        direct: bool = False,
    ) -> None:
        self.store = store
        self.direct = direct
        self._connections = _Connections(timeout)
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self.max_object_bytes = max_object_bytes  # bigger manifests are refused (TooLarge)
        self.check_disk = check_disk  # raises StorageError when the object would not fit
        self.http = http
        self.peers = peers
        self.auth = auth
        self.on_complete = on_complete
        self.concurrency = concurrency
        self.batch_bytes = batch_bytes
        self.commit_bytes = commit_bytes
        self.timeout = timeout
        self.manifest_timeout = manifest_timeout
        self.scores = scores or PeerScores()
        self.clock = clock
        self.rng = rng or random.Random()
        self.stats = FetchStats()
        self._inflight: dict[bytes, asyncio.Task[bool]] = {}
        self._closed = False

    # -- public -----------------------------------------------------------------------------

    def ensure(
        self, roots: Iterable[bytes], prefer: Sequence[str] = ()
    ) -> list[asyncio.Task[bool]]:
        """Start a background fetch of every root the store lacks (deduplicated).

        ``prefer``: peer URLs to ask first (e.g. the peer whose state told us about the roots:
        it most likely holds them).
        """
        tasks = []
        for root in roots:
            if self._closed or self.store.has(root):
                continue
            task = self._inflight.get(root)
            if task is None:
                task = asyncio.create_task(
                    self._fetch_once(root, tuple(prefer)), name=f"fetch-{root.hex()[:12]}"
                )
                self._inflight[root] = task

                def forget(_t: asyncio.Task[bool], r: bytes = root) -> None:
                    self._inflight.pop(r, None)

                task.add_done_callback(forget)
            tasks.append(task)
        return tasks

    def fetching(self) -> list[bytes]:
        return list(self._inflight)

    async def fetch(self, root: bytes) -> bool:
        """Fetch ``root`` (or join the fetch already running); True when it is in the store."""
        tasks = self.ensure([root])
        if not tasks:
            return self.store.has(root)
        return await tasks[0]

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        self._connections.close()  # fetch threads blocked on a socket return now
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the algorithm ----------------------------------------------------------------------

    def _candidates(self, prefer: Sequence[str]) -> list[str]:
        """Peers to ask for an object: preferred ones first, then the others shuffled (so
        many nodes fetching the same object do not all ask the same peer first), healthy first."""
        peers = list(self.peers())
        first = [p for p in prefer if p in peers]
        rest = [p for p in peers if p not in first]
        self.rng.shuffle(rest)
        return first + self.scores.order(rest, self.clock())

    async def _fetch_once(self, root: bytes, prefer: Sequence[str] = ()) -> bool:
        t0 = self.clock()
        short = root.hex()[:12]
        try:
            manifest, holders = await self._manifest(root, self._candidates(prefer))
            if self.max_object_bytes is not None and manifest.total_bytes > self.max_object_bytes:
                raise TooLarge(
                    f"object {short} is {manifest.total_bytes} bytes; this node accepts at "
                    f"most {self.max_object_bytes}"
                )
            if self.check_disk is not None:
                self.check_disk(manifest.total_bytes)
            partial = await asyncio.to_thread(self.store.begin_partial, manifest)
            missing = partial.missing()
            self.stats.resumed_chunks += manifest.num_chunks - len(missing)
            if missing:
                await self._chunks(partial, missing, holders)
            await asyncio.to_thread(partial.complete)
        except _NoHolder as exc:
            self.stats.failures += 1
            log.info("object %s not fetched yet: %s", short, exc)
            return False
        except CrdtMergeError as exc:
            self.stats.failures += 1
            log.warning("object %s fetch failed: %s [%s]", short, exc.detail, exc.code)
            return False
        self.stats.objects += 1
        self.stats.seconds += self.clock() - t0
        log.info(
            "object %s fetched (%d chunks, %.2fs)", short, manifest.num_chunks, self.clock() - t0
        )
        if self.on_complete is not None:
            result = self.on_complete(root)
            if inspect.isawaitable(result):
                await result
        return True

    async def _manifest(self, root: bytes, peers: list[str]) -> tuple[Manifest, list[str]]:
        """The verified manifest from the first peer that has it, and the peers to fetch
        chunks from: that one, plus (for objects of several batches) the next candidates,
        unprobed: a peer without the object answers 404 to a chunk request and is dropped."""
        path = f"/v1/replication/objects/{root.hex()}/manifest"
        for i, peer in enumerate(peers):
            try:
                resp = await asyncio.wait_for(
                    self.http.get(
                        peer + path,
                        auth=self.auth,
                        timeout=self.timeout,
                        extensions={RESPONSE_LIMIT: MAX_MANIFEST_BYTES},
                    ),
                    min(self.timeout, self.manifest_timeout),
                )
            except (TooLarge, RemoteProtocolError) as exc:
                self._bad(peer, f"manifest of {root.hex()[:12]}: {exc.detail}")
                continue
            except (httpx.HTTPError, Unauthorized, TimeoutError) as exc:
                self.scores.failed(peer, self.clock())
                log.debug("manifest %s from %s: %r", root.hex()[:12], peer, exc)
                continue
            if resp.status_code == 404:
                continue  # the peer does not hold it (yet)
            if resp.status_code != 200:
                self.scores.failed(peer, self.clock())
                continue
            try:
                manifest = Manifest.from_bytes(resp.content, expected_root=root)
            except (IntegrityError, InvalidInput, UnsupportedVersion) as exc:
                self._bad(peer, f"manifest of {root.hex()[:12]}: {exc.detail}")
                continue
            self.scores.ok(peer)
            extra = MAX_SOURCES - 1 if manifest.total_bytes > self.batch_bytes else 0
            return manifest, [peer, *peers[i + 1 : i + 1 + extra]]
        raise _NoHolder("no reachable peer holds it")

    def _bad(self, peer: str, what: str) -> None:
        self.stats.bad_chunks += 1
        self.stats.bad_peers[peer] = self.stats.bad_peers.get(peer, 0) + 1
        self.scores.served_bad_bytes(peer, self.clock())
        log.warning("peer %s served bad bytes (%s); penalised", peer, what)

    async def _chunks(
        self, partial: PartialObject, missing: list[ChunkRef], holders: list[str]
    ) -> None:
        manifest = partial.manifest
        pending = deque(plan_batches(manifest, missing, self.batch_bytes))
        usable = list(holders)  # peers still allowed to serve this object
        max_attempts = 8 * len(pending) + 16
        attempts = 0
        inflight: dict[asyncio.Task[int], tuple[str, list[ChunkRef]]] = {}
        strikes: dict[str, int] = {}
        written_refs: list[ChunkRef] = []  # verified and written, not yet committed
        written_bytes = 0
        try:
            while pending or inflight:
                backoff = self.scores.ready_in(usable, self.clock())
                if backoff > 0 and not inflight and pending:
                    await asyncio.sleep(min(backoff, 2.0))  # every holder is backed off
                while pending and usable and len(inflight) < self.concurrency:
                    attempts += 1
                    if attempts > max_attempts:
                        raise _NoHolder(f"gave up after {attempts - 1} batch requests")
                    ordered = self.scores.order(usable, self.clock())
                    peer = ordered[attempts % len(ordered)]
                    batch = pending.popleft()
                    task = asyncio.create_task(self._batch(partial, peer, batch, usable))
                    inflight[task] = (peer, batch)
                if not inflight:
                    raise _NoHolder("every holder failed or served bad bytes")
                finished, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    peer, batch = inflight.pop(task)
                    try:
                        written = task.result()
                        strikes[peer] = 0
                    except _PeerFailed:
                        written = 0
                        strikes[peer] = strikes.get(peer, 0) + 1
                        if strikes[peer] >= MAX_STRIKES and peer in usable:
                            usable.remove(peer)
                    written_refs += batch[:written]
                    written_bytes += sum(manifest.chunk_span(*ref)[1] for ref in batch[:written])
                    if written_bytes >= self.commit_bytes:
                        await asyncio.to_thread(partial.commit, written_refs)
                        written_refs, written_bytes = [], 0
                    left = batch[written:]
                    if left:
                        pending.append(left)
        finally:
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            # what was verified is kept (a later fetch resumes after it), even on failure
            await asyncio.to_thread(partial.commit, written_refs)

    async def _batch(
        self,
        partial: PartialObject,
        peer: str,
        batch: list[ChunkRef],
        usable: list[str],
    ) -> int:
        """Fetch one batch from ``peer``; return how many of its leading chunks were written."""
        sizes = [partial.manifest.chunk_span(*ref)[1] for ref in batch]
        written: list[ChunkRef] = []
        try:
            if self._direct_to(peer):
                loop = asyncio.get_running_loop()
                status = await loop.run_in_executor(
                    self._executor(), self._receive_direct, partial, peer, batch, sizes, written
                )
            else:
                status = await self._receive_httpx(partial, peer, batch, sizes, written)
        except _BadBytes as exc:
            self._drop(peer, usable, exc.detail)
            status = 0
        except _PeerFailed as exc:
            self.scores.failed(peer, self.clock())
            log.debug("chunks from %s: %s", peer, exc)
            raise
        finally:
            self.stats.chunks += len(written)
            self.stats.bytes += sum(sizes[: len(written)])
        if status == 200:
            self.scores.ok(peer)
        elif status == 404:  # the peer does not hold it
            if peer in usable:
                usable.remove(peer)
        elif status == 429:  # the peer is busy serving: back off, no strike
            self.scores.failed(peer, self.clock())
        elif status:
            self.scores.failed(peer, self.clock())
            raise _PeerFailed(f"HTTP {status}")
        return len(written)

    def _direct_to(self, peer: str) -> bool:
        return self.direct and peer.startswith(("http://", "https://"))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="crdtmerge-fetch")
        return self._pool

    def _buffer(self, n: int) -> memoryview:
        """This thread's receive buffer, at least ``n`` bytes (reused across batches)."""
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = bytearray(n)
        return memoryview(buf)

    def _receive_direct(
        self,
        partial: PartialObject,
        peer: str,
        batch: list[ChunkRef],
        sizes: list[int],
        written: list[ChunkRef],
    ) -> int:
        """The batch over a plain keep-alive socket (blocking; runs in a fetch thread): each
        chunk is read into this thread's buffer, verified and written (committed later, see
        :data:`COMMIT_BYTES`). Returns the HTTP status."""
        root = partial.manifest.root
        body = _batch_request(batch)
        target = f"{urlsplit(peer).path.rstrip('/')}/v1/replication/objects/{root.hex()}/chunks"
        conn, resp = self._post(peer, target, body)
        keep = False
        try:
            if resp.status != 200:
                return resp.status
            encoding = (resp.getheader("content-encoding") or "identity").lower()
            if encoding != "identity":
                raise _BadBytes(f"chunk answer with content-encoding {encoding}")
            declared, expected = resp.getheader("content-length"), sum(sizes)
            if declared != str(expected):
                raise _BadBytes(f"batch of {declared or 'unknown'} bytes, expected {expected}")
            buf = self._buffer(max(sizes))
            for ref, n in zip(batch, sizes, strict=True):
                view = buf[:n]
                try:
                    _read_exact(resp, view)
                except (OSError, http.client.HTTPException) as exc:
                    raise _PeerFailed(f"chunks of {root.hex()[:12]}: {exc!r}") from exc
                self._write(partial, ref, view)
                written.append(ref)
            keep = True
            return 200
        finally:
            self._connections.give(peer, conn, keep)

    def _post(
        self, peer: str, target: str, body: bytes
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the signed request; a reused connection that fails before the answer starts
        (the peer closed it while idle) is replaced by a new one, once (signed afresh: the
        peer would refuse a repeated nonce)."""
        for fresh in (False, True):
            headers = {"content-type": "application/msgpack"}
            if isinstance(self.auth, ClusterAuth):
                headers.update(self.auth.key.sign_request("POST", target, body, self.auth.node))
            conn, reused = self._connections.take(peer, fresh=fresh)
            try:
                conn.request("POST", target, body=body, headers=headers)
                return conn, conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._connections.give(peer, conn, keep=False)
                if not reused:
                    raise _PeerFailed(f"{target}: {exc!r}") from exc
        raise AssertionError("unreachable: a fresh connection is never reused")

    async def _receive_httpx(
        self,
        partial: PartialObject,
        peer: str,
        batch: list[ChunkRef],
        sizes: list[int],
        written: list[ChunkRef],
    ) -> int:
        """The batch through the shared ``httpx`` client (in-process transports, tests)."""
        root = partial.manifest.root
        try:
            resp = await self.http.post(
                f"{peer}/v1/replication/objects/{root.hex()}/chunks",
                content=_batch_request(batch),
                # httpx's post() leaves None out of `auth`'s type; request() (which post() calls)
                # takes it: None sends no auth, not the client's default
                auth=self.auth,  # type: ignore[arg-type]
                timeout=self.timeout,
                headers={"content-type": "application/msgpack"},
                # more than the batch is wrong: never read it
                extensions={RESPONSE_LIMIT: sum(sizes), UNSIGNED_RESPONSE: True},
            )
        except (TooLarge, RemoteProtocolError) as exc:
            raise _BadBytes(exc.detail) from exc
        except httpx.HTTPError as exc:
            raise _PeerFailed(f"chunks of {root.hex()[:12]}: {exc!r}") from exc
        if resp.status_code != 200:
            return resp.status_code
        data = resp.content
        if len(data) != sum(sizes):
            raise _BadBytes(f"batch of {len(data)} bytes, expected {sum(sizes)}")

        def store() -> None:
            pos = 0
            view = memoryview(data)
            for ref, n in zip(batch, sizes, strict=True):
                self._write(partial, ref, view[pos : pos + n])
                written.append(ref)
                pos += n

        await asyncio.to_thread(store)
        return 200

    @staticmethod
    def _write(partial: PartialObject, ref: ChunkRef, data: memoryview) -> None:
        """Verify and write one chunk (not yet durable: the batch commits together). No lock:
        chunks and bitmap bytes live at distinct offsets (pwrite), so batches run in parallel."""
        try:
            partial.write_chunk(ref[0], ref[1], data, durable=False)
        except IntegrityError as exc:
            raise _BadBytes(exc.detail) from exc
        except NotFound as exc:
            raise RemoteProtocolError(f"chunk plan does not match manifest: {exc}") from exc

    def _drop(self, peer: str, usable: list[str], what: str) -> None:
        self._bad(peer, what)
        if peer in usable:
            usable.remove(peer)
