"""A deterministic, single-threaded simulator of a crdtmerge cluster, and its reference model.

Everything comes from one seed (FoundationDB / TigerBeetle VOPR style): which replica acts,
message loss, duplication, reordering and delay, partitions and healing, crashes (possibly in the
middle of executing a list of effects: only effects already executed happened, and only what was
``Persist``-ed survives), restarts with a new epoch, and restores of an old data directory.
Messages really go through ``wire.encode``/``wire.decode``.

The reference model is riak_dt's (adds plus observed removes), with the uncertainty a crash or a
restore introduces written out:

* an add *happened* if its ``Persist`` was executed; its dot is then required in the final state
  unless some remove or re-add observed it;
* a restore of an old data directory makes the events that replica persisted after the snapshot
  *uncertain*: they may or may not survive (their only copy may have been rolled back);
* final dots of every (merge, root) must satisfy ``required ⊆ final ⊆ allowed``, where allowed =
  dots of happened adds minus those observed by certain removes. So nothing acknowledged is lost,
  nothing removed is resurrected, and concurrent adds win.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from crdtmerge import wire
from crdtmerge.crdt import NodeState, next_epoch
from crdtmerge.crdt.clock import Dot
from crdtmerge.errors import RemoteProtocolError
from crdtmerge.recipe import Recipe
from crdtmerge.replica import (
    Ack,
    AddContribution,
    AddTrustedKey,
    FetchObjects,
    MessageReceived,
    ObjectsPresent,
    ObjectStored,
    Persist,
    PersistEpoch,
    RemoveContribution,
    RemoveTrustedKey,
    Replica,
    ReplicaConfig,
    Send,
    SendFailed,
    SetRecipe,
    Tick,
)

MERGES = ("m1", "m2")
BASE = b"\xba" * 32
RECIPES = (
    Recipe("linear", 1, {"weight": 1.0}),
    Recipe("ties", 1, {"density": 0.5}, base=BASE),
    None,
)
CONFIG = ReplicaConfig(backoff_base=0.5, backoff_max=2.0)


@dataclass
class Faults:
    drop: float = 0.1
    duplicate: float = 0.05
    crash_mid_effects: float = 0.3


@dataclass
class Node:
    rid: str
    replica: Replica | None = None
    docs: dict[str, bytes] = field(default_factory=dict)  # the durable store
    epoch: int = 0
    persist_seq: int = 0
    objects: set[bytes] = field(default_factory=set)  # the durable object store
    backup: tuple[dict[str, bytes], int, int] | None = None  # (docs, epoch, persist_seq)


@dataclass
class Event:
    """One local write in the model."""

    node: str
    seq: int  # the node's persist_seq when it happened
    kind: str
    merge: str
    target: bytes | None = None
    dot: Dot | None = None
    observed: frozenset[Dot] = frozenset()
    recipe_key: tuple | None = None
    happened: bool = False
    uncertain: bool = False


class Simulator:
    def __init__(self, seed: int, n: int | None = None, faults: Faults | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.n = n if n is not None else self.rng.randint(3, 7)
        self.faults = faults or Faults()
        self.now = 0.0
        ids = [f"r{i}" for i in range(self.n)]
        self.nodes = {rid: Node(rid) for rid in ids}
        self.in_flight: list[tuple[str, str, bytes]] = []
        self.partition: dict[str, int] = {}
        self.fetches: set[tuple[str, bytes]] = set()
        self.events: list[Event] = []
        self.issued_dots: set[tuple[str, Dot]] = set()
        self.next_root = 0
        self.log: list[str] = []
        self.touched: set[str] = set()
        self.stats = {"messages": 0, "bytes": 0, "dropped": 0, "crashes": 0, "restores": 0}
        for node in self.nodes.values():
            node.objects.add(BASE)
            self._start(node)

    # -- node lifecycle ---------------------------------------------------------------------

    def _peers(self, rid: str) -> list[str]:
        return [p for p in self.nodes if p != rid]

    def _start(self, node: Node) -> None:
        node.epoch = next_epoch(node.epoch, self.rng.getrandbits(32))  # persisted at start
        node.replica = Replica.restore(
            node.rid, node.epoch, node.docs, self._peers(node.rid), CONFIG
        )
        self._run(node, node.replica.handle(ObjectsPresent(frozenset(node.objects))))

    def crash(self, node: Node) -> None:
        self.log.append(f"crash {node.rid}")
        self.stats["crashes"] += 1
        node.replica = None
        self.fetches = {f for f in self.fetches if f[0] != node.rid}

    def restart(self, node: Node) -> None:
        self.log.append(f"restart {node.rid}")
        self._start(node)

    def restore_backup(self, node: Node) -> None:
        """Replace a crashed node's data directory with its old backup."""
        assert node.replica is None and node.backup is not None
        self.log.append(f"restore {node.rid} to seq {node.backup[2]}")
        self.stats["restores"] += 1
        docs, epoch, seq = node.backup
        for ev in self.events:
            if ev.node == node.rid and ev.seq > seq and ev.happened:
                ev.uncertain = True
        node.docs, node.epoch, node.persist_seq = dict(docs), epoch, seq

    # -- effects ----------------------------------------------------------------------------

    def _run(self, node: Node, effects: list, crash_after: int | None = None) -> list:
        """Execute effects in order; with ``crash_after`` = k, crash after the first k."""
        self.touched.add(node.rid)
        done = []
        for i, effect in enumerate(effects):
            if crash_after is not None and i >= crash_after:
                self.crash(node)
                return done
            done.append(effect)
            if isinstance(effect, Persist):
                node.persist_seq += 1
                node.docs.update(dict(effect.documents))
            elif isinstance(effect, PersistEpoch):
                node.epoch = effect.epoch
            elif isinstance(effect, Send):
                self._send(node.rid, effect.peer, effect.message)
            elif isinstance(effect, FetchObjects):
                self.fetches.update((node.rid, r) for r in effect.roots)
        if crash_after is not None and crash_after >= len(effects):
            self.crash(node)
        return done

    def _reachable(self, a: str, b: str) -> bool:
        return self.partition.get(a, 0) == self.partition.get(b, 0)

    def _send(self, src: str, dst: str, message: wire.Message) -> None:
        data = wire.encode(message)
        self.stats["messages"] += 1
        self.stats["bytes"] += len(data)
        if self.nodes[dst].replica is None or not self._reachable(src, dst):
            replica = self.nodes[src].replica
            if replica is not None:
                self._run(self.nodes[src], replica.handle(SendFailed(dst, self.now)))
            return
        self.in_flight.append((src, dst, data))

    def deliver(self, index: int) -> None:
        src, dst, data = self.in_flight.pop(index)
        node = self.nodes[dst]
        if node.replica is None or not self._reachable(src, dst):
            return
        message = wire.decode(data)
        self._run(node, node.replica.handle(MessageReceived(src, message)))

    def complete_fetch(self, rid: str, root: bytes) -> None:
        node = self.nodes[rid]
        if node.replica is None:
            self.fetches.discard((rid, root))
            return
        sources = [
            p
            for p, other in self.nodes.items()
            if p != rid
            and other.replica is not None
            and root in other.objects
            and self._reachable(p, rid)
        ]
        if not sources:
            return  # stays pending: the driver retries fetches until they succeed
        self.fetches.discard((rid, root))
        node.objects.add(root)
        self._run(node, node.replica.handle(ObjectStored(root)))

    # -- local writes (with the model) ------------------------------------------------------

    def local_write(self, node: Node, crash_mid: bool = False) -> None:
        replica = node.replica
        assert replica is not None
        merge = self.rng.choice(MERGES)
        doc = replica.state.get(merge)
        live = doc.live_roots()
        roll = self.rng.random()
        if roll < 0.45 or not live:
            if live and self.rng.random() < 0.3:
                root = self.rng.choice(live)  # re-add
            else:
                root = self.next_root.to_bytes(4, "big") * 8
                self.next_root += 1
                node.objects.add(root)
                self._run(node, replica.handle(ObjectStored(root)))
            ev = Event(node.rid, 0, "add", merge, root, observed=doc.contributions.dots(root))
            event = AddContribution(merge, root, len(self.events))
        elif roll < 0.75:
            root = self.rng.choice(live)
            ev = Event(node.rid, 0, "remove", merge, root, observed=doc.contributions.dots(root))
            event = RemoveContribution(merge, root, len(self.events))
        elif roll < 0.9:
            recipe = self.rng.choice(RECIPES)
            ev = Event(node.rid, 0, "recipe", merge)
            event = SetRecipe(merge, recipe, len(self.events))
        else:
            key = bytes([0xE0 + self.rng.randrange(3)]) * 32
            if self.rng.random() < 0.6:
                event = AddTrustedKey(merge, key, len(self.events))
            else:
                event = RemoveTrustedKey(merge, key, len(self.events))
            ev = Event(node.rid, 0, "key", merge)
        effects = replica.handle(event)
        after = replica.state.get(merge)
        if ev.kind == "add":
            (ev.dot,) = after.contributions.dots(ev.target)
            key = (merge, ev.dot)  # each merge's contributions set has its own clock
            assert key not in self.issued_dots, f"dot reused: {key}"
            self.issued_dots.add(key)
        elif ev.kind == "recipe":
            ev.recipe_key = after.recipe.key()
        crash_after = self.rng.randint(0, len(effects)) if crash_mid else None
        done = self._run(node, effects, crash_after)
        ev.happened = any(isinstance(e, Persist) for e in done)
        acked = [e for e in done if isinstance(e, Ack)]
        assert not (acked and acked[0].changed and not ev.happened), (
            f"{node.rid}: write acknowledged before it was persisted"
        )
        ev.seq = node.persist_seq
        self.events.append(ev)
        self.log.append(f"{node.rid} {type(event).__name__} {merge} happened={ev.happened}")

    # -- the random schedule ----------------------------------------------------------------

    def running(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.replica is not None]

    def step(self) -> None:
        self.now += 0.1
        rng = self.rng
        running = self.running()
        crashed = [n for n in self.nodes.values() if n.replica is None]
        r = rng.random()
        if r < 0.25 and running:
            self.local_write(rng.choice(running), crash_mid=rng.random() < 0.03)
        elif r < 0.45 and running:
            node = rng.choice(running)
            self._run(node, node.replica.handle(Tick(self.now, rng.getrandbits(64))))
        elif r < 0.75 and self.in_flight:
            i = rng.randrange(len(self.in_flight))  # any message: reordering and delay
            if rng.random() < self.faults.drop:
                self.in_flight.pop(i)
                self.stats["dropped"] += 1
            else:
                if rng.random() < self.faults.duplicate:
                    self.in_flight.append(self.in_flight[i])
                self.deliver(i)
        elif r < 0.82 and self.fetches:
            self.complete_fetch(*rng.choice(sorted(self.fetches)))
        elif r < 0.86:
            if self.partition or rng.random() < 0.3:
                self.partition = {}
                self.log.append("heal")
            else:
                self.partition = {rid: rng.randrange(2) for rid in self.nodes}
                self.log.append(f"partition {self.partition}")
        elif r < 0.89 and running:
            self.crash(rng.choice(running))
        elif r < 0.94 and crashed:
            node = rng.choice(crashed)
            if node.backup is not None and rng.random() < 0.25:
                self.restore_backup(node)
            self.restart(node)
        elif r < 0.97:
            node = rng.choice(list(self.nodes.values()))
            node.backup = (dict(node.docs), node.epoch, node.persist_seq)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.touched = set()
            self.step()
            for rid in sorted(self.touched):
                replica = self.nodes[rid].replica
                if replica is not None:
                    replica.check_invariants()

    # -- heal, quiesce, check ---------------------------------------------------------------

    def quiesce(self, max_rounds: int = 60) -> int:
        """Heal everything, then run lossless rounds until all states are equal."""
        self.partition = {}
        for node in self.nodes.values():
            if node.replica is None:
                self.restart(node)
        for rounds in range(1, max_rounds + 1):
            self.now += 5.0  # past every backoff
            for node in self.running():
                self._run(node, node.replica.handle(Tick(self.now, self.rng.getrandbits(64))))
            while self.in_flight:
                self.deliver(self.rng.randrange(len(self.in_flight)))
            for fetch in sorted(self.fetches):
                self.complete_fetch(*fetch)
            hashes = {n.replica.state.state_hash() for n in self.running()}
            if len(hashes) == 1 and not self.in_flight and not self.fetches:
                return rounds
        raise AssertionError(f"seed {self.seed}: no convergence after {max_rounds} rounds")

    def check(self) -> None:
        states = [n.replica.state for n in self.running()]
        first: NodeState = states[0]
        for s in states[1:]:
            assert s.to_bytes() == first.to_bytes(), "replicas differ after quiesce"
        for merge in MERGES:
            self._check_merge(first, merge)
        # every replica has every object, and reports the same digest as all its peers
        for _ in range(2 * self.n):
            self.now += 5.0
            for node in self.running():
                self._run(node, node.replica.handle(Tick(self.now, self.rng.getrandbits(64))))
            while self.in_flight:
                self.deliver(0)
        for node in self.running():
            node.replica.check_invariants()
            for merge in MERGES:
                st = node.replica.status(merge)
                assert st.complete, (node.rid, merge, st.missing_roots)
                assert st.converged, (node.rid, merge, st.peers_differing)

    def _check_merge(self, state: NodeState, merge: str) -> None:
        contributions = state.get(merge).contributions
        events = [e for e in self.events if e.merge == merge and e.happened]
        targets = {e.target for e in events if e.target is not None}
        for root in contributions.value():
            assert root in targets, f"{merge}: unexpected root {root.hex()[:8]}"
        for root in targets:
            mine = [e for e in events if e.target == root]
            added = {e.dot for e in mine if e.kind == "add"}
            certain_added = {e.dot for e in mine if e.kind == "add" and not e.uncertain}
            observed_any = set().union(*(e.observed for e in mine))
            observed_certain = set().union(*(e.observed for e in mine if not e.uncertain))
            required = certain_added - observed_any
            allowed = added - observed_certain
            final = set(contributions.dots(root))
            assert required <= final, (
                f"{merge} {root.hex()[:8]}: lost acknowledged add(s) {required - final}"
            )
            assert final <= allowed, (
                f"{merge} {root.hex()[:8]}: resurrected or unknown dot(s) {final - allowed}"
            )
        writes = [e for e in events if e.kind == "recipe"]
        register = state.get(merge).recipe
        if writes:
            certain = [e.recipe_key for e in writes if not e.uncertain]
            assert register.key() in {e.recipe_key for e in writes} or (
                not certain and register.is_bottom()
            ), f"{merge}: recipe is not one that was written"
            if certain:
                assert register.key() >= max(certain), f"{merge}: an acknowledged recipe lost"
        else:
            assert register.is_bottom()


def run_seed(seed: int, steps: int = 150) -> Simulator:
    sim = Simulator(seed)
    try:
        sim.run(steps)
        sim.quiesce()
        sim.check()
    except (AssertionError, RemoteProtocolError) as exc:
        tail = "\n".join(sim.log[-15:])
        raise AssertionError(
            f"simulation seed {seed} failed: {exc}\nreplay: CRDTMERGE_SIM_SEED={seed} "
            f".venv/bin/pytest tests/simulation -k seeds\nlast steps:\n{tail}"
        ) from exc
    return sim


def convergence_rounds(n: int, seed: int, notify: bool, writers: int = 1, loss: float = 0.0) -> int:
    """Rounds until ``n`` replicas agree after ``writers`` of them each add one root.

    A round: every replica ticks once (one digest to its next peer); messages are delivered,
    with probability ``loss`` of being dropped, until none is in flight. With ``notify`` the
    writers also send change notices, as the node does.
    """
    rng = random.Random(seed)
    ids = [f"n{i}" for i in range(n)]
    config = ReplicaConfig(backoff_base=0.0, backoff_max=0.0, notify_changes=notify)
    replicas = {rid: Replica(rid, 1, None, [p for p in ids if p != rid], config) for rid in ids}
    queue: list[tuple[str, str, wire.Message]] = []

    def run(rid: str, effects: list) -> None:
        for e in effects:
            if isinstance(e, Send):
                queue.append((rid, e.peer, e.message))

    for i, rid in enumerate(rng.sample(ids, writers)):
        run(rid, replicas[rid].handle(AddContribution("m", i.to_bytes(4, "big") * 8)))
    rounds = 0
    while True:
        while queue:
            src, dst, msg = queue.pop(rng.randrange(len(queue)))
            if rng.random() >= loss:
                run(dst, replicas[dst].handle(MessageReceived(src, msg)))
        if len({r.state.state_hash() for r in replicas.values()}) == 1:
            return rounds
        rounds += 1
        for rid in ids:
            run(rid, replicas[rid].handle(Tick(float(rounds), rng.getrandbits(64))))
