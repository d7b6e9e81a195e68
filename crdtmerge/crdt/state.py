"""The replica's whole layer-1 state: merge name -> :class:`MergeDocument`.

A map of CRDTs joined pointwise is itself a CRDT (Shapiro et al. 2011, the "map" construction
used by riak_dt ``riak_dt_map`` without removals): an absent name is the bottom document, so
``join`` keeps every name of both sides and joins the documents of names on both sides. Merges
are never deleted from the map (a merge is emptied by removing its contributions and clearing
its recipe), which keeps the join trivially correct.

Merge names are 1-128 characters from ``[A-Za-z0-9._-]`` starting with a letter or digit, so
they are safe in URLs, file names and log lines.

Example:
    >>> s = NodeState().update("m", lambda d: d.add(b"\\1" * 32, "a.1"))
    >>> s.names(), s.get("other").is_bottom()
    (['m'], True)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..canonical import domain_hash
from ..errors import InvalidInput
from ._codec import TAG_NODE_STATE, expect_list, frame, malformed, pack, unframe
from .document import MergeDocument

__all__ = ["NodeState", "check_merge_name"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BOTTOM = MergeDocument()


def check_merge_name(name: Any) -> str:
    """Return ``name`` if it is a valid merge name, else raise ``InvalidInput``."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidInput(
            f"merge name must be 1-128 characters of [A-Za-z0-9._-] starting with a letter or "
            f"digit, got {name!r}"
        )
    return name


class NodeState:
    """An immutable map of merge documents; absent names read as the bottom document."""

    __slots__ = ("_docs",)

    _docs: dict[str, MergeDocument]

    def __init__(self, documents: Mapping[str, MergeDocument] | None = None) -> None:
        docs: dict[str, MergeDocument] = {}
        for name, doc in (documents or {}).items():
            check_merge_name(name)
            if not isinstance(doc, MergeDocument):
                raise InvalidInput(f"merge {name!r}: expected a MergeDocument")
            if not doc.is_bottom():
                docs[name] = doc
        self._docs = docs

    @classmethod
    def _make(cls, docs: dict[str, MergeDocument]) -> NodeState:
        s = cls.__new__(cls)
        s._docs = docs
        return s

    # -- queries ----------------------------------------------------------------------------

    def get(self, name: str) -> MergeDocument:
        return self._docs.get(name, _BOTTOM)

    def names(self) -> list[str]:
        return sorted(self._docs)

    def items(self) -> list[tuple[str, MergeDocument]]:
        return sorted(self._docs.items())

    def __contains__(self, name: object) -> bool:
        return name in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeState):
            return NotImplemented
        return self is other or self._docs == other._docs

    def __hash__(self) -> int:
        return hash(self.state_hash())

    def __repr__(self) -> str:
        return f"NodeState({self.names()!r})"

    def state_hash(self) -> bytes:
        """Whole-state hash: BLAKE3 over the sorted (name, document state hash) pairs."""
        parts = []
        for name, doc in self.items():
            parts.append(name.encode())
            parts.append(doc.state_hash())
        return domain_hash("crdtmerge/v1/node-state", *parts)

    # -- operations -------------------------------------------------------------------------

    def with_document(self, name: str, doc: MergeDocument) -> NodeState:
        check_merge_name(name)
        if self._docs.get(name) is doc:
            return self
        docs = dict(self._docs)
        if doc.is_bottom():
            docs.pop(name, None)
        else:
            docs[name] = doc
        return NodeState._make(docs)

    def update(self, name: str, op: Callable[[MergeDocument], MergeDocument]) -> NodeState:
        """Apply ``op`` to one document (the bottom document if absent)."""
        return self.with_document(name, op(self.get(name)))

    def join(self, other: NodeState) -> NodeState:
        """Pointwise join; returns ``self`` when nothing changes."""
        if self is other:
            return self
        docs = dict(self._docs)
        changed = False
        for name, doc in other._docs.items():
            mine = docs.get(name)
            joined = doc if mine is None else mine.join(doc)
            if joined is not mine:
                docs[name] = joined
                changed = True
        return NodeState._make(docs) if changed else self

    def restrict(self, names: Iterable[str]) -> NodeState:
        """The sub-state holding only ``names`` (those present)."""
        return NodeState._make({n: self._docs[n] for n in names if n in self._docs})

    # -- encoding ---------------------------------------------------------------------------

    def _to_obj(self) -> list[Any]:
        return [[name, doc._to_obj()] for name, doc in self.items()]

    def to_bytes(self) -> bytes:
        """Canonical bytes: tag 0x05, version 1, msgpack ``[[name, document], ...]`` sorted."""
        return frame(TAG_NODE_STATE, self._to_obj())

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeState:
        """Parse and validate; raises ``UnsupportedVersion`` or ``InvalidInput``."""
        obj = unframe(data, TAG_NODE_STATE, "node state")
        docs: dict[str, MergeDocument] = {}
        previous: str | None = None
        for item in expect_list(obj, "node state", "body"):
            name, doc_obj = expect_list(item, "node state", "entry", 2)
            if not isinstance(name, str) or _NAME.fullmatch(name) is None:
                raise malformed("node state", f"invalid merge name {name!r}")
            if previous is not None and name <= previous:
                raise malformed("node state", "merge names are not strictly sorted")
            previous = name
            doc = MergeDocument._from_obj(doc_obj)
            if doc.is_bottom():
                raise malformed("node state", f"merge {name!r} holds the empty document")
            docs[name] = doc
        if pack(obj) != bytes(data)[2:]:
            raise malformed("node state", "encoding is not canonical")
        return cls._make(docs)

    def check_invariants(self) -> None:
        for name, doc in self._docs.items():
            check_merge_name(name)
            if doc.is_bottom():
                raise malformed("node state", f"merge {name!r} holds the empty document")
            doc.check_invariants()
