"""A small fault-injecting HTTP/1.1 proxy for process tests (a Toxiproxy stand-in).

One listener per directed link (node i -> node j): node i is configured with the proxy's address
as its peer URL for j, and the test changes the link's behaviour while the cluster runs:

- ``mode="pass"``: forward requests and responses unchanged (the default);
- ``mode="refuse"``: close every connection at once (a partition that fails fast);
- ``mode="blackhole"``: accept and read, never answer (a partition that times out);
- ``delay_s``: hold each request that long before forwarding it;
- ``drop_request`` / ``drop_response``: probability of closing the connection instead of
  forwarding the request, or after the upstream answered (the effect happened, the caller
  never learns it);
- ``truncate`` / ``bitflip``: probability of cutting a response body in half (then closing),
  or flipping one bit of it (the framing stays valid, so the client reads wrong bytes);
- ``duplicate``: probability of replaying a forwarded request upstream once more, on a fresh
  connection, after the original was answered (the replay's answer is discarded: the network
  delivered one request twice);
- ``match``: response faults apply only to requests whose path contains this string.

The proxy speaks just enough HTTP/1.1 to frame messages (``Content-Length`` and chunked
bodies) so keep-alive connections keep working: each downstream connection gets its own
upstream connection. It runs its own event loop in a background thread, so a synchronous test
controls it with plain method calls; randomness comes from one seeded generator.

Example::

    with FaultProxy(seed=1) as proxy:
        port = proxy.add_link("a->b", "127.0.0.1", node_b_port)
        proxy.set("a->b", mode="refuse")     # partition a -> b
        proxy.set("a->b")                    # heal
        proxy.stats("a->b").bytes_down
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import threading
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "LinkFaults", "LinkStats"]

_MAX_HEAD = 64 * 1024
_MODES = ("pass", "refuse", "blackhole")


@dataclass(frozen=True)
class LinkFaults:
    mode: str = "pass"
    delay_s: float = 0.0
    drop_request: float = 0.0
    drop_response: float = 0.0
    truncate: float = 0.0
    bitflip: float = 0.0
    duplicate: float = 0.0
    match: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {_MODES}")
        for name in ("drop_request", "drop_response", "truncate", "bitflip", "duplicate"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p}: expected a probability in [0, 1]")
        if self.delay_s < 0:
            raise ValueError(f"delay_s={self.delay_s}: expected >= 0")


@dataclass
class LinkStats:
    connections: int = 0
    requests: int = 0
    responses: int = 0
    bytes_up: int = 0  # request bytes forwarded upstream
    bytes_down: int = 0  # response bytes sent back downstream
    refused: int = 0
    blackholed: int = 0
    dropped_requests: int = 0
    dropped_responses: int = 0
    truncated: int = 0
    flipped: int = 0
    duplicated: int = 0
    paths: list[str] = field(default_factory=list)
    bytes_by_path: dict[str, int] = field(default_factory=dict)  # response bytes sent down


class _Closed(Exception):
    """The peer closed the connection."""


@dataclass
class _Link:
    name: str
    upstream: tuple[str, int]
    faults: LinkFaults
    stats: LinkStats
    server: asyncio.Server | None = None
    port: int = 0


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise _Closed from exc
    except asyncio.LimitOverrunError as exc:
        raise _Closed from exc
    if len(head) > _MAX_HEAD:
        raise _Closed
    return head


def _headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            out[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    return out


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], *, until_eof: bool
) -> tuple[bytes, int, int]:
    """Return (raw body bytes as framed on the wire, payload start, payload end).

    For a Content-Length body the payload is the whole raw body; for a chunked one the payload
    span is the first data chunk (enough for bit flips); for neither, read to EOF if allowed.
    """
    try:
        if "content-length" in headers:
            n = int(headers["content-length"])
            data = await reader.readexactly(n)
            return data, 0, n
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            span = (0, 0)
            offset = 0
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                parts.append(size_line)
                offset += len(size_line)
                if size == 0:
                    while True:
                        trailer = await reader.readuntil(b"\r\n")
                        parts.append(trailer)
                        if trailer == b"\r\n":
                            return b"".join(parts), span[0], span[1]
                chunk = await reader.readexactly(size + 2)
                if span == (0, 0):
                    span = (offset, offset + size)
                parts.append(chunk)
                offset += len(chunk)
        if until_eof:
            data = await reader.read()
            return data, 0, len(data)
        return b"", 0, 0
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise _Closed from exc


def _has_no_body(method: bytes, resp_head: bytes) -> bool:
    status = int(resp_head.split(b" ", 2)[1])
    return method == b"HEAD" or 100 <= status < 200 or status in (204, 304)


class FaultProxy:
    """The proxy: a background event loop with one listener per link."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._links: dict[str, _Link] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._started = False
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> FaultProxy:
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    def close(self) -> None:
        if not self._started:
            return

        async def shutdown() -> None:
            for link in self._links.values():
                if link.server is not None:
                    link.server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._started = False

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control --------------------------------------------------------------------------
    def add_link(self, name: str, host: str, port: int) -> int:
        """Listen on 127.0.0.1 (a free port) and forward to ``host:port``; return the port."""
        if name in self._links:
            raise ValueError(f"link {name!r} exists")
        link = _Link(name, (host, port), LinkFaults(), LinkStats())
        self._links[name] = link

        async def listen() -> int:
            link.server = await asyncio.start_server(
                lambda r, w: self._spawn(self._serve(link, r, w)), "127.0.0.1", 0
            )
            return link.server.sockets[0].getsockname()[1]

        link.port = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        return link.port

    def set(self, name: str, **faults: object) -> None:
        """Replace the link's faults (no arguments = heal: pass everything unchanged)."""
        self._links[name].faults = LinkFaults(**faults)  # type: ignore[arg-type]

    def set_all(self, **faults: object) -> None:
        for name in self._links:
            self.set(name, **faults)

    def faults(self, name: str) -> LinkFaults:
        return self._links[name].faults

    def stats(self, name: str) -> LinkStats:
        return self._links[name].stats

    def links(self) -> list[str]:
        return list(self._links)

    def port(self, name: str) -> int:
        return self._links[name].port

    def reset_stats(self) -> None:
        for link in self._links.values():
            link.stats = LinkStats()

    # -- data path ------------------------------------------------------------------------
    async def _replay(self, link: _Link, request: bytes) -> None:
        """Send ``request`` upstream once more on its own connection; discard the answer."""
        w: asyncio.StreamWriter | None = None
        try:
            r, w = await asyncio.open_connection(*link.upstream)
            w.write(request)
            await w.drain()
            head = await _read_head(r)
            if not _has_no_body(request.split(b" ", 1)[0], head):
                await _read_body(r, _headers(head), until_eof=False)
        except (_Closed, ConnectionError, OSError, ValueError, IndexError):
            return
        finally:
            if w is not None:
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _chance(self, p: float) -> bool:
        return p > 0 and (p >= 1 or self._rng.random() < p)

    async def _serve(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        link.stats.connections += 1
        up_reader: asyncio.StreamReader | None = None
        up_writer: asyncio.StreamWriter | None = None
        try:
            while True:
                head = await _read_head(reader)
                req_headers = _headers(head)
                body, _, _ = await _read_body(reader, req_headers, until_eof=False)
                faults = link.faults
                stats = link.stats
                stats.requests += 1
                path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
                stats.paths.append(path)
                if faults.mode == "refuse":
                    stats.refused += 1
                    return
                if faults.mode == "blackhole":
                    stats.blackholed += 1
                    while await reader.read(65536):
                        pass
                    return
                if faults.delay_s:
                    await asyncio.sleep(faults.delay_s)  # the injected fault, not a sync
                if self._chance(faults.drop_request):
                    stats.dropped_requests += 1
                    return
                if up_reader is None or up_writer is None:
                    up_reader, up_writer = await asyncio.open_connection(*link.upstream)
                request = head + body
                up_writer.write(request)
                await up_writer.drain()
                stats.bytes_up += len(request)
                resp_head = await _read_head(up_reader)
                resp_headers = _headers(resp_head)
                if _has_no_body(head.split(b" ", 1)[0], resp_head):
                    raw, lo, hi = b"", 0, 0
                else:
                    raw, lo, hi = await _read_body(up_reader, resp_headers, until_eof=True)
                applies = faults.match is None or faults.match in path
                if applies and self._chance(faults.drop_response):
                    stats.dropped_responses += 1
                    return
                if applies and hi > lo and self._chance(faults.truncate):
                    stats.truncated += 1
                    cut = resp_head + raw[: lo + (hi - lo) // 2]
                    writer.write(cut)
                    stats.bytes_down += len(cut)
                    await writer.drain()
                    return
                if applies and hi > lo and self._chance(faults.bitflip):
                    stats.flipped += 1
                    pos = self._rng.randrange(lo, hi)
                    flipped = bytearray(raw)
                    flipped[pos] ^= 1 << self._rng.randrange(8)
                    raw = bytes(flipped)
                writer.write(resp_head + raw)
                await writer.drain()
                stats.responses += 1
                stats.bytes_down += len(resp_head) + len(raw)
                stats.bytes_by_path[path] = stats.bytes_by_path.get(path, 0) + len(raw)
                if self._chance(faults.duplicate):
                    stats.duplicated += 1
                    self._spawn(self._replay(link, request))
                closing = resp_headers.get("connection", "").lower() == "close"
                if closing or req_headers.get("connection", "").lower() == "close":
                    return
        except (_Closed, ConnectionError, OSError, ValueError, IndexError):
            return
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()


def replace_faults(faults: LinkFaults, **changes: object) -> LinkFaults:
    """A copy of ``faults`` with some fields changed (for tests that tweak one knob)."""
    return dataclasses.replace(faults, **changes)  # type: ignore[arg-type]
