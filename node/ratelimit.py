"""Request limits in front of the app: per-client rate and uploads, per-peer transfers (429).

A pure ASGI middleware (:class:`RequestLimits`), so request and response bodies still stream.
It answers ``429 {"error": "rate_limited", "detail": ...}`` with a ``Retry-After`` header,
before any route or body is touched, when:

- a client of the public API (``/v1/...`` except replication) exceeds its token bucket:
  ``rate_limit_per_s`` requests per second on average, bursts of ``rate_limit_burst``
  (``0`` turns it off). A client is its Bearer token when it sends one (hashed, never kept in
  clear), else its address, so many clients behind one address with their own tokens do not
  starve each other;
- a client already has ``max_uploads_per_client`` uploads in flight (``POST /v1/objects``,
  ``POST /v1/merges/{name}/contributions``);
- a peer already has ``max_transfers_per_peer`` object-transfer requests in flight
  (``/v1/replication/objects/...``). The peer is the claimed node id *and* the connection's
  address: the id is only verified later (the cluster MAC), so keying on it alone would let
  anyone exhaust a real peer's slots.

Health and metrics endpoints are never limited. The clock is injectable for tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .settings import Settings

__all__ = ["RequestLimits", "TokenBucket"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: buckets idle this long are forgotten when the table grows
_IDLE_S = 300.0
_MAX_CLIENTS = 10_000


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; :meth:`take` spends one if there is one."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Spend a token: 0.0 if allowed, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def _is_upload(method: str, path: str) -> bool:
    if method != "POST":
        return False
    return path == "/v1/objects" or (
        path.startswith("/v1/merges/") and path.endswith("/contributions")
    )


class RequestLimits:
    """The middleware (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, settings: Settings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.app = app
        self.rate = settings.rate_limit_per_s
        self.burst = max(1, settings.rate_limit_burst)
        self.max_uploads = settings.max_uploads_per_client
        self.max_transfers = settings.max_transfers_per_peer
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}
        self.uploads: dict[str, int] = {}
        self.transfers: dict[tuple[str, str], int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        host = (scope.get("client") or ("unknown", 0))[0]
        if path.startswith("/v1/replication/objects/"):
            # x-crdtmerge-auth: "v1 <node id> <ts> <nonce> <mac>" (node/auth_cluster.py)
            auth = headers.get("x-crdtmerge-auth", b"").decode("latin-1").split(" ")
            node = auth[1][:256] if len(auth) == 5 else ""
            await self._counted(
                self.transfers,
                (host, node),
                self.max_transfers,
                f"peer {node or host!r} already has {self.max_transfers} object transfers in "
                "flight; retry when one finishes",
                scope,
                receive,
                send,
            )
            return
        if not path.startswith("/v1/") or path.startswith("/v1/replication/"):
            await self.app(scope, receive, send)
            return
        client = self._client_key(headers, host)
        if self.rate > 0:
            wait = self._bucket(client).take(self.clock())
            if wait > 0:
                await _too_many(
                    send,
                    f"rate limit: at most {self.rate:g} requests/s (bursts of {self.burst}) per "
                    f"client; retry in {wait:.2f} s",
                    wait,
                )
                return
        if _is_upload(method, path):
            await self._counted(
                self.uploads,
                client,
                self.max_uploads,
                f"this client already has {self.max_uploads} uploads in flight; wait for one "
                "to finish",
                scope,
                receive,
                send,
            )
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _client_key(headers: dict[str, bytes], host: str) -> str:
        auth = headers.get("authorization", b"")
        if auth[:7].lower() == b"bearer " and len(auth) > 7:
            return "token:" + hashlib.blake2b(auth[7:].strip(), digest_size=16).hexdigest()
        return "addr:" + host

    def _bucket(self, client: str) -> TokenBucket:
        now = self.clock()
        bucket = self.buckets.get(client)
        if bucket is None:
            if len(self.buckets) >= _MAX_CLIENTS:
                self._forget_idle(now)
            bucket = TokenBucket(self.rate, float(self.burst), float(self.burst), now)
            self.buckets[client] = bucket
        return bucket

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, b in self.buckets.items() if now - b.stamp > _IDLE_S]:
            del self.buckets[key]
        if len(self.buckets) >= _MAX_CLIENTS:  # all busy: drop the oldest half
            for key in sorted(self.buckets, key=lambda k: self.buckets[k].stamp)[
                : _MAX_CLIENTS // 2
            ]:
                del self.buckets[key]

    async def _counted(
        self,
        table: dict[Any, int],
        key: Any,
        limit: int,
        detail: str,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        if table.get(key, 0) >= limit:
            await _too_many(send, detail, 1.0)
            return
        table[key] = table.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            table[key] -= 1
            if table[key] <= 0:
                del table[key]


async def _too_many(send: Send, detail: str, retry_after: float) -> None:
    body = json.dumps({"error": "rate_limited", "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(max(1, math.ceil(retry_after))).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
