"""Replication messages between replicas: msgpack with a protocol version.

Every message is a msgpack map ``{"v": PROTOCOL_VERSION, "type": ..., "from": sender, ...}``.
The receiver checks the version first (:class:`~crdtmerge.errors.UnsupportedVersion` for
another version, so mixed-version clusters fail loudly), then the type and every field, and
decodes and validates every embedded document before returning (a malformed message raises
:class:`~crdtmerge.errors.RemoteProtocolError` and nothing of it is ever applied).

Messages (see ``docs/architecture.md``, "Replica core", for the exchange):

* :class:`DigestMessage` -- an anti-entropy round opener (``reply=False``) or the answer of a
  peer whose state matched (``reply=True``); carries the whole-state hash and, when
  ``listed``, one :class:`MergeSummary` per merge.
* :class:`ChangedNotice` -- best-effort "I changed" push after a local write; the receiver
  compares summaries and pulls at once.
* :class:`IndexMessage` -- full documents of the merges whose hashes differed, plus ``want``:
  the merges the sender wants back (push-pull in one and a half round trips).

Idle rounds cost one ``DigestMessage`` each way: about 100 bytes when the hash alone is sent,
plus about 75 per merge when the summaries are listed inline.

Example:
    >>> m = DigestMessage.of("node-a", (MergeSummary("m", b"\\0" * 32, b"\\1" * 32),))
    >>> decode(encode(m)) == m
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from .canonical import domain_hash
from .crdt.document import MergeDocument
from .crdt.state import check_merge_name
from .errors import (
    CrdtMergeError,
    LocalProtocolError,
    RemoteProtocolError,
    UnsupportedVersion,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ChangedNotice",
    "DigestMessage",
    "IndexMessage",
    "MergeSummary",
    "Message",
    "decode",
    "encode",
    "summaries_hash",
]

PROTOCOL_VERSION = 1
#: a message larger than this is refused before parsing (10^4 elements encode to ~0.5 MB).
MAX_MESSAGE_BYTES = 256 << 20
_MAX_SENDER = 255


def _check_sender(sender: Any) -> str:
    if not isinstance(sender, str) or not sender or len(sender) > _MAX_SENDER:
        raise LocalProtocolError(f"sender must be a non-empty replica id, got {sender!r}")
    if not sender.isprintable():
        raise LocalProtocolError(f"sender {sender!r} contains control characters")
    return sender


_VALID_NAMES: set[str] = set()  # names already checked (a node sees few distinct merges)


def _check_sorted_names(names: list[str], what: str) -> None:
    for name in names:
        if isinstance(name, str) and name in _VALID_NAMES:
            continue
        try:
            check_merge_name(name)
        except CrdtMergeError as exc:
            raise LocalProtocolError(f"{what}: {exc.detail}") from exc
        if len(_VALID_NAMES) < 100_000:
            _VALID_NAMES.add(name)
    if any(b <= a for a, b in zip(names, names[1:], strict=False)):
        raise LocalProtocolError(f"{what} must be strictly sorted by merge name")


@dataclass(frozen=True)
class MergeSummary:
    """One merge as seen by the sender: document ``state_hash`` and model ``digest``."""

    name: str
    state_hash: bytes
    digest: bytes

    def __post_init__(self) -> None:
        _check_sorted_names([self.name], "merge summary")
        for field_name in ("state_hash", "digest"):
            value = getattr(self, field_name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise LocalProtocolError(f"merge summary {field_name} must be 32 bytes")

    @classmethod
    def of(cls, name: str, doc: MergeDocument) -> MergeSummary:
        return cls(name, doc.state_hash(), doc.digest())


def _check_summaries(merges: Any) -> None:
    if not isinstance(merges, tuple) or not all(isinstance(m, MergeSummary) for m in merges):
        raise LocalProtocolError("merges must be a tuple of MergeSummary")
    # each MergeSummary validated its own name; only the order is left to check
    if any(b.name <= a.name for a, b in zip(merges, merges[1:], strict=False)):
        raise LocalProtocolError("merges must be strictly sorted by merge name")


def summaries_hash(merges: tuple[MergeSummary, ...]) -> bytes:
    """The whole-state hash of a replica with these merges (= ``NodeState.state_hash()``)."""
    parts = []
    for m in merges:
        parts.append(m.name.encode())
        parts.append(m.state_hash)
    return domain_hash("crdtmerge/v1/node-state", *parts)


@dataclass(frozen=True)
class DigestMessage:
    """Anti-entropy digest: the sender's whole-state hash, and its per-merge summaries when
    ``listed`` (a replica with few merges lists them inline; otherwise it sends the hash alone
    and lists them only when asked, by a peer whose hash differs)."""

    sender: str
    state_hash: bytes
    merges: tuple[MergeSummary, ...] = ()
    listed: bool = True
    reply: bool = False

    def __post_init__(self) -> None:
        _check_sender(self.sender)
        if not isinstance(self.state_hash, bytes) or len(self.state_hash) != 32:
            raise LocalProtocolError("digest state_hash must be 32 bytes")
        _check_summaries(self.merges)
        if not isinstance(self.reply, bool) or not isinstance(self.listed, bool):
            raise LocalProtocolError("reply and listed must be bools")
        if not self.listed and self.merges:
            raise LocalProtocolError("an unlisted digest carries no merge summaries")
        if self.listed and summaries_hash(self.merges) != self.state_hash:
            raise LocalProtocolError("digest state_hash does not match its merge summaries")

    @classmethod
    def of(
        cls, sender: str, merges: tuple[MergeSummary, ...], listed: bool = True, reply: bool = False
    ) -> DigestMessage:
        """A digest of ``merges`` (listed inline, or as the whole-state hash only)."""
        return cls(sender, summaries_hash(merges), merges if listed else (), listed, reply)


@dataclass(frozen=True)
class ChangedNotice:
    """Best-effort notice sent after a local write: "pull from me now"."""

    sender: str
    merges: tuple[MergeSummary, ...]

    def __post_init__(self) -> None:
        _check_sender(self.sender)
        _check_summaries(self.merges)


@dataclass(frozen=True)
class IndexMessage:
    """Full documents for the merges that differed, and the merges wanted back."""

    sender: str
    merges: tuple[MergeSummary, ...]
    documents: tuple[tuple[str, MergeDocument], ...]
    want: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_sender(self.sender)
        _check_summaries(self.merges)
        if not isinstance(self.documents, tuple) or not all(
            isinstance(d, tuple) and len(d) == 2 and isinstance(d[1], MergeDocument)
            for d in self.documents
        ):
            raise LocalProtocolError("documents must be a tuple of (name, MergeDocument)")
        _check_sorted_names([name for name, _ in self.documents], "documents")
        if not isinstance(self.want, tuple):
            raise LocalProtocolError("want must be a tuple of merge names")
        _check_sorted_names(list(self.want), "want")


Message = DigestMessage | ChangedNotice | IndexMessage

_TYPES = {DigestMessage: "digest", ChangedNotice: "changed", IndexMessage: "index"}


def _summaries_obj(merges: tuple[MergeSummary, ...]) -> list[list[Any]]:
    return [[m.name, m.state_hash, m.digest] for m in merges]


def encode(message: Message) -> bytes:
    """The msgpack bytes of ``message`` (deterministic for equal messages)."""
    kind = _TYPES.get(type(message))
    if kind is None:
        raise LocalProtocolError(f"not a replication message: {message!r}")
    obj: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": kind,
        "from": message.sender,
        "merges": _summaries_obj(message.merges),
    }
    if isinstance(message, DigestMessage):
        obj["state"] = message.state_hash
        obj["listed"] = message.listed
        obj["reply"] = message.reply
    elif isinstance(message, IndexMessage):
        obj["documents"] = [[name, doc.to_bytes()] for name, doc in message.documents]
        obj["want"] = list(message.want)
    return msgpack.packb(obj, use_bin_type=True)


_FIELDS = {
    "digest": {"v", "type", "from", "state", "merges", "listed", "reply"},
    "changed": {"v", "type", "from", "merges"},
    "index": {"v", "type", "from", "merges", "documents", "want"},
}


def _summaries(value: Any) -> tuple[MergeSummary, ...]:
    if not isinstance(value, list):
        raise RemoteProtocolError("'merges' must be an array")
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3:
            raise RemoteProtocolError("each merge summary must be [name, state_hash, digest]")
        out.append(MergeSummary(*item))
    return tuple(out)


def decode(data: bytes) -> Message:
    """Parse and fully validate a replication message.

    Raises:
        UnsupportedVersion: the message's protocol version is not :data:`PROTOCOL_VERSION`.
        RemoteProtocolError: anything else wrong (garbage, unknown type, bad fields, a
            malformed embedded document); chained to the underlying error.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError(f"a message must be bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise RemoteProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"message is not valid msgpack ({exc})") from exc
    if not isinstance(obj, Mapping):
        raise RemoteProtocolError("a message must be a msgpack map")
    version = obj.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RemoteProtocolError(f"message has no integer protocol version 'v' (got {version!r})")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"replication protocol version {version} is not supported; this node speaks "
            f"version {PROTOCOL_VERSION} (upgrade the older node)"
        )
    kind = obj.get("type")
    if kind not in _FIELDS:
        raise RemoteProtocolError(
            f"unknown message type {kind!r}; expected one of {sorted(_FIELDS)}"
        )
    if set(obj) != _FIELDS[kind]:
        raise RemoteProtocolError(
            f"{kind} message fields {sorted(obj)} do not match {sorted(_FIELDS[kind])}"
        )
    try:
        merges = _summaries(obj["merges"])
        if kind == "digest":
            return DigestMessage(obj["from"], obj["state"], merges, obj["listed"], obj["reply"])
        if kind == "changed":
            return ChangedNotice(obj["from"], merges)
        documents_obj, want = obj["documents"], obj["want"]
        if not isinstance(documents_obj, list) or not isinstance(want, list):
            raise RemoteProtocolError("'documents' and 'want' must be arrays")
        documents = []
        for item in documents_obj:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], bytes):
                raise RemoteProtocolError("each document must be [name, bytes]")
            documents.append((item[0], MergeDocument.from_bytes(item[1])))
        return IndexMessage(obj["from"], merges, tuple(documents), tuple(want))
    except (RemoteProtocolError, UnsupportedVersion):
        raise
    except CrdtMergeError as exc:
        raise RemoteProtocolError(f"invalid {kind} message: {exc.detail}") from exc
