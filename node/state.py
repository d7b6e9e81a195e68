"""Read-only views of the replica core's state for the node's readers (status, merge worker).

State transitions live in the sans-I/O core (:class:`crdtmerge.replica.Replica`); this module
only turns one merge document into the immutable snapshot the merge worker computes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from crdtmerge.crdt import NodeState
from crdtmerge.recipe import Recipe

__all__ = ["MergeSnapshot", "snapshot"]


@dataclass(frozen=True)
class MergeSnapshot:
    """One merge as readers see it: its recipe, sorted live roots, state digest and sorted
    live trusted keys (non-empty: only contributions signed by one of them are merged)."""

    name: str
    recipe: Recipe | None
    roots: tuple[bytes, ...]
    digest: bytes
    trusted_keys: tuple[bytes, ...] = ()


def snapshot(state: NodeState, name: str) -> MergeSnapshot:
    doc = state.get(name)
    return MergeSnapshot(
        name=name,
        recipe=doc.recipe.value,
        roots=tuple(doc.live_roots()),
        digest=doc.digest(),
        trusted_keys=tuple(doc.live_keys()),
    )
