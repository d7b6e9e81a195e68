"""Named examples for the sans-I/O replica core: effect order, exchanges, backoff, errors."""

from __future__ import annotations

import pytest

from crdtmerge import wire
from crdtmerge.crdt import MergeDocument, make_actor
from crdtmerge.errors import InvalidInput, RemoteProtocolError, StorageError
from crdtmerge.recipe import Recipe
from crdtmerge.replica import (
    Ack,
    AddContribution,
    DigestChanged,
    FetchObjects,
    MessageReceived,
    ObjectsPresent,
    ObjectStored,
    Persist,
    PersistEpoch,
    RemoveContribution,
    Replica,
    ReplicaConfig,
    Send,
    SendFailed,
    SetRecipe,
    Tick,
)
from crdtmerge.wire import ChangedNotice, DigestMessage, IndexMessage

R1, R2, BASE = b"\x01" * 32, b"\x02" * 32, b"\xba" * 32


def kinds(effects):
    return [type(e).__name__ for e in effects]


def deliver_all(replicas, effects_by_sender):
    """Deliver Send effects (through the wire codec) until nothing is left; return count."""
    queue = [(src, e) for src, effects in effects_by_sender for e in effects if isinstance(e, Send)]
    count = 0
    while queue:
        src, send = queue.pop(0)
        count += 1
        msg = wire.decode(wire.encode(send.message))
        out = replicas[send.peer].handle(MessageReceived(src, msg))
        queue += [(send.peer, e) for e in out if isinstance(e, Send)]
    return count


def test_local_add_persists_before_it_acks_and_notifies():
    r = Replica("a", 1, peers=["b", "c"])
    effects = r.handle(AddContribution("m", R1, "req-1"))
    assert kinds(effects) == ["Persist", "Ack", "DigestChanged", "FetchObjects", "Send", "Send"]
    persist, ack = effects[0], effects[1]
    assert persist.documents == (("m", r.state.get("m").to_bytes()),)
    assert ack == Ack("req-1", "m", True, r.state.get("m").digest())
    assert effects[3] == FetchObjects("m", (R1,))
    assert {e.peer for e in effects[4:]} == {"b", "c"}
    assert all(isinstance(e.message, ChangedNotice) for e in effects[4:])


def test_add_of_a_stored_object_does_not_fetch():
    r = Replica("a", 1)
    r.handle(ObjectStored(R1))
    effects = r.handle(AddContribution("m", R1, 1))
    assert kinds(effects) == ["Persist", "Ack", "DigestChanged"]
    assert effects[2] == DigestChanged("m", r.state.get("m").digest(), True)


def test_removing_an_absent_root_only_acks_unchanged():
    r = Replica("a", 1, peers=["b"])
    assert r.handle(RemoveContribution("m", R1, 5)) == [
        Ack(5, "m", False, MergeDocument().digest())
    ]


def test_bad_local_arguments_raise_before_any_change():
    with pytest.raises(InvalidInput, match="root must be 32 bytes"):
        AddContribution("m", b"short")
    with pytest.raises(InvalidInput, match="merge name must be"):
        AddContribution("no spaces", R1)


def test_equal_states_exchange_two_digests_only():
    a, b = Replica("a", 1, peers=["b"]), Replica("b", 1, peers=["a"])
    (send,) = a.handle(Tick(0.0, 1))
    assert isinstance(send.message, DigestMessage) and not send.message.reply
    reply = b.handle(MessageReceived("a", send.message))
    assert kinds(reply) == ["Send"] and reply[0].message.reply
    assert a.handle(MessageReceived("b", reply[0].message)) == []
    assert len(wire.encode(send.message)) < 120  # no merge yet: the whole-state hash
    assert a.status("m").converged


def test_push_pull_converges_both_sides_in_one_exchange():
    a, b = Replica("a", 1, peers=["b"]), Replica("b", 1, peers=["a"])
    a.handle(AddContribution("m", R1))
    b.handle(AddContribution("m", R2))
    b.handle(SetRecipe("n", Recipe("linear")))
    replicas = {"a": a, "b": b}
    messages = deliver_all(replicas, [("a", a.handle(Tick(0.0, 0)))])
    assert messages == 3  # digest, index (+want), index back
    assert a.state == b.state
    assert a.state.get("m").live_roots() == [R1, R2]


def test_idle_digest_round_costs_a_few_hundred_bytes():
    a, b = Replica("a", 1, peers=["b"]), Replica("b", 1, peers=["a"])
    for i in range(3):
        a.handle(AddContribution(f"merge-{i}", R1))
    deliver_all({"a": a, "b": b}, [("a", a.handle(Tick(0.0, 0)))])
    (send,) = a.handle(Tick(1.0, 0))
    assert send.message.listed  # 3 merges: summaries inline
    reply = b.handle(MessageReceived("a", send.message))
    sizes = [len(wire.encode(send.message)), len(wire.encode(reply[0].message))]
    assert reply[0].message.reply and max(sizes) < 400, sizes
    assert a.handle(MessageReceived("b", reply[0].message)) == []


def test_many_merges_send_the_whole_state_hash_only_when_idle():
    a, b = Replica("a", 1, peers=["b"]), Replica("b", 1, peers=["a"])
    for i in range(50):
        a.handle(AddContribution(f"merge-{i:02}", R1))
    deliver_all({"a": a, "b": b}, [("a", a.handle(Tick(0.0, 0)))])
    assert a.state == b.state
    (send,) = a.handle(Tick(1.0, 0))
    assert not send.message.listed and len(wire.encode(send.message)) < 120
    (reply,) = b.handle(MessageReceived("a", send.message))
    assert reply.message.reply and len(wire.encode(reply.message)) < 120
    assert b.status("merge-07").peers_agreeing == ("a",)


def test_hash_only_digest_that_differs_is_answered_with_the_listed_digest():
    config = ReplicaConfig(inline_summaries=0)
    a = Replica("a", 1, peers=["b"], config=config)
    b = Replica("b", 1, peers=["a"], config=config)
    a.handle(AddContribution("m", R1))
    b.handle(AddContribution("n", R2))
    (send,) = a.handle(Tick(0.0, 0))
    assert not send.message.listed
    (answer,) = b.handle(MessageReceived("a", send.message))
    assert answer.message.listed and not answer.message.reply
    assert deliver_all({"a": a, "b": b}, [("b", [answer])]) == 3  # listed, index, index back
    assert a.state == b.state


def test_changed_notice_makes_the_receiver_pull_at_once():
    a, b = Replica("a", 1, peers=["b"]), Replica("b", 1, peers=["a"])
    effects = a.handle(AddContribution("m", R1))
    deliver_all({"a": a, "b": b}, [("a", effects)])
    assert b.state.get("m").live_roots() == [R1]


def test_join_persists_before_it_fetches_and_reports():
    a, b = Replica("a", 1, peers=["b"]), Replica("b", 1, peers=["a"])
    a.handle(AddContribution("m", R1))
    index = IndexMessage("a", a.summaries(), (("m", a.state.get("m")),))
    effects = b.handle(MessageReceived("a", index))
    assert kinds(effects) == ["Persist", "DigestChanged", "FetchObjects"]
    assert effects[2] == FetchObjects("m", (R1,))
    assert b.status("m").missing_roots == (R1,)
    assert kinds(b.handle(ObjectStored(R1))) == ["DigestChanged"]
    assert b.status("m").complete


def test_recipe_base_counts_as_a_needed_object():
    r = Replica("a", 1)
    effects = r.handle(SetRecipe("m", Recipe("ties", 1, {"density": 0.5}, base=BASE)))
    assert FetchObjects("m", (BASE,)) in effects
    r.handle(ObjectsPresent(frozenset({BASE})))
    assert r.status("m").complete


def test_message_from_an_impostor_is_rejected_and_changes_nothing():
    a, b = Replica("a", 1, peers=["b", "c"]), Replica("b", 1)
    b.handle(AddContribution("m", R1))
    index = IndexMessage("b", b.summaries(), (("m", b.state.get("m")),))
    before = a.state
    with pytest.raises(RemoteProtocolError, match="claims to be from 'b'"):
        a.handle(MessageReceived("c", index))
    assert a.state is before


def test_garbage_from_a_peer_is_a_remote_protocol_error():
    with pytest.raises(RemoteProtocolError):
        wire.decode(b"\x81\xa1v\x01")


def test_round_robin_visits_every_peer_once_per_pass():
    r = Replica("a", 1, peers=["b", "c", "d", "e"])
    first = [r.handle(Tick(0.0, 42))[0].peer for _ in range(4)]
    second = [r.handle(Tick(0.0, 43))[0].peer for _ in range(4)]
    assert sorted(first) == sorted(second) == ["b", "c", "d", "e"]


def test_failed_peer_is_skipped_with_exponential_backoff():
    r = Replica("a", 1, peers=["b"], config=ReplicaConfig(backoff_base=1.0, backoff_max=4.0))
    assert r.handle(SendFailed("b", 10.0)) == []
    assert r.handle(Tick(10.5, 0)) == []  # in backoff until 11.0
    assert r.handle(Tick(11.0, 0))[0].peer == "b"
    r.handle(SendFailed("b", 11.0))
    assert r.handle(Tick(12.5, 0)) == []  # second failure: 2 s
    for _ in range(5):
        r.handle(SendFailed("b", 20.0))
    assert r.handle(Tick(23.9, 0)) == [] and r.handle(Tick(24.0, 0))  # capped at 4 s
    # a message from the peer clears the backoff; failing peers get no change notices
    r.handle(SendFailed("b", 30.0))
    assert not any(isinstance(e, Send) for e in r.handle(AddContribution("m", R1)))
    r.handle(MessageReceived("b", DigestMessage.of("b", (), reply=True)))
    assert r.handle(Tick(30.0, 0))[0].peer == "b"


def test_status_reports_agreement_with_peers_heard_from():
    a, b = Replica("a", 1, peers=["b"]), Replica("b", 1, peers=["a"])
    a.handle(AddContribution("m", R1))
    b.handle(MessageReceived("a", DigestMessage.of("a", a.summaries())))
    assert b.status("m").peers_differing == ("a",) and not b.status("m").converged
    deliver_all({"a": a, "b": b}, [("a", a.handle(Tick(0.0, 0)))])
    deliver_all({"a": a, "b": b}, [("b", b.handle(Tick(1.0, 0)))])
    assert b.status("m").peers_agreeing == ("a",) and b.status("m").converged


def test_restore_rebuilds_the_state_and_rejects_corrupt_rows():
    a = Replica("a", 1)
    (persist, *_) = a.handle(AddContribution("m", R1))
    restored = Replica.restore("a", 2, dict(persist.documents))
    assert restored.state == a.state and restored.actor == make_actor("a", 2)
    with pytest.raises(StorageError, match="stored merge 'm' is unreadable"):
        Replica.restore("a", 2, {"m": b"\x04\x01\xc1"})


def test_stale_incarnation_moves_to_a_new_epoch_before_anything_else():
    # An old data directory was restored without a fresh epoch: this replica runs as "a.5"
    # again although the lost incarnation "a.5" already issued dots that peers hold.
    lost = Replica("a", 5)
    lost.handle(AddContribution("m", R1))
    lost.handle(AddContribution("m", R2))
    peer = Replica("b", 1, peers=["a"])
    peer.handle(
        MessageReceived("a", IndexMessage("a", lost.summaries(), tuple(lost.state.items())))
    )
    again = Replica("a", 5, peers=["b"])
    again.handle(AddContribution("n", R1))
    index = IndexMessage("b", peer.summaries(), tuple(peer.state.items()))
    effects = again.handle(MessageReceived("b", index))
    assert isinstance(effects[0], PersistEpoch)
    assert again.epoch == effects[0].epoch and again.epoch >> 32 == 1
    assert again.actor == make_actor("a", again.epoch)
    # later adds use the new actor, so they cannot collide with the lost incarnation's dots
    again.handle(AddContribution("m", b"\x03" * 32))
    assert {d.actor for d in again.state.get("m").contributions.dots(b"\x03" * 32)} == {again.actor}
    again.check_invariants()


def test_tick_without_peers_does_nothing():
    assert Replica("solo", 1).handle(Tick(0.0, 0)) == []
    assert Replica("solo", 1, peers=["solo"]).peers.peers() == []


def test_set_peers_never_makes_a_replica_its_own_peer():
    r = Replica("a", 1, peers=["b"])
    r.peers.set_peers(["a", "b", "c"])  # e.g. peer exchange echoing our own id back
    assert r.peers.peers() == ["b", "c"]
    r.check_invariants()


def test_persisted_effects_restore_the_exact_state():
    a = Replica("a", 1, peers=["b"])
    store: dict[str, bytes] = {}
    for event in (
        AddContribution("m", R1),
        AddContribution("m", R2),
        RemoveContribution("m", R1),
        SetRecipe("m", Recipe("linear")),
    ):
        for e in a.handle(event):
            if isinstance(e, Persist):
                store.update(dict(e.documents))
    assert Replica.restore("a", 2, store).state == a.state
