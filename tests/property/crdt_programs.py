"""Reachable CRDT states for property tests: run random programs on 2-5 replicas.

States are never drawn as arbitrary tuples (the join laws only hold on well-formed states); a
*program* is a list of operations (add, remove, set recipe, trusted-key add/remove, sync,
restart with a new epoch) run on a few replicas, and the states are whatever those replicas
hold at the end. :class:`Program` also keeps the abstract model used by riak_dt's
``crdt_statem_eqc``: every add's dot and, for every remove (and re-add), the dots it observed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from crdtmerge.crdt import MergeDocument, NodeState, make_actor
from crdtmerge.crdt.clock import Dot
from crdtmerge.recipe import Recipe

MERGES = ("alpha", "beta")
ELEMENTS = tuple(bytes([i]) * 32 for i in range(1, 7))
KEYS = tuple(bytes([0x80 + i]) * 32 for i in range(1, 4))
RECIPES = (
    None,
    Recipe("linear", 1, {"weight": 1.0}),
    Recipe("ties", 1, {"density": 0.5}),
    Recipe("dare", 1, {"density": 0.3, "rescale": True}, base=b"\x42" * 32),
)


@dataclass
class Program:
    """Replicas running operations, plus the abstract model of the contributions sets."""

    n: int
    states: list[NodeState] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    #: (merge, element) -> dots of every add of it
    added: dict[tuple[str, bytes], set[Dot]] = field(default_factory=dict)
    #: (merge, element) -> dots observed (and so removed or superseded) by removes and re-adds
    observed: dict[tuple[str, bytes], set[Dot]] = field(default_factory=dict)
    snapshots: list[NodeState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.states = [NodeState() for _ in range(self.n)]
        self.epochs = [1] * self.n

    def actor(self, i: int) -> str:
        return make_actor(f"r{i}", self.epochs[i])

    def run(self, op: tuple) -> None:
        kind, i = op[0], op[1] % self.n
        s = self.states[i]
        if kind == "add":
            merge, e = MERGES[op[2] % 2], ELEMENTS[op[3] % len(ELEMENTS)]
            before = s.get(merge).contributions.dots(e)
            s = s.update(merge, lambda d: d.add(e, self.actor(i)))
            (dot,) = s.get(merge).contributions.dots(e)
            self.added.setdefault((merge, e), set()).add(dot)
            self.observed.setdefault((merge, e), set()).update(before)
        elif kind == "remove":
            merge, e = MERGES[op[2] % 2], ELEMENTS[op[3] % len(ELEMENTS)]
            self.observed.setdefault((merge, e), set()).update(s.get(merge).contributions.dots(e))
            s = s.update(merge, lambda d: d.remove(e))
        elif kind == "recipe":
            merge, r = MERGES[op[2] % 2], RECIPES[op[3] % len(RECIPES)]
            s = s.update(merge, lambda d: d.set_recipe(r, self.actor(i)))
        elif kind == "key":
            merge, k = MERGES[op[2] % 2], KEYS[op[3] % len(KEYS)]
            if op[4]:
                s = s.update(merge, lambda d: d.add_trusted_key(k, self.actor(i)))
            else:
                s = s.update(merge, lambda d: d.remove_trusted_key(k))
        elif kind == "sync":
            s = s.join(self.states[op[2] % self.n])
        elif kind == "restart":
            self.epochs[i] += 1
        self.states[i] = s
        self.snapshots.append(s)

    def expected_dots(self, merge: str, element: bytes) -> set[Dot]:
        """The model: dots of adds that no remove or re-add observed."""
        key = (merge, element)
        return self.added.get(key, set()) - self.observed.get(key, set())


def _op() -> st.SearchStrategy[tuple]:
    idx = st.integers(0, 7)
    return st.one_of(
        st.tuples(st.just("add"), idx, idx, idx),
        st.tuples(st.just("remove"), idx, idx, idx),
        st.tuples(st.just("recipe"), idx, idx, idx),
        st.tuples(st.just("key"), idx, idx, idx, st.booleans()),
        st.tuples(st.just("sync"), idx, idx),
        st.tuples(st.just("restart"), idx),
    )


@st.composite
def programs(draw: st.DrawFn, min_replicas: int = 2, max_ops: int = 40) -> Program:
    """A program run to completion on 2-5 replicas."""
    p = Program(draw(st.integers(min_replicas, 5)))
    for op in draw(st.lists(_op(), max_size=max_ops)):
        p.run(op)
    return p


@st.composite
def node_states(draw: st.DrawFn, count: int = 3) -> list[NodeState]:
    """``count`` reachable states (replicas' final states or snapshots of one program)."""
    p = draw(programs())
    pool = p.states + p.snapshots
    return [draw(st.sampled_from(pool)) for _ in range(count)]


@st.composite
def documents(draw: st.DrawFn, count: int = 3) -> list[MergeDocument]:
    merge = draw(st.sampled_from(MERGES))
    return [s.get(merge) for s in draw(node_states(count))]
