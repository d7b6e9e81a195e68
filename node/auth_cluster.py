"""Cluster authentication for replication traffic: HMAC-signed requests and responses.

Every node of a cluster shares one secret (``--cluster-secret`` or ``CRDTMERGE_CLUSTER_SECRET``).
A request between nodes carries one header (compact: idle gossip is mostly headers)::

    x-crdtmerge-auth: v1 <node id> <unix seconds> <nonce> <mac>

``nonce`` is 16 fresh random bytes and ``mac`` is HMAC-SHA256 over the canonical request, both
base64url without padding. The canonical request is ``"crdtmerge-repl/v1"``, method, path with
query, the BLAKE3 hex of the body, timestamp, nonce and node id, one per line. The key is
derived from the secret with a domain-separated BLAKE3, so the raw secret never keys anything
directly. Node ids are replica ids (no spaces).

The receiver (:class:`RequestVerifier`) recomputes the MAC (constant-time compare), accepts a
timestamp within a generous window (default 300 s: clocks of replicas may be skewed, and nothing
in the design depends on wall time) and remembers every nonce it accepted until that nonce's
timestamp leaves the window, so a captured request replayed verbatim is refused. Even if a replay
got through it would be harmless: replication messages are CRDT states (joins are idempotent) or
reads of content-addressed bytes.

Responses are signed too (``x-crdtmerge-sig``: the MAC over the request's nonce, the status
code and the body hash), so a node only joins state that came from a cluster member, not from
something on the network path. Only successful (2xx) responses must be signed: an error answer
carries no state, and forging one denies service, which a network attacker can do anyway.
Chunk bytes are the exception (request extension :data:`UNSIGNED_RESPONSE`): they are content
addressed and checked chunk by chunk against the manifest, so a MAC would only hash them again.
:class:`ClusterAuth` is an ``httpx.Auth`` that signs every outgoing request and checks every
other response; a missing or wrong response MAC raises
:class:`~crdtmerge.errors.Unauthorized`. It also drops httpx's default ``Accept``,
``Accept-Encoding``, ``Connection`` and ``User-Agent`` headers from replication requests: they
mean nothing between nodes and would be a tenth of the idle traffic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Mapping

import blake3
import httpx

from crdtmerge.canonical import domain_hash
from crdtmerge.errors import InvalidInput, RemoteProtocolError, TooLarge, Unauthorized

__all__ = [
    "HEADER_AUTH",
    "HEADER_SIGNATURE",
    "ClusterAuth",
    "ClusterKey",
    "RequestVerifier",
    "UNSIGNED_RESPONSE",
    "load_cluster_secret",
    "request_target",
]

logger = logging.getLogger(__name__)

HEADER_AUTH = "x-crdtmerge-auth"
HEADER_SIGNATURE = "x-crdtmerge-sig"

_SCHEME = "v1"
_DROP_HEADERS = ("accept", "accept-encoding", "connection", "user-agent")
_REQUEST_TAG = b"crdtmerge-repl/v1"
_RESPONSE_TAG = b"crdtmerge-repl-response/v1"
#: a secret shorter than this is refused at startup
MIN_SECRET_BYTES = 16
#: largest replication answer read; a peer streaming more is cut off (TooLarge)
MAX_RESPONSE_BYTES = 256 << 20
#: request extension overriding that bound for one request (e.g. an exact chunk batch size)
RESPONSE_LIMIT = "crdtmerge.max_response_bytes"
#: request extension: the answer is not MAC-signed (chunk bytes; the caller verifies content)
UNSIGNED_RESPONSE = "crdtmerge.unsigned_response"


def load_cluster_secret(value: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The cluster secret from the command line, else ``CRDTMERGE_CLUSTER_SECRET``, else None.

    Raises:
        InvalidInput: if a secret is given but shorter than 16 bytes.
    """
    env = os.environ if env is None else env
    secret = value if value else env.get("CRDTMERGE_CLUSTER_SECRET") or None
    if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
        raise InvalidInput(
            f"cluster secret is {len(secret.encode())} bytes; expected at least "
            f"{MIN_SECRET_BYTES} (generate one with `python -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))'`)"
        )
    return secret


def request_target(scope: Mapping[str, object]) -> str:
    """The signed target of an ASGI request: raw path plus ``?query`` (as the client sent it)."""
    raw = scope.get("raw_path") or str(scope.get("path", "")).encode()
    query = scope.get("query_string") or b""
    if not isinstance(raw, bytes | bytearray) or not isinstance(query, bytes | bytearray):
        raise TypeError("an ASGI scope's raw_path and query_string must be bytes")
    target = bytes(raw) + (b"?" + bytes(query) if query else b"")
    return target.decode("latin-1")


class ClusterKey:
    """The MAC key derived from a cluster secret, and the two MAC computations."""

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(raw) < MIN_SECRET_BYTES:
            raise InvalidInput(
                f"cluster secret is {len(raw)} bytes; expected at least {MIN_SECRET_BYTES}"
            )
        self._key = domain_hash("crdtmerge/v1/cluster-key", raw)

    def request_mac(
        self, method: str, target: str, body: bytes, timestamp: str, nonce: str, node: str
    ) -> str:
        msg = b"\n".join(
            [
                _REQUEST_TAG,
                method.upper().encode(),
                target.encode(),
                blake3.blake3(body).hexdigest().encode(),
                timestamp.encode(),
                nonce.encode(),
                node.encode(),
            ]
        )
        return _b64(hmac.new(self._key, msg, hashlib.sha256).digest())

    def response_mac(self, nonce: str, status: int, body: bytes) -> str:
        msg = b"\n".join(
            [
                _RESPONSE_TAG,
                nonce.encode(),
                str(int(status)).encode(),
                blake3.blake3(body).hexdigest().encode(),
            ]
        )
        return _b64(hmac.new(self._key, msg, hashlib.sha256).digest())

    def sign_request(
        self,
        method: str,
        target: str,
        body: bytes,
        node: str,
        *,
        now: float | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        """The authentication header for one request."""
        if not node or any(c.isspace() for c in node):
            raise InvalidInput(f"node id {node!r} must be non-empty without spaces")
        timestamp = str(int(time.time() if now is None else now))
        nonce = _b64(secrets.token_bytes(16)) if nonce is None else nonce
        mac = self.request_mac(method, target, body, timestamp, nonce, node)
        return {HEADER_AUTH: f"{_SCHEME} {node} {timestamp} {nonce} {mac}"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class RequestVerifier:
    """Checks signed requests: MAC, timestamp window, and a nonce cache against replays.

    Args:
        key: the cluster key.
        window_s: accepted distance between the request's timestamp and the local clock.
        max_nonces: bound on the replay cache; when full, the oldest entries are evicted and
            requests older than the oldest remembered one are refused (fail closed).
    """

    def __init__(self, key: ClusterKey, *, window_s: float = 300.0, max_nonces: int = 200_000):
        self.key = key
        self.window_s = window_s
        self.max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> timestamp, by arrival
        self._floor = float("-inf")  # requests older than this are refused (evicted nonces)

    def verify(
        self,
        method: str,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        now: float | None = None,
    ) -> tuple[str, str]:
        """Return ``(node id, nonce)`` of a valid request.

        Raises:
            Unauthorized: missing headers, bad MAC, stale timestamp, or a replayed nonce.
        """
        now = time.time() if now is None else now
        parts = headers.get(HEADER_AUTH, "").split(" ")
        if len(parts) != 5 or parts[0] != _SCHEME:
            raise Unauthorized(
                "replication request is not signed: expected an x-crdtmerge-auth header "
                "made with the cluster secret"
            )
        _, node, ts, nonce, sig = parts
        if len(nonce) != 22 or not node or len(node) > 256:
            raise Unauthorized("replication request has a malformed nonce or node id")
        expected = self.key.request_mac(method, target, body, ts, nonce, node)
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            raise Unauthorized(
                "replication request signature does not match: is this node configured with "
                "the same cluster secret?"
            )
        try:
            ts_value = float(int(ts))
        except ValueError as exc:
            raise Unauthorized(f"replication request timestamp {ts!r} is not an integer") from exc
        if abs(now - ts_value) > self.window_s:
            raise Unauthorized(
                f"replication request timestamp is {now - ts_value:+.0f} s off the local clock "
                f"(accepted: ±{self.window_s:.0f} s); check the clocks"
            )
        self._prune(now)
        if nonce in self._seen or ts_value < self._floor:  # evicted nonces: fail closed
            raise Unauthorized("replication request replayed (nonce already used)")
        self._seen[nonce] = ts_value
        return node, nonce

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        # arrival order approximates timestamp order; stale entries are dropped lazily
        while self._seen:
            oldest_nonce, oldest_ts = next(iter(self._seen.items()))
            if oldest_ts < horizon:
                self._seen.popitem(last=False)
            elif len(self._seen) >= self.max_nonces:
                self._seen.popitem(last=False)
                self._floor = max(self._floor, oldest_ts + 1)
            else:
                break
        if self._floor < horizon:
            self._floor = float("-inf")


class _CappedStream(httpx.AsyncByteStream):
    """A response body that raises TooLarge past ``limit`` bytes (an endless or oversized
    answer never fills memory)."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int, what: str) -> None:
        self._inner = inner
        self._limit = limit
        self._what = what

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                raise TooLarge(f"{self._what} sent more than {self._limit} bytes; cut off")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class ClusterAuth(httpx.Auth):
    """``httpx.Auth`` signing every request and checking the response MAC.

    Example:
        >>> auth = ClusterAuth(ClusterKey("0123456789abcdef"), node="n1")
        >>> client = httpx.AsyncClient(auth=auth)  # doctest: +SKIP
    """

    requires_request_body = True
    requires_response_body = True

    def __init__(self, key: ClusterKey, node: str, *, verify_responses: bool = True) -> None:
        self.key = key
        self.node = node
        self.verify_responses = verify_responses

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """As ``httpx.Auth.async_auth_flow``, but the answer is read with a size bound
        (``MAX_RESPONSE_BYTES``, or the request's ``RESPONSE_LIMIT`` extension) and must not be
        compressed (we never ask for it; a compressed answer could expand without bound)."""
        await request.aread()
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            response = yield request
            limit = int(request.extensions.get(RESPONSE_LIMIT, MAX_RESPONSE_BYTES))
            what = f"{request.url.host}:{request.url.port}"
            try:
                encoding = response.headers.get("content-encoding", "identity").lower()
                if encoding not in ("", "identity"):
                    raise RemoteProtocolError(f"{what} answered with content-encoding {encoding}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise TooLarge(f"{what} announced {declared} bytes; at most {limit} accepted")
                response.stream = _CappedStream(response.stream, limit, what)  # type: ignore[arg-type]
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
            try:
                request = flow.send(response)
            except StopIteration:
                break

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        target = request.url.raw_path.decode("ascii")
        for name in _DROP_HEADERS:
            request.headers.pop(name, None)
        headers = self.key.sign_request(request.method, target, request.content, self.node)
        nonce = headers[HEADER_AUTH].split(" ")[3]
        request.headers.update(headers)
        response = yield request
        if not self.verify_responses or not 200 <= response.status_code < 300:
            return  # an error answer carries no state; forging one only denies service
        if request.extensions.get(UNSIGNED_RESPONSE):
            return  # content-addressed bytes, checked by the caller against their hashes
        got = response.headers.get(HEADER_SIGNATURE, "")
        expected = self.key.response_mac(nonce, response.status_code, response.content)
        if not hmac.compare_digest(expected.encode(), got.encode()):
            raise Unauthorized(
                f"response from {request.url.host}:{request.url.port} is not signed with the "
                f"cluster secret (status {response.status_code}); refusing it"
            )
