"""Named examples for the layer-1 CRDTs and the wire format: scenarios, exact errors, vectors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import pytest

from crdtmerge.canonical import canonical_pack, domain_hash
from crdtmerge.crdt import (
    LWWRegister,
    MergeDocument,
    NodeState,
    ORSet,
    VersionVector,
    make_actor,
    next_epoch,
    parse_actor,
)
from crdtmerge.crdt.clock import Dot
from crdtmerge.errors import InvalidInput, RemoteProtocolError, UnsupportedVersion
from crdtmerge.recipe import Recipe
from crdtmerge.wire import (
    ChangedNotice,
    DigestMessage,
    IndexMessage,
    MergeSummary,
    decode,
    encode,
)

E1, E2, E3 = (bytes([i]) * 32 for i in (1, 2, 3))
VECTORS = Path(__file__).parent.parent / "vectors" / "crdt.jsonl"


# -- OR-Set scenarios ---------------------------------------------------------------------------


def test_concurrent_add_and_remove_add_wins():
    a = ORSet().add(E1, "a.1")
    b = a  # b received a's state
    removed = b.remove(E1)  # b removes the element it saw
    readded = a.add(E1, "a.1")  # concurrently a adds it again (new dot, unseen by b)
    assert removed.join(readded).value() == {E1}
    assert readded.join(removed).value() == {E1}


def test_observed_remove_wins_over_the_add_it_observed():
    a = ORSet().add(E1, "a.1")
    b = ORSet().join(a).remove(E1)
    assert a.join(b).value() == frozenset()
    assert b.join(a).value() == frozenset()


def test_re_add_after_remove_works():
    s = ORSet().add(E1, "a.1").remove(E1)
    peer = ORSet().join(s)
    s = s.add(E1, "a.1")
    assert peer.join(s).value() == {E1}
    assert s.dots(E1) == {Dot("a.1", 2)}


def test_remove_of_an_absent_element_returns_the_same_state():
    s = ORSet().add(E1, "a.1")
    assert s.remove(E2) is s


def test_later_entry_arrives_first_full_state_loses_nothing():
    # A adds e1 then e2 and ships full states; B receives the later state first.
    s1 = ORSet().add(E1, "a.1")
    s2 = s1.add(E2, "a.1")
    b = ORSet().join(s2).join(s1)
    assert b.value() == {E1, E2}


def test_partial_delta_entry_plus_whole_clock_would_lose_the_earlier_entry():
    # Why crdtmerge never ships "new entry + whole clock": built by hand to show the bug.
    s1 = ORSet().add(E1, "a.1")
    s2 = s1.add(E2, "a.1")
    bad_delta = ORSet._make(s2.clock, {E2: s2.dots(E2)})  # entry e2 + clock a:2
    b = ORSet().join(bad_delta).join(s1)  # e2's "delta" arrives before e1's
    assert b.value() == {E2}  # e1 lost: (a.1, 1) looks seen-and-removed
    good = ORSet().join(s2).join(s1)
    assert good.value() == {E1, E2}


def test_reusing_an_actor_after_lost_state_drops_an_add_kv679():
    # Bug class kv679: a replica adds e1 with dot (a,1), ships it, crashes before persisting,
    # restarts from an empty disk and reuses actor "a": its next add, e2, gets (a,1) again.
    shipped = ORSet().add(E1, "a.1")
    peer = ORSet().join(shipped).remove(E1)  # the peer saw (a,1) and removed e1
    reused = ORSet().add(E2, "a.1")  # same actor, counter restarts at 1
    assert E2 not in peer.join(reused).value()  # e2 silently dropped
    fresh = ORSet().add(E2, make_actor("a", 2))  # new epoch: a new actor, a new dot
    assert E2 in peer.join(fresh).value()


def test_join_returns_self_when_equal():
    s = ORSet().add(E1, "a.1")
    copy = ORSet.from_bytes(s.to_bytes())
    assert s.join(copy) is s
    doc = MergeDocument().add(E1, "a.1")
    assert doc.join(MergeDocument.from_bytes(doc.to_bytes())) is doc


# -- LWW register ------------------------------------------------------------------------------


def test_lww_later_write_wins():
    r1 = LWWRegister().set(Recipe("linear"), "b.1")
    r2 = r1.set(Recipe("ties", 1, {"density": 0.5}), "a.1")  # a < b, but r2 observed r1
    assert r1.join(r2).value.strategy == "ties"
    assert r2.counter == 2


def test_lww_concurrent_writes_are_ordered_by_actor():
    ra = LWWRegister().set(Recipe("linear"), "a.1")
    rb = LWWRegister().set(Recipe("ties", 1, {"density": 0.5}), "b.1")
    assert ra.join(rb) == rb.join(ra) == rb


def test_lww_same_counter_and_actor_is_ordered_by_value_bytes():
    # only reachable if an actor is reused; join must still commute
    r1 = LWWRegister().set(Recipe("linear"), "a.1")
    r2 = LWWRegister().set(Recipe("ties", 1, {"density": 0.5}), "a.1")
    assert r1.join(r2) == r2.join(r1)


def test_lww_clearing_the_recipe_is_a_write():
    r = LWWRegister().set(Recipe("linear"), "a.1").set(None, "a.1")
    assert r.value is None and r.counter == 2 and not r.is_bottom()
    assert LWWRegister.from_bytes(r.to_bytes()) == r


# -- documents, digests ------------------------------------------------------------------------


def test_document_digest_is_blake3_over_recipe_hash_and_sorted_roots():
    recipe = Recipe("ties", 1, {"density": 0.5})
    doc = MergeDocument().add(E2, "a.1").add(E1, "b.1").set_recipe(recipe, "a.1")
    expected = domain_hash("crdtmerge/v1/state-digest", canonical_pack([recipe.hash(), [E1, E2]]))
    assert doc.digest() == expected
    assert doc.live_roots() == [E1, E2]
    empty = domain_hash("crdtmerge/v1/state-digest", canonical_pack([b"", []]))
    assert MergeDocument().digest() == empty


def test_document_digest_covers_trusted_keys_only_when_there_are_some():
    # trusted keys decide which contributions a merge uses (crdtmerge.signing), so two states
    # with the same roots but different keys must not share a digest
    doc = MergeDocument().add(E1, "a.1")
    keyed = doc.add_trusted_key(E3, "a.1")
    expected = domain_hash("crdtmerge/v1/state-digest", canonical_pack([b"", [E1], [E3]]))
    assert keyed.digest() == expected
    assert keyed.remove_trusted_key(E3).digest() == doc.digest()


def test_digest_ignores_history_but_state_hash_does_not():
    a = MergeDocument().add(E1, "a.1")
    b = MergeDocument().add(E2, "b.1").remove(E2).add(E1, "b.1")
    assert a.digest() == b.digest()
    assert a.state_hash() != b.state_hash()


def test_documents_are_immutable():
    doc = MergeDocument()
    with pytest.raises(AttributeError):
        doc.recipe = LWWRegister()


def test_plain_msgpack_body_equals_canonical_pack():
    doc = MergeDocument().add(E1, "a.1").add(E2, "b.7").set_recipe(Recipe("linear"), "a.1")
    obj = NodeState({"m": doc})._to_obj()
    assert msgpack.packb(obj, use_bin_type=True) == canonical_pack(obj)


def test_merge_names_are_validated():
    with pytest.raises(InvalidInput, match="merge name must be"):
        NodeState().with_document("../etc", MergeDocument())


# -- actors and epochs -------------------------------------------------------------------------


def test_make_actor_and_parse_actor_are_inverses():
    assert make_actor("node.a", 5) == "node.a.5"
    assert parse_actor("node.a.5") == ("node.a", 5)
    assert parse_actor("nodea") is None


def test_next_epoch_grows_and_mixes_entropy():
    e1 = next_epoch(0, 0xDEADBEEF)
    e2 = next_epoch(e1, 0x1234)
    assert e1 >> 32 == 1 and e2 >> 32 == 2 and e2 > e1
    # a restored old directory (stale persisted epoch) still gets a fresh epoch
    assert next_epoch(0, 0xCAFE) != e1


# -- decoding errors ---------------------------------------------------------------------------


def _sample_state() -> NodeState:
    doc = MergeDocument().add(E1, "a.1").add(E2, "b.1").set_recipe(Recipe("linear"), "a.1")
    return NodeState({"m": doc.add_trusted_key(E3, "a.1")})


def test_from_bytes_rejects_an_unknown_version():
    data = bytearray(ORSet().add(E1, "a.1").to_bytes())
    data[1] = 9
    with pytest.raises(UnsupportedVersion, match="OR-Set encoding version 9 is not supported"):
        ORSet.from_bytes(bytes(data))


def test_from_bytes_rejects_a_wrong_tag():
    with pytest.raises(InvalidInput, match=r"tag byte is 0x04, expected 0x02"):
        ORSet.from_bytes(MergeDocument().to_bytes())


def test_from_bytes_rejects_garbage_and_every_truncation():
    data = _sample_state().to_bytes()
    for cut in range(len(data)):
        with pytest.raises(InvalidInput):
            NodeState.from_bytes(data[:cut])
    with pytest.raises(InvalidInput, match="malformed node state"):
        NodeState.from_bytes(b"\x05\x01\xc1garbage")
    with pytest.raises(InvalidInput):
        NodeState.from_bytes(data + b"\x00")


def test_from_bytes_never_accepts_an_ill_formed_single_byte_flip():
    data = _sample_state().to_bytes()
    for i in range(2, len(data)):
        for bit in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[i] ^= bit
            try:
                s = NodeState.from_bytes(bytes(flipped))
            except (InvalidInput, UnsupportedVersion):
                continue
            s.check_invariants()  # anything accepted is well-formed and canonical
            assert s.to_bytes() == bytes(flipped)


def test_lww_rejects_recipe_bytes_whose_map_key_is_a_map():
    # Bug found by test_from_bytes_never_accepts_an_ill_formed_single_byte_flip: a flipped
    # byte turned a recipe key into a map; canonical_unpack let msgpack's TypeError
    # ("unhashable type: 'dict'") escape instead of a malformed-state error.
    body = [1, "a.1", b"\x81\x80\x01"]  # {{}: 1}
    with pytest.raises(InvalidInput, match="malformed LWW register: value is not a valid recipe"):
        LWWRegister.from_bytes(b"\x03\x01" + msgpack.packb(body, use_bin_type=True))


def test_from_bytes_rejects_a_dot_above_the_clock():
    body = [[["a.1", 1]], [[E1, [[0, 2]]]]]
    with pytest.raises(InvalidInput, match=r"dot \(a.1, 2\) .* not covered by the set's own clock"):
        ORSet.from_bytes(b"\x02\x01" + msgpack.packb(body))


def test_from_bytes_rejects_a_dot_held_by_two_elements():
    body = [[["a.1", 1]], [[E1, [[0, 1]]], [E2, [[0, 1]]]]]
    with pytest.raises(InvalidInput, match="a dot is held by two elements"):
        ORSet.from_bytes(b"\x02\x01" + msgpack.packb(body))


def test_from_bytes_rejects_unsorted_elements():
    body = [[["a.1", 2]], [[E2, [[0, 1]]], [E1, [[0, 2]]]]]
    with pytest.raises(InvalidInput, match="elements are not strictly sorted"):
        ORSet.from_bytes(b"\x02\x01" + msgpack.packb(body))


def test_from_bytes_rejects_non_canonical_integers():
    good = ORSet().add(E1, "a.1").to_bytes()
    bad = good.replace(b"\xa3a.1\x01", b"\xa3a.1\xcc\x01")  # 1 as uint8 instead of fixint
    assert bad != good
    with pytest.raises(InvalidInput, match="not canonical"):
        ORSet.from_bytes(bad)


# -- wire --------------------------------------------------------------------------------------


def _index() -> IndexMessage:
    doc = _sample_state().get("m")
    return IndexMessage("node-a", (MergeSummary.of("m", doc),), (("m", doc),), ("m",))


def test_wire_messages_round_trip():
    doc = _sample_state().get("m")
    for msg in (
        DigestMessage.of("node-a", (MergeSummary.of("m", doc),), reply=True),
        ChangedNotice("node-b", ()),
        _index(),
    ):
        assert decode(encode(msg)) == msg
        assert encode(decode(encode(msg))) == encode(msg)


def test_wire_rejects_another_protocol_version():
    obj = msgpack.unpackb(encode(ChangedNotice("a", ())))
    obj["v"] = 2
    with pytest.raises(UnsupportedVersion, match="replication protocol version 2"):
        decode(msgpack.packb(obj))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.pop("v"), "no integer protocol version"),
        (lambda o: o.update(type="gossip"), "unknown message type 'gossip'"),
        (lambda o: o.update(extra=1), "fields"),
        (lambda o: o.update(merges=[["m", b"x", b"y"]]), "state_hash must be 32 bytes"),
        (lambda o: o.update(documents=[["m", b"\x04\x01\xc1"]]), "malformed merge document"),
        (lambda o: o.update(want=["b", "a"]), "strictly sorted"),
        (lambda o: o.update(want=[["unhashable"]]), "merge name must be"),
        (lambda o: o.update(merges=[[{"a": 1}, b"x" * 32, b"y" * 32]]), "merge name must be"),
        (lambda o: o.update({"from": ""}), "sender must be a non-empty replica id"),
    ],
)
def test_wire_rejects_malformed_messages(mutate, message):
    obj = msgpack.unpackb(encode(_index()))
    mutate(obj)
    with pytest.raises(RemoteProtocolError, match=message):
        decode(msgpack.packb(obj, use_bin_type=True))


def test_wire_rejects_a_digest_whose_hash_does_not_match_its_summaries():
    doc = _sample_state().get("m")
    obj = msgpack.unpackb(encode(DigestMessage.of("a", (MergeSummary.of("m", doc),))))
    obj["state"] = b"\0" * 32
    with pytest.raises(RemoteProtocolError, match="does not match its merge summaries"):
        decode(msgpack.packb(obj, use_bin_type=True))


def test_wire_decode_raises_only_protocol_errors_on_any_single_byte_flip():
    data = encode(_index())
    for i in range(len(data)):
        for bit in (0x01, 0x20, 0x80):
            flipped = bytearray(data)
            flipped[i] ^= bit
            try:
                msg = decode(bytes(flipped))
            except (RemoteProtocolError, UnsupportedVersion):
                continue
            assert decode(encode(msg)) == msg  # anything accepted is a valid message


def test_wire_rejects_garbage():
    for data in (b"", b"\xc1", b"\x93\x01\x02\x03", encode(_index())[:-3]):
        with pytest.raises(RemoteProtocolError):
            decode(data)


# -- golden vectors ----------------------------------------------------------------------------


def _vector_values() -> dict[str, bytes]:
    recipe = Recipe("ties", 1, {"density": 0.5, "weight": 1.0}, base=b"\x42" * 32)
    orset = ORSet().add(E1, "a.1").add(E2, "b.1").remove(E1).add(E3, "a.1")
    concurrent = ORSet().add(E1, "a.1").join(ORSet().add(E1, "b.1"))
    doc = MergeDocument(LWWRegister().set(recipe, "a.1", 4), orset, ORSet().add(E3, "a.1"))
    state = NodeState({"alpha": doc, "beta": MergeDocument().set_recipe(None, "b.1")})
    summary = MergeSummary.of("alpha", doc)
    return {
        "version_vector": VersionVector({"a.1": 3, "b.2": 1}).to_bytes(),
        "orset_empty": ORSet().to_bytes(),
        "orset_add_remove_readd": orset.to_bytes(),
        "orset_concurrent_adds": concurrent.to_bytes(),
        "lww_empty": LWWRegister().to_bytes(),
        "lww_recipe": doc.recipe.to_bytes(),
        "document": doc.to_bytes(),
        "document_digest": doc.digest(),
        "document_state_hash": doc.state_hash(),
        "node_state": state.to_bytes(),
        "wire_digest": encode(DigestMessage.of("node-a", (summary,))),
        "wire_index": encode(IndexMessage("node-a", (summary,), (("alpha", doc),), ("alpha",))),
    }


def test_golden_vectors_pin_the_encodings():
    values = _vector_values()
    if os.environ.get("CRDTMERGE_REGEN_VECTORS") == "1":
        lines = [json.dumps({"name": k, "hex": v.hex()}) for k, v in values.items()]
        VECTORS.write_text("\n".join(lines) + "\n")
    vectors = {
        v["name"]: bytes.fromhex(v["hex"])
        for v in map(json.loads, VECTORS.read_text().splitlines())
    }
    assert vectors == values
    decoders = {
        "version_vector": VersionVector,
        "orset_empty": ORSet,
        "orset_add_remove_readd": ORSet,
        "orset_concurrent_adds": ORSet,
        "lww_empty": LWWRegister,
        "lww_recipe": LWWRegister,
        "document": MergeDocument,
        "node_state": NodeState,
    }
    for name, cls in decoders.items():
        assert cls.from_bytes(vectors[name]).to_bytes() == vectors[name], name
    for name in ("wire_digest", "wire_index"):
        assert encode(decode(vectors[name])) == vectors[name]
