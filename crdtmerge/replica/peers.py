"""Peer selection for anti-entropy: round-robin over a shuffled order, with backoff.

Each round contacts one peer. Peers are visited round-robin over an order that is reshuffled
(from the caller's ``rng_value``) every time it is exhausted, which bounds the gap between two
contacts of the same peer to under two passes (SWIM's round-robin probing, Das et al. 2002), yet
avoids every replica contacting peers in the same order. A peer whose send failed gets an
exponential backoff (``base * 2**(failures-1)``, capped); a message from it clears the backoff.
Nothing here blocks: a peer in backoff is simply skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..canonical import domain_hash

__all__ = ["PeerTable"]


@dataclass
class _Peer:
    failures: int = 0
    next_try: float = float("-inf")


class PeerTable:
    """Mutable bookkeeping owned by one :class:`~crdtmerge.replica.Replica`."""

    def __init__(
        self,
        peers: Iterable[str],
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        own_id: str | None = None,
    ) -> None:
        self.own_id = own_id
        self._peers: dict[str, _Peer] = {}
        self._order: list[str] = []
        self._cursor = 0
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.set_peers(peers)

    def set_peers(self, peers: Iterable[str]) -> None:
        """Replace the peer set (keeps the backoff of peers that stay; never includes us)."""
        wanted = sorted(set(peers) - {self.own_id})
        self._peers = {p: self._peers.get(p, _Peer()) for p in wanted}
        self._order = [p for p in self._order if p in self._peers]
        self._cursor = min(self._cursor, len(self._order))

    def peers(self) -> list[str]:
        return sorted(self._peers)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def healthy(self) -> list[str]:
        """Peers without recent failures (targets of best-effort change notices)."""
        return [p for p, s in sorted(self._peers.items()) if s.failures == 0]

    def next_peer(self, now: float, rng_value: int) -> str | None:
        """The next peer to contact, skipping peers in backoff; None if none is available."""
        for _ in range(2 * len(self._peers)):
            if self._cursor >= len(self._order):
                seed = (rng_value & (2**64 - 1)).to_bytes(8, "little")
                self._order = sorted(
                    self._peers,
                    key=lambda p: domain_hash("crdtmerge/v1/peer-shuffle", seed, p.encode()),
                )
                self._cursor = 0
                if not self._order:
                    return None
            peer = self._order[self._cursor]
            self._cursor += 1
            if self._peers[peer].next_try <= now:
                return peer
        return None

    def failed(self, peer: str, now: float) -> None:
        state = self._peers.get(peer)
        if state is None:
            return
        state.failures += 1
        delay = min(self.backoff_base * 2 ** (state.failures - 1), self.backoff_max)
        state.next_try = now + delay

    def heard_from(self, peer: str) -> None:
        state = self._peers.get(peer)
        if state is not None:
            state.failures = 0
            state.next_try = float("-inf")

    def failures(self, peer: str) -> int:
        return self._peers[peer].failures

    def check_invariants(self) -> None:
        if not 0 <= self._cursor <= len(self._order):
            raise AssertionError("peer cursor out of range")
        if not set(self._order) <= set(self._peers):
            raise AssertionError("peer order holds an unknown peer")
        for p, s in self._peers.items():
            if s.failures < 0:
                raise AssertionError(f"peer {p} has negative failures")
