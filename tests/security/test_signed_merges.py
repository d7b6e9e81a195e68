"""Signed contributions on a node: trusted keys are admin state, uploads are checked at ingest,
and the merge uses exactly the live contributions signed by a live trusted key of the
replicated state, so replicas decide the same whatever the order they learnt things in."""

from __future__ import annotations

from safetensors.torch import load_file as read_tensors

from crdtmerge.identity import contribution_metadata_header, hash_tensors
from crdtmerge.replica import MessageReceived
from crdtmerge.signing import generate_key, public_key_bytes, sign_tensors
from crdtmerge.tensors import write_tensors
from crdtmerge.wire import IndexMessage

from .conftest import ADMIN, ADMIN_TOKEN, runtime, wait_state, write_signed

RECIPE = {"strategy": "linear", "params": {}}


def _state(client) -> tuple[list[bytes], dict]:
    rt = runtime(client)
    return sorted(rt.store.list()), {
        n: rt.replica.state.get(n).state_hash() for n in rt.merge_names()
    }


def test_trusting_a_key_needs_the_admin_token(node_factory):
    node = node_factory(admin_token=ADMIN_TOKEN)
    key = public_key_bytes(generate_key()).hex()
    r = node.put(f"/v1/merges/m/trusted-keys/{key}")  # the write token only
    assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
    r = node.put(f"/v1/merges/m/trusted-keys/{key}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["trusted_keys"] == [key]
    r = node.put("/v1/merges/m/trusted-keys/nothex", headers=ADMIN)
    assert r.status_code == 400 and "64 hex" in r.json()["detail"]
    r = node.delete(f"/v1/merges/m/trusted-keys/{key}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["trusted_keys"] == []
    assert node.delete(f"/v1/merges/m/trusted-keys/{key}", headers=ADMIN).status_code == 404


def test_ingest_refuses_unsigned_untrusted_and_forged_uploads_and_stores_nothing(
    node, model_files, tmp_path
):
    trusted, other = generate_key(), generate_key()
    node.put("/v1/merges/m/recipe", json=RECIPE)
    node.put(f"/v1/merges/m/trusted-keys/{public_key_bytes(trusted).hex()}")
    before = _state(node)
    tensors = read_tensors(model_files["ft0"])

    r = node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    assert (r.status_code, r.json()["error"]) == (403, "signature_required")

    write_signed(tmp_path / "other.safetensors", tensors, other)
    r = node.post(
        "/v1/merges/m/contributions", content=(tmp_path / "other.safetensors").read_bytes()
    )
    assert (r.status_code, r.json()["error"]) == (403, "untrusted_signer")

    # a valid signature moved onto other tensors: the object hashes fine but does not verify
    signed = sign_tensors(tensors, trusted, {})
    changed = {k: v + 1 if k == "lm_head.weight" else v for k, v in tensors.items()}
    write_tensors(
        tmp_path / "forged.safetensors", changed, contribution_metadata_header(signed.metadata)
    )
    r = node.post(
        "/v1/merges/m/contributions", content=(tmp_path / "forged.safetensors").read_bytes()
    )
    assert (r.status_code, r.json()["error"]) == (422, "bad_signature")

    # parameters changed after signing (e.g. a bigger weight) break it too
    meta = {**signed.metadata, "params": {"weight": 9.0}}
    write_tensors(tmp_path / "reweighted.safetensors", tensors, contribution_metadata_header(meta))
    r = node.post(
        "/v1/merges/m/contributions", content=(tmp_path / "reweighted.safetensors").read_bytes()
    )
    assert (r.status_code, r.json()["error"]) == (422, "bad_signature")
    assert _state(node) == before

    root = write_signed(tmp_path / "good.safetensors", tensors, trusted)
    r = node.post(
        "/v1/merges/m/contributions", content=(tmp_path / "good.safetensors").read_bytes()
    )
    assert r.status_code == 201 and r.json()["root"] == root.hex()


def test_replicas_merge_the_same_set_whatever_they_accepted_at_ingest(
    node_factory, model_files, tmp_path
):
    """A accepts a signed contribution while keys are set; B accepted an unsigned one before
    any key existed. After exchanging state and objects both merge only the signed one."""
    key = generate_key()
    a = node_factory(tmp_path / "a")
    b = node_factory(tmp_path / "b")
    signed_path = tmp_path / "signed.safetensors"
    signed_root = write_signed(signed_path, read_tensors(model_files["ft0"]), key)
    unsigned_root = hash_tensors(model_files["ft1"]).root

    a.put("/v1/merges/m/recipe", json=RECIPE)
    a.put(f"/v1/merges/m/trusted-keys/{public_key_bytes(key).hex()}")
    assert a.post("/v1/merges/m/contributions", content=signed_path.read_bytes()).status_code == 201
    r = b.post("/v1/merges/m/contributions", content=model_files["ft1"].read_bytes())
    assert r.status_code == 201  # no key yet on B: accepted at ingest

    # anti-entropy by hand: each side gets the other's document and objects
    for src, dst in ((a, b), (b, a)):
        rs, rd = runtime(src), runtime(dst)
        for root in rs.store.list():
            dst.post("/v1/objects", content=rs.store.path(root).read_bytes())
        msg = IndexMessage(rs.replica_id, rs.replica.summaries(), tuple(rs.replica.state.items()))
        dst.portal.call(rd.handle, MessageReceived(rs.replica_id, msg))

    sa = wait_state(a, "m", {"ready", "failed"})
    sb = wait_state(b, "m", {"ready", "failed"})
    assert sa["state"] == sb["state"] == "ready"
    assert sa["digest"] == sb["digest"]
    assert sa["contributions"] == sorted([signed_root.hex(), unsigned_root.hex()])
    assert sa["untrusted"] == sb["untrusted"] == [unsigned_root.hex()]
    assert sa["merged_hash"] == sb["merged_hash"]
    # the merged model really is the signed contribution alone (linear over one input)
    merged = runtime(a).store.metadata(bytes.fromhex(sa["merged_hash"]))
    assert signed_root.hex() in str(merged) and unsigned_root.hex() not in str(merged)


def test_without_a_trusted_contribution_the_merge_fails_clearly(node, model_files, tmp_path):
    node.put("/v1/merges/m/recipe", json=RECIPE)
    node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    node.put(f"/v1/merges/m/trusted-keys/{public_key_bytes(generate_key()).hex()}")
    status = wait_state(node, "m", {"ready", "failed"})
    assert status["state"] == "failed" and status["error"] == "no_trusted_contribution"
    assert status["untrusted"] == status["contributions"]


def test_removing_the_last_key_brings_unsigned_contributions_back(node, model_files):
    node.put("/v1/merges/m/recipe", json=RECIPE)
    node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    open_digest = node.get("/v1/merges/m").json()["digest"]
    key = public_key_bytes(generate_key()).hex()
    keyed = node.put(f"/v1/merges/m/trusted-keys/{key}").json()
    assert keyed["digest"] != open_digest  # the keys decide the merged set: they are digested
    back = node.delete(f"/v1/merges/m/trusted-keys/{key}").json()
    assert back["digest"] == open_digest and back["untrusted"] == []
    assert wait_state(node, "m", {"ready"})["state"] == "ready"
