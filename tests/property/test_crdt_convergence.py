"""Convergence of full-state replication under any delivery order, and dot safety.

Replicas run random operations; every state a replica ever held may be "sent" to any other
replica. The network drops, duplicates and reorders those messages arbitrarily; at the end
(heal) each replica's final state reaches every other replica at least once, in a random order.
Then all replicas hold the same state, equal to the join of all final states, and the
contributions sets equal riak_dt's model: the dots of adds that no remove or re-add observed.
"""

from __future__ import annotations

from hypothesis import given, note
from hypothesis import strategies as st

from crdtmerge.crdt import NodeState, make_actor
from tests.property.crdt_programs import ELEMENTS, MERGES, Program, _op


@st.composite
def deliveries(draw: st.DrawFn):
    """A program interleaved with lossy, duplicating, reordering delivery of full states."""
    p = Program(draw(st.integers(2, 5)))
    in_flight: list[tuple[int, NodeState]] = []
    for _ in range(draw(st.integers(0, 40))):
        action = draw(st.sampled_from(["op", "op", "send", "deliver", "drop", "dup"]))
        if action == "op":
            op = draw(_op())
            if op[0] != "sync":  # syncs go through the network here
                p.run(op)
        elif action == "send":
            src = draw(st.integers(0, p.n - 1))
            dst = draw(st.integers(0, p.n - 1))
            in_flight.append((dst, p.states[src]))
        elif in_flight:
            k = draw(st.integers(0, len(in_flight) - 1))
            if action == "deliver":
                dst, state = in_flight.pop(k)  # any message, not the oldest: reordering
                p.states[dst] = p.states[dst].join(state)
            elif action == "drop":
                in_flight.pop(k)
            else:
                in_flight.append(in_flight[k])
    # heal: every final state reaches every replica, in a drawn order, some twice
    finals = list(p.states)
    heal = [(dst, finals[src]) for dst in range(p.n) for src in range(p.n)]
    heal += draw(st.lists(st.sampled_from(heal), max_size=5)) + in_flight
    heal = draw(st.permutations(heal))
    return p, heal


@given(deliveries())
def test_full_states_converge_under_loss_duplication_and_reordering(case):
    p, heal = case
    note(f"{p.n} replicas, {len(heal)} heal deliveries")
    for dst, state in heal:
        p.states[dst] = p.states[dst].join(state)
    first = p.states[0]
    for s in p.states[1:]:
        assert s == first
        assert s.to_bytes() == first.to_bytes()
    for m in MERGES:
        assert len({s.get(m).digest() for s in p.states}) == 1
        contributions = first.get(m).contributions
        for e in ELEMENTS:
            assert set(contributions.dots(e)) == p.expected_dots(m, e), (m, e[0])
    first.check_invariants()


@given(deliveries())
def test_converged_value_matches_the_add_wins_model(case):
    # an element is live iff some add of it was observed by no remove and no re-add
    p, heal = case
    for dst, state in heal:
        p.states[dst] = p.states[dst].join(state)
    for m in MERGES:
        expected = {e for e in ELEMENTS if p.expected_dots(m, e)}
        assert set(p.states[0].get(m).live_roots()) == expected


@st.composite
def crash_programs(draw: st.DrawFn):
    """Ops on 3 replicas with crashes that lose everything after the last persist."""
    n = 3
    epochs = [1] * n
    live = [NodeState() for _ in range(n)]
    persisted = [NodeState() for _ in range(n)]
    issued: list[tuple[str, int]] = []
    for _ in range(draw(st.integers(1, 60))):
        i = draw(st.integers(0, n - 1))
        action = draw(st.sampled_from(["add", "add", "remove", "persist", "crash", "sync"]))
        if action == "add":
            e = draw(st.sampled_from(ELEMENTS))
            live[i] = live[i].update(
                "m", lambda d, e=e, i=i: d.add(e, make_actor(f"r{i}", epochs[i]))
            )
            issued.extend(live[i].get("m").contributions.dots(e))
        elif action == "remove":
            e = draw(st.sampled_from(ELEMENTS))
            live[i] = live[i].update("m", lambda d, e=e: d.remove(e))
        elif action == "persist":
            persisted[i] = live[i]
        elif action == "crash":
            # kill -9: un-persisted state is lost; the restart bumps the persisted epoch
            live[i] = persisted[i]
            epochs[i] += 1
        else:
            j = draw(st.integers(0, n - 1))
            live[i] = live[i].join(live[j])
    return issued


@given(crash_programs())
def test_no_dot_is_reused_across_crash_and_restart(issued):
    # every add minted a dot never minted before, though crashes rolled counters back
    assert len(issued) == len(set(issued))
