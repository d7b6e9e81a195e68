"""Cluster HMAC authentication: signatures bind every field, replays and forgeries are refused."""

from __future__ import annotations

import httpx
import pytest

from crdtmerge.errors import InvalidInput, Unauthorized
from node.auth_cluster import (
    HEADER_AUTH,
    HEADER_SIGNATURE,
    ClusterAuth,
    ClusterKey,
    RequestVerifier,
    load_cluster_secret,
)

SECRET = "correct horse battery staple"
NOW = 1_800_000_000.0


def _signed(key: ClusterKey, body: bytes = b"payload", **kw) -> dict[str, str]:
    return key.sign_request("POST", "/v1/replication/index?m=a", body, "n1", now=NOW, **kw)


def test_valid_request_is_accepted_and_returns_sender():
    key = ClusterKey(SECRET)
    headers = _signed(key)
    node, nonce = RequestVerifier(key).verify(
        "POST", "/v1/replication/index?m=a", b"payload", headers, now=NOW + 5
    )
    assert node == "n1"
    assert nonce == headers[HEADER_AUTH].split(" ")[3]


@pytest.mark.parametrize(
    "method,target,body",
    [
        ("GET", "/v1/replication/index?m=a", b"payload"),
        ("POST", "/v1/replication/index?m=b", b"payload"),
        ("POST", "/v1/replication/index?m=a", b"payloaD"),
    ],
)
def test_signature_binds_method_path_and_body(method, target, body):
    key = ClusterKey(SECRET)
    with pytest.raises(Unauthorized, match="signature does not match"):
        RequestVerifier(key).verify(method, target, body, _signed(key), now=NOW)


def test_wrong_secret_is_refused():
    headers = _signed(ClusterKey("another secret of enough length"))
    with pytest.raises(Unauthorized, match="same cluster secret"):
        RequestVerifier(ClusterKey(SECRET)).verify(
            "POST", "/v1/replication/index?m=a", b"payload", headers, now=NOW
        )


def test_unsigned_request_is_refused():
    with pytest.raises(Unauthorized, match="not signed"):
        RequestVerifier(ClusterKey(SECRET)).verify("GET", "/v1/replication/digest", b"", {})


def test_tampered_timestamp_is_refused():
    key = ClusterKey(SECRET)
    headers = _signed(key)
    parts = headers[HEADER_AUTH].split(" ")
    parts[2] = str(int(NOW) + 1)
    headers[HEADER_AUTH] = " ".join(parts)
    with pytest.raises(Unauthorized, match="signature does not match"):
        RequestVerifier(key).verify(
            "POST", "/v1/replication/index?m=a", b"payload", headers, now=NOW
        )


def test_replayed_request_is_refused():
    key = ClusterKey(SECRET)
    verifier = RequestVerifier(key)
    headers = _signed(key)
    verifier.verify("POST", "/v1/replication/index?m=a", b"payload", headers, now=NOW)
    with pytest.raises(Unauthorized, match="replayed"):
        verifier.verify("POST", "/v1/replication/index?m=a", b"payload", headers, now=NOW + 1)


def test_request_outside_the_window_is_refused():
    key = ClusterKey(SECRET)
    verifier = RequestVerifier(key, window_s=300)
    with pytest.raises(Unauthorized, match="off the local clock"):
        verifier.verify(
            "POST", "/v1/replication/index?m=a", b"payload", _signed(key), now=NOW + 301
        )


def test_full_nonce_cache_fails_closed_for_older_requests():
    key = ClusterKey(SECRET)
    verifier = RequestVerifier(key, max_nonces=2)
    for i in range(3):
        headers = key.sign_request("GET", "/x", b"", "n1", now=NOW + i)
        verifier.verify("GET", "/x", b"", headers, now=NOW + i)
    # the nonce of the first request was evicted: a replay of it must still be refused
    old = key.sign_request("GET", "/x", b"", "n1", now=NOW)
    with pytest.raises(Unauthorized, match="replayed"):
        verifier.verify("GET", "/x", b"", old, now=NOW + 3)


def test_node_id_is_bound_by_the_signature():
    key = ClusterKey(SECRET)
    headers = _signed(key)
    headers[HEADER_AUTH] = headers[HEADER_AUTH].replace(" n1 ", " n2 ")
    with pytest.raises(Unauthorized, match="signature does not match"):
        RequestVerifier(key).verify(
            "POST", "/v1/replication/index?m=a", b"payload", headers, now=NOW
        )


def test_short_secret_is_rejected_at_startup():
    with pytest.raises(InvalidInput, match="at least 16"):
        load_cluster_secret("short", env={})
    assert load_cluster_secret(None, env={"CRDTMERGE_CLUSTER_SECRET": SECRET}) == SECRET
    assert load_cluster_secret(None, env={}) is None


def _server(key: ClusterKey, *, sign: bool = True, status: int = 200):
    verifier = RequestVerifier(key)

    def handler(request: httpx.Request) -> httpx.Response:
        _, nonce = verifier.verify(
            request.method, request.url.raw_path.decode(), request.content, request.headers
        )
        body = b"state"
        headers = {HEADER_SIGNATURE: key.response_mac(nonce, status, body)} if sign else {}
        return httpx.Response(status, content=body, headers=headers)

    return httpx.MockTransport(handler)


def test_client_auth_round_trip_without_default_headers():
    key = ClusterKey(SECRET)
    seen = []
    server = _server(key)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return server.handler(request)  # type: ignore[attr-defined]

    client = httpx.Client(transport=httpx.MockTransport(handler), auth=ClusterAuth(key, "n2"))
    with client:
        response = client.post("http://peer/v1/replication/index?m=a", content=b"x")
    assert response.content == b"state"
    assert "user-agent" not in seen[0] and "accept-encoding" not in seen[0]


def test_unsigned_success_response_is_refused():
    key = ClusterKey(SECRET)
    client = httpx.Client(transport=_server(key, sign=False), auth=ClusterAuth(key, "n2"))
    with client, pytest.raises(Unauthorized, match="not signed with the cluster secret"):
        client.get("http://peer/v1/replication/digest")


def test_unsigned_error_response_is_passed_through():
    key = ClusterKey(SECRET)
    client = httpx.Client(
        transport=_server(key, sign=False, status=404), auth=ClusterAuth(key, "n2")
    )
    with client:
        assert client.get("http://peer/v1/replication/digest").status_code == 404
