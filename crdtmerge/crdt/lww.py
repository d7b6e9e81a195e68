"""A last-writer-wins register holding the merge's recipe (``Recipe`` or ``None``).

Each write carries a Lamport timestamp (Lamport 1978): the writer takes one more than the
largest counter it has seen (in this register, or the caller's own Lamport clock), so a write
that observed another always orders after it. Concurrent writes are ordered by the actor id,
and -- only reachable if an actor id was ever reused -- by the canonical bytes of the value, so
the order is total and ``join`` (keep the larger) is commutative, associative and idempotent
(Shapiro et al. 2011, "A comprehensive study of convergent and commutative replicated data
types", LWW-Register; riak_dt ``riak_dt_lwwreg``). Actor ids are per incarnation
(``make_actor``), like the OR-Set's, so a restarted replica never issues the same
``(counter, actor)`` pair for a different value.

The empty register (never written) has counter 0, no actor and value ``None``; writing
``None`` later is a real write ("clear the recipe") and outranks older writes.

Example:
    >>> from crdtmerge.recipe import Recipe
    >>> a = LWWRegister().set(Recipe("linear"), "a.1")
    >>> b = a.set(Recipe("ties", 1, {"density": 0.5}), "b.1")
    >>> a.join(b).value.strategy, b.join(a) == a.join(b)
    ('ties', True)
"""

from __future__ import annotations

import functools
from typing import Any

import msgpack

from ..canonical import canonical_pack, canonical_unpack
from ..errors import InvalidInput
from ..recipe import Recipe
from ._codec import TAG_LWW_REGISTER, expect_int, expect_list, frame, malformed, pack, unframe
from .clock import MAX_COUNTER, check_actor

__all__ = ["LWWRegister"]


def _value_bytes(value: Recipe | None) -> bytes:
    return b"" if value is None else canonical_pack(value.to_dict())


@functools.lru_cache(maxsize=1024)
def _decode_value(vb: bytes) -> Recipe:
    """Parse canonical recipe bytes (memoised: replicas decode the same recipe very often)."""
    try:
        value = Recipe.from_dict(canonical_unpack(vb))
    except InvalidInput as exc:
        raise malformed("LWW register", f"value is not a valid recipe ({exc.detail})") from exc
    except (TypeError, ValueError, OverflowError, msgpack.UnpackException) as exc:
        # canonical_unpack lets msgpack's TypeError (unhashable map key) through
        raise malformed("LWW register", f"value is not a valid recipe ({exc})") from exc
    if _value_bytes(value) != vb:
        raise malformed("LWW register", "recipe value is not canonically encoded")
    return value


class LWWRegister:
    """An immutable LWW register ordered by ``(counter, actor, value bytes)``."""

    __slots__ = ("_actor", "_counter", "_value", "_value_bytes")

    _value: Recipe | None
    _counter: int
    _actor: str
    _value_bytes: bytes

    def __init__(self) -> None:
        self._value = None
        self._counter = 0
        self._actor = ""
        self._value_bytes = b""

    @classmethod
    def _make(cls, value: Recipe | None, counter: int, actor: str, vb: bytes) -> LWWRegister:
        r = cls.__new__(cls)
        r._value = value
        r._counter = counter
        r._actor = actor
        r._value_bytes = vb
        return r

    # -- queries ----------------------------------------------------------------------------

    @property
    def value(self) -> Recipe | None:
        return self._value

    @property
    def counter(self) -> int:
        """The Lamport timestamp of the winning write (0 if never written)."""
        return self._counter

    @property
    def actor(self) -> str:
        return self._actor

    def key(self) -> tuple[int, str, bytes]:
        """The total order: Lamport counter, then actor id, then canonical value bytes."""
        return (self._counter, self._actor, self._value_bytes)

    def is_bottom(self) -> bool:
        return self._counter == 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LWWRegister):
            return NotImplemented
        return self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return f"LWWRegister({self._value!r}, counter={self._counter}, actor={self._actor!r})"

    # -- operations -------------------------------------------------------------------------

    def set(self, value: Recipe | None, actor: str, lamport: int = 0) -> LWWRegister:
        """Write ``value``; its timestamp is ``max(self.counter, lamport) + 1``.

        Raises:
            InvalidInput: bad actor id, a value that is not a ``Recipe`` or ``None``.
        """
        if value is not None and not isinstance(value, Recipe):
            raise InvalidInput(f"a recipe register holds a Recipe or None, got {value!r}")
        check_actor(actor)
        expect_int(lamport, "LWW register", "lamport", 0, MAX_COUNTER - 1)
        counter = max(self._counter, lamport) + 1
        if counter > MAX_COUNTER:
            raise InvalidInput("Lamport counter exhausted")
        return LWWRegister._make(value, counter, actor, _value_bytes(value))

    def join(self, other: LWWRegister) -> LWWRegister:
        """Keep the write with the larger key."""
        if self is other:
            return self
        return self if self.key() >= other.key() else other

    # -- encoding ---------------------------------------------------------------------------

    def _to_obj(self) -> list[Any]:
        if self._counter == 0:
            return [0, "", None]
        return [self._counter, self._actor, self._value_bytes or None]

    @classmethod
    def _from_obj(cls, obj: Any, type_name: str = "LWW register") -> LWWRegister:
        counter, actor, vb = expect_list(obj, type_name, "register body", 3)
        expect_int(counter, type_name, "counter", 0, MAX_COUNTER)
        if counter == 0:
            if actor != "" or vb is not None:
                raise malformed(type_name, "an unwritten register has no actor or value")
            return cls()
        check_actor(actor, type_name)
        if vb is None:
            return cls._make(None, counter, actor, b"")
        if not isinstance(vb, bytes) or not vb:
            raise malformed(type_name, "value must be the canonical bytes of a recipe, or nil")
        value = _decode_value(vb)
        return cls._make(value, counter, actor, vb)

    def to_bytes(self) -> bytes:
        """Canonical bytes: tag 0x03, version 1, msgpack ``[counter, actor, recipe bytes|nil]``."""
        return frame(TAG_LWW_REGISTER, self._to_obj())

    @classmethod
    def from_bytes(cls, data: bytes) -> LWWRegister:
        """Parse and validate :meth:`to_bytes` output (raises like ``ORSet.from_bytes``)."""
        obj = unframe(data, TAG_LWW_REGISTER, "LWW register")
        r = cls._from_obj(obj)
        if pack(obj) != bytes(data)[2:]:
            raise malformed("LWW register", "encoding is not canonical")
        return r

    def check_invariants(self) -> None:
        """Raise ``InvalidInput`` unless the register is well-formed."""
        expect_int(self._counter, "LWW register", "counter", 0, MAX_COUNTER)
        if self._counter == 0:
            if self._actor or self._value is not None:
                raise malformed("LWW register", "an unwritten register has no actor or value")
            return
        check_actor(self._actor, "LWW register")
        if _value_bytes(self._value) != self._value_bytes:
            raise malformed("LWW register", "cached value bytes do not match the value")
