"""Ed25519 contribution signatures (crdtmerge.signing) and the keygen / trust / push --sign CLI."""

from __future__ import annotations

import json
import stat

import pytest
import torch

import crdtmerge.client
from crdtmerge.canonical import canonical_pack
from crdtmerge.cli import main, remote_cmd
from crdtmerge.client import Client
from crdtmerge.errors import Forbidden, IntegrityError, InvalidInput
from crdtmerge.identity import Manifest, hash_tensors
from crdtmerge.signing import (
    SIGNATURE_DOMAIN,
    check_trusted,
    eligible_roots,
    generate_key,
    load_private_key,
    load_public_key,
    public_key_bytes,
    save_private_key,
    sign_manifest,
    sign_tensors,
    signing_message,
    unsigned_root,
    verify_manifest,
)

from .conftest import runtime, wait_state

TENSORS = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}


def _with_meta(m: Manifest, **changes) -> Manifest:
    return Manifest.build(m.tensors, {**m.metadata, **changes}, chunk_size=m.chunk_size)


def test_a_signature_verifies_and_names_its_signer():
    key = generate_key()
    m = sign_tensors(TENSORS, key, {"params": {"weight": 0.5}})
    assert verify_manifest(m) == public_key_bytes(key)
    assert m.metadata["params"] == {"weight": 0.5}
    assert m.metadata["signer"] == public_key_bytes(key).hex()
    # the root covers the signature: the signed object is another object than the unsigned one
    assert m.root != unsigned_root(m) != hash_tensors(TENSORS, {"params": {"weight": 0.5}}).root


def test_signing_is_deterministic_and_re_signing_replaces_the_signer():
    key, other = generate_key(), generate_key()
    m1, m2 = sign_tensors(TENSORS, key, {}), sign_tensors(TENSORS, key, {})
    assert m1.root == m2.root and m1.metadata == m2.metadata  # RFC 8032: same key, same bytes
    m3 = sign_manifest(other, m1)
    assert verify_manifest(m3) == public_key_bytes(other) and m3.root != m1.root


def test_the_message_is_domain_separated_canonical_msgpack():
    key = generate_key()
    m = sign_tensors(TENSORS, key, {})
    meta = {k: v for k, v in m.metadata.items() if k != "signature"}
    msg = signing_message(unsigned_root(m), meta)
    assert msg == canonical_pack([SIGNATURE_DOMAIN, unsigned_root(m), meta])
    key.public_key().verify(bytes.fromhex(m.metadata["signature"]), msg)
    with pytest.raises(InvalidInput):
        signing_message(unsigned_root(m), m.metadata)  # never sign the signature itself


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda m, k: _with_meta(m, params={"weight": 2.0}), id="params"),
        pytest.param(lambda m, k: _with_meta(m, signer=public_key_bytes(k).hex()), id="signer"),
        pytest.param(lambda m, k: _with_meta(m, signature="00" * 64), id="signature"),
        pytest.param(
            lambda m, k: Manifest.build(
                hash_tensors({**TENSORS, "a": TENSORS["a"] + 1}).tensors, m.metadata
            ),
            id="tensor-bytes",
        ),
        pytest.param(
            lambda m, k: Manifest.build(m.tensors, m.metadata, chunk_size=1 << 16), id="chunk-size"
        ),
    ],
)
def test_any_change_after_signing_breaks_the_signature(tamper):
    key, other = generate_key(), generate_key()
    m = sign_tensors(TENSORS, key, {"params": {"weight": 1.0}})
    with pytest.raises(IntegrityError) as err:
        verify_manifest(tamper(m, other))
    assert err.value.code == "bad_signature"


@pytest.mark.parametrize(
    "meta,match",
    [
        ({"signer": "ab" * 32}, "no 'signature'"),
        ({"signature": "ab" * 64}, "no 'signer'"),
        ({"signer": "xyz", "signature": "ab" * 64}, "64 hex"),
        ({"signer": "ab" * 32, "signature": 5}, "128 hex"),
    ],
)
def test_malformed_signature_fields_are_integrity_errors(meta, match):
    with pytest.raises(IntegrityError, match=match):
        verify_manifest(hash_tensors(TENSORS, meta))


def test_unsigned_objects_have_no_signer():
    assert verify_manifest(hash_tensors(TENSORS, {"params": {}})) is None


def test_eligibility_is_decided_by_the_trusted_keys_alone():
    k1, k2 = generate_key(), generate_key()
    by_root = {}
    for m in (
        sign_tensors(TENSORS, k1, {}),
        sign_tensors(TENSORS, k2, {}),
        hash_tensors(TENSORS, {}),
        _with_meta(sign_tensors(TENSORS, k1, {}), params={"weight": 3}),  # forged
    ):
        by_root[m.root] = m
    roots = sorted(by_root)

    def signer_of(r):
        return verify_manifest(by_root[r])

    assert eligible_roots(roots, [], signer_of) == (roots, [])
    inc, exc = eligible_roots(roots, [public_key_bytes(k1)], signer_of)
    assert [verify_manifest(by_root[r]) for r in inc] == [public_key_bytes(k1)]
    assert len(exc) == 3
    # any order of the inputs gives the same split (it is a function of the state)
    inc2, exc2 = eligible_roots(roots[::-1], {public_key_bytes(k1)}, signer_of)
    assert sorted(inc2) == sorted(inc) and sorted(exc2) == sorted(exc)


def test_ingest_check_codes():
    k = generate_key()
    signed, unsigned = sign_tensors(TENSORS, k, {}), hash_tensors(TENSORS, {})
    assert check_trusted(unsigned, []) is None
    assert check_trusted(signed, [public_key_bytes(k)]) == public_key_bytes(k)
    with pytest.raises(Forbidden) as e:
        check_trusted(unsigned, [public_key_bytes(k)])
    assert e.value.code == "signature_required"
    with pytest.raises(Forbidden) as e:
        check_trusted(signed, [public_key_bytes(generate_key())])
    assert e.value.code == "untrusted_signer"


def test_key_files_round_trip_and_are_private(tmp_path):
    key = generate_key()
    priv, pub = save_private_key(key, tmp_path / "me")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert public_key_bytes(load_private_key(priv)) == public_key_bytes(key)
    assert load_public_key(pub) == load_public_key(pub.read_text()) == public_key_bytes(key)
    assert load_public_key(priv) == public_key_bytes(key)  # a PEM private key names its public
    with pytest.raises(InvalidInput, match="refusing to overwrite"):
        save_private_key(generate_key(), tmp_path / "me")
    seed = tmp_path / "seed"
    seed.write_text("11" * 32)
    assert len(public_key_bytes(load_private_key(seed))) == 32
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(InvalidInput, match="crdtmerge keygen"):
        load_private_key(tmp_path / "junk")
    with pytest.raises(InvalidInput, match="64 hex"):
        load_public_key("abc")


def test_cli_keygen_trust_and_signed_push(node, model_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(remote_cmd, "_client", lambda args: Client(http=node))
    monkeypatch.setattr(crdtmerge.client, "Client", lambda *a, **k: Client(http=node))
    assert main(["keygen", str(tmp_path / "alice"), "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)
    assert main(["keygen", str(tmp_path / "alice")]) == 1  # never overwrites
    capsys.readouterr()
    node.put("/v1/merges/m/recipe", json={"strategy": "linear"})
    assert main(["trust", "http://testserver", "--merge", "m", keys["public_file"]]) == 0
    capsys.readouterr()
    assert node.get("/v1/merges/m").json()["trusted_keys"] == [keys["public_key"]]

    url = "http://testserver"
    assert main(["push", url, "--merge", "m", str(model_files["ft0"]), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "signature_required"
    args = ["push", url, "--merge", "m", str(model_files["ft0"]), "--json"]
    assert main([*args, "--sign", keys["private_key"]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["created"] and out["signer"] == keys["public_key"]
    assert verify_manifest(runtime(node).store.manifest(bytes.fromhex(out["root"]))) == (
        bytes.fromhex(keys["public_key"])
    )
    status = wait_state(node, "m", {"ready"})
    assert status["contributions"] == [out["root"]] and status["untrusted"] == []
    assert main(["trust", url, "--merge", "m", keys["public_key"], "--remove"]) == 0
    assert node.get("/v1/merges/m").json()["trusted_keys"] == []
