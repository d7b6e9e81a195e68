"""The sans-I/O replica core: events in, ordered effects out (see :mod:`.core`).

Example (a driver's loop, in outline)::

    replica = Replica.restore(replica_id, epoch, stored_documents, peers)
    for effect in replica.handle(ObjectsPresent(store.roots())):
        run(effect)                       # Persist, Send, FetchObjects, Ack ... in order
    # then, for every API call, timer tick, message, failure or stored object:
    for effect in replica.handle(event):
        run(effect)
"""

from __future__ import annotations

from .core import MergeStatus, Replica, ReplicaConfig
from .effects import Ack, DigestChanged, Effect, FetchObjects, Persist, PersistEpoch, Send
from .events import (
    AddContribution,
    AddTrustedKey,
    Event,
    MessageReceived,
    ObjectsPresent,
    ObjectStored,
    RemoveContribution,
    RemoveTrustedKey,
    SendFailed,
    SetRecipe,
    Tick,
)
from .peers import PeerTable

__all__ = [
    "Ack",
    "AddContribution",
    "AddTrustedKey",
    "DigestChanged",
    "Effect",
    "Event",
    "FetchObjects",
    "MergeStatus",
    "MessageReceived",
    "ObjectStored",
    "ObjectsPresent",
    "PeerTable",
    "Persist",
    "PersistEpoch",
    "RemoveContribution",
    "RemoveTrustedKey",
    "Replica",
    "ReplicaConfig",
    "Send",
    "SendFailed",
    "SetRecipe",
    "Tick",
]
