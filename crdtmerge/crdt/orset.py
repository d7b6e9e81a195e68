"""The optimized add-wins OR-Set without tombstones (ORSWOT).

Algorithm (Bieniusa, Zawirski, Preguiça, Shapiro, Baquero, Balegas, Duarte 2012, "An optimized
conflict-free replicated set", arXiv:1210.3368; the same design as riak_dt ``riak_dt_orswot``
and rust-crdt ``Orswot``; its delta-state form is Almeida, Shoker, Baquero 2018, "Delta state
replicated data types", JPDC):

* The state is one version vector ``clock`` for the whole set, plus, for every *live* element,
  the set of dots that added it. There are no tombstones.
* ``add(e, actor)`` mints the next dot of ``actor`` in ``clock`` and stores ``e`` with that one
  dot; older dots of ``e`` are superseded (the add observed them).
* ``remove(e)`` deletes ``e``'s entry. The clock still covers the removed dots, and that is what
  makes the removal stick: a peer that still holds one of those dots drops it on join, because
  our clock shows we saw it and no longer hold it.
* ``join``: the clock is the pointwise maximum; a dot of an element survives if both sides hold
  it, or if one side holds it and the other side's clock has not seen it (the other side has
  not heard of that add yet, rather than having removed it). An element without a surviving
  dot is gone. This is commutative, associative, idempotent and inflationary on well-formed
  states. A concurrent add survives a remove because the remover never saw its dot (add wins),
  and a re-add after a remove works because it carries a new dot.

Well-formedness (:meth:`ORSet.check_invariants`, enforced on every decoded state): every dot is
covered by the set's own clock, no dot belongs to two elements, an element holds at most one dot
per actor, and no entry is empty. The join laws only hold for such states, which is why the
property tests build states by running operations and never by drawing arbitrary tuples.

**Dot safety (kv679).** A dot must never be issued twice: if a replica restarted with a stale
counter and reused ``(actor, n)`` for a new element, every peer that had seen the old
``(actor, n)`` would treat the new add as "seen and removed" and silently drop it (Riak issue
basho/riak_kv#679). crdtmerge makes actor ids per incarnation, ``make_actor(replica_id,
epoch)`` = ``"<replica>.<epoch>"``, where the node persists an epoch counter and bumps it on
every start before issuing any dot (:func:`~crdtmerge.crdt.clock.next_epoch` also mixes in
entropy, for restores of old data directories). Counters of a fresh actor start at 1, so
nothing an earlier incarnation shipped can be shadowed.

**No partial deltas.** Shipping "one new entry + the whole clock" is *not* a valid delta: if
A adds e1 then e2 and a peer receives the e2 message (clock A:2) first, it concludes that A's
dot 1 was seen and removed, and e1 is lost. crdtmerge ships the full state (about 45 bytes per
element encoded), which tolerates loss, duplication and reordering.

Example:
    >>> s = ORSet().add(b"\\1" * 32, "a.1")
    >>> t = s.remove(b"\\1" * 32).add(b"\\2" * 32, "b.1")
    >>> sorted(x[0] for x in s.join(t).value())
    [2]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import InvalidInput
from ._codec import TAG_ORSET, expect_list, frame, malformed, pack, unframe
from .clock import Dot, VersionVector, check_actor

__all__ = ["ELEMENT_SIZE", "ORSet"]

#: elements are 32-byte roots or 32-byte Ed25519 public keys.
ELEMENT_SIZE = 32

#: a dot as stored: a ``Dot`` or a plain ``(actor, counter)`` pair (decoding builds plain
#: pairs; they compare and hash as equal ``Dot``s). :meth:`ORSet.dots` returns ``Dot``s.
_Pair = tuple[str, int]

_EMPTY: frozenset[_Pair] = frozenset()


def _check_element(element: Any) -> bytes:
    if not isinstance(element, bytes) or len(element) != ELEMENT_SIZE:
        raise InvalidInput(
            f"an OR-Set element must be {ELEMENT_SIZE} bytes (a root or public key), got "
            f"{type(element).__name__} of length {len(element) if hasattr(element, '__len__') else '?'}"
        )
    return element


def _unseen(dots: frozenset[_Pair], clock: dict[str, int]) -> frozenset[_Pair]:
    """The dots of ``dots`` that ``clock`` has not seen."""
    if len(dots) == 1:
        for actor, counter in dots:
            return dots if clock.get(actor, 0) < counter else _EMPTY
    return frozenset(d for d in dots if clock.get(d[0], 0) < d[1])


class ORSet:
    """An immutable add-wins OR-Set of 32-byte elements; every operation returns a new set.

    Example:
        >>> e = b"\\7" * 32
        >>> a = ORSet().add(e, "a.1")
        >>> b = a.remove(e)            # b observed a's add, then removed it
        >>> c = a.add(e, "c.1")        # concurrently, c re-added e
        >>> e in b.join(c).value()     # add wins
        True
    """

    __slots__ = ("_clock", "_entries", "_sorted", "_value")

    _clock: VersionVector
    _entries: dict[bytes, frozenset[_Pair]]
    _value: frozenset[bytes] | None
    _sorted: list[bytes] | None

    def __init__(self) -> None:
        self._clock = VersionVector()
        self._entries = {}
        self._value = None
        self._sorted = None

    @classmethod
    def _make(cls, clock: VersionVector, entries: dict[bytes, frozenset[_Pair]]) -> ORSet:
        s = cls.__new__(cls)
        s._clock = clock
        s._entries = entries
        s._value = None
        s._sorted = None
        return s

    # -- queries ----------------------------------------------------------------------------

    @property
    def clock(self) -> VersionVector:
        return self._clock

    def value(self) -> frozenset[bytes]:
        """The live elements."""
        if self._value is None:
            self._value = frozenset(self._entries)
        return self._value

    def __contains__(self, element: object) -> bool:
        return element in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def dots(self, element: bytes) -> frozenset[Dot]:
        """The dots that currently keep ``element`` alive (empty if absent)."""
        return frozenset(Dot(*d) for d in self._entries.get(element, _EMPTY))

    def sorted_elements(self) -> list[bytes]:
        """The live elements in byte order (a new list; the sort is cached)."""
        if self._sorted is None:
            self._sorted = sorted(self._entries)
        return list(self._sorted)

    def is_bottom(self) -> bool:
        """True for the initial (empty, never-written) state."""
        return not self._entries and not len(self._clock)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ORSet):
            return NotImplemented
        return self is other or (self._clock == other._clock and self._entries == other._entries)

    def __hash__(self) -> int:
        return hash((self._clock, frozenset(self._entries.items())))

    def __repr__(self) -> str:
        return f"ORSet(clock={self._clock!r}, elements={len(self._entries)})"

    # -- operations -------------------------------------------------------------------------

    def add(self, element: bytes, actor: str) -> ORSet:
        """Add ``element`` with a fresh dot of ``actor`` (superseding its older dots)."""
        _check_element(element)
        clock, dot = self._clock.increment(actor)
        entries = dict(self._entries)
        entries[element] = frozenset((dot,))
        return ORSet._make(clock, entries)

    def remove(self, element: bytes) -> ORSet:
        """Remove ``element`` (the dots observed here); a no-op returning ``self`` if absent."""
        _check_element(element)
        if element not in self._entries:
            return self
        entries = dict(self._entries)
        del entries[element]
        return ORSet._make(self._clock, entries)

    def join(self, other: ORSet) -> ORSet:
        """The least upper bound of two states (see the module docstring)."""
        if self is other or self == other:
            return self
        c1 = self._clock._counters
        c2 = other._clock._counters
        e1 = self._entries
        e2 = other._entries
        out: dict[bytes, frozenset[_Pair]] = {}
        get1, get2 = c1.get, c2.get
        lookup = e2.get
        matched = 0  # elements of e2 also in e1
        for element, d1 in e1.items():
            d2 = lookup(element)
            if d2 is None:  # only here: keep the dots the other side has not seen
                if len(d1) == 1:
                    ((actor, counter),) = d1
                    if get2(actor, 0) < counter:
                        out[element] = d1
                else:
                    kept = _unseen(d1, c2)
                    if kept:
                        out[element] = kept
            elif d1 is d2 or d1 == d2:  # the common case: identical on both sides
                matched += 1
                out[element] = d1
            else:
                matched += 1
                kept = (d1 & d2) | _unseen(d1 - d2, c2) | _unseen(d2 - d1, c1)
                if kept:
                    out[element] = kept
        if matched < len(e2):  # e2 has elements e1 lacks
            for element, d2 in e2.items():
                if element in e1:
                    continue
                if len(d2) == 1:
                    ((actor, counter),) = d2
                    if get1(actor, 0) < counter:
                        out[element] = d2
                else:
                    kept = _unseen(d2, c1)
                    if kept:
                        out[element] = kept
        return ORSet._make(self._clock.join(other._clock), out)

    def join_all(self, others: Iterable[ORSet]) -> ORSet:
        result = self
        for o in others:
            result = result.join(o)
        return result

    # -- encoding ---------------------------------------------------------------------------

    def _to_obj(self) -> list[Any]:
        actors = self._clock.actors()
        index = {a: i for i, a in enumerate(actors)}
        entries = self._entries
        if self._sorted is None:
            self._sorted = sorted(entries)
        body = []
        for e in self._sorted:
            dots = entries[e]
            if len(dots) == 1:
                ((actor, counter),) = dots
                body.append([e, [[index[actor], counter]]])
            else:
                body.append([e, sorted([index[a], n] for a, n in dots)])
        return [[[a, self._clock.get(a)] for a in actors], body]

    @classmethod
    def _from_obj(cls, obj: Any, type_name: str = "OR-Set") -> ORSet:
        """Build and validate a state from its decoded body (structure, order, invariants)."""
        clock_obj, entries_obj = expect_list(obj, type_name, "OR-Set body", 2)
        clock = VersionVector._from_obj(clock_obj, type_name)
        counters = clock._counters
        actors = clock.actors()
        n_actors = len(actors)
        entries: dict[bytes, frozenset[_Pair]] = {}
        seen: set[_Pair] = set()
        previous = b""
        for item in expect_list(entries_obj, type_name, "entries"):
            if type(item) is not list or len(item) != 2:
                raise malformed(type_name, "each entry must be [element, dots]")
            element, dots_obj = item
            if type(element) is not bytes or len(element) != ELEMENT_SIZE:
                raise malformed(type_name, f"element must be {ELEMENT_SIZE} bytes")
            if element <= previous:
                raise malformed(type_name, "elements are not strictly sorted")
            previous = element
            if type(dots_obj) is not list or not dots_obj:
                raise malformed(type_name, f"element {element.hex()[:16]} has no dot")
            dots = []
            last = (-1, 0)
            for dot in dots_obj:
                if type(dot) is not list or len(dot) != 2:
                    raise malformed(type_name, "a dot must be [actor index, counter]")
                i, n = dot
                if type(i) is not int or not 0 <= i < n_actors:
                    raise malformed(type_name, f"dot actor index {i!r} is not in the clock")
                if type(n) is not int or n < 1:
                    raise malformed(type_name, f"dot counter {n!r} is not a positive integer")
                if (i, n) <= last:
                    raise malformed(type_name, "dots are not strictly sorted")
                if i == last[0]:
                    raise malformed(
                        type_name, f"element {element.hex()[:16]} holds two dots of {actors[i]}"
                    )
                last = (i, n)
                actor = actors[i]
                if n > counters[actor]:
                    raise malformed(
                        type_name,
                        f"dot ({actor}, {n}) of element {element.hex()[:16]} is not covered by "
                        f"the set's own clock ({counters[actor]})",
                    )
                d = (actor, n)
                if d in seen:
                    raise malformed(type_name, "a dot is held by two elements")
                seen.add(d)
                dots.append(d)
            entries[element] = frozenset(dots)
        return cls._make(clock, entries)

    def to_bytes(self) -> bytes:
        """Canonical bytes: tag 0x02, version 1, msgpack ``[clock, entries]``.

        ``clock`` is ``[[actor, counter], ...]`` sorted by actor; ``entries`` is
        ``[[element, [[actor index, counter], ...]], ...]`` sorted by element, dots sorted, the
        actor index pointing into ``clock``.
        """
        return frame(TAG_ORSET, self._to_obj())

    @classmethod
    def from_bytes(cls, data: bytes) -> ORSet:
        """Parse and validate :meth:`to_bytes` output.

        Raises:
            UnsupportedVersion: unknown encoding version.
            InvalidInput: (code ``malformed_state``) wrong tag, garbage, non-canonical bytes, or
                an ill-formed state (a dot above the clock, a dot held twice ...).
        """
        obj = unframe(data, TAG_ORSET, "OR-Set")
        s = cls._from_obj(obj)
        if pack(obj) != bytes(data)[2:]:
            raise malformed("OR-Set", "encoding is not canonical")
        return s

    def check_invariants(self, type_name: str = "OR-Set") -> None:
        """Raise ``InvalidInput`` (code ``malformed_state``) unless the state is well-formed."""
        self._clock.check_invariants()
        clock = self._clock._counters
        seen: set[_Pair] = set()
        total = 0
        for element, dots in self._entries.items():
            if not isinstance(element, bytes) or len(element) != ELEMENT_SIZE:
                raise malformed(type_name, f"element must be {ELEMENT_SIZE} bytes")
            if not dots:
                raise malformed(type_name, f"element {element.hex()[:16]} has no dot")
            actors = set()
            for actor, counter in dots:
                check_actor(actor, type_name)
                if counter > clock.get(actor, 0) or counter < 1:
                    raise malformed(
                        type_name,
                        f"dot ({actor}, {counter}) of element {element.hex()[:16]} is not "
                        f"covered by the set's own clock ({clock.get(actor, 0)})",
                    )
                if actor in actors:
                    raise malformed(
                        type_name, f"element {element.hex()[:16]} holds two dots of {actor}"
                    )
                actors.add(actor)
            seen |= dots
            total += len(dots)
        if len(seen) != total:
            raise malformed(type_name, "a dot is held by two elements")
