"""The anti-entropy driver: runs the replica core's replication effects over HTTP.

The sans-I/O core (:class:`crdtmerge.replica.Replica`) decides *what* to say and to whom; this
module only moves bytes. It never re-implements a rule of the core:

- **Timer.** Every ``gossip_interval_s`` (±10 % jitter, so nodes do not tick in lockstep) the
  driver feeds ``Tick(now, rng)`` to the core through the runtime; the core picks one peer
  (round-robin over a shuffled order, skipping peers in backoff) and returns
  ``Send(peer, DigestMessage)``.
- **Sends.** Each ``Send(peer, message)`` becomes ``POST /v1/replication/messages`` (msgpack,
  :mod:`crdtmerge.wire`, HMAC-signed) to the peer's URL, in its own task: nothing waits on a
  slow or dead peer. The answer carries the messages the peer's core addressed back to us (its
  digest, or an index of the documents that differ); each is fed to our core as
  ``MessageReceived``, whose effects may send again (the last half of push-pull). A failed POST
  is fed back as ``SendFailed`` (the core backs that peer off).
- **Receiving.** The route hands the decoded message to :meth:`Replication.handle_message`;
  the core's effects run in order (``Persist`` is fsynced before anything is answered), and the
  ``Send`` effects addressed to the caller are captured (a context variable) and returned in
  the HTTP answer instead of opening a connection back.
- **Objects.** ``FetchObjects`` effects go to the :class:`~node.transfer.ObjectFetcher`; when an
  object completes, the runtime is told (``ObjectStored``). Each round also re-offers the roots
  still missing, so a fetch that found no holder is retried (with the fetcher's backoff).
- **Peers.** The core knows peers by replica id; configuration gives URLs. ``POST
  /v1/replication/hello`` exchanges ``(replica id, advertised URL, known peers)``: configured
  URLs learn their ids, and with peer exchange on, peers of peers are added (a configured URL
  always wins over a learned one for the same id). Unreachable configured URLs are retried with
  backoff; every 10th round one known peer is asked again, so membership keeps spreading.

:meth:`Replication.round` runs one tick without the timer and :meth:`Replication.quiesce`
waits (bounded) until every send it caused has finished, so the in-process simulation counts
rounds exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import msgpack

from crdtmerge.errors import (
    CrdtMergeError,
    RemoteProtocolError,
    TooLarge,
    Unauthorized,
    UnsupportedVersion,
)
from crdtmerge.replica import FetchObjects, MessageReceived, Send, SendFailed, Tick
from crdtmerge.wire import Message, decode, encode

from .auth_cluster import ClusterAuth, ClusterKey, RequestVerifier
from .transfer import ObjectFetcher

if TYPE_CHECKING:
    from .runtime import NodeRuntime
    from .settings import Settings

__all__ = ["HELLO_VERSION", "PeerDirectory", "Replication"]

log = logging.getLogger(__name__)

HELLO_VERSION = 1
MSGPACK = "application/msgpack"
#: every this many rounds, one known peer is asked for its peers again
EXCHANGE_EVERY = 10

# the peer whose message the core is handling (a hint for where missing objects are)
_current_peer: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "crdtmerge_current_peer", default=None
)
# (peer id, captured messages) while the core handles a message received over HTTP
_reply_capture: contextvars.ContextVar[tuple[str, list[Message]] | None] = contextvars.ContextVar(
    "crdtmerge_reply_capture", default=None
)


@dataclass
class _UrlState:
    failures: int = 0
    next_try: float = float("-inf")


class PeerDirectory:
    """Replica id <-> URL, from configuration and peer exchange."""

    def __init__(self, configured: tuple[str, ...], own_url: str | None) -> None:
        self.configured = tuple(u.rstrip("/") for u in configured)
        self.own_url = own_url.rstrip("/") if own_url else None
        self.by_id: dict[str, str] = {}
        self.learned: set[str] = set()  # ids whose URL came from peer exchange
        self.url_state: dict[str, _UrlState] = {}
        self.self_urls: set[str] = set()  # configured URLs that turned out to be this node

    def url(self, peer_id: str) -> str | None:
        return self.by_id.get(peer_id)

    def ids(self) -> list[str]:
        return sorted(self.by_id)

    def urls(self) -> list[str]:
        return [self.by_id[i] for i in sorted(self.by_id)]

    def unknown_configured(self) -> list[str]:
        known = set(self.by_id.values()) | self.self_urls
        return [u for u in self.configured if u not in known]

    def learn(self, peer_id: str, url: str, *, configured: bool) -> bool:
        """Record ``peer_id`` at ``url``; True if the directory changed."""
        url = url.rstrip("/")
        current = self.by_id.get(peer_id)
        if current == url:
            if configured:
                self.learned.discard(peer_id)
            return False
        if current is not None and not configured and peer_id not in self.learned:
            return False  # a configured URL always wins over a learned one
        self.by_id[peer_id] = url
        if configured:
            self.learned.discard(peer_id)
        else:
            self.learned.add(peer_id)
        return True

    def failed(self, url: str, now: float, base: float, cap: float = 30.0) -> None:
        st = self.url_state.setdefault(url, _UrlState())
        st.failures += 1
        st.next_try = now + min(cap, base * 2 ** (st.failures - 1))

    def ok(self, url: str) -> None:
        self.url_state[url] = _UrlState()

    def due(self, url: str, now: float) -> bool:
        return self.url_state.get(url, _UrlState()).next_try <= now


class Replication:
    """The replication side of one node: auth, peer directory, gossip loop, object fetcher.

    Args:
        runtime: the started node runtime (core, store, HTTP client).
        settings: the node's settings (cluster secret, peers, interval, peer exchange).
        rng: randomness for the core's peer shuffle and the timer jitter.
        clock: a monotonic clock.
    """

    def __init__(
        self,
        runtime: NodeRuntime,
        settings: Settings,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.rng = rng or random.Random()
        self.clock = clock
        self.interval = settings.gossip_interval_s
        self.peer_exchange = bool(getattr(settings, "peer_exchange", True))
        secret = settings.cluster_secret
        self.key = ClusterKey(secret) if secret else None
        self.verifier = RequestVerifier(self.key) if self.key is not None else None
        self.auth = ClusterAuth(self.key, runtime.replica_id) if self.key is not None else None
        own = settings.advertise_url or f"http://{settings.host}:{settings.port}"
        self.directory = PeerDirectory(tuple(settings.peers), own)
        self.timeout = httpx.Timeout(
            max(2.0, 10 * self.interval), connect=max(1.0, 5 * self.interval)
        )
        self.fetcher = ObjectFetcher(
            runtime.store,
            runtime.http,
            self.directory.urls,
            auth=self.auth,
            on_complete=self._object_complete,
            timeout=30.0,
            rng=self.rng,
            max_object_bytes=settings.max_body_bytes,
            check_disk=runtime.check_disk,
            direct=runtime.owns_http,
            batch_bytes=settings.fetch_batch_bytes,
            commit_bytes=settings.fetch_commit_bytes,
        )
        self.rounds = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._fetch_retry: dict[bytes, tuple[int, float]] = {}
        self._stopped = False
        if self.key is not None:
            runtime.on_send(self._on_send)
            runtime.on_fetch(self._on_fetch)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.key is not None

    async def start(self, *, loop: bool = True) -> None:
        """Start the gossip timer (unless ``loop`` is False: rounds are then driven by hand)."""
        if not self.enabled:
            if self.settings.peers:
                log.warning("peers are configured but no cluster secret: replication is off")
            return
        if loop and self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="crdtmerge-gossip")
        log.info(
            "replication on: %d configured peer(s), interval %.2fs, peer exchange %s",
            len(self.directory.configured),
            self.interval,
            "on" if self.peer_exchange else "off",
        )

    async def stop(self) -> None:
        self._stopped = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.fetcher.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except CrdtMergeError as exc:
                log.warning("gossip round failed: %s [%s]", exc.detail, exc.code)
            except Exception:
                log.exception("gossip round crashed")
            # the timer itself (not a synchronisation): next round after one interval
            await asyncio.sleep(self.interval * self.rng.uniform(0.9, 1.1))

    # -- one round --------------------------------------------------------------------------

    async def round(self) -> None:
        """Discover peers, tick the core once, re-offer missing objects to the fetcher."""
        now = self.clock()
        self.rounds += 1
        await self._discover(now)
        self._sync_core_peers()
        await self.runtime.handle(Tick(self.core_now(), self.rng.getrandbits(63)))
        await self._retry_fetches(now)

    def core_now(self) -> float:
        """Time as the core sees it: in gossip intervals, so its peer backoff (1 unit,
        doubling, capped at 60) scales with the interval: 1 s..60 s at the default 1 s."""
        return self.clock() / self.interval

    async def quiesce(self, timeout: float = 30.0) -> None:
        """Wait until every send and hello this node started has finished (bounded)."""
        deadline = time.monotonic() + timeout
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(self._tasks)} replication task(s) still running")
            await asyncio.wait(list(self._tasks), timeout=remaining)

    def _spawn(self, coro: Any, name: str) -> None:
        if self._stopped:
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- peers ------------------------------------------------------------------------------

    def _sync_core_peers(self) -> None:
        ids = [i for i in self.directory.ids() if i != self.runtime.replica_id]
        if ids != self.runtime.replica.peers.peers():
            self.runtime.replica.peers.set_peers(ids)

    def _hello_body(self) -> bytes:
        peers = (
            [[i, u] for i, u in sorted(self.directory.by_id.items())] if self.peer_exchange else []
        )
        return msgpack.packb(
            {
                "v": HELLO_VERSION,
                "id": self.runtime.replica_id,
                "url": self.directory.own_url,
                "peers": peers,
            }
        )

    def parse_hello(self, body: bytes) -> tuple[str, str | None, list[tuple[str, str]]]:
        try:
            obj = msgpack.unpackb(body, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"hello is not msgpack: {exc}") from exc
        if not isinstance(obj, dict) or set(obj) != {"v", "id", "url", "peers"}:
            raise RemoteProtocolError("hello must be {v, id, url, peers}")
        if obj["v"] != HELLO_VERSION:
            raise UnsupportedVersion(
                f"hello version {obj['v']!r}; this node speaks {HELLO_VERSION}"
            )
        pid, url, peers = obj["id"], obj["url"], obj["peers"]
        if not isinstance(pid, str) or not pid or len(pid) > 255:
            raise RemoteProtocolError("hello id must be a replica id")
        if url is not None and (
            not isinstance(url, str) or not url.startswith(("http://", "https://"))
        ):
            raise RemoteProtocolError("hello url must be an http(s) URL or null")
        if not isinstance(peers, list) or len(peers) > 10_000:
            raise RemoteProtocolError("hello peers must be a list of [id, url]")
        out = []
        for item in peers:
            if (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], str)
                and item[1].startswith(("http://", "https://"))
            ):
                out.append((item[0], item[1]))
        return pid, url, out

    def _learn_exchanged(self, peers: list[tuple[str, str]]) -> None:
        if not self.peer_exchange:
            return
        for pid, url in peers:
            if pid != self.runtime.replica_id and self.directory.learn(pid, url, configured=False):
                log.info("learned peer %s at %s by peer exchange", pid, url)

    async def _discover(self, now: float) -> None:
        targets = [u for u in self.directory.unknown_configured() if self.directory.due(u, now)]
        if self.peer_exchange and self.rounds % EXCHANGE_EVERY == 0 and self.directory.by_id:
            targets.append(self.rng.choice(self.directory.urls()))
        if targets:
            await asyncio.gather(*(self._hello(u, now) for u in targets))

    async def _exchange(self, url: str, path: str, body: bytes, what: str) -> bytes:
        """POST a signed msgpack body to a peer; count the bytes; the answer's body.

        Raises:
            httpx.HTTPError: the request failed.
            RemoteProtocolError: the peer answered anything but 200.
        """
        resp = await self.runtime.http.post(
            f"{url}{path}",
            content=body,
            # httpx's post() leaves None out of `auth`'s type; request() (which post() calls)
            # takes it: None sends no auth, not the client's default
            auth=self.auth,  # type: ignore[arg-type]
            timeout=self.timeout,
            headers={"content-type": MSGPACK},
        )
        self.bytes_sent += len(body)
        if resp.status_code != 200:
            raise RemoteProtocolError(f"{what} answered HTTP {resp.status_code}: {resp.text[:200]}")
        self.bytes_received += len(resp.content)
        return resp.content

    async def _hello(self, url: str, now: float) -> None:
        body = self._hello_body()
        try:
            answer = await self._exchange(url, "/v1/replication/hello", body, "hello")
            pid, _their_url, peers = self.parse_hello(answer)
        except (httpx.HTTPError, CrdtMergeError) as exc:
            self.directory.failed(url, now, self.interval)
            log.debug("hello to %s failed: %s", url, exc)
            return
        self.directory.ok(url)
        if pid == self.runtime.replica_id:
            self.directory.self_urls.add(url)
            return
        configured = url in self.directory.configured
        if self.directory.learn(pid, url, configured=configured):
            log.info("peer %s is at %s", pid, url)
        self._learn_exchanged(peers)
        self._sync_core_peers()

    async def handle_hello(self, body: bytes, peer: str) -> bytes:
        """A peer introduced itself; answer with our id, URL and known peers."""
        pid, url, peers = self.parse_hello(body)
        if pid != peer:
            raise RemoteProtocolError(f"hello from {peer!r} claims to be from {pid!r}")
        if (
            url is not None
            and self.peer_exchange
            and pid != self.runtime.replica_id
            and self.directory.learn(pid, url, configured=False)
        ):
            log.info("learned peer %s at %s (it said hello)", pid, url)
        self._learn_exchanged(peers)
        self._sync_core_peers()
        return self._hello_body()

    # -- messages ---------------------------------------------------------------------------

    def _on_send(self, effect: Send) -> None:
        capture = _reply_capture.get()
        if capture is not None and capture[0] == effect.peer:
            capture[1].append(effect.message)  # goes back in the HTTP answer
            return
        self._spawn(self._post(effect.peer, effect.message), f"send-{effect.peer}")

    async def _post(self, peer: str, message: Message) -> None:
        url = self.directory.url(peer)
        if url is None:
            await self.runtime.handle(SendFailed(peer, self.core_now()))
            return
        body = encode(message)
        try:
            answer = await self._exchange(url, "/v1/replication/messages", body, url)
            replies = self._decode_replies(answer)
        except (
            httpx.HTTPError,
            Unauthorized,
            RemoteProtocolError,
            UnsupportedVersion,
            TooLarge,  # an oversized or endless answer, cut off by ClusterAuth
        ) as exc:
            log.debug("send to %s (%s) failed: %s", peer, url, exc)
            await self.runtime.handle(SendFailed(peer, self.core_now()))
            return
        token = _current_peer.set(peer)
        try:
            for reply in replies:
                await self.runtime.handle(MessageReceived(peer, reply))
        except (RemoteProtocolError, UnsupportedVersion) as exc:
            log.warning("bad reply from %s: %s", peer, exc.detail)
            await self.runtime.handle(SendFailed(peer, self.core_now()))
        except CrdtMergeError as exc:  # e.g. a Persist failed: nothing was acknowledged
            log.error("joining the reply from %s failed: %s [%s]", peer, exc.detail, exc.code)
        finally:
            _current_peer.reset(token)

    @staticmethod
    def _decode_replies(data: bytes) -> list[Message]:
        try:
            items = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"reply is not msgpack: {exc}") from exc
        if not isinstance(items, list) or not all(isinstance(i, bytes) for i in items):
            raise RemoteProtocolError("reply must be a msgpack array of encoded messages")
        return [decode(i) for i in items]

    async def handle_message(self, body: bytes, peer: str) -> bytes:
        """A peer sent one message: run the core, answer with its messages back to the peer."""
        message = decode(body)
        captured: list[Message] = []
        token = _reply_capture.set((peer, captured))
        token_peer = _current_peer.set(peer)
        try:
            await self.runtime.handle(MessageReceived(peer, message))
        finally:
            _current_peer.reset(token_peer)
            _reply_capture.reset(token)
        return msgpack.packb([encode(m) for m in captured])

    # -- objects ----------------------------------------------------------------------------

    def _on_fetch(self, effect: FetchObjects) -> None:
        for root in effect.roots:  # new knowledge: try these roots again at once
            self._fetch_retry.pop(root, None)
        peer = _current_peer.get()
        url = self.directory.url(peer) if peer is not None else None
        self.fetcher.ensure(effect.roots, prefer=[url] if url else [])

    async def _retry_fetches(self, now: float) -> None:
        missing: set[bytes] = set()
        for name in self.runtime.merge_names():
            missing.update(self.runtime.replica.missing_roots(name))
        for root in [r for r in missing if self.runtime.store.has(r)]:
            # stored, but the core was never told (e.g. its ObjectStored failed): tell it now
            missing.discard(root)
            await self.runtime.object_stored(root)
        due = []
        for root in missing:
            failures, at = self._fetch_retry.get(root, (0, float("-inf")))
            if at <= now and root not in self.fetcher.fetching():
                due.append(root)
                delay = min(10.0, self.interval * 2**failures)
                self._fetch_retry[root] = (failures + 1, now + delay)
        for root in list(self._fetch_retry):
            if root not in missing:
                del self._fetch_retry[root]
        if due:
            self.fetcher.ensure(due)

    async def _object_complete(self, root: bytes) -> None:
        self._fetch_retry.pop(root, None)
        await self.runtime.object_stored(root)

    # -- status -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "replica_id": self.runtime.replica_id,
            "enabled": self.enabled,
            "rounds": self.rounds,
            "peers": dict(sorted(self.directory.by_id.items())),
            "unknown_configured": self.directory.unknown_configured(),
            "fetching": [r.hex() for r in self.fetcher.fetching()],
            "transfer": {
                "objects": self.fetcher.stats.objects,
                "chunks": self.fetcher.stats.chunks,
                "bytes": self.fetcher.stats.bytes,
                "bad_chunks": self.fetcher.stats.bad_chunks,
                "resumed_chunks": self.fetcher.stats.resumed_chunks,
            },
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "counters": dict(self.runtime.replica.counters),
        }
