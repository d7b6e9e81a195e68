"""The fault proxy itself: each fault does what it says, and healing restores the link."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from tests.process.faultproxy import FaultProxy, LinkFaults

BODY = bytes(range(256)) * 16  # 4 KiB
HITS: list[str] = []  # every path the upstream served, in order


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    HITS.append(scope["path"])
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": BODY[:100], "more_body": True})
        await send({"type": "http.response.body", "body": BODY[100:], "more_body": False})
        return
    if scope["path"] == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = body if scope["path"] == "/echo" else BODY
    headers = [(b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def upstream_port():
    config = uvicorn.Config(_app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("upstream did not start within 10 s")
        time.sleep(0.01)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def proxy(upstream_port):
    with FaultProxy(seed=7) as p:
        p.add_link("a->b", "127.0.0.1", upstream_port)
        yield p


def _url(proxy: FaultProxy, path: str) -> str:
    return f"http://127.0.0.1:{proxy.port('a->b')}{path}"


def test_pass_forwards_keepalive_requests_unchanged(proxy):
    with httpx.Client(timeout=5) as client:
        for _ in range(3):
            assert client.get(_url(proxy, "/data")).content == BODY
        assert client.post(_url(proxy, "/echo"), content=b"hello").content == b"hello"
        assert client.get(_url(proxy, "/stream")).content == BODY
        assert client.get(_url(proxy, "/empty")).status_code == 204
    stats = proxy.stats("a->b")
    assert stats.requests == 6
    assert stats.connections == 1  # keep-alive survived the proxy
    assert stats.bytes_down > 4 * len(BODY)


def test_refuse_fails_fast_and_heal_restores(proxy):
    proxy.set("a->b", mode="refuse")
    with httpx.Client(timeout=5) as client:
        with pytest.raises(httpx.TransportError):
            client.get(_url(proxy, "/data"))
        proxy.set("a->b")
        assert client.get(_url(proxy, "/data")).content == BODY
    assert proxy.stats("a->b").refused == 1


def test_blackhole_times_out(proxy):
    proxy.set("a->b", mode="blackhole")
    with httpx.Client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.get(_url(proxy, "/data"))
    assert proxy.stats("a->b").blackholed == 1


def test_bitflip_changes_exactly_one_bit_of_matching_paths(proxy):
    proxy.set("a->b", bitflip=1.0, match="/data")
    with httpx.Client(timeout=5) as client:
        got = client.get(_url(proxy, "/data")).content
        assert client.post(_url(proxy, "/echo"), content=b"x").content == b"x"
    assert len(got) == len(BODY)
    diff = int.from_bytes(got, "big") ^ int.from_bytes(BODY, "big")
    assert bin(diff).count("1") == 1
    assert proxy.stats("a->b").flipped == 1


def test_truncate_cuts_the_body_and_closes(proxy):
    proxy.set("a->b", truncate=1.0)
    with httpx.Client(timeout=5) as client, pytest.raises(httpx.RemoteProtocolError):
        client.get(_url(proxy, "/data"))
    assert proxy.stats("a->b").truncated == 1


def test_drop_response_forwards_request_but_never_answers(proxy):
    proxy.set("a->b", drop_response=1.0)
    with httpx.Client(timeout=5) as client, pytest.raises(httpx.RemoteProtocolError):
        client.post(_url(proxy, "/echo"), content=b"effect")
    stats = proxy.stats("a->b")
    assert (stats.dropped_responses, stats.bytes_up > 0, stats.responses) == (1, True, 0)


def test_delay_holds_each_request(proxy):
    proxy.set("a->b", delay_s=0.2)
    with httpx.Client(timeout=5) as client:
        start = time.monotonic()
        client.get(_url(proxy, "/data"))
        assert time.monotonic() - start >= 0.2


def test_duplicate_replays_the_request_once_more_upstream(proxy):
    proxy.set("a->b", duplicate=1.0)
    with httpx.Client(timeout=5) as client:
        assert client.post(_url(proxy, "/echo-dup"), content=b"twice").status_code == 200
    deadline = time.monotonic() + 10
    while HITS.count("/echo-dup") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # poll, bounded by the deadline
    assert HITS.count("/echo-dup") == 2
    stats = proxy.stats("a->b")
    assert stats.duplicated == 1
    assert stats.bytes_by_path["/echo-dup"] == len(BODY)


def test_invalid_faults_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        LinkFaults(mode="explode")
    with pytest.raises(ValueError, match="probability"):
        LinkFaults(bitflip=2.0)
