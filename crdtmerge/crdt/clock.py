"""Dots, actor ids and version vectors.

A **dot** ``(actor, counter)`` names one event: the ``counter``-th event issued by ``actor``.
A **version vector** maps each actor to the highest counter seen from it; because every actor
issues its counters in order and a replica only ever learns whole states, the vector summarises
exactly the set of dots ``{(a, 1..vv[a])}`` the replica has seen (Bieniusa et al. 2012, "An
optimized conflict-free replicated set", §3; riak_dt ``riak_dt_vclock``). Join is the pointwise
maximum, a semilattice join.

Actor ids are **per incarnation**: ``make_actor(replica_id, epoch)`` gives ``"<replica>.<epoch>"``
where the epoch is a counter the node persists and bumps on every start, *before* it issues a
dot. A replica that restarts with lost un-fsynced state therefore never reissues a dot it may
already have shipped (the Riak "kv679" bug, basho/riak_kv#679). :func:`next_epoch` also mixes
caller-supplied entropy into the low 32 bits, so that restoring an *old* data directory (whose
persisted epoch counter is stale) still yields an epoch never used before, with probability
1 - 2**-32 per earlier incarnation.

Example:
    >>> vv, dot = VersionVector().increment("a.1")
    >>> dot, vv.contains(dot), vv.contains(Dot("a.1", 2))
    (Dot(actor='a.1', counter=1), True, False)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from ..errors import InvalidInput
from ._codec import TAG_VERSION_VECTOR, expect_int, expect_list, frame, malformed, pack, unframe

__all__ = [
    "MAX_COUNTER",
    "Dot",
    "VersionVector",
    "check_actor",
    "make_actor",
    "next_epoch",
    "parse_actor",
]

#: counters (and epochs) fit in a signed 64-bit integer on every platform and in SQLite.
MAX_COUNTER = 2**63 - 1
MAX_ACTOR_BYTES = 255
_EPOCH_ENTROPY_BITS = 32


class Dot(NamedTuple):
    """One event: the ``counter``-th event of ``actor`` (counters start at 1)."""

    actor: str
    counter: int


def check_actor(actor: Any, type_name: str = "actor id") -> str:
    """Return ``actor`` if it is a valid actor id, else raise ``InvalidInput``."""
    if not isinstance(actor, str) or not actor:
        raise malformed(type_name, f"actor id must be a non-empty string, got {actor!r}")
    if len(actor.encode("utf-8", "surrogatepass")) > MAX_ACTOR_BYTES:
        raise malformed(type_name, f"actor id is longer than {MAX_ACTOR_BYTES} bytes")
    if not actor.isprintable():
        raise malformed(type_name, f"actor id {actor!r} contains control characters")
    return actor


def make_actor(replica_id: str, epoch: int) -> str:
    """The actor id of one incarnation of a replica: ``f"{replica_id}.{epoch}"``.

    Args:
        replica_id: the stable replica name (non-empty, printable; may contain dots).
        epoch: a non-negative integer never used before by this replica (see
            :func:`next_epoch`).

    Raises:
        InvalidInput: empty or non-printable replica id, or a bad epoch.

    Example:
        >>> make_actor("node-a", 3)
        'node-a.3'
    """
    if not isinstance(replica_id, str) or not replica_id or not replica_id.isprintable():
        raise InvalidInput(f"replica id must be a non-empty printable string, got {replica_id!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_COUNTER:
        raise InvalidInput(f"epoch must be an integer in [0, 2**63), got {epoch!r}")
    return check_actor(f"{replica_id}.{epoch}")


def parse_actor(actor: str) -> tuple[str, int] | None:
    """Split ``"<replica>.<epoch>"`` into its parts, or None if it has no numeric epoch."""
    replica_id, sep, epoch = actor.rpartition(".")
    if not sep or not replica_id or not epoch.isdigit():
        return None
    return replica_id, int(epoch)


def next_epoch(persisted: int, entropy: int) -> int:
    """The epoch for the next incarnation, given the last persisted one.

    The high bits count incarnations (so epochs grow across ordinary restarts); the low 32
    bits are ``entropy`` (from the caller's random source), so a replica restored from an old
    data directory does not reuse the epoch of a later, lost incarnation.

    Example:
        >>> next_epoch(0, 7), next_epoch(next_epoch(0, 7), 9) >> 32
        (4294967303, 2)
    """
    if isinstance(persisted, bool) or not isinstance(persisted, int) or persisted < 0:
        raise InvalidInput(f"persisted epoch must be a non-negative integer, got {persisted!r}")
    incarnation = (persisted >> _EPOCH_ENTROPY_BITS) + 1
    epoch = (incarnation << _EPOCH_ENTROPY_BITS) | (entropy & ((1 << _EPOCH_ENTROPY_BITS) - 1))
    if epoch > MAX_COUNTER:
        raise InvalidInput("epoch counter exhausted")
    return epoch


class VersionVector:
    """An immutable version vector: actor -> highest counter seen (absent means 0).

    Example:
        >>> a = VersionVector({"x.1": 2}); b = VersionVector({"y.1": 1})
        >>> a.join(b) == VersionVector({"x.1": 2, "y.1": 1}), a <= a.join(b)
        (True, True)
    """

    __slots__ = ("_counters",)

    _counters: dict[str, int]

    def __init__(self, counters: Mapping[str, int] | None = None) -> None:
        checked: dict[str, int] = {}
        for actor, counter in (counters or {}).items():
            check_actor(actor, "version vector")
            expect_int(counter, "version vector", f"counter of {actor!r}", 0, MAX_COUNTER)
            if counter:
                checked[actor] = counter
        self._counters = checked

    @classmethod
    def _make(cls, counters: dict[str, int]) -> VersionVector:
        """Wrap an already-validated dict that nobody else holds (no copy, no checks)."""
        vv = cls.__new__(cls)
        vv._counters = counters
        return vv

    # -- queries ----------------------------------------------------------------------------

    def get(self, actor: str) -> int:
        return self._counters.get(actor, 0)

    def contains(self, dot: tuple[str, int]) -> bool:
        """True if this vector has seen ``dot``."""
        return self._counters.get(dot[0], 0) >= dot[1]

    def actors(self) -> list[str]:
        return sorted(self._counters)

    def items(self) -> Iterator[tuple[str, int]]:
        return iter(sorted(self._counters.items()))

    def __len__(self) -> int:
        return len(self._counters)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VersionVector):
            return NotImplemented
        return self._counters == other._counters

    def __hash__(self) -> int:
        return hash(frozenset(self._counters.items()))

    def __le__(self, other: VersionVector) -> bool:
        """``self`` is dominated by (or equal to) ``other``."""
        oc = other._counters
        return all(oc.get(a, 0) >= n for a, n in self._counters.items())

    def __ge__(self, other: VersionVector) -> bool:
        return other <= self

    def __repr__(self) -> str:
        return f"VersionVector({dict(sorted(self._counters.items()))!r})"

    # -- operations (each returns a new vector) ---------------------------------------------

    def increment(self, actor: str) -> tuple[VersionVector, Dot]:
        """Mint the next dot of ``actor``; return the new vector and the dot."""
        check_actor(actor)
        counter = self._counters.get(actor, 0) + 1
        if counter > MAX_COUNTER:
            raise InvalidInput(f"counter of actor {actor!r} is exhausted; start a new epoch")
        counters = dict(self._counters)
        counters[actor] = counter
        return VersionVector._make(counters), Dot(actor, counter)

    def join(self, other: VersionVector) -> VersionVector:
        """Pointwise maximum."""
        if self is other or self._counters == other._counters:
            return self
        counters = dict(self._counters)
        for actor, n in other._counters.items():
            if n > counters.get(actor, 0):
                counters[actor] = n
        return VersionVector._make(counters)

    # -- encoding ---------------------------------------------------------------------------

    def _to_obj(self) -> list[list[Any]]:
        return [[a, n] for a, n in sorted(self._counters.items())]

    @classmethod
    def _from_obj(cls, obj: Any, type_name: str = "version vector") -> VersionVector:
        counters: dict[str, int] = {}
        previous: str | None = None
        for item in expect_list(obj, type_name, "clock"):
            actor, counter = expect_list(item, type_name, "clock entry", 2)
            check_actor(actor, type_name)
            expect_int(counter, type_name, f"counter of {actor!r}", 1, MAX_COUNTER)
            if previous is not None and actor <= previous:
                raise malformed(type_name, "clock actors are not strictly sorted")
            previous = actor
            counters[actor] = counter
        return cls._make(counters)

    def to_bytes(self) -> bytes:
        """Canonical bytes: tag 0x01, version 1, msgpack ``[[actor, counter], ...]`` sorted."""
        return frame(TAG_VERSION_VECTOR, self._to_obj())

    @classmethod
    def from_bytes(cls, data: bytes) -> VersionVector:
        """Parse :meth:`to_bytes` output; raise on anything else (see ``_codec.unframe``)."""
        obj = unframe(data, TAG_VERSION_VECTOR, "version vector")
        vv = cls._from_obj(obj)
        if pack(obj) != bytes(data)[2:]:
            raise malformed("version vector", "encoding is not canonical")
        return vv

    def check_invariants(self) -> None:
        """Raise ``InvalidInput`` unless every actor is valid and every counter positive."""
        for actor, n in self._counters.items():
            check_actor(actor, "version vector")
            expect_int(n, "version vector", f"counter of {actor!r}", 1, MAX_COUNTER)
