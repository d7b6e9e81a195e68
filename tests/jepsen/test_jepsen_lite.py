"""Jepsen-lite: real node processes, a workload, a nemesis, a recorded history and a checker.

``test_jepsen_lite_3_nodes`` (CI, ``slow``): 3 nodes behind the fault proxy, ~35 s of workload
(adds, re-adds, removes, reads on random nodes) while the nemesis partitions, kills (also in
the middle of an object transfer), pauses and restarts nodes with a skewed clock, over
background drop/duplicate/delay/bit-flip noise; then heal, wait (bounded) for convergence and
check the history (:mod:`tests.jepsen.checker`), equal digests and merged hashes, and that
every object re-hashes to its root on every node.

``test_jepsen_full_5_nodes``: the same with 5 nodes for longer; only with
``CRDTMERGE_JEPSEN_FULL=1``.

Seeds: the workload, the nemesis schedule and the proxy's randomness derive from one seed
(timing still varies). By default the run replays ``DEFAULT_SEED`` (the schedule that found
the re-push add-wins bug); ``CRDTMERGE_JEPSEN_SEED=n`` picks another and
``CRDTMERGE_JEPSEN_SEED=random`` draws one. The seed is printed, and shown on failure. ``CRDTMERGE_JEPSEN_REPORT=path`` writes the run's report
as JSON; the history is in the test's temporary directory (``history.jsonl``).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.process.cluster import Cluster

from .checker import check, op_counts, summary
from .history import History
from .nemesis import BULK, CHUNK, Nemesis, NoiseRates
from .workload import LINEAR, MERGE, Workload, final_reads

pytestmark = pytest.mark.slow

#: seconds after a partition is installed before the checker treats it as in force
GRACE_S = 3.0


#: the seed of the default run: CI replays one schedule that is known to pass, so a red run
#: means a regression, not a newly drawn schedule; `CRDTMERGE_JEPSEN_SEED=random` explores.
DEFAULT_SEED = 1412824649


def _seed() -> int:
    raw = os.environ.get("CRDTMERGE_JEPSEN_SEED", "")
    if raw == "random":
        return random.SystemRandom().randrange(1 << 31)
    return int(raw) if raw else DEFAULT_SEED


def _converged(
    cluster: Cluster, merges: list[str], *, merged: bool = True
) -> dict[str, Any] | None:
    """The agreed (digest, merged, live) per merge if every node agrees (and, with ``merged``,
    holds every object and has computed the merged model)."""
    out = {}
    for merge in merges:
        seen = set()
        for i in range(cluster.n):
            try:
                with cluster.client(i, timeout=5) as c:
                    st = c.status(merge)
            except Exception:
                return None
            if merged and (st.get("missing") or not st.get("merged_hash")):
                return None
            live = tuple(
                sorted(x["root"] if isinstance(x, dict) else x for x in st["contributions"])
            )
            seen.add((st["digest"], st["merged_hash"] if merged else None, live))
        if len(seen) != 1:
            return None
        digest, merged_hash, live = seen.pop()
        out[merge] = {"digest": digest, "merged": merged_hash, "live": len(live)}
    return out


def _proxy_totals(cluster: Cluster) -> dict[str, int]:
    keys = (
        "requests",
        "dropped_requests",
        "dropped_responses",
        "duplicated",
        "flipped",
        "truncated",
        "refused",
        "blackholed",
    )
    totals = dict.fromkeys(keys, 0)
    for name in cluster.proxy.links():
        st = cluster.proxy.stats(name)
        for k in keys:
            totals[k] += getattr(st, k)
    return totals


def run_jepsen(
    workdir: Path,
    *,
    n: int,
    seed: int,
    duration_s: float,
    workers: int,
    max_ops: int,
    noise: NoiseRates,
    converge_timeout_s: float,
) -> dict[str, Any]:
    """One run; returns the report (``report["check"]["valid"]`` is the verdict)."""
    t_start = time.monotonic()
    # one 4 MiB chunk per request and a commit after each: the transfer-kill must be able to
    # see a partial object (with the defaults an 8-chunk object is one batch, one commit)
    small = str(CHUNK)
    cluster = Cluster(
        workdir,
        n,
        gossip_interval_s=0.15,
        seed=seed,
        extra_env={"CRDTMERGE_FETCH_BATCH_BYTES": small, "CRDTMERGE_FETCH_COMMIT_BYTES": small},
    )
    history = History()
    report: dict[str, Any] = {"seed": seed, "nodes": n, "history": str(workdir / "history.jsonl")}
    try:
        cluster.start(timeout=120)
        report["startup_s"] = round(time.monotonic() - t_start, 1)
        cluster.set_recipe(0, MERGE, LINEAR)
        cluster.set_recipe(0, BULK, LINEAR)
        workload = Workload(history, cluster.urls, seed, workers=workers, max_ops=max_ops)
        nemesis = Nemesis(
            cluster, history, workload.elements, seed=seed, noise=noise, grace_s=GRACE_S
        )
        t0 = time.monotonic()
        deadline = t0 + duration_s
        workload.start(deadline + 300)  # a bound only: stopped when the nemesis is done
        try:
            nemesis.run(deadline)
        finally:
            workload.stop()
            workload.join(60)
            report["faults"] = _proxy_totals(cluster)
            nemesis.repair_all()
        t_heal = time.monotonic()
        report["workload_s"] = round(t_heal - t0, 1)
        agreed = None
        deadline = t_heal + converge_timeout_s
        while agreed is None and time.monotonic() < deadline:
            if "digests_agree_after_heal_s" not in report and _converged(
                cluster, [MERGE, BULK], merged=False
            ):
                report["digests_agree_after_heal_s"] = round(time.monotonic() - t_heal, 2)
            agreed = _converged(cluster, [MERGE, BULK])
            if agreed is None:
                time.sleep(0.1)  # poll interval, bounded by the deadline
        report.setdefault("digests_agree_after_heal_s", None)
        nemesis.finish_transfer()
        report["converged_after_heal_s"] = (
            round(time.monotonic() - t_heal, 2) if agreed is not None else None
        )
        report["agreed"] = agreed
        finals = final_reads(history, cluster.urls)
        history.dump(workdir / "history.jsonl")
        result = check(history, grace_s=GRACE_S)
        report["check"] = result
        report["ops"] = dict(op_counts(history))
        report["merged_equal"] = sum(
            1
            for f in finals
            if f.type == "ok" and f.extra.get("merged") == finals[0].extra.get("merged")
        )
        live = {r for f in finals if f.type == "ok" for r in f.value}
        if nemesis.bulk_root:
            live.add(nemesis.bulk_root)
        try:
            cluster.check_objects(live)
            report["objects_verified"] = len(live) * n
        except AssertionError as exc:
            report["objects_verified"] = 0
            result["valid"] = False
            result["problems"].append(f"object check: {exc}")
        nc = nemesis.counts
        report["nemesis"] = {
            "partitions": nc.partitions,
            "kills": nc.kills,
            "restarts": nc.restarts,
            "pauses": nc.pauses,
            "skews_s": nc.skews,
            "skew_skipped": nc.skew_skipped,
            "transfer_kills": nc.transfer_kills,
            "transfer_missed": nc.transfer_missed,
            "add_wins_pairs": nc.add_wins_pairs,
            "corrupt_phases": nc.corrupt_phases,
            "noise": noise.describe(),
        }
        report["bad_chunks_rejected"] = nemesis.final_bad_chunks()
        report["transfer"] = {
            "object_bytes": nc.object_bytes,
            "refetched_bytes": nc.refetched_bytes,
            "resumed_chunks": nc.resumed_chunks,
        }
        report["nemesis_log"] = nemesis.log
        report["total_s"] = round(time.monotonic() - t_start, 1)
        if agreed is None:
            result["valid"] = False
            result["problems"].append(f"not converged {converge_timeout_s:.0f} s after the heal")
        return report
    except BaseException:
        history.dump(workdir / "history.jsonl")
        print(f"\nJepsen-lite seed {seed} crashed; logs:\n{cluster.logs()}")
        raise
    finally:
        cluster.close()


def line(report: dict[str, Any]) -> str:
    """The run in one sentence (the shape used in docs/reliability.md)."""
    r, c, nm = report, report["check"], report["nemesis"]
    ops = r["ops"]
    lat = c.get("stable_latency_s") or {}
    return (
        f"{r['nodes']} nodes, {r['workload_s']} s, {ops.get('add:ok', 0)} adds + "
        f"{ops.get('remove:ok', 0)} removes acknowledged ({c['attempts']['add']} + "
        f"{c['attempts']['remove']} attempted, {c['info']} unknown), {nm['partitions']} partitions, "
        f"{nm['kills']} kill -9/{nm['restarts']} restarts ({nm['transfer_kills']} mid-transfer), "
        f"{nm['pauses']} pauses, clock skews {nm['skews_s'] or 'skipped'}, {nm['noise']}: "
        f"{c['lost_count']} lost, {c['unexpected_count']} unexpected, "
        f"{c['resurrected_count']} resurrected, {c['duplicates_count']} duplicates, add-wins "
        f"{c['add_wins']['checked'] - c['add_wins']['violated']}/{c['add_wins']['checked']}; "
        f"digests equal {r['digests_agree_after_heal_s']} s and merged hashes "
        f"{r['converged_after_heal_s']} s after the final heal; merged hash equal on "
        f"{r['merged_equal']}/{r['nodes']}; {r['bad_chunks_rejected']} bad chunks rejected; "
        f"resume re-fetched {r['transfer']['refetched_bytes']} B of "
        f"{r['transfer']['object_bytes']} B; stable latency p50/p99/max {lat.get('50')}/"
        f"{lat.get('99')}/{lat.get('100')} s"
    )


def _run_and_check(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    seed = _seed()
    print(f"\nJepsen-lite seed {seed} (replay with CRDTMERGE_JEPSEN_SEED={seed})")
    report = run_jepsen(tmp_path, seed=seed, **kw)
    out = os.environ.get("CRDTMERGE_JEPSEN_REPORT")
    if out:
        Path(out).write_text(json.dumps(report, indent=2, sort_keys=True))
    print(line(report))
    if report["nemesis"]["skew_skipped"]:
        print(report["nemesis"]["skew_skipped"])
    assert report["check"]["valid"], (
        f"seed {seed} (CRDTMERGE_JEPSEN_SEED={seed}): {summary(report['check'])}; "
        f"history {report['history']}; nemesis: {report['nemesis_log']}"
    )
    assert report["merged_equal"] == report["nodes"]
    return report


@pytest.mark.timeout(600)
def test_jepsen_lite_3_nodes(tmp_path):
    report = _run_and_check(
        tmp_path,
        n=3,
        duration_s=30,
        workers=3,
        max_ops=250,
        noise=NoiseRates(),
        converge_timeout_s=90,
    )
    nm = report["nemesis"]
    assert nm["partitions"] >= 1 and nm["kills"] >= 2 and nm["pauses"] >= 1
    # the receiver was killed while it held a partial object (a missed kill tests no resume)
    assert nm["transfer_kills"] == 1, report["nemesis_log"]
    assert report["check"]["ok"]["add"] >= 10


@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    os.environ.get("CRDTMERGE_JEPSEN_FULL") != "1",
    reason="the 5-node Jepsen-lite run is opt-in: set CRDTMERGE_JEPSEN_FULL=1",
)
def test_jepsen_full_5_nodes(tmp_path):
    duration = float(os.environ.get("CRDTMERGE_JEPSEN_SECONDS", "150"))
    _run_and_check(
        tmp_path,
        n=5,
        duration_s=duration,
        workers=4,
        max_ops=5000,
        noise=NoiseRates(),
        converge_timeout_s=180,
    )
