"""The nemesis of a Jepsen-lite run: faults on real node processes and the proxy between them.

Faults (each recorded in the history as a ``nemesis`` operation, invoke then ok/info):

- **partition**: cut every proxy link between groups (``refuse`` fails fast, ``blackhole``
  times out); links inside a group keep the background noise;
- **kill**: ``kill -9`` a node at a random moment (mid-request, mid-merge, mid-gossip), keep it
  down a little, restart it from its data directory;
- **transfer-kill**: push a multi-chunk contribution (8 chunks of 4 MiB) to one node, slow the
  receiver's links so the fetch takes seconds, ``kill -9`` the receiver once its partial object
  has some but not all chunks, restart it, and count the chunk bytes delivered to it beyond the
  object's size (what the resume re-fetched);
- **corrupt**: for a few seconds, half of the chunk answers to one node are bit-flipped and
  a fifth truncated;
- **pause**: ``SIGSTOP`` a node, ``SIGCONT`` it a few seconds later;
- **skew**: ``kill -9`` and restart a node under libfaketime with its clock moved by up to
  ±4 minutes (inside the cluster-auth window of ±300 s; nothing in the design reads wall time
  otherwise); skipped, and reported, when libfaketime is not installed;
- **noise** (background, all run long): per link, random delay, dropped requests and
  answers, replayed (duplicated) requests, bit-flipped and truncated answers.

Phases run one after another (fault, hold, repair, short quiet gap) in an order drawn from the
seed; :meth:`Nemesis.repair_all` heals everything at the end. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from crdtmerge.store import ObjectStore
from node.demo import wait_ready
from tests.process.cluster import Cluster, wait_until

from .history import History
from .workload import Elements, run_op

__all__ = ["FAKETIME_LIB", "Nemesis", "NoiseRates", "find_faketime"]

_FAKETIME_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)


def find_faketime() -> str | None:
    """The libfaketime shared object, if installed (Debian package ``faketime``)."""
    env = os.environ.get("CRDTMERGE_FAKETIME_LIB")
    for path in (env, *_FAKETIME_CANDIDATES):
        if path and Path(path).is_file():
            return path
    return None


FAKETIME_LIB = find_faketime()
BULK = "bulk"
CHUNK = 4 << 20


@dataclass(frozen=True)
class NoiseRates:
    drop: float = 0.03  # of requests and of answers, each
    duplicate: float = 0.05
    bitflip: float = 0.03
    truncate: float = 0.02
    max_delay_s: float = 0.1

    def describe(self) -> str:
        return (
            f"{self.drop:.0%} requests + {self.drop:.0%} answers dropped, "
            f"{self.duplicate:.0%} duplicated, {self.bitflip:.0%} bit-flipped, "
            f"{self.truncate:.0%} truncated, 0-{self.max_delay_s * 1000:.0f} ms delay"
        )


@dataclass
class Counts:
    partitions: int = 0
    kills: int = 0
    restarts: int = 0
    pauses: int = 0
    skews: list[float] = field(default_factory=list)
    skew_skipped: str | None = None
    transfer_kills: int = 0
    transfer_missed: int = 0
    add_wins_pairs: int = 0
    corrupt_phases: int = 0
    refetched_bytes: int = 0
    object_bytes: int = 0
    resumed_chunks: int = 0
    bad_chunks: int = 0  # sampled from nodes before they are killed, plus at the end


class Nemesis:
    def __init__(
        self,
        cluster: Cluster,
        history: History,
        elements: Elements,
        *,
        seed: int,
        noise: NoiseRates,
        grace_s: float,
        faketime: str | None = FAKETIME_LIB,
    ) -> None:
        self.c = cluster
        self.h = history
        self.elements = elements
        self.rng = random.Random(f"{seed}-nemesis")
        self.noise = noise
        self.grace_s = grace_s
        self.faketime = faketime
        self.counts = Counts()
        self.paused: set[int] = set()
        self.down: set[int] = set()
        self.groups: list[list[int]] | None = None
        self.bulk_root: str | None = None
        self.bulk_receiver: int | None = None
        self._bad_chunks_seen: dict[int, int] = {}
        self.log: list[str] = []

    # -- recording --------------------------------------------------------------------------

    def _do(self, f: str, value: Any, action) -> Any:
        inv = self.h.invoke("nemesis", f, value)
        try:
            out = action()
        except Exception as exc:
            self.h.complete(inv, "info", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            raise
        self.h.complete(inv, "ok")
        self.log.append(f"{self.h.now() / 1e9:7.2f}s {f} {value}")
        return out

    # -- proxy ------------------------------------------------------------------------------

    def bulk_complete(self) -> bool:
        """The transfer-kill receiver holds the bulk object (or there is none)."""
        if self.bulk_root is None or self.bulk_receiver is None:
            return True
        store = ObjectStore(self.c.nodes[self.bulk_receiver].data_dir / "objects")
        return store.has(bytes.fromhex(self.bulk_root))

    def _link_faults(self, name: str) -> dict[str, Any]:
        a, b = (int(x) for x in name.split("->"))
        if self.groups is not None:
            side = {n: g for g, members in enumerate(self.groups) for n in members}
            if side.get(a) != side.get(b):
                return {"mode": self._partition_mode}
        if a == self.bulk_receiver and not self.bulk_complete():
            return {}  # keep the resumed fetch clean, so its byte count is the resume's alone
        n = self.noise
        return {
            "delay_s": self.rng.uniform(0, n.max_delay_s),
            "drop_request": n.drop,
            "drop_response": n.drop,
            "duplicate": n.duplicate,
            "bitflip": n.bitflip,
            "truncate": n.truncate,
        }

    def apply_links(self) -> None:
        for name in self.c.proxy.links():
            self.c.proxy.set(name, **self._link_faults(name))

    def start_noise(self) -> None:
        self._partition_mode = "refuse"
        self._do("noise", self.noise.describe(), self.apply_links)

    def partition(self, groups: list[list[int]], mode: str) -> None:
        def act() -> None:
            self.groups = groups
            self._partition_mode = mode
            self.apply_links()

        self._do("partition", groups, act)
        self.counts.partitions += 1

    def heal(self, *, noise: bool = True) -> None:
        def act() -> None:
            self.groups = None
            if noise:
                self.apply_links()
            else:
                self.c.proxy.set_all()

        self._do("heal", "noise" if noise else "clean", act)

    # -- processes --------------------------------------------------------------------------

    def _sample_bad_chunks(self, i: int) -> None:
        try:
            bad = int(self.c.info(i)["transfer"]["bad_chunks"])
        except Exception:
            return  # the node may be unreachable; its count since the last start is lost
        self._bad_chunks_seen[i] = bad

    def kill(self, i: int, *, sample: bool = True) -> None:
        if sample:  # the node's counters die with it: keep what it rejected so far
            self._sample_bad_chunks(i)
        self.counts.bad_chunks += self._bad_chunks_seen.pop(i, 0)
        self._do("kill", i, lambda: self.c.kill(i))
        self.down.add(i)
        self.counts.kills += 1

    def start(self, i: int, *, skew_s: float | None = None, wait: bool = False) -> None:
        """Restart node ``i`` from its data directory; by default without waiting until it is
        ready (the run goes on while it boots; :meth:`repair_all` waits for every node)."""
        env = self.c.nodes[i].env
        for k in ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_RESET"):
            env.pop(k, None)
        if skew_s is not None:
            assert self.faketime is not None
            env["LD_PRELOAD"] = self.faketime
            env["FAKETIME"] = f"{skew_s:+.0f}s"
        value = {"node": i, "skew_s": skew_s} if skew_s is not None else i
        action = (lambda: self.c.start(i, timeout=120)) if wait else self.c.nodes[i].start
        self._do("start", value, action)
        self.down.discard(i)
        self.counts.restarts += 1

    def pause(self, i: int) -> None:
        proc = self.c.nodes[i].proc
        assert proc is not None
        self._do("pause", i, lambda: os.kill(proc.pid, signal.SIGSTOP))
        self.paused.add(i)
        self.counts.pauses += 1

    def resume(self, i: int) -> None:
        proc = self.c.nodes[i].proc
        if proc is not None and proc.poll() is None:
            self._do("resume", i, lambda: os.kill(proc.pid, signal.SIGCONT))
        self.paused.discard(i)

    def repair_all(self, timeout: float = 120) -> None:
        """SIGCONT paused nodes, heal the network (no noise), restart dead nodes, and wait
        (bounded) until every node is ready."""
        for i in sorted(self.paused):
            self.resume(i)
        self.heal(noise=False)
        for i in range(self.c.n):
            proc = self.c.nodes[i].proc
            if proc is None or proc.poll() is not None:
                self.start(i)
        wait_ready(self.c.urls, self.c.nodes, timeout=timeout)

    def final_bad_chunks(self) -> int:
        total = self.counts.bad_chunks
        for i in range(self.c.n):
            self._sample_bad_chunks(i)
            total += self._bad_chunks_seen.get(i, 0)
        return total

    # -- phases -----------------------------------------------------------------------------

    def _hold(self, lo: float, hi: float, deadline: float) -> None:
        """Keep the fault in force for a while (pacing the nemesis; bounded by the deadline)."""
        time.sleep(max(0.0, min(self.rng.uniform(lo, hi), deadline - time.monotonic())))

    def phase_partition(self, deadline: float) -> None:
        n = self.c.n
        nodes = list(range(n))
        self.rng.shuffle(nodes)
        cut = self.rng.randint(1, (n - 1) // 2) if n > 3 else 1
        groups = [sorted(nodes[:cut]), sorted(nodes[cut:])]
        mode = self.rng.choice(["refuse", "blackhole"])
        a_side, b_side = groups
        a, b = self.rng.choice(a_side), self.rng.choice(b_side)
        urls = self.c.urls
        # an element live on b just before the cut, for an add-wins pair
        with contextlib.suppress(RuntimeError, TimeoutError):  # b may be rebooting
            wait_ready([urls[b]], timeout=30)
        seen = run_op(self.h, "aw-b", urls[b], b, "read")
        candidates = sorted(seen.value) if seen.type == "ok" and seen.value else []
        self.partition(groups, mode)
        t_part = time.monotonic()
        if candidates:
            # wait out the grace period (requests in flight when the cut happened), then:
            # b removes it; a removes and re-adds it (a new dot b cannot see): add-wins says
            # the element stays
            time.sleep(max(0.0, t_part + self.grace_s + 0.3 - time.monotonic()))
            root = self.rng.choice(candidates)
            with contextlib.suppress(RuntimeError, TimeoutError):  # a may be rebooting
                wait_ready([urls[a]], timeout=30)
            run_op(self.h, "aw-b", urls[b], b, "remove", root)
            run_op(self.h, "aw-a", urls[a], a, "remove", root)
            data = self.elements.by_root[root]
            done = run_op(self.h, "aw-a", urls[a], a, "add", root, data=data)
            if done.type == "ok":
                self.elements.acked(done.value, a)
            self.counts.add_wins_pairs += 1
        self._hold(2.0, 4.0, deadline)
        self.heal()

    def phase_kill(self, deadline: float) -> None:
        i = self.rng.randrange(self.c.n)
        self.kill(i)
        self._hold(0.5, 2.5, deadline)
        self.start(i)

    def phase_corrupt(self, deadline: float) -> None:
        """Heavy corruption of object transfers on every link into one node: half the chunk
        answers bit-flipped, a fifth truncated (the answers' MAC and the chunk leaves must
        catch every one; the chunks are fetched again, from another peer if possible)."""
        i = self.rng.randrange(self.c.n)
        links = [f"{i}->{j}" for j in range(self.c.n) if j != i]
        if i == self.bulk_receiver and not self.bulk_complete():
            links = []  # keep the measured resume clean
        for name in links:
            self.c.proxy.set(name, bitflip=0.5, truncate=0.2, match="/chunks")
        self._do("corrupt", {"node": i, "bitflip": 0.5, "truncate": 0.2}, lambda: None)
        self.counts.corrupt_phases += 1
        self._hold(3.0, 5.0, deadline)
        self._do("uncorrupt", i, self.apply_links)

    def phase_pause(self, deadline: float) -> None:
        i = self.rng.randrange(self.c.n)
        self.pause(i)
        self._hold(2.0, 4.0, deadline)
        self.resume(i)

    def phase_skew(self, deadline: float) -> None:
        if self.faketime is None:
            self.counts.skew_skipped = (
                "libfaketime not found (apt-get install -y faketime): clock-skew restarts skipped"
            )
            return
        i = self.rng.randrange(self.c.n)
        skew = self.rng.choice([-1, 1]) * self.rng.uniform(30, 240)
        self.kill(i)
        self.start(i, skew_s=skew)
        self.counts.skews.append(round(skew))
        self._hold(1.0, 2.0, deadline)

    def phase_transfer_kill(self, timeout: float = 60) -> None:
        """kill -9 a node in the middle of fetching an 8-chunk object; measure the resume."""
        n = self.c.n
        s = self.rng.randrange(n)
        r = self.rng.choice([i for i in range(n) if i != s])
        # one tensor of 8 x 4 MiB (deterministic bytes)
        values = np.arange(8 * CHUNK // 4, dtype=np.float32) * np.float32(1e-6)
        data = save({"w": values})
        self.counts.object_bytes = values.nbytes
        # slow only the receiver's requests, no corruption on its links for a clean count
        for j in range(n):
            if j != r:
                self.c.proxy.set(f"{r}->{j}", delay_s=1.5)
        root = self._do("push-bulk", {"node": s}, lambda: self.c.push(s, BULK, data))
        self.bulk_root = root
        self.bulk_receiver = r
        store = ObjectStore(self.c.nodes[r].data_dir / "objects")
        have = store.partial_dir / f"{root}.have"

        def mid_transfer() -> str | None:
            if store.has(bytes.fromhex(root)):
                return "complete"
            try:
                bits = have.read_bytes()
            except OSError:
                return None
            return "mid" if bits and 0 < sum(bits) < len(bits) else None

        state = wait_until(mid_transfer, timeout=timeout, interval=0.02, what="transfer started")
        if state == "mid":
            self.kill(r, sample=False)  # at once: the transfer is still running
            self.counts.transfer_kills += 1
        else:
            self.counts.transfer_missed += 1
        for j in range(n):
            if j != r:
                self.c.proxy.set(f"{r}->{j}")
        if state == "mid":
            self.start(r)
        self.log.append(f"transfer-kill: n{r} fetching {root[:12]} from n{s}: {state}")

    def finish_transfer(self) -> None:
        """After the run: what the transfer-kill receiver was sent for the bulk object."""
        r, root = self.bulk_receiver, self.bulk_root
        if r is None or root is None:
            return
        with contextlib.suppress(Exception):
            self.counts.resumed_chunks = int(self.c.info(r)["transfer"]["resumed_chunks"])
        path = f"/v1/replication/objects/{root}/chunks"
        delivered = sum(
            self.c.proxy.stats(name).bytes_by_path.get(path, 0)
            for name in self.c.proxy.links()
            if name.startswith(f"{r}->")
        )
        self.counts.refetched_bytes = max(0, delivered - self.counts.object_bytes)
        self.log.append(
            f"transfer: n{r} was sent {delivered} B of chunks for a {self.counts.object_bytes} B "
            f"object; {self.counts.resumed_chunks} chunks were kept across the kill"
        )

    def run(self, deadline: float) -> None:
        """The transfer-kill, then every other fault once (in a seeded order, even past
        ``deadline`` on a slow machine), then a seeded mix until ``deadline``."""
        self.start_noise()
        self.phase_transfer_kill()
        self.apply_links()
        phases = [
            self.phase_partition,
            self.phase_kill,
            self.phase_pause,
            self.phase_skew,
            self.phase_corrupt,
        ]
        order = phases[:]
        self.rng.shuffle(order)
        for phase in order:
            phase(max(deadline, time.monotonic() + 6))
            time.sleep(self.rng.uniform(0.5, 1.5))  # quiet gap between faults (pacing)
        while time.monotonic() < deadline - 3:
            self.rng.choice(phases)(deadline)
            time.sleep(min(max(0.0, deadline - time.monotonic()), self.rng.uniform(0.5, 1.5)))
