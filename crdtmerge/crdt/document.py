"""The merge document: recipe register x contributions set x trusted-key set.

A :class:`MergeDocument` is the product of three CRDTs, joined componentwise (a product of
join-semilattices is a join-semilattice, Shapiro et al. 2011 §2.4):

* ``recipe``: an :class:`~crdtmerge.crdt.lww.LWWRegister` of ``Recipe | None``;
* ``contributions``: an :class:`~crdtmerge.crdt.orset.ORSet` of 32-byte object roots;
* ``trusted_keys``: an ``ORSet`` of 32-byte Ed25519 public keys allowed to sign contributions.

Two hashes describe a document:

* :meth:`MergeDocument.digest` -- the **state digest** of DESIGN.md §3: BLAKE3 (domain
  ``crdtmerge/v1/state-digest``) over the canonical encoding of ``[recipe hash or b"", sorted
  live roots]``, plus ``sorted live trusted keys`` as a third item when there is any (they
  decide which contributions the merge uses, see :mod:`crdtmerge.signing`). Equal digests mean
  the same merged model; "converged?" is a digest compare.
* :meth:`MergeDocument.state_hash` -- BLAKE3 (domain ``crdtmerge/v1/document``) over the full
  canonical bytes, clocks and trusted keys included. Anti-entropy compares this one, so that
  clocks and trusted keys converge too, not only the value.

Example:
    >>> d = MergeDocument().add(b"\\1" * 32, "a.1")
    >>> d.live_roots() == [b"\\1" * 32], len(d.digest())
    (True, 32)
"""

from __future__ import annotations

import functools
from typing import Any

from ..canonical import domain_hash
from ..recipe import Recipe
from ._codec import TAG_MERGE_DOCUMENT, expect_list, frame, malformed, pack, unframe
from .lww import LWWRegister
from .orset import ORSet

__all__ = ["DIGEST_DOMAIN", "MergeDocument"]

DIGEST_DOMAIN = "crdtmerge/v1/state-digest"
STATE_HASH_DOMAIN = "crdtmerge/v1/document"


class MergeDocument:
    """An immutable merge document; operations return new documents."""

    __slots__ = ("_bytes", "_digest", "_state_hash", "contributions", "recipe", "trusted_keys")

    recipe: LWWRegister
    contributions: ORSet
    trusted_keys: ORSet

    def __init__(
        self,
        recipe: LWWRegister | None = None,
        contributions: ORSet | None = None,
        trusted_keys: ORSet | None = None,
    ) -> None:
        self.recipe = recipe if recipe is not None else LWWRegister()
        self.contributions = contributions if contributions is not None else ORSet()
        self.trusted_keys = trusted_keys if trusted_keys is not None else ORSet()
        self._bytes: bytes | None = None
        self._digest: bytes | None = None
        self._state_hash: bytes | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("recipe", "contributions", "trusted_keys") and hasattr(self, name):
            raise AttributeError(f"MergeDocument is immutable; use the operations ({name})")
        object.__setattr__(self, name, value)

    def _replace(self, **parts: Any) -> MergeDocument:
        return MergeDocument(
            parts.get("recipe", self.recipe),
            parts.get("contributions", self.contributions),
            parts.get("trusted_keys", self.trusted_keys),
        )

    # -- queries ----------------------------------------------------------------------------

    def live_roots(self) -> list[bytes]:
        """The live contribution roots, sorted (the order layer 2 merges them in)."""
        return self.contributions.sorted_elements()

    def live_keys(self) -> list[bytes]:
        return self.trusted_keys.sorted_elements()

    def digest(self) -> bytes:
        """The state digest: equal digests imply the same merged model."""
        if self._digest is None:
            recipe = self.recipe.value
            recipe_hash = recipe.hash() if recipe is not None else b""
            parts: list[Any] = [recipe_hash, self.live_roots()]
            keys = self.live_keys()
            if keys:  # they decide which contributions count (crdtmerge.signing)
                parts.append(keys)
            payload = pack(parts)
            self._digest = domain_hash(DIGEST_DOMAIN, payload)
        return self._digest

    def state_hash(self) -> bytes:
        """Hash of the full canonical encoding (what anti-entropy compares)."""
        if self._state_hash is None:
            self._state_hash = domain_hash(STATE_HASH_DOMAIN, self.to_bytes())
        return self._state_hash

    def is_bottom(self) -> bool:
        """True for a document nobody has written (equivalent to an absent one)."""
        return (
            self.recipe.is_bottom()
            and self.contributions.is_bottom()
            and self.trusted_keys.is_bottom()
        )

    def max_lamport(self) -> int:
        return self.recipe.counter

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MergeDocument):
            return NotImplemented
        return self is other or (
            self.recipe == other.recipe
            and self.contributions == other.contributions
            and self.trusted_keys == other.trusted_keys
        )

    def __hash__(self) -> int:
        return hash(self.state_hash())

    def __repr__(self) -> str:
        return (
            f"MergeDocument(recipe={self.recipe!r}, contributions={self.contributions!r}, "
            f"trusted_keys={self.trusted_keys!r})"
        )

    # -- operations -------------------------------------------------------------------------

    def set_recipe(self, recipe: Recipe | None, actor: str, lamport: int = 0) -> MergeDocument:
        return self._replace(recipe=self.recipe.set(recipe, actor, lamport))

    def add(self, root: bytes, actor: str) -> MergeDocument:
        return self._replace(contributions=self.contributions.add(root, actor))

    def remove(self, root: bytes) -> MergeDocument:
        new = self.contributions.remove(root)
        return self if new is self.contributions else self._replace(contributions=new)

    def add_trusted_key(self, key: bytes, actor: str) -> MergeDocument:
        return self._replace(trusted_keys=self.trusted_keys.add(key, actor))

    def remove_trusted_key(self, key: bytes) -> MergeDocument:
        new = self.trusted_keys.remove(key)
        return self if new is self.trusted_keys else self._replace(trusted_keys=new)

    def join(self, other: MergeDocument) -> MergeDocument:
        """Componentwise join; returns ``self`` when nothing changes."""
        if self is other:
            return self
        recipe = self.recipe.join(other.recipe)
        contributions = self.contributions.join(other.contributions)
        trusted = self.trusted_keys.join(other.trusted_keys)
        if (
            recipe is self.recipe
            and contributions is self.contributions
            and trusted is self.trusted_keys
        ):
            return self
        if (
            recipe is other.recipe
            and contributions is other.contributions
            and trusted is other.trusted_keys
        ):
            return other
        return MergeDocument(recipe, contributions, trusted)

    # -- encoding ---------------------------------------------------------------------------

    def _to_obj(self) -> list[Any]:
        return [
            self.recipe._to_obj(),
            self.contributions._to_obj(),
            self.trusted_keys._to_obj(),
        ]

    @classmethod
    def _from_obj(cls, obj: Any) -> MergeDocument:
        recipe, contributions, trusted = expect_list(obj, "merge document", "document body", 3)
        return cls(
            LWWRegister._from_obj(recipe, "merge document recipe"),
            ORSet._from_obj(contributions, "merge document contributions"),
            ORSet._from_obj(trusted, "merge document trusted keys"),
        )

    def to_bytes(self) -> bytes:
        """Canonical bytes: tag 0x04, version 1, msgpack ``[recipe, contributions, keys]``."""
        if self._bytes is None:
            self._bytes = frame(TAG_MERGE_DOCUMENT, self._to_obj())
        return self._bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> MergeDocument:
        """Parse and validate; raises ``UnsupportedVersion`` or ``InvalidInput``.

        Small documents are memoised by their bytes (values are immutable, and gossip decodes
        the same peer documents again and again).
        """
        if isinstance(data, bytes) and len(data) <= _MEMO_MAX_BYTES:
            return _decode_memo(data)
        return _decode(data)

    def check_invariants(self) -> None:
        self.recipe.check_invariants()
        self.contributions.check_invariants("merge document contributions")
        self.trusted_keys.check_invariants("merge document trusted keys")


_MEMO_MAX_BYTES = 64 << 10


def _decode(data: bytes) -> MergeDocument:
    obj = unframe(data, TAG_MERGE_DOCUMENT, "merge document")
    doc = MergeDocument._from_obj(obj)
    if pack(obj) != bytes(data)[2:]:
        raise malformed("merge document", "encoding is not canonical")
    doc._bytes = bytes(data)
    return doc


@functools.lru_cache(maxsize=512)
def _decode_memo(data: bytes) -> MergeDocument:
    return _decode(data)
