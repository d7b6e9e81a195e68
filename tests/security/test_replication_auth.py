"""Replication endpoints on an in-process node: unauthenticated, forged, tampered, stale and
replayed requests are refused before anything is joined; a duplicate delivery that does get in
(fresh nonce) is harmless, because joins are idempotent; a member sending garbage changes
nothing."""

from __future__ import annotations

import pytest

from crdtmerge.crdt import MergeDocument
from crdtmerge.wire import IndexMessage, MergeSummary, encode
from node.auth_cluster import ClusterKey

from .conftest import runtime

SECRET = "a-cluster-secret-for-tests-0123"
PATH = "/v1/replication/messages"
ROOT = bytes(range(32))


@pytest.fixture
def member(node_factory):
    return node_factory(cluster_secret=SECRET, extra={"gossip_loop": False})


def _index(sender: str = "peer-1", root: bytes = ROOT) -> bytes:
    doc = MergeDocument().add(root, f"{sender}.1")
    return encode(IndexMessage(sender, (MergeSummary.of("m", doc),), (("m", doc),)))


def _post(node, body: bytes, headers: dict[str, str], path: str = PATH):
    return node.post(path, content=body, headers={"content-type": "application/msgpack", **headers})


def _state(node) -> tuple[bytes, list[str]]:
    rt = runtime(node)
    return rt.replica.state.state_hash(), rt.merge_names()


@pytest.mark.parametrize(
    "make_headers",
    [
        pytest.param(lambda body: {}, id="unsigned"),
        pytest.param(
            lambda body: ClusterKey("not-the-cluster-secret-at-all").sign_request(
                "POST", PATH, body, "peer-1"
            ),
            id="wrong-secret",
        ),
        pytest.param(
            lambda body: ClusterKey(SECRET).sign_request("POST", PATH, b"other body", "peer-1"),
            id="body-swapped",
        ),
        pytest.param(
            lambda body: ClusterKey(SECRET).sign_request(
                "POST", "/v1/replication/hello", body, "peer-1"
            ),
            id="path-swapped",
        ),
        pytest.param(
            lambda body: ClusterKey(SECRET).sign_request(
                "POST", PATH, body, "peer-1", now=1_000_000_000
            ),
            id="stale",
        ),
    ],
)
def test_forged_index_entries_are_refused_and_change_nothing(member, make_headers):
    before = _state(member)
    body = _index()
    r = _post(member, body, make_headers(body))
    assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
    assert _state(member) == before
    assert runtime(member).replica.missing_roots("m") == []


def test_a_captured_request_replayed_verbatim_is_refused(member):
    body = _index()
    headers = ClusterKey(SECRET).sign_request("POST", PATH, body, "peer-1")
    assert _post(member, body, headers).status_code == 200
    joined = _state(member)
    assert ROOT in runtime(member).replica.state.get("m").contributions
    r = _post(member, body, headers)
    assert r.status_code == 401 and "replayed" in r.json()["detail"]
    assert _state(member) == joined


def test_a_duplicate_delivery_with_a_fresh_nonce_is_harmless(member):
    body = _index()
    key = ClusterKey(SECRET)
    assert _post(member, body, key.sign_request("POST", PATH, body, "peer-1")).status_code == 200
    joined = _state(member)
    for _ in range(3):
        assert _post(member, body, key.sign_request("POST", PATH, body, "peer-1")).is_success
    assert _state(member) == joined  # join is idempotent: same state, no new dot


def test_a_message_claiming_another_sender_is_refused(member):
    before = _state(member)
    body = _index(sender="peer-2")  # signed as peer-1, says it is from peer-2
    r = _post(member, body, ClusterKey(SECRET).sign_request("POST", PATH, body, "peer-1"))
    assert r.status_code == 400 and r.json()["error"] == "remote_protocol_error"
    assert _state(member) == before and before[1] == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xc1garbage", id="not-msgpack"),
        pytest.param(b"\x80", id="empty-map"),
        pytest.param(_index()[:-3], id="truncated"),
        pytest.param(_index().replace(b"index", b"indey"), id="unknown-type"),
    ],
)
def test_a_member_sending_garbage_gets_400_and_nothing_changes(member, body):
    before = _state(member)
    r = _post(member, body, ClusterKey(SECRET).sign_request("POST", PATH, body, "peer-1"))
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "detail"}, r.text
    assert _state(member) == before


def test_object_endpoints_need_the_cluster_secret_too(member, model_files):
    root = member.post("/v1/objects", content=model_files["ft0"].read_bytes()).json()["root"]
    path = f"/v1/replication/objects/{root}/manifest"
    assert member.get(path).status_code == 401
    headers = ClusterKey("not-the-cluster-secret-at-all").sign_request("GET", path, b"", "p")
    assert member.get(path, headers=headers).status_code == 401
    ok = member.get(path, headers=ClusterKey(SECRET).sign_request("GET", path, b"", "p"))
    assert ok.status_code == 200


def test_a_node_without_a_cluster_secret_refuses_all_replication(node):
    body = _index()
    r = _post(node, body, ClusterKey(SECRET).sign_request("POST", PATH, body, "peer-1"))
    assert r.status_code == 401 and "no cluster secret" in r.json()["detail"]
