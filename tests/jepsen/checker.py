"""A set checker for an add-wins OR-Set, after Jepsen's ``set`` and ``set-full`` checkers.

Input: a :class:`~tests.jepsen.history.History` of ``add``/``remove`` of elements (roots, hex)
on numbered nodes, ``read`` operations (ok value = the node's live elements), and nemesis
``partition``/``heal`` records. The final reads (``extra["final"]``) come after the cluster was
healed and converged; they are what the checker judges.

What an OR-Set promises, and what the history can prove about it. A remove deletes the *dots*
(add instances) its node had observed; an add that a remove did not observe survives it
(add wins). The history does not show dots, so the checker reasons about which adds a remove
*could* have observed:

- a remove cannot have observed an add that was invoked after the remove completed (real time);
- nor an add made on the other side of a partition that was in force (``grace`` seconds after
  it was installed, to let requests already in flight finish) from before the add was invoked
  until after the remove completed;
- a remove *surely* observed an add acknowledged on the same node before the remove was
  invoked, and, when only one add of the element could have been observed at all, that add (an
  acknowledged remove saw the element live, so it saw at least one of its dots).

An operation that completed ``info`` (outcome unknown) may take effect at any later time, so
its interval is open-ended; ``fail`` means it did not happen and it is ignored.

Per element:

- **must be present**: some acknowledged add could not have been observed by any remove that may
  have happened; absent at the end = **lost**;
- **must be absent**: every add that may have happened was surely observed by an acknowledged
  remove; present at the end = **resurrected**;
- present but never attempted = **unexpected**; listed twice in one read = **duplicate**;
  present with only unknown-outcome adds = **recovered** (allowed);
- otherwise **indeterminate** (either outcome is allowed by the history).

**Add-wins**: pairs (add, acknowledged remove) of one element that are concurrent by the history
(their intervals overlap, or a partition separated their nodes); where the add could not have been
observed by any remove, the element must be present: that is add-wins honoured (a violation is
also counted as lost). Finally every node's final read must be the same set, with the same digest
and merged hash when the reads carry them.

Latencies as in ``set-full``: for each element that must be present, the time from the add's
invocation until it appeared in every read that began afterwards (``stable``), percentiles
0/50/95/99/100 in seconds; and for lost elements, the time from the add until it was last seen.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .history import History, pairs

__all__ = ["Interval", "check", "op_counts", "summary"]

INF = math.inf
NS = 1e9


@dataclass(frozen=True)
class Interval:
    """One client operation: invoked at ``start``, known outcome at ``end`` (inf if unknown)."""

    f: str
    value: Any
    node: int | None
    start: float  # seconds
    end: float  # seconds; inf for info / never completed
    type: str  # ok | fail | info
    extra: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.type == "ok"


@dataclass(frozen=True)
class _Partition:
    start: float  # installed (seconds)
    end: float  # healed or replaced (seconds; inf if never)
    side: dict[int, int]  # node -> group index

    def separates(self, a: int | None, b: int | None) -> bool:
        if a is None or b is None or a == b:
            return False
        return self.side.get(a, -1 - a) != self.side.get(b, -1 - b)


def _intervals(history: History) -> list[Interval]:
    out = []
    for inv, done in pairs([op for op in history.ops if op.process != "nemesis"]):
        typ = done.type if done is not None else "info"
        end = done.time / NS if done is not None and typ != "info" else INF
        value = done.value if done is not None and typ == "ok" else inv.value
        extra = {**inv.extra, **(done.extra if done is not None else {})}
        out.append(Interval(inv.f, value, inv.node, inv.time / NS, end, typ, extra))
    return out


def _partitions(history: History) -> list[_Partition]:
    """Partitions in force: from the ``partition`` op's completion to the next nemesis
    ``partition``/``heal`` invocation."""
    nem = [op for op in history.ops if op.process == "nemesis" and op.f in ("partition", "heal")]
    out: list[_Partition] = []
    current: tuple[float, dict[int, int]] | None = None
    for op in nem:
        t = op.time / NS
        if op.type == "invoke":
            if current is not None:
                out.append(_Partition(current[0], t, current[1]))
                current = None
        elif op.type == "ok" and op.f == "partition":
            groups = op.value or []
            current = (t, {n: g for g, members in enumerate(groups) for n in members})
    if current is not None:
        out.append(_Partition(current[0], INF, current[1]))
    return out


def _percentiles(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    s = sorted(xs)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, math.ceil(q * len(s)) - 1 if q > 0 else 0)], 3)

    return {"0": at(0), "50": at(0.5), "95": at(0.95), "99": at(0.99), "100": at(1.0)}


def check(history: History, *, grace_s: float = 3.0, show: int = 20) -> dict[str, Any]:
    """Check ``history``; returns a result dict whose ``valid`` is True only if nothing is lost,
    unexpected, resurrected or duplicated, add-wins held, and the final reads agree."""
    ops = _intervals(history)
    parts = _partitions(history)

    def separated(a: int | None, b: int | None, t0: float, t1: float) -> bool:
        return any(p.separates(a, b) and p.start + grace_s <= t0 and t1 <= p.end for p in parts)

    def may_observe(r: Interval, a: Interval) -> bool:
        if r.end < a.start:
            return False
        return not separated(a.node, r.node, a.start, r.end)

    def concurrent(r: Interval, a: Interval) -> bool:
        overlap = r.start <= a.end and a.start <= r.end
        return overlap or separated(a.node, r.node, a.start, r.end)

    adds: dict[str, list[Interval]] = {}
    removes: dict[str, list[Interval]] = {}
    failed_adds: set[str] = set()
    reads: list[Interval] = []
    finals: list[Interval] = []
    for op in ops:
        if op.f == "add":
            if op.type == "fail":
                failed_adds.add(op.value)
            else:
                adds.setdefault(op.value, []).append(op)
        elif op.f == "remove" and op.type != "fail":
            removes.setdefault(op.value, []).append(op)
        elif op.f == "read" and op.ok:
            (finals if op.extra.get("final") else reads).append(op)

    result: dict[str, Any] = {"valid": True, "problems": []}
    if not finals:
        result["valid"] = False
        result["problems"].append("no final reads")
        return result

    # -- final reads agree, no duplicates ---------------------------------------------------
    duplicates: set[str] = set()
    for fr in finals:
        duplicates.update(e for e, n in Counter(fr.value).items() if n > 1)
    final_sets = {fr.node: frozenset(fr.value) for fr in finals}
    divergent = len(set(final_sets.values())) != 1
    present_anywhere = frozenset().union(*final_sets.values())
    present_everywhere = frozenset.intersection(*final_sets.values())
    for key in ("digest", "merged"):
        seen = {fr.extra.get(key) for fr in finals}
        result[f"{key}s_equal"] = len(seen) == 1 and None not in seen
        if seen != {None} and not result[f"{key}s_equal"]:
            result["problems"].append(f"final {key}s differ: {sorted(map(str, seen))}")

    # -- per element ------------------------------------------------------------------------
    lost, resurrected, unexpected, recovered, indeterminate = [], [], [], [], []
    stable_ok, removed_ok = [], []
    add_wins_checked, add_wins_violated = 0, []
    concurrent_pairs = 0
    stable_lat: list[float] = []
    lost_lat: list[float] = []
    universe = set(adds) | set(removes) | present_anywhere | failed_adds
    for e in sorted(universe):
        e_adds = adds.get(e, [])
        e_rems = removes.get(e, [])
        ok_rems = [r for r in e_rems if r.ok]

        def surely(r: Interval, a: Interval, e_adds: list[Interval] = e_adds) -> bool:
            if not (r.ok and may_observe(r, a)):
                return False
            if a.ok and r.node == a.node and r.start > a.end:
                return True
            candidates = [x for x in e_adds if may_observe(r, x)]
            return candidates == [a]

        survivors = [a for a in e_adds if a.ok and not any(may_observe(r, a) for r in e_rems)]
        must_present = bool(survivors)
        must_absent = bool(e_adds) and all(any(surely(r, a) for r in ok_rems) for a in e_adds)
        concurrent_pairs += sum(1 for a in e_adds for r in ok_rems if concurrent(r, a))
        won = [a for a in survivors if any(concurrent(r, a) for r in ok_rems)]
        if won:
            add_wins_checked += 1
        in_all, in_any = e in present_everywhere, e in present_anywhere
        if not e_adds:
            if in_any:
                unexpected.append(e)
            continue  # never attempted (or only failed adds) and absent: as it should be
        if must_present:
            if not in_all:
                lost.append(e)
                if won:
                    add_wins_violated.append(e)
                seen = [r.end for r in reads if e in r.value]
                if seen:
                    lost_lat.append(max(seen) - survivors[0].start)
            else:
                stable_ok.append(e)
                stable_lat.append(_stable_latency(e, survivors[0], reads, finals))
        elif must_absent:
            if in_any:
                resurrected.append(e)
            else:
                removed_ok.append(e)
        elif in_any and not any(a.ok for a in e_adds):
            recovered.append(e)
        else:
            indeterminate.append(e)

    problems = result["problems"]
    for name, items in (
        ("lost", lost),
        ("unexpected", unexpected),
        ("resurrected", resurrected),
        ("duplicates", sorted(duplicates)),
        ("add-wins violated", add_wins_violated),
    ):
        if items:
            problems.append(f"{len(items)} {name}: {[x[:16] for x in items[:show]]}")
    if divergent:
        problems.append(f"final reads differ between nodes: {_diff(final_sets)}")
    n_adds = sum(1 for op in ops if op.f == "add")
    n_removes = sum(1 for op in ops if op.f == "remove")
    result.update(
        {
            "valid": not problems,
            "attempts": {"add": n_adds, "remove": n_removes, "read": len(reads)},
            "ok": {
                "add": sum(1 for op in ops if op.f == "add" and op.ok),
                "remove": sum(1 for op in ops if op.f == "remove" and op.ok),
            },
            "info": sum(1 for op in ops if op.type == "info"),
            "final_size": len(present_anywhere),
            "nodes_read": len(final_sets),
            "stable": len(stable_ok),
            "removed": len(removed_ok),
            "lost": lost[:show],
            "lost_count": len(lost),
            "unexpected": unexpected[:show],
            "unexpected_count": len(unexpected),
            "resurrected": resurrected[:show],
            "resurrected_count": len(resurrected),
            "duplicates": sorted(duplicates)[:show],
            "duplicates_count": len(duplicates),
            "recovered_count": len(recovered),
            "indeterminate_count": len(indeterminate),
            "concurrent_pairs": concurrent_pairs,
            "add_wins": {"checked": add_wins_checked, "violated": len(add_wins_violated)},
            "divergent": divergent,
            "stable_latency_s": _percentiles(stable_lat),
            "lost_latency_s": _percentiles(lost_lat),
            "partitions": len(parts),
        }
    )
    return result


def _stable_latency(e: str, add: Interval, reads: list[Interval], finals: list[Interval]) -> float:
    """Seconds from ``add``'s invocation until ``e`` was in every read that began afterwards
    (the first read containing it after the last read that did not; else the final reads)."""
    later = [r for r in reads if r.start >= add.start]
    last_absent = max((r.end for r in later if e not in r.value), default=-INF)
    seen = [r.start for r in later if r.start > last_absent and e in r.value]
    t = min(seen) if seen else min(f.start for f in finals)
    return max(0.0, t - add.start)


def _diff(final_sets: dict[int | None, frozenset[str]]) -> str:
    union = frozenset().union(*final_sets.values())
    return ", ".join(
        f"node {n}: missing {len(union - s)}" for n, s in sorted(final_sets.items(), key=str)
    )


def summary(result: dict[str, Any]) -> str:
    """One line for logs and failure messages."""
    return (
        f"valid={result['valid']} adds={result.get('attempts', {}).get('add')} "
        f"removes={result.get('attempts', {}).get('remove')} "
        f"lost={result.get('lost_count')} unexpected={result.get('unexpected_count')} "
        f"resurrected={result.get('resurrected_count')} "
        f"duplicates={result.get('duplicates_count')} add_wins={result.get('add_wins')} "
        f"problems={result.get('problems')}"
    )


def op_counts(history: History) -> Counter[str]:
    """Completed client operations by ``f:type`` (for reports)."""
    c: Counter[str] = Counter()
    for op in history.ops:
        if op.type != "invoke":
            c[f"{op.f}:{op.type}"] += 1
    return c
