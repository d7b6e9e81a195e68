"""Layer 1: the replicated CRDT state (pure, immutable values).

* :mod:`.clock` -- dots, per-incarnation actor ids (:func:`make_actor`), version vectors;
* :mod:`.orset` -- the optimized add-wins OR-Set without tombstones (Bieniusa et al. 2012);
* :mod:`.lww` -- the last-writer-wins recipe register (Lamport counter, actor id);
* :mod:`.document` -- a merge: recipe x contributions x trusted keys, with its state digest;
* :mod:`.state` -- the node's map of merge name -> document.

Every value is immutable: operations and ``join`` return new values and never mutate their
inputs. Every type has ``to_bytes``/``from_bytes`` (tag byte, version byte, canonical msgpack)
and ``check_invariants``; ``from_bytes`` validates fully, so a malformed remote state raises
before anything is applied.
"""

from __future__ import annotations

from .clock import Dot, VersionVector, make_actor, next_epoch, parse_actor
from .document import MergeDocument
from .lww import LWWRegister
from .orset import ORSet
from .state import NodeState, check_merge_name

__all__ = [
    "Dot",
    "LWWRegister",
    "MergeDocument",
    "NodeState",
    "ORSet",
    "VersionVector",
    "check_merge_name",
    "make_actor",
    "next_epoch",
    "parse_actor",
]
