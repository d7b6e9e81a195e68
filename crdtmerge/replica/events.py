"""Inputs of the replica core: frozen dataclass events, validated in their constructors.

The driver (the node runtime, or the simulator) turns everything that happens -- an API call,
a timer, a message, a failed send, an object landing in the store -- into one of these and
passes it to :meth:`crdtmerge.replica.Replica.handle`. Time (``now``, seconds on any monotonic
clock) and randomness (``rng_value``, any integer) are fields of the events: the core never
reads a clock or a random source itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..crdt.orset import ELEMENT_SIZE
from ..crdt.state import check_merge_name
from ..errors import InvalidInput
from ..recipe import Recipe
from ..wire import Message

__all__ = [
    "AddContribution",
    "AddTrustedKey",
    "Event",
    "MessageReceived",
    "ObjectsPresent",
    "ObjectStored",
    "RemoveContribution",
    "RemoveTrustedKey",
    "SendFailed",
    "SetRecipe",
    "Tick",
]

RequestId = str | int | None


def _check_root(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != ELEMENT_SIZE:
        raise InvalidInput(f"{what} must be {ELEMENT_SIZE} bytes, got {value!r:.80}")


@dataclass(frozen=True)
class SetRecipe:
    """Write the merge's recipe (``None`` clears it)."""

    merge: str
    recipe: Recipe | None
    request_id: RequestId = None

    def __post_init__(self) -> None:
        check_merge_name(self.merge)
        if self.recipe is not None and not isinstance(self.recipe, Recipe):
            raise InvalidInput("recipe must be a Recipe or None")


@dataclass(frozen=True)
class AddContribution:
    """Add a contribution root (the object should already be stored)."""

    merge: str
    root: bytes
    request_id: RequestId = None

    def __post_init__(self) -> None:
        check_merge_name(self.merge)
        _check_root(self.root, "root")


@dataclass(frozen=True)
class RemoveContribution:
    """Remove a contribution root (the adds observed here)."""

    merge: str
    root: bytes
    request_id: RequestId = None

    def __post_init__(self) -> None:
        check_merge_name(self.merge)
        _check_root(self.root, "root")


@dataclass(frozen=True)
class AddTrustedKey:
    """Trust an Ed25519 public key (32 bytes) to sign contributions to this merge."""

    merge: str
    key: bytes
    request_id: RequestId = None

    def __post_init__(self) -> None:
        check_merge_name(self.merge)
        _check_root(self.key, "public key")


@dataclass(frozen=True)
class RemoveTrustedKey:
    merge: str
    key: bytes
    request_id: RequestId = None

    def __post_init__(self) -> None:
        check_merge_name(self.merge)
        _check_root(self.key, "public key")


@dataclass(frozen=True)
class Tick:
    """The anti-entropy timer fired; ``rng_value`` reshuffles the peer order when needed."""

    now: float
    rng_value: int = 0


@dataclass(frozen=True)
class MessageReceived:
    """A decoded replication message arrived from the authenticated ``peer``."""

    peer: str
    message: Message


@dataclass(frozen=True)
class SendFailed:
    """Sending to ``peer`` failed (refused, timed out); the peer gets a backoff."""

    peer: str
    now: float


@dataclass(frozen=True)
class ObjectsPresent:
    """These objects are complete in the local store (at start-up, or after a scan)."""

    roots: frozenset[bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "roots", frozenset(self.roots))
        for r in self.roots:
            _check_root(r, "root")


@dataclass(frozen=True)
class ObjectStored:
    """One object finished downloading and verifying, and is now complete locally."""

    root: bytes

    def __post_init__(self) -> None:
        _check_root(self.root, "root")


Event = (
    SetRecipe
    | AddContribution
    | RemoveContribution
    | AddTrustedKey
    | RemoveTrustedKey
    | Tick
    | MessageReceived
    | SendFailed
    | ObjectsPresent
    | ObjectStored
)
