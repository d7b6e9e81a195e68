"""Benchmark: replication convergence, idle traffic, object transfer, and the demo.

Run: ``.venv/bin/python bench/replication_bench.py [--only convergence,idle,transfer,demo]``
(prints Markdown for the "Replication" section of docs/benchmarks.md).

* **convergence** (in-process, ``tests/replication_sim.py``): N full node apps over httpx ASGI
  transports; 5 contributions pushed to random nodes with the eager change notices dropped
  (anti-entropy alone), then gossip rounds until every node has the same digest (metadata) and
  every object (transfer). Several seeds per N; at the default 1 s interval a round is 1 s.
* **idle**: 3 real node processes (gossip every 1 s, the default), each link through the
  counting proxy of ``tests/process/faultproxy.py``, one merge with 3 contributions; after
  convergence, the bytes on the wire (HTTP requests and answers, headers included) over 20 s.
* **transfer**: 2 real nodes on loopback; five different 256 MiB contributions pushed to A in
  turn, each timed from the push acknowledgement until B's store holds it (change notice,
  manifest, chunks, verification, fsyncs), vs copying the same file with ``shutil.copyfile`` +
  ``fsync`` (same durability) and without, measured right after each fetch; best and median.
* **demo**: ``python -m node.demo`` (3 nodes, 0.2 s interval); its convergence time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from crdtmerge.store import ObjectStore  # noqa: E402
from node.demo import NodeProcess, free_ports, node_env, wait_ready  # noqa: E402
from tests.process.cluster import TOKEN, Cluster, wait_until  # noqa: E402
from tests.replication_sim import converge_from_random_pushes, log2_bound, model_bytes  # noqa: E402

TRIALS = {3: 30, 10: 12, 30: 6, 100: 3}


def convergence() -> None:
    print("### Convergence vs N (in-process, anti-entropy only)\n")
    print(
        "| N | trials | metadata rounds mean | p99 (max) | goal ⌈log2 N⌉+3 | object rounds max "
        "| wall s / trial |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, trials in TRIALS.items():
        meta, objs, walls = [], [], []
        for seed in range(trials):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.monotonic()
                r = asyncio.run(converge_from_random_pushes(Path(d), n, seed=seed))
                walls.append(time.monotonic() - t0)
            meta.append(r["metadata_rounds"])
            objs.append(r["object_rounds"])
        ok = all(m is not None and m <= log2_bound(n) for m in meta)
        print(
            f"| {n} | {trials} | {statistics.mean(meta):.1f} | {max(meta)} | {log2_bound(n)} "
            f"{'✓' if ok else '✗'} | {max(objs)} | {statistics.mean(walls):.1f} |",
            flush=True,
        )
    print()


def idle(seconds: float = 20.0) -> None:
    with tempfile.TemporaryDirectory() as d:
        cluster = Cluster(Path(d), 3, gossip_interval_s=1.0)
        try:
            cluster.start()
            cluster.set_recipe(0, "idle", {"strategy": "linear", "version": 1, "params": {}})
            roots = {cluster.push(i, "idle", model_bytes(900 + i)) for i in range(3)}
            cluster.wait_converged("idle", live=roots, timeout=60)
            # let hellos and fetches finish, then count a quiet window
            time.sleep(3)  # settle before the measured window (not a synchronisation)
            cluster.proxy.reset_stats()
            t0 = time.monotonic()
            time.sleep(seconds)  # the measured idle window
            elapsed = time.monotonic() - t0
            total = requests = 0
            for name in cluster.proxy.links():
                st = cluster.proxy.stats(name)
                total += st.bytes_up + st.bytes_down
                requests += st.requests
        finally:
            cluster.close()
    per_node = total / 3 / elapsed
    print("### Idle replication traffic\n")
    print(
        "| nodes | interval | window | requests | bytes on the wire | per node per second | goal |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| 3 | 1 s | {elapsed:.0f} s | {requests} | {total:,} | {per_node:,.0f} B/s "
        f"| ≤ 1,024 B/s {'✓' if per_node <= 1024 else '✗'} |\n"
    )


def _big_model(path: Path, nbytes: int, seed: int = 1) -> None:
    n = nbytes // 4
    rng = np.random.Generator(np.random.PCG64(seed))
    tensors = {f"w{i}": rng.standard_normal(n // 4, dtype=np.float32) for i in range(4)}
    save_file(tensors, str(path))


def transfer(size_mib: int = 256, trials: int = 5) -> None:
    """``trials`` different objects pushed to A one after the other; after each, the copy and
    the plain GET of the same bytes, so every kind of measurement sees the same moments of the
    (shared, noisy) disk. The best of each kind is compared, and the medians."""
    fetch_s, get_s, sync_s, plain_s = [], [], [], []
    with tempfile.TemporaryDirectory(
        dir=ROOT / ".demo" if (ROOT / ".demo").exists() else None
    ) as d:
        work = Path(d)
        ports = free_ports(2)
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        secret = "bench-transfer-secret-0123456789"
        nodes = []
        for i in range(2):
            data = work / f"n{i}"
            data.mkdir()
            env = node_env(
                data_dir=data,
                port=ports[i],
                peers=[urls[1 - i]],
                secret=secret,
                token=TOKEN,
                replica_id=f"n{i}",
                gossip_interval_s=1.0,
                extra={"CRDTMERGE_LOG_LEVEL": "WARNING"},
            )
            nodes.append(NodeProcess(f"n{i}", urls[i], data, env, work / f"n{i}.log"))
        try:
            for n in nodes:
                n.start()
            wait_ready(urls, nodes)
            from crdtmerge.client import Client

            store_a = ObjectStore(nodes[0].data_dir / "objects")  # read only
            store_b = ObjectStore(nodes[1].data_dir / "objects")
            for trial in range(trials):
                src = work / "big.safetensors"
                _big_model(src, size_mib << 20, seed=trial + 1)
                with Client(urls[0], token=TOKEN, timeout=300) as c:
                    root = c.push("bench", src).root
                t0 = time.monotonic()
                wait_until(
                    lambda r=bytes.fromhex(root): store_b.has(r),
                    timeout=600,
                    interval=0.005,
                    what="object on B",
                )
                fetch_s.append(time.monotonic() - t0)
                stored = store_a.path(bytes.fromhex(root))
                size = stored.stat().st_size
                # reference: the same bytes as one plain streamed HTTP download from A
                t1 = time.monotonic()
                with (
                    httpx.Client(timeout=300) as h,
                    h.stream("GET", f"{urls[0]}/v1/objects/{root}") as r,
                ):
                    got = sum(len(b) for b in r.iter_bytes(1 << 20))
                get_s.append(time.monotonic() - t1)
                if got != size:
                    raise RuntimeError(f"plain GET returned {got} bytes, expected {size}")
                sync_s.append(_copy(stored, work / "copy1", fsync=True))
                plain_s.append(_copy(stored, work / "copy2", fsync=False))
        finally:
            for n in nodes:
                n.stop()
    mb = size / 1e6
    print("### Object transfer between two nodes on loopback\n")
    print(
        f"{trials} objects of {size:,} bytes; seconds per trial in order, then best and median.\n"
    )
    print(
        "| what | seconds per trial | best MB/s | vs copy+fsync (best) | median MB/s | vs copy+fsync (median) |"
    )
    print("|---|---|---|---|---|---|")
    ref_best, ref_med = mb / min(sync_s), mb / statistics.median(sync_s)
    rows = [
        ("replication fetch (A → B, verified, fsynced)", fetch_s),
        ("plain HTTP GET of the object from A (uvicorn → httpx, not stored)", get_s),
        ("`shutil.copyfile` + `fsync`", sync_s),
        ("`shutil.copyfile` (page cache only)", plain_s),
    ]
    for i, (what, times) in enumerate(rows):
        best, med = mb / min(times), mb / statistics.median(times)
        goal = (" ✓" if best >= 0.5 * ref_best else " ✗") + " (goal ≥ 50%)" if i == 0 else ""
        print(
            f"| {what} | {' '.join(f'{t:.2f}' for t in times)} | {best:,.0f} | "
            f"{best / ref_best:.0%}{goal} | {med:,.0f} | {med / ref_med:.0%} |"
        )
    print()


def _copy(src: Path, dst: Path, *, fsync: bool) -> float:
    t0 = time.monotonic()
    shutil.copyfile(src, dst)
    if fsync:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.monotonic() - t0
    dst.unlink()
    return seconds


def demo() -> None:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "node.demo"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    wall = time.monotonic() - t0
    m = re.search(r"after ([0-9.]+) s", out.stdout)
    print("### `make demo`\n")
    print("```")
    print("\n".join(line for line in out.stdout.splitlines() if not line.startswith("logs")))
    print("```")
    conv = m.group(1) if m else "n/a"
    print(
        f"\nConverged {conv} s after the last push acknowledgement; whole demo {wall:.1f} s "
        "(start 3 processes, generate and push models, converge, stop).\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="convergence,idle,transfer,demo")
    args = parser.parse_args()
    parts = args.only.split(",")
    print(
        f"<!-- bench/replication_bench.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} -->\n"
    )
    if "convergence" in parts:
        convergence()
    if "idle" in parts:
        idle()
    if "transfer" in parts:
        transfer()
    if "demo" in parts:
        demo()


if __name__ == "__main__":
    main()
