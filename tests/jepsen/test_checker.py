"""The set checker on hand-made histories: valid ones pass, and each kind of anomaly FAILS."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.jepsen.checker import check
from tests.jepsen.history import History, Op, pairs

A, B, C = "aa" * 32, "bb" * 32, "cc" * 32


class H:
    """Builds a history with explicit times (seconds)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.n = 0

    def _op(self, typ, process, f, value, node, t, **extra) -> None:
        self.ops.append(Op(len(self.ops), typ, process, f, value, node, int(t * 1e9), extra))

    def op(self, f, value, node, t0, t1, typ="ok", result=None, **extra) -> H:
        self.n += 1
        p = f"c{self.n}"
        self._op("invoke", p, f, value, node, t0)
        if typ is not None:
            self._op(typ, p, f, result if result is not None else value, node, t1, **extra)
        return self

    def add(self, e, node, t0, t1, typ="ok") -> H:
        return self.op("add", e, node, t0, t1, typ)

    def remove(self, e, node, t0, t1, typ="ok") -> H:
        return self.op("remove", e, node, t0, t1, typ)

    def read(self, elements, node, t0, t1) -> H:
        return self.op("read", None, node, t0, t1, result=list(elements))

    def final(self, elements, nodes=(0, 1, 2), t=100.0, **extra) -> H:
        for n in nodes:
            self.op("read", None, n, t, t + 0.1, result=list(elements), final=True, **extra)
        return self

    def nemesis(self, f, value, t0, t1) -> H:
        self._op("invoke", "nemesis", f, value, None, t0)
        self._op("ok", "nemesis", f, value, None, t1)
        return self

    def history(self) -> History:
        ops = sorted(self.ops, key=lambda o: (o.time, o.index))
        return History.of([dataclasses.replace(o, index=i) for i, o in enumerate(ops)])


def test_acknowledged_adds_present_everywhere_is_valid():
    h = H().add(A, 0, 1, 2).add(B, 1, 1, 2).read([A], 2, 2.5, 2.6).read([A, B], 2, 3, 3.1)
    r = check(h.final([A, B]).history())
    assert r["valid"], r["problems"]
    assert (r["stable"], r["lost_count"]) == (2, 0)
    assert r["stable_latency_s"]["100"] >= 1.0  # B appeared on node 2 only at t=3


def test_lost_acknowledged_add_fails():
    r = check(H().add(A, 0, 1, 2).add(B, 1, 1, 2).final([A]).history())
    assert not r["valid"]
    assert r["lost"] == [B]


def test_missing_on_one_node_only_is_lost_and_divergent():
    h = H().add(A, 0, 1, 2)
    h.final([A], nodes=(0, 1)).final([], nodes=(2,))
    r = check(h.history())
    assert not r["valid"] and r["divergent"] and r["lost"] == [A]


def test_unexpected_element_fails():
    r = check(H().add(A, 0, 1, 2).final([A, C]).history())
    assert not r["valid"] and r["unexpected"] == [C]


def test_failed_add_that_shows_up_is_unexpected():
    r = check(H().add(A, 0, 1, 2, typ="fail").final([A]).history())
    assert not r["valid"] and r["unexpected"] == [A]


def test_duplicate_in_a_read_fails():
    r = check(H().add(A, 0, 1, 2).final([A, A]).history())
    assert not r["valid"] and r["duplicates"] == [A]


def test_removed_element_that_comes_back_is_resurrected():
    # added on node 0, removed on node 0 afterwards: the remove surely saw the only dot
    r = check(H().add(A, 0, 1, 2).remove(A, 0, 3, 4).final([A]).history())
    assert not r["valid"] and r["resurrected"] == [A]


def test_remove_on_another_node_of_a_single_add_surely_observed_it():
    # the remove was acknowledged, so node 1 saw A live: the only dot there is
    r = check(H().add(A, 0, 1, 2).remove(A, 1, 5, 6).final([A]).history())
    assert r["resurrected"] == [A]
    assert check(H().add(A, 0, 1, 2).remove(A, 1, 5, 6).final([]).history())["valid"]


def test_removed_element_absent_is_valid():
    r = check(H().add(A, 0, 1, 2).remove(A, 0, 3, 4).final([]).history())
    assert r["valid"], r["problems"]
    assert r["removed"] == 1


def test_readd_after_remove_must_be_present():
    h = H().add(A, 0, 1, 2).remove(A, 0, 3, 4).add(A, 1, 5, 6)
    assert check(h.final([A]).history())["valid"]
    r = check(H().add(A, 0, 1, 2).remove(A, 0, 3, 4).add(A, 1, 5, 6).final([]).history())
    assert not r["valid"] and r["lost"] == [A]


def test_add_wins_across_a_partition_honoured():
    # A everywhere; partition {0} | {1, 2}; node 1 removes A; node 0 removes and re-adds A
    h = (
        H()
        .add(A, 0, 1, 2)
        .nemesis("partition", [[0], [1, 2]], 10, 10.1)
        .remove(A, 1, 14, 14.5)
        .remove(A, 0, 14, 14.2)
        .add(A, 0, 14.3, 14.6)
        .nemesis("heal", None, 20, 20.1)
    )
    r = check(h.final([A]).history())
    assert r["valid"], r["problems"]
    assert r["add_wins"] == {"checked": 1, "violated": 0}


def test_add_wins_violation_fails():
    h = (
        H()
        .add(A, 0, 1, 2)
        .nemesis("partition", [[0], [1, 2]], 10, 10.1)
        .remove(A, 1, 14, 14.5)
        .remove(A, 0, 14, 14.2)
        .add(A, 0, 14.3, 14.6)
        .nemesis("heal", None, 20, 20.1)
    )
    r = check(h.final([]).history())
    assert not r["valid"]
    assert r["add_wins"] == {"checked": 1, "violated": 1}
    assert r["lost"] == [A]


def test_partition_grace_keeps_early_ops_undecided():
    # the same ops 1 s after the partition: a request in flight may still have carried the
    # new dot, so the checker cannot insist on add-wins; both outcomes are allowed
    def h():
        return (
            H()
            .add(A, 0, 1, 2)
            .nemesis("partition", [[0], [1, 2]], 10, 10.1)
            .remove(A, 0, 10.5, 10.6)
            .add(A, 0, 10.7, 10.8)
            .remove(A, 1, 10.9, 11.0)
            .nemesis("heal", None, 20, 20.1)
        )

    assert check(h().final([A]).history())["valid"]
    r = check(h().final([]).history())
    assert r["valid"] and r["indeterminate_count"] == 1


def test_overlapping_add_and_remove_on_different_nodes_allow_either_outcome():
    for final in ([A], []):
        h = H().add(A, 0, 1, 2).add(A, 1, 5, 7).remove(A, 2, 6, 8)
        r = check(h.final(final).history())
        assert r["valid"], (final, r["problems"])
        assert r["concurrent_pairs"] >= 1


def test_unknown_outcome_add_may_or_may_not_appear():
    for final in ([A], []):
        r = check(H().add(A, 0, 1, 2, typ="info").final(final).history())
        assert r["valid"], r["problems"]
    assert check(H().add(A, 0, 1, 2, typ="info").final([A]).history())["recovered_count"] == 1


def test_unknown_outcome_remove_does_not_make_an_add_required():
    for final in ([A], []):
        r = check(H().add(A, 0, 1, 2).remove(A, 1, 3, 4, typ="info").final(final).history())
        assert r["valid"]


def test_unknown_outcome_add_seen_by_an_acknowledged_remove_must_be_gone():
    # the remove found A live, and the info add was its only possible source: it happened
    # (once) and the remove deleted it
    r = check(H().add(A, 0, 1, 2, typ="info").remove(A, 1, 3, 4).final([A]).history())
    assert r["resurrected"] == [A]
    # a remove that found nothing (404, fail) proves nothing: the add may land later
    r = check(H().add(A, 0, 1, 2, typ="info").remove(A, 1, 3, 4, typ="fail").final([A]).history())
    assert r["valid"]


def test_final_digests_must_agree():
    h = H().add(A, 0, 1, 2)
    h.final([A], nodes=(0, 1), digest="d1", merged="m1").final([A], nodes=(2,), digest="d2")
    r = check(h.history())
    assert not r["valid"]
    assert not r["digests_equal"] and not r["mergeds_equal"]


def test_no_final_reads_is_invalid():
    assert not check(H().add(A, 0, 1, 2).history())["valid"]


def test_history_round_trips_through_jsonl(tmp_path: Path):
    h = History()
    op = h.invoke("w0", "add", A, node=1, size=10)
    h.complete(op, "ok")
    op = h.invoke("w1", "read", None, node=2)
    h.complete(op, "ok", [A], final=True)
    h.dump(tmp_path / "h.jsonl")
    again = History.load(tmp_path / "h.jsonl")
    assert again.ops == h.ops
    assert [(i.f, d.type if d else None) for i, d in pairs(again.ops)] == [
        ("add", "ok"),
        ("read", "ok"),
    ]
    assert check(again)["valid"]
