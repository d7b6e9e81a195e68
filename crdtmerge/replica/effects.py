"""Outputs of the replica core: frozen dataclass effects, executed by the driver *in order*.

Order is the contract: a :class:`Persist` always precedes the :class:`Ack` and the
:class:`Send` that reveal the state it protects, so a crash between two effects never
acknowledges or ships a dot that was not durably stored (dot safety, DESIGN.md §3). The driver
must finish (fsync) a ``Persist`` before executing the next effect.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wire import Message

__all__ = [
    "Ack",
    "DigestChanged",
    "Effect",
    "FetchObjects",
    "Persist",
    "PersistEpoch",
    "Send",
]


@dataclass(frozen=True)
class Persist:
    """Durably store these merge documents (name, ``MergeDocument.to_bytes()``), atomically.

    Each is the full new document, replacing the stored one. Write them in one transaction
    (SQLite, ``synchronous=FULL``) before executing the next effect.
    """

    documents: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class PersistEpoch:
    """The core moved to a new epoch (it detected that its actor id was used before, e.g.
    after a restore of an old data directory). Persist ``epoch`` before the next effect; the
    next start must bump from it."""

    epoch: int


@dataclass(frozen=True)
class Ack:
    """Answer the local request ``request_id``: it is durable. ``changed`` is False for a
    no-op (removing an absent root). ``digest`` is the merge's state digest afterwards."""

    request_id: str | int | None
    merge: str
    changed: bool
    digest: bytes


@dataclass(frozen=True)
class Send:
    """Best-effort: deliver ``message`` to ``peer`` (``wire.encode`` it). On failure, feed
    ``SendFailed(peer, now)`` back. Never block other effects on it."""

    peer: str
    message: Message


@dataclass(frozen=True)
class FetchObjects:
    """These live roots of ``merge`` (contributions, or the recipe's base) are not stored
    locally: fetch them from peers, verify, store, then feed ``ObjectStored(root)`` back."""

    merge: str
    roots: tuple[bytes, ...]


@dataclass(frozen=True)
class DigestChanged:
    """The merge's digest or completeness changed. When ``complete`` and the digest stays
    stable for the debounce, the node computes the merged model for ``digest``."""

    merge: str
    digest: bytes
    complete: bool


Effect = Persist | PersistEpoch | Ack | Send | FetchObjects | DigestChanged
