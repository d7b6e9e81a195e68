"""The client side of a Jepsen-lite run: workers adding, removing and reading contributions.

Each worker is one Jepsen "process": it runs one operation at a time against a random node and
records it in the :class:`~tests.jepsen.history.History` (invoke, then ok / fail / info):

- ``add``: push a new small contribution (a ~400-byte safetensors file generated from a unique
  seed; its root is computed locally *before* the request, so an add whose outcome is unknown
  still names its element), or, sometimes, push an element again (a client-side duplicate:
  it must never show up twice, and after a remove it is a re-add);
- ``remove``: remove an element this run added (any node, so many removes find nothing: 404);
- ``read``: the node's live set of the merge.

Outcomes: a 2xx is ``ok``; a 4xx or a refused connection (nothing was sent) is ``fail``; a
timeout, a dropped connection or a 5xx is ``info`` (the effect may or may not happen). Every
request has a timeout; workers stop at a deadline or after ``max_ops``; the pause between
operations only paces the load.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from crdtmerge.client import Client, NodeUnavailable
from crdtmerge.errors import CrdtMergeError
from crdtmerge.store import hash_file
from tests.process.cluster import TOKEN
from tests.replication_sim import model_bytes

from .history import History, Op

__all__ = ["Elements", "Workload", "classify", "run_op"]

MERGE = "jepsen"
LINEAR = {"strategy": "linear", "version": 1, "params": {"weight": 1.0}}


class Elements:
    """Generated contributions: seed -> bytes and root, computed once (thread-safe)."""

    def __init__(self, first_seed: int) -> None:
        self._next = first_seed
        self._lock = threading.Lock()
        self.by_root: dict[str, bytes] = {}
        self.added: list[str] = []  # roots with at least one acknowledged add
        self.first_node: dict[str, int] = {}  # root -> node of its first acknowledged add

    def new(self) -> tuple[str, bytes]:
        with self._lock:
            seed = self._next
            self._next += 1
        data = model_bytes(seed)
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
            f.write(data)
            f.flush()
            root = hash_file(f.name).hex()
        with self._lock:
            self.by_root[root] = data
        return root, data

    def acked(self, root: str, node: int) -> None:
        with self._lock:
            if root not in self.first_node:
                self.added.append(root)
                self.first_node[root] = node

    def pick(self, rng: random.Random) -> str | None:
        with self._lock:
            return rng.choice(self.added) if self.added else None


def classify(exc: BaseException) -> str:
    """``fail`` when the request surely had no effect, else ``info``."""
    if isinstance(exc, NodeUnavailable):
        return "fail" if isinstance(exc.__cause__, httpx.ConnectError) else "info"
    if isinstance(exc, CrdtMergeError):
        status = getattr(exc, "http_status", 500)
        return "fail" if 400 <= status < 500 else "info"
    return "info"


def run_op(
    history: History,
    process: str,
    url: str,
    node: int,
    f: str,
    value: Any = None,
    *,
    data: bytes | None = None,
    timeout: float = 5.0,
    merge: str = MERGE,
) -> Op:
    """Run one operation against ``url`` and record it; returns the completion."""
    inv = history.invoke(process, f, value, node=node)
    try:
        with Client(url, token=TOKEN, timeout=timeout) as c:
            if f == "add":
                assert data is not None
                got = c.push(merge, data).root
                if got != value:  # the node computed another root: record what it said
                    return history.complete(inv, "ok", got, expected=value)
                return history.complete(inv, "ok")
            if f == "remove":
                c.remove(merge, value)
                return history.complete(inv, "ok")
            if f == "read":
                st = c.status(merge)
                live = [x["root"] if isinstance(x, dict) else x for x in st["contributions"]]
                return history.complete(
                    inv, "ok", live, digest=st.get("digest"), merged=st.get("merged_hash")
                )
            raise ValueError(f"unknown op {f!r}")
    except (CrdtMergeError, httpx.HTTPError, OSError) as exc:
        typ = "fail" if f == "read" else classify(exc)
        return history.complete(inv, typ, error=f"{type(exc).__name__}: {str(exc)[:120]}")


@dataclass
class Workload:
    """``workers`` threads issuing random operations until ``deadline`` or ``max_ops`` each."""

    history: History
    urls: list[str]
    seed: int
    workers: int = 3
    max_ops: int = 400
    pause_s: tuple[float, float] = (0.03, 0.12)
    weights: dict[str, float] = field(
        default_factory=lambda: {"add": 0.5, "readd": 0.05, "remove": 0.17, "read": 0.28}
    )
    elements: Elements = field(init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        self.elements = Elements(first_seed=10_000 + self.seed * 100_000)

    def start(self, deadline: float) -> None:
        for k in range(self.workers):
            t = threading.Thread(
                target=self._run, args=(k, deadline), name=f"jepsen-w{k}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"workers still running after {timeout:.0f} s: {alive}")

    def _run(self, k: int, deadline: float) -> None:
        rng = random.Random(f"{self.seed}-w{k}")
        names, weights = zip(*self.weights.items(), strict=True)
        for _ in range(self.max_ops):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            node = rng.randrange(len(self.urls))
            kind = rng.choices(names, weights)[0]
            self.step(f"w{k}", node, kind, rng)
            self._stop.wait(rng.uniform(*self.pause_s))  # pacing, not synchronisation

    def step(self, process: str, node: int, kind: str, rng: random.Random) -> Op | None:
        url = self.urls[node]
        if kind == "add":
            root, data = self.elements.new()
            done = run_op(self.history, process, url, node, "add", root, data=data)
        elif kind == "readd":
            root = self.elements.pick(rng)
            if root is None:
                return None
            data = self.elements.by_root[root]
            done = run_op(self.history, process, url, node, "add", root, data=data)
        elif kind == "remove":
            root = self.elements.pick(rng)
            if root is None:
                return None
            return run_op(self.history, process, url, node, "remove", root)
        else:
            return run_op(self.history, process, url, node, "read")
        if done.type == "ok":
            self.elements.acked(done.value, node)
        return done


def final_reads(history: History, urls: list[str], merge: str = MERGE) -> list[Op]:
    """One final read per node (recorded with ``final=True``)."""
    out = []
    for i, url in enumerate(urls):
        inv = history.invoke("final", "read", None, node=i, final=True)
        try:
            with Client(url, token=TOKEN, timeout=10) as c:
                st = c.status(merge)
        except CrdtMergeError as exc:
            out.append(history.complete(inv, "fail", error=str(exc)[:200]))
            continue
        live = [x["root"] if isinstance(x, dict) else x for x in st["contributions"]]
        out.append(
            history.complete(inv, "ok", live, digest=st.get("digest"), merged=st.get("merged_hash"))
        )
    return out
