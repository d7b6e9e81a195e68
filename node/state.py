"""The node's replicated state: a thin, synchronous layer over the CRDT types.

:class:`ReplicaState` holds the :class:`~crdtmerge.crdt.NodeState` (merge name -> document)
and this incarnation's actor id (``replica_id.epoch``). Every operation returns the encoded
documents that changed; the runtime commits them to SQLite *before* acknowledging (the
"Persist before Ack" rule of the sans-I/O core), and only then does the new state become the
one readers see (:meth:`commit`): a failed fsync leaves the old state in place.

This is the single swap point for the sans-I/O replica core (``crdtmerge.replica``): the
runtime only uses the methods below, so driving the core instead changes this module only.
Joining a peer's state (:meth:`join_document`) is here already for the replication driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from crdtmerge.crdt import MergeDocument, NodeState, make_actor
from crdtmerge.recipe import Recipe

__all__ = ["MergeSnapshot", "Pending", "ReplicaState"]


@dataclass(frozen=True)
class MergeSnapshot:
    """One merge as readers see it: its recipe, sorted live roots and state digest."""

    name: str
    recipe: Recipe | None
    roots: tuple[bytes, ...]
    digest: bytes


@dataclass(frozen=True)
class Pending:
    """A state transition not yet visible: persist ``encoded`` first, then :meth:`commit`."""

    name: str
    doc: MergeDocument
    changed: bool

    @property
    def encoded(self) -> dict[str, bytes]:
        return {self.name: self.doc.to_bytes()} if self.changed else {}


class ReplicaState:
    """The CRDT state of all merges on this node (not thread-safe: one writer at a time)."""

    def __init__(self, actor: str, state: NodeState) -> None:
        self.actor = actor
        self._state = state

    @classmethod
    def load(cls, replica_id: str, epoch: int, docs: Mapping[str, bytes]) -> ReplicaState:
        """Decode the persisted documents (validated: a corrupt row raises)."""
        decoded = {name: MergeDocument.from_bytes(data) for name, data in docs.items()}
        return cls(make_actor(replica_id, epoch), NodeState(decoded))

    # -- reads ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return self._state.names()

    def document(self, name: str) -> MergeDocument:
        return self._state.get(name)

    def snapshot(self, name: str) -> MergeSnapshot:
        doc = self._state.get(name)
        return MergeSnapshot(
            name=name,
            recipe=doc.recipe.value,
            roots=tuple(doc.live_roots()),
            digest=doc.digest(),
        )

    def contains(self, name: str, root: bytes) -> bool:
        return name in self._state and root in self._state.get(name).contributions

    def node_state(self) -> NodeState:
        return self._state

    # -- transitions (not visible until committed) -----------------------------------------

    def set_recipe(self, name: str, recipe: Recipe) -> Pending:
        doc = self._state.get(name)
        new = doc.set_recipe(recipe, self.actor, doc.max_lamport())
        return Pending(name, new, True)

    def add(self, name: str, root: bytes) -> Pending:
        """Add ``root`` unless it is already live (a re-add of a live root is a no-op)."""
        doc = self._state.get(name)
        if root in doc.contributions:
            return Pending(name, doc, False)
        return Pending(name, doc.add(root, self.actor), True)

    def remove(self, name: str, root: bytes) -> Pending:
        doc = self._state.get(name)
        if root not in doc.contributions:
            return Pending(name, doc, False)
        return Pending(name, doc.remove(root), True)

    def join_document(self, name: str, remote: MergeDocument) -> Pending:
        """Join a peer's document (for the replication driver)."""
        doc = self._state.get(name)
        new = doc.join(remote)
        return Pending(name, new, new != doc)

    def commit(self, pending: Pending) -> None:
        if pending.changed:
            self._state = self._state.with_document(pending.name, pending.doc)
