"""A real-process cluster for tests: N uvicorn nodes on loopback, every link through a proxy.

Node *i* reaches node *j* only through the fault proxy link ``"i->j"`` (its configured peer
URL for *j* is the proxy's port), so a test partitions, delays or corrupts any directed link
while the nodes run. Nodes are started with ``python -m crdtmerge node`` and configured through
``CRDTMERGE_*`` variables (the same path as ``make demo``); :meth:`Cluster.kill` sends SIGKILL
and :meth:`Cluster.start` restarts a node from its data directory.

Every wait is a bounded poll (``wait_until``); nothing sleeps as synchronisation.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from crdtmerge.client import Client
from crdtmerge.errors import CrdtMergeError
from crdtmerge.store import ObjectStore, hash_file
from node.auth_cluster import ClusterAuth, ClusterKey
from node.demo import NodeProcess, free_ports, node_env, wait_ready
from tests.process.faultproxy import FaultProxy

T = TypeVar("T")

TOKEN = "process-test-token"


def wait_until(
    predicate: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.1f} s (last: {last!r})")
        time.sleep(interval)  # poll interval, bounded by the deadline
        last = predicate()
    return last


@dataclass
class NodeReport:
    digest: str | None
    merged: str | None
    live: tuple[str, ...]
    state: str | None


class Cluster:
    """``n`` nodes, a proxy per directed link, shared secret and token."""

    def __init__(
        self,
        workdir: Path,
        n: int = 3,
        *,
        gossip_interval_s: float = 0.15,
        extra_env: dict[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        self.n = n
        self.workdir = workdir
        self.proxy = FaultProxy(seed=seed).start()
        self.ports = free_ports(n)
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.secret = secrets.token_urlsafe(32)
        self.nodes: list[NodeProcess] = []
        for i in range(n):
            peers = []
            for j in range(n):
                if j != i:
                    port = self.proxy.add_link(f"{i}->{j}", "127.0.0.1", self.ports[j])
                    peers.append(f"http://127.0.0.1:{port}")
            data_dir = workdir / f"n{i}"
            data_dir.mkdir(parents=True, exist_ok=True)
            env = node_env(
                data_dir=data_dir,
                port=self.ports[i],
                peers=peers,
                secret=self.secret,
                token=TOKEN,
                replica_id=f"n{i}",
                gossip_interval_s=gossip_interval_s,
                extra={"CRDTMERGE_PEER_EXCHANGE": "false", **(extra_env or {})},
            )
            self.nodes.append(
                NodeProcess(f"n{i}", self.urls[i], data_dir, env, workdir / f"n{i}.log")
            )

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, *which: int, timeout: float = 60) -> None:
        idx = which or tuple(range(self.n))
        for i in idx:
            self.nodes[i].start()
        wait_ready([self.urls[i] for i in idx], [self.nodes[i] for i in idx], timeout=timeout)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (no shutdown handlers run)."""
        self.nodes[i].kill()

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        self.proxy.close()

    def logs(self) -> str:
        out = []
        for node in self.nodes:
            if node.log_path.exists():
                tail = node.log_path.read_text(errors="replace").splitlines()[-40:]
                out.append(f"--- {node.name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    # -- faults -----------------------------------------------------------------------------
    def isolate(self, i: int, mode: str = "refuse") -> None:
        """Cut every link to and from node ``i``."""
        for j in range(self.n):
            if j != i:
                self.proxy.set(f"{i}->{j}", mode=mode)
                self.proxy.set(f"{j}->{i}", mode=mode)

    def partition(self, *groups: Sequence[int], mode: str = "refuse") -> None:
        """Cut every link between different groups (links inside a group pass)."""
        side = {i: g for g, members in enumerate(groups) for i in members}
        for name in self.proxy.links():
            a, b = (int(x) for x in name.split("->"))
            if side.get(a) != side.get(b):
                self.proxy.set(name, mode=mode)
            else:
                self.proxy.set(name)

    def heal(self) -> None:
        self.proxy.set_all()

    # -- client operations ------------------------------------------------------------------
    def client(self, i: int, timeout: float = 30) -> Client:
        return Client(self.urls[i], token=TOKEN, timeout=timeout)

    def set_recipe(self, i: int, merge: str, recipe: Any) -> None:
        with self.client(i) as c:
            c.set_recipe(merge, recipe)

    def push(self, i: int, merge: str, path: Path | bytes) -> str:
        with self.client(i) as c:
            return c.push(merge, path).root

    def put_object(self, i: int, path: Path | bytes) -> str:
        with self.client(i) as c:
            return c.put_object(path).root

    def remove(self, i: int, merge: str, root: str) -> None:
        with self.client(i) as c:
            c.remove(merge, root)

    def report(self, i: int, merge: str) -> NodeReport | None:
        try:
            with self.client(i, timeout=5) as c:
                st = c.status(merge)
        except CrdtMergeError:
            return None
        roots = tuple(sorted(_root_of(x) for x in st.get("contributions") or []))
        return NodeReport(st.get("digest"), st.get("merged_hash"), roots, st.get("state"))

    def info(self, i: int) -> dict[str, Any]:
        """The node's replication view (``GET /v1/replication/info``, cluster-signed)."""
        auth = ClusterAuth(ClusterKey(self.secret), "test-harness")
        r = httpx.get(f"{self.urls[i]}/v1/replication/info", auth=auth, timeout=5)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def check_objects(self, roots: set[str]) -> None:
        """Every node holds every root, and each re-hashes to its root."""
        for node in self.nodes:
            store = ObjectStore(node.data_dir / "objects")  # read only: no sweep
            for root in roots:
                r = bytes.fromhex(root)
                assert store.has(r), f"{node.name} lacks {root[:16]}"
                assert hash_file(store.path(r)) == r, f"{node.name}: {root[:16]} is corrupt"

    def wait_converged(
        self, merge: str, *, live: set[str], timeout: float = 60, merged: bool = True
    ) -> list[NodeReport]:
        """Poll until every node reports the same digest and merged hash, with ``live``."""

        def check() -> list[NodeReport] | None:
            reports = [self.report(i, merge) for i in range(self.n)]
            if any(r is None for r in reports):
                return None
            if len({(r.digest, r.merged) for r in reports}) != 1:  # type: ignore[union-attr]
                return None
            if any(set(r.live) != live for r in reports):  # type: ignore[union-attr]
                return None
            if merged and not reports[0].merged:  # type: ignore[union-attr]
                return None
            return reports  # type: ignore[return-value]

        try:
            return wait_until(check, timeout=timeout, interval=0.1, what="convergence")
        except TimeoutError as exc:
            state = [self.report(i, merge) for i in range(self.n)]
            raise TimeoutError(f"{exc}\nreports: {state}\n{self.logs()}") from None


def _root_of(item: Any) -> str:
    return item["root"] if isinstance(item, dict) else str(item)
