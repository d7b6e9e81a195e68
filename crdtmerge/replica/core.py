"""The sans-I/O replica core: every transition rule of a replica, in one module.

Like h11's ``Connection``, a :class:`Replica` owns no socket, clock, thread, random source or
file. The driver feeds it events (:mod:`.events`) through :meth:`Replica.handle` and executes the
returned effects (:mod:`.effects`) in order. The same core runs in the node (FastAPI + SQLite +
httpx) and in the deterministic simulator of ``tests/simulation``.

Rules:

* **Local writes** (set recipe, add/remove contribution, add/remove trusted key) apply to the
  merge document with this incarnation's actor (``make_actor(replica_id, epoch)``) and return
  ``[Persist(doc), Ack, DigestChanged?, FetchObjects?, Send(peer, ChangedNotice) ...]``: the
  write is durable before it is acknowledged or revealed to anyone (dot safety).
* **Anti-entropy** (Demers et al. 1987, push-pull): on :class:`~.events.Tick` the replica sends
  a :class:`~crdtmerge.wire.DigestMessage` to one peer, round-robin over a shuffled order
  (:mod:`.peers`): its whole-state hash, plus one ``(name, state_hash, digest)`` per merge when
  it has few merges (``ReplicaConfig.inline_summaries``). If the whole-state hashes match the
  receiver answers with its own digest (``reply=True``): an idle round costs two small
  messages. If they differ and the summaries were not listed, it answers with its listed
  digest so the initiator can compare. Otherwise it sends an
  :class:`~crdtmerge.wire.IndexMessage` with its full documents for the differing merges and
  ``want`` = the merges it needs back; the initiator joins them and answers with its documents.
  Full documents only -- never "one entry + whole clock" (see :mod:`crdtmerge.crdt.orset`).
* **Change notices**: after a local write, every healthy peer gets a ``ChangedNotice`` carrying
  the merge's summary; a receiver whose hash differs pulls at once (as for a digest).
* **Joins** validate everything first (messages arrive decoded and validated by
  :mod:`crdtmerge.wire`), then join, then ``Persist`` the changed documents, then
  ``FetchObjects`` for live roots not stored locally. A bad message raises
  :class:`~crdtmerge.errors.RemoteProtocolError` and changes nothing.
* **Stale incarnation**: if a peer's state shows a dot of our own actor that we do not know, or
  a later epoch of our replica id, this incarnation's actor id was used before (an old data
  directory was restored). The core moves to a fresh epoch (``PersistEpoch``) before any other
  effect, so no further dot can collide.
* **Objects** are inputs: ``ObjectsPresent``/``ObjectStored`` feed completeness, which
  :meth:`Replica.status` reports with the digest, live and missing roots, and whether every peer
  heard from reported the same digest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..canonical import domain_hash
from ..crdt.clock import make_actor, next_epoch, parse_actor
from ..crdt.document import MergeDocument
from ..crdt.state import NodeState
from ..errors import InvalidInput, LocalProtocolError, RemoteProtocolError, StorageError
from ..recipe import Recipe
from ..wire import ChangedNotice, DigestMessage, IndexMessage, MergeSummary, Message
from .effects import Ack, DigestChanged, Effect, FetchObjects, Persist, PersistEpoch, Send
from .events import (
    AddContribution,
    AddTrustedKey,
    Event,
    MessageReceived,
    ObjectsPresent,
    ObjectStored,
    RemoveContribution,
    RemoveTrustedKey,
    RequestId,
    SendFailed,
    SetRecipe,
    Tick,
)
from .peers import PeerTable

__all__ = ["MergeStatus", "Replica", "ReplicaConfig"]

_BOTTOM = MergeDocument()


@dataclass(frozen=True)
class ReplicaConfig:
    """Tunables. Backoff times are in the driver's ``now`` units (seconds)."""

    backoff_base: float = 1.0
    backoff_max: float = 60.0
    notify_changes: bool = True
    #: digests list per-merge summaries inline up to this many merges, else send the hash only
    inline_summaries: int = 4


@dataclass(frozen=True)
class MergeStatus:
    """What ``GET /v1/merges/{name}`` needs from layer 1."""

    merge: str
    digest: bytes
    state_hash: bytes
    recipe: Recipe | None
    live_roots: tuple[bytes, ...]
    missing_roots: tuple[bytes, ...]
    complete: bool
    peers_agreeing: tuple[str, ...]
    peers_differing: tuple[str, ...]

    @property
    def converged(self) -> bool:
        """Every peer heard from reported this digest (vacuously true with no peer heard)."""
        return not self.peers_differing


class Replica:
    """One replica's layer-1 state and gossip bookkeeping (see the module docstring).

    Args:
        replica_id: stable replica name (also the ``sender`` of its messages).
        epoch: this incarnation's epoch, persisted and bumped on every start
            (:func:`~crdtmerge.crdt.clock.next_epoch`).
        state: the persisted state (``NodeState()`` for a new replica).
        peers: replica ids of the peers.

    Example:
        >>> r = Replica("a", 1, peers=["b"])
        >>> [type(e).__name__ for e in r.handle(AddContribution("m", b"\\1" * 32, "req-1"))]
        ['Persist', 'Ack', 'DigestChanged', 'FetchObjects', 'Send']
    """

    def __init__(
        self,
        replica_id: str,
        epoch: int,
        state: NodeState | None = None,
        peers: Iterable[str] = (),
        config: ReplicaConfig | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.epoch = epoch
        self.actor = make_actor(replica_id, epoch)
        self.config = config or ReplicaConfig()
        self.state = state if state is not None else NodeState()
        self.peers = PeerTable(
            peers, self.config.backoff_base, self.config.backoff_max, own_id=replica_id
        )
        self._lamport = max((d.recipe.counter for _, d in self.state.items()), default=0)
        self._present: set[bytes] = set()
        self._peer_views: dict[str, dict[str, MergeSummary]] = {}
        self._reported: dict[str, tuple[bytes, bool]] = {}
        self.counters: dict[str, int] = {}
        self._summaries: tuple[NodeState | None, tuple[MergeSummary, ...]] = (None, ())

    @classmethod
    def restore(
        cls,
        replica_id: str,
        epoch: int,
        documents: Mapping[str, bytes],
        peers: Iterable[str] = (),
        config: ReplicaConfig | None = None,
    ) -> Replica:
        """Rebuild a replica from persisted documents (``Persist`` payloads).

        Raises:
            StorageError: a stored document does not decode (disk corruption).
        """
        docs = {}
        for name, data in documents.items():
            try:
                docs[name] = MergeDocument.from_bytes(data)
            except InvalidInput as exc:
                raise StorageError(f"stored merge {name!r} is unreadable: {exc.detail}") from exc
        return cls(replica_id, epoch, NodeState(docs), peers, config)

    # -- the one entry point ----------------------------------------------------------------

    def handle(self, event: Event) -> list[Effect]:
        """Apply one event and return the effects to execute, in order.

        Raises:
            InvalidInput: a local request with bad arguments (nothing changed).
            RemoteProtocolError: a message that breaks the protocol (nothing changed).
            LocalProtocolError: not an event.
        """
        handler = self._HANDLERS.get(type(event))
        if handler is None:
            raise LocalProtocolError(f"not a replica event: {event!r}")
        return handler(self, event)

    def revert(self, state: NodeState) -> None:
        """Put back ``state``, the state this replica held before the last event.

        The I/O layer calls it when persisting that event's documents failed: a change that
        is not durable must not be gossiped (a crash would then lose an add the cluster has
        seen, or reuse its dot). Nothing of it was sent, because every handler emits ``Persist``
        before its ``Send``, ``Ack`` and notice effects, and the I/O layer stops at a failed
        one; so the dots minted for it may be minted again.
        """
        self.state = state

    # -- local writes -----------------------------------------------------------------------

    def _local(
        self, merge: str, request_id: RequestId, op: Callable[[MergeDocument], MergeDocument]
    ) -> list[Effect]:
        before = self.state.get(merge)
        after = op(before)
        if after is before:
            return [Ack(request_id, merge, False, before.digest())]
        self.state = self.state.with_document(merge, after)
        self._lamport = max(self._lamport, after.recipe.counter)
        self._count("local_writes")
        effects: list[Effect] = [
            Persist(((merge, after.to_bytes()),)),
            Ack(request_id, merge, True, after.digest()),
        ]
        effects += self._after_change([merge])
        if self.config.notify_changes:
            notice = ChangedNotice(self.replica_id, (MergeSummary.of(merge, after),))
            effects += [Send(p, notice) for p in self.peers.healthy()]
        return effects

    def _on_set_recipe(self, ev: SetRecipe) -> list[Effect]:
        return self._local(
            ev.merge, ev.request_id, lambda d: d.set_recipe(ev.recipe, self.actor, self._lamport)
        )

    def _on_add(self, ev: AddContribution) -> list[Effect]:
        return self._local(ev.merge, ev.request_id, lambda d: d.add(ev.root, self.actor))

    def _on_remove(self, ev: RemoveContribution) -> list[Effect]:
        return self._local(ev.merge, ev.request_id, lambda d: d.remove(ev.root))

    def _on_add_key(self, ev: AddTrustedKey) -> list[Effect]:
        return self._local(ev.merge, ev.request_id, lambda d: d.add_trusted_key(ev.key, self.actor))

    def _on_remove_key(self, ev: RemoveTrustedKey) -> list[Effect]:
        return self._local(ev.merge, ev.request_id, lambda d: d.remove_trusted_key(ev.key))

    # -- anti-entropy -----------------------------------------------------------------------

    def summaries(self) -> tuple[MergeSummary, ...]:
        """One ``(name, state_hash, digest)`` per merge (cached until the state changes)."""
        if self._summaries[0] is not self.state:
            items = tuple(MergeSummary.of(name, doc) for name, doc in self.state.items())
            self._summaries = (self.state, items)
        return self._summaries[1]

    def _digest(self, reply: bool, listed: bool | None = None) -> DigestMessage:
        summaries = self.summaries()
        if listed is None:
            listed = len(summaries) <= self.config.inline_summaries
        return DigestMessage.of(self.replica_id, summaries, listed=listed, reply=reply)

    def _on_tick(self, ev: Tick) -> list[Effect]:
        peer = self.peers.next_peer(ev.now, ev.rng_value)
        if peer is None:
            return []
        self._count("rounds")
        return [Send(peer, self._digest(reply=False))]

    def _on_send_failed(self, ev: SendFailed) -> list[Effect]:
        self.peers.failed(ev.peer, ev.now)
        self._count("send_failures")
        return []

    def _on_message(self, ev: MessageReceived) -> list[Effect]:
        msg: Message = ev.message
        if msg.sender != ev.peer:
            raise RemoteProtocolError(
                f"message from peer {ev.peer!r} claims to be from {msg.sender!r}"
            )
        if msg.sender == self.replica_id:
            raise RemoteProtocolError(f"peer {ev.peer!r} uses our own replica id")
        if isinstance(msg, IndexMessage):
            return self._on_index(ev.peer, msg)
        self.peers.heard_from(ev.peer)
        self._count("messages_received")
        if isinstance(msg, DigestMessage):
            return self._on_digest(ev.peer, msg)
        if isinstance(msg, ChangedNotice):
            view = self._peer_views.setdefault(ev.peer, {})
            view.update((m.name, m) for m in msg.merges)
            diff = self._differing(msg.merges, complete=False)
            return [Send(ev.peer, self._index(diff, msg.merges))] if diff else []
        raise LocalProtocolError(f"unknown message type {type(msg).__name__}")

    def _on_digest(self, peer: str, msg: DigestMessage) -> list[Effect]:
        mine = self._digest(reply=True)
        if msg.state_hash == mine.state_hash:  # idle round: equal states
            self._peer_views[peer] = {m.name: m for m in self.summaries()}
            return [] if msg.reply else [Send(peer, mine)]
        if not msg.listed:  # hash only and it differs: list ours so the peer can compare
            return [Send(peer, self._digest(reply=False, listed=True))]
        self._peer_views[peer] = {m.name: m for m in msg.merges}
        diff = self._differing(msg.merges, complete=True)
        return [Send(peer, self._index(diff, msg.merges))] if diff else []

    def _differing(self, theirs: tuple[MergeSummary, ...], complete: bool) -> list[str]:
        """Merges whose state hash differs; ``complete``: ``theirs`` lists all their merges."""
        names = {m.name for m in theirs}
        diff = [m.name for m in theirs if self.state.get(m.name).state_hash() != m.state_hash]
        if complete:
            diff += [n for n in self.state.names() if n not in names]
        return sorted(set(diff))

    def _index(self, names: list[str], theirs: tuple[MergeSummary, ...]) -> IndexMessage:
        they_have = {m.name for m in theirs}
        docs = tuple((n, self.state.get(n)) for n in names if n in self.state)
        want = tuple(n for n in names if n in they_have)
        self._count("index_sent")
        return IndexMessage(self.replica_id, self.summaries(), docs, want)

    def _on_index(self, peer: str, msg: IndexMessage) -> list[Effect]:
        # validate every document against this replica before changing anything
        for name, doc in msg.documents:
            self._check_remote(peer, name, doc)
        self.peers.heard_from(peer)
        self._count("messages_received")
        self._peer_views[peer] = {m.name: m for m in msg.merges}
        effects: list[Effect] = []
        stale = self._stale_epoch(msg.documents)
        if stale is not None:
            self.epoch = stale
            self.actor = make_actor(self.replica_id, stale)
            self._count("stale_epoch_detected")
            effects.append(PersistEpoch(stale))
        changed = []
        state = self.state
        for name, doc in msg.documents:
            mine = state.get(name)
            joined = mine.join(doc)
            if joined is not mine and joined != mine:
                state = state.with_document(name, joined)
                changed.append(name)
                self._lamport = max(self._lamport, joined.recipe.counter)
        self.state = state
        if changed:
            self._count("joins_changed")
            effects.append(Persist(tuple((n, state.get(n).to_bytes()) for n in changed)))
        if msg.want:
            docs = tuple((n, state.get(n)) for n in msg.want if n in state)
            if docs:
                effects.append(Send(peer, IndexMessage(self.replica_id, self.summaries(), docs)))
        effects += self._after_change(changed)
        return effects

    def _check_remote(self, peer: str, name: str, doc: MergeDocument) -> None:
        # documents arrive decoded by ``wire.decode``, which validated their structure and
        # invariants; here only what depends on this replica is checked.
        if not isinstance(doc, MergeDocument):
            raise RemoteProtocolError(f"peer {peer!r} sent merge {name!r} without a document")

    def _stale_epoch(self, documents: Iterable[tuple[str, MergeDocument]]) -> int | None:
        """A fresh epoch if a peer knows more of our actor (or a later epoch of our id)."""
        highest: int | None = None
        prefix = self.replica_id + "."
        for name, doc in documents:
            mine = self.state.get(name)
            pairs = (
                (doc.contributions, mine.contributions),
                (doc.trusted_keys, mine.trusted_keys),
            )
            for theirs, ours in pairs:
                for actor in theirs.clock.actors():
                    if not actor.startswith(prefix):
                        continue
                    parsed = parse_actor(actor)
                    if parsed is None or parsed[0] != self.replica_id or parsed[1] < self.epoch:
                        continue
                    if parsed[1] > self.epoch or theirs.clock.get(actor) > ours.clock.get(actor):
                        highest = max(highest or 0, parsed[1])
            if doc.recipe.actor == self.actor and doc.recipe.key() > mine.recipe.key():
                highest = max(highest or 0, self.epoch)
        if highest is None:
            return None
        entropy = int.from_bytes(domain_hash("crdtmerge/v1/epoch", self.state.state_hash())[:4])
        return next_epoch(max(highest, self.epoch), entropy)

    # -- objects ----------------------------------------------------------------------------

    def _on_objects_present(self, ev: ObjectsPresent) -> list[Effect]:
        self._present |= ev.roots
        return self._after_change(self.state.names())

    def _on_object_stored(self, ev: ObjectStored) -> list[Effect]:
        if ev.root in self._present:
            return []
        self._present.add(ev.root)
        affected = [n for n, d in self.state.items() if ev.root in self._needed(d)]
        return self._after_change(affected, fetch=False)

    @staticmethod
    def _needed(doc: MergeDocument) -> list[bytes]:
        roots = doc.live_roots()
        recipe = doc.recipe.value
        if recipe is not None and recipe.base is not None and recipe.base not in roots:
            roots.append(recipe.base)
        return roots

    def missing_roots(self, merge: str) -> list[bytes]:
        return sorted(r for r in self._needed(self.state.get(merge)) if r not in self._present)

    def _after_change(self, merges: Iterable[str], fetch: bool = True) -> list[Effect]:
        effects: list[Effect] = []
        for name in merges:
            doc = self.state.get(name)
            missing = self.missing_roots(name)
            report = (doc.digest(), not missing)
            if self._reported.get(name) != report:
                self._reported[name] = report
                effects.append(DigestChanged(name, report[0], report[1]))
            if missing and fetch:
                effects.append(FetchObjects(name, tuple(missing)))
        return effects

    # -- queries ----------------------------------------------------------------------------

    def status(self, merge: str) -> MergeStatus:
        """Digest, live and missing roots, and agreement with the peers heard from."""
        doc = self.state.get(merge)
        digest = doc.digest()
        agreeing: list[str] = []
        differing: list[str] = []
        for peer, view in sorted(self._peer_views.items()):
            theirs = view.get(merge)
            their_digest = theirs.digest if theirs is not None else _BOTTOM.digest()
            (agreeing if their_digest == digest else differing).append(peer)
        missing = self.missing_roots(merge)
        return MergeStatus(
            merge=merge,
            digest=digest,
            state_hash=doc.state_hash(),
            recipe=doc.recipe.value,
            live_roots=tuple(doc.live_roots()),
            missing_roots=tuple(missing),
            complete=not missing,
            peers_agreeing=tuple(agreeing),
            peers_differing=tuple(differing),
        )

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def check_invariants(self) -> None:
        """Raise if the replica's state or bookkeeping is inconsistent."""
        self.state.check_invariants()
        self.peers.check_invariants()
        if self.actor != make_actor(self.replica_id, self.epoch):
            raise AssertionError("actor does not match replica id and epoch")
        for name, doc in self.state.items():
            if doc.recipe.counter > self._lamport:
                raise AssertionError(f"lamport clock behind the recipe register of {name!r}")
        if self.replica_id in self.peers:
            raise AssertionError("a replica is its own peer")

    # each handler takes the event type it is keyed by (a Callable over all of Event would
    # wrongly claim each accepts every event)
    _HANDLERS: dict[type, Callable[[Replica, Any], list[Effect]]] = {
        SetRecipe: _on_set_recipe,
        AddContribution: _on_add,
        RemoveContribution: _on_remove,
        AddTrustedKey: _on_add_key,
        RemoveTrustedKey: _on_remove_key,
        Tick: _on_tick,
        MessageReceived: _on_message,
        SendFailed: _on_send_failed,
        ObjectsPresent: _on_objects_present,
        ObjectStored: _on_object_stored,
    }
