"""Resource limits answer clear JSON errors and store nothing: 413 body, 400 header/tensor
count, 507 disk reserve, 429 rate/uploads/transfers; and token scopes (401/403)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from node.ratelimit import RequestLimits, TokenBucket
from node.settings import Settings

from .conftest import ADMIN, ADMIN_TOKEN, TOKEN, runtime

READ_TOKEN = "read-token-789"


def _nothing_stored(client) -> None:
    rt = runtime(client)
    assert rt.store.list() == [] and rt.merge_names() == []
    assert list((rt.settings.store_dir / "tmp").glob("*")) == []


def test_disk_reserve_refuses_uploads_with_507(node_factory, model_files, monkeypatch):
    node = node_factory(min_free_bytes=1 << 20)
    usage = shutil.disk_usage(runtime(node).settings.store_dir)
    fake = usage._replace(free=(1 << 20) + 10)  # just above the reserve: any upload crosses it
    monkeypatch.setattr("node.runtime.shutil.disk_usage", lambda _p: fake)
    data = model_files["ft0"].read_bytes()
    for path in ("/v1/objects", "/v1/merges/m/contributions"):
        r = node.post(path, content=data)
        assert r.status_code == 507, r.text
        assert r.json()["error"] == "insufficient_storage" and "disk space" in r.json()["detail"]
    _nothing_stored(node)


def test_body_over_the_limit_is_413_and_stores_nothing(node_factory, model_files):
    node = node_factory(max_body_bytes=1000)
    r = node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    def chunks():  # no Content-Length: counted while streaming
        yield model_files["ft0"].read_bytes()

    r = node.post("/v1/objects", content=chunks())
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    _nothing_stored(node)


def test_rate_limit_per_client_is_429_with_retry_after(node_factory):
    node = node_factory(rate_limit_per_s=0.001, rate_limit_burst=3)
    codes = [node.get("/v1/merges").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = node.get("/v1/merges")
    assert r.json()["error"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
    # another client (its own token) has its own bucket; health is never limited
    assert node.get("/v1/merges", headers={"authorization": "Bearer other"}).status_code != 429
    assert node.get("/healthz").status_code == 200


def test_token_bucket_refills_at_its_rate():
    b = TokenBucket(rate=2.0, burst=2.0, tokens=2.0, stamp=0.0)
    assert [b.take(0.0), b.take(0.0)] == [0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.5) == 0.0


def _run(limits: RequestLimits, scopes: list[dict]) -> list[int]:
    """Start every request; the inner app blocks until all have started, then answers."""
    started = asyncio.Event()
    inflight = 0
    statuses: list[int] = []

    async def app(scope, receive, send):
        nonlocal inflight
        inflight += 1
        if inflight == 2:
            started.set()
        await started.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limits.app = app

    async def one(scope):
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg):
            if msg["type"] == "http.response.start":
                statuses.append(msg["status"])
                if msg["status"] == 429:
                    started.set()

        await limits(scope, receive, send)

    async def main():
        await asyncio.gather(*(one(s) for s in scopes))

    asyncio.run(main())
    return sorted(statuses)


def _scope(method, path, host="10.0.0.1", headers=()):
    return {
        "type": "http",
        "method": method,
        "path": path,
        "client": (host, 1),
        "headers": [(k.encode(), v.encode()) for k, v in headers],
    }


def test_concurrent_uploads_per_client_are_capped(tmp_path):
    s = Settings(data_dir=tmp_path, max_uploads_per_client=1, rate_limit_per_s=0)
    limits = RequestLimits(None, s)  # type: ignore[arg-type]
    up = _scope("POST", "/v1/merges/m/contributions")
    assert _run(limits, [up, dict(up)]) == [200, 429]
    assert limits.uploads == {}  # slots are released


def test_concurrent_transfers_per_peer_are_capped_per_address_and_id(tmp_path):
    s = Settings(data_dir=tmp_path, max_transfers_per_peer=1)
    limits = RequestLimits(None, s)  # type: ignore[arg-type]
    path = "/v1/replication/objects/" + "ab" * 32 + "/chunks"
    peer = _scope("POST", path, headers=[("x-crdtmerge-auth", "v1 n1 0 nonce mac")])
    assert _run(limits, [peer, dict(peer)]) == [200, 429]
    # an impostor claiming the same id from elsewhere does not use n1's slots
    other = _scope(
        "POST", path, host="10.6.6.6", headers=[("x-crdtmerge-auth", "v1 n1 0 nonce mac")]
    )
    assert _run(limits, [peer, other]) == [200, 200]


def test_token_scopes_nest_admin_write_read(node_factory, model_files):
    node = node_factory(read_token=READ_TOKEN, admin_token=ADMIN_TOKEN)
    read = {"authorization": f"Bearer {READ_TOKEN}"}
    anon = {"authorization": ""}
    key = "ab" * 32
    assert node.get("/v1/merges", headers=anon).status_code == 401
    assert node.get("/v1/merges", headers={"authorization": "Bearer nope"}).status_code == 401
    for h in (read, {"authorization": f"Bearer {TOKEN}"}, ADMIN):
        assert node.get("/v1/merges", headers=h).status_code == 200
    r = node.put("/v1/merges/m/recipe", json={"strategy": "linear"}, headers=read)
    assert (r.status_code, r.json()["error"]) == (403, "insufficient_scope")
    assert node.put("/v1/merges/m/recipe", json={"strategy": "linear"}, headers=ADMIN).is_success
    r = node.put(f"/v1/merges/m/trusted-keys/{key}")  # the write token
    assert (r.status_code, r.json()["error"]) == (403, "insufficient_scope")
    assert node.put(f"/v1/merges/m/trusted-keys/{key}", headers=ADMIN).status_code == 200


def test_a_disk_that_fills_during_an_upload_is_507_and_keeps_nothing(
    node, model_files, monkeypatch
):
    import errno

    import node.spool as node_spool

    class FullDisk:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    monkeypatch.setattr(node_spool, "open", lambda *a, **k: FullDisk(), raising=False)
    r = node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    assert (r.status_code, r.json()["error"]) == (507, "insufficient_storage")
    assert "No space left" in r.json()["detail"]
    _nothing_stored(node)
