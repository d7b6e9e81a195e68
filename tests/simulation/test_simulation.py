"""Deterministic simulation of 3-7 replicas under faults, checked against the reference model.

* ``test_seeded_simulations_converge_to_the_model``: ``CRDTMERGE_SIM_SEEDS`` seeds (default
  1,000, in 10 chunks), 150 random steps each (writes, ticks, delivery with loss, duplication
  and reordering, partitions and heals, crashes in the middle of effect lists, restarts with a
  new epoch, restores of an old data directory), then heal + quiesce and check: equal states
  everywhere, the add-wins model (nothing acknowledged lost, nothing resurrected), every object
  present, every replica reporting convergence. Replay one seed with ``CRDTMERGE_SIM_SEED=n``.
* ``SimulationMachine``: the same simulator driven by a hypothesis state machine, so a failure
  shrinks to a few steps; ``@invariant`` calls ``check_invariants()`` on every replica.
* ``test_100_replicas_converge_in_few_rounds``: rounds of anti-entropy to agree, 100 replicas.
"""

from __future__ import annotations

import os
import statistics

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from crdtmerge.replica import Tick
from tests.simulation.sim import Simulator, convergence_rounds, run_seed

_SEEDS = int(os.environ.get("CRDTMERGE_SIM_SEEDS", "1000"))
_CHUNKS = 10


@pytest.mark.parametrize("chunk", range(_CHUNKS))
def test_seeded_simulations_converge_to_the_model(chunk):
    if "CRDTMERGE_SIM_SEED" in os.environ:
        if chunk:
            pytest.skip("replaying one seed")
        run_seed(int(os.environ["CRDTMERGE_SIM_SEED"]))
        return
    per_chunk = -(-_SEEDS // _CHUNKS)
    for seed in range(chunk * per_chunk, min(_SEEDS, (chunk + 1) * per_chunk)):
        run_seed(seed)


def test_simulation_is_deterministic_per_seed():
    a, b = run_seed(7), run_seed(7)
    assert a.log == b.log
    assert [n.replica.state.to_bytes() for n in a.running()] == [
        n.replica.state.to_bytes() for n in b.running()
    ]


def test_simulation_exercises_every_fault():
    # guard against a simulator that silently stopped injecting faults
    totals = {"crashes": 0, "restores": 0, "dropped": 0}
    logs = []
    for seed in range(20):
        sim = run_seed(seed)
        for k in totals:
            totals[k] += sim.stats[k]
        logs += sim.log
    assert all(v > 0 for v in totals.values()), totals
    assert any(line.startswith("partition") for line in logs)
    assert any("happened=False" in line for line in logs)  # a crash mid-effects lost a write


def test_100_replicas_converge_in_few_rounds(capsys):
    # push-pull anti-entropy alone (no change notices), one writer, no loss
    rounds = [convergence_rounds(100, seed, notify=False) for seed in range(5)]
    lossy = [convergence_rounds(100, seed, notify=True, loss=0.3) for seed in range(5)]
    with capsys.disabled():
        print(
            f"\n100 replicas: anti-entropy only {rounds} rounds (mean "
            f"{statistics.mean(rounds):.1f}); with change notices and 30% loss {lossy}"
        )
    assert max(rounds) <= 10  # log2(100) + ln(100) ≈ 11.2 for push only; push-pull is faster
    assert max(lossy) <= 20
    assert convergence_rounds(100, 0, notify=True) == 0  # notices reach everyone at once


class SimulationMachine(RuleBasedStateMachine):
    """Hypothesis drives the simulator step by step (and shrinks failures)."""

    def __init__(self) -> None:
        super().__init__()
        self.sim: Simulator | None = None

    @initialize(seed=st.integers(0, 2**32), n=st.integers(3, 5))
    def start(self, seed, n):
        self.sim = Simulator(seed, n)

    def _node(self, i):
        return list(self.sim.nodes.values())[i % self.sim.n]

    @rule(i=st.integers(0, 6), count=st.integers(1, 4), crash_roll=st.integers(0, 5))
    def local_writes(self, i, count, crash_roll):
        node = self._node(i)
        for k in range(count):
            if node.replica is not None:
                self.sim.local_write(node, crash_mid=crash_roll == 0 and k == count - 1)

    @rule(i=st.integers(0, 6))
    def tick(self, i):
        node = self._node(i)
        if node.replica is not None:
            self.sim.now += 1.0
            self.sim._run(node, node.replica.handle(Tick(self.sim.now, i * 7919)))

    @rule(k=st.integers(0, 50), count=st.integers(1, 6), drop=st.booleans(), dup=st.booleans())
    @precondition(lambda self: self.sim.in_flight)
    def network(self, k, count, drop, dup):
        for _ in range(count):
            if not self.sim.in_flight:
                return
            j = k % len(self.sim.in_flight)
            if drop:
                self.sim.in_flight.pop(j)
                drop = False  # drop one, deliver the rest
            else:
                if dup:
                    self.sim.in_flight.append(self.sim.in_flight[j])
                self.sim.deliver(j)

    @rule(groups=st.lists(st.integers(0, 1), min_size=7, max_size=7))
    def partition(self, groups):
        self.sim.partition = dict(zip(self.sim.nodes, groups, strict=False))

    @rule()
    def heal(self):
        self.sim.partition = {}

    @rule(i=st.integers(0, 6))
    def crash(self, i):
        node = self._node(i)
        if node.replica is not None:
            self.sim.crash(node)

    @rule(i=st.integers(0, 6), restore=st.booleans())
    def restart(self, i, restore):
        node = self._node(i)
        if node.replica is None:
            if restore and node.backup is not None:
                self.sim.restore_backup(node)
            self.sim.restart(node)

    @rule(i=st.integers(0, 6))
    def backup(self, i):
        node = self._node(i)
        node.backup = (dict(node.docs), node.epoch, node.persist_seq)

    @rule(k=st.integers(0, 50))
    @precondition(lambda self: self.sim.fetches)
    def fetch(self, k):
        fetches = sorted(self.sim.fetches)
        self.sim.complete_fetch(*fetches[k % len(fetches)])

    @invariant()
    def replicas_are_well_formed(self):
        for node in self.sim.running():
            node.replica.check_invariants()

    def teardown(self):
        if self.sim is not None:
            self.sim.quiesce()
            self.sim.check()


_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
SimulationMachine.TestCase.settings = settings(
    settings.get_profile(_PROFILE),
    max_examples=int(
        os.environ.get("CRDTMERGE_SIM_EXAMPLES", "500" if _PROFILE == "thorough" else "60")
    ),
    stateful_step_count=50,
)
TestSimulationMachine = SimulationMachine.TestCase
