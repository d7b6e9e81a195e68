"""Replication between full node apps in one process (httpx ASGI transports, no sockets).

See ``tests/replication_sim.py`` for the harness. The 100-node case records how many gossip
rounds metadata and objects need to converge from random pushes (anti-entropy alone: the eager
change notices are dropped), and checks the goal of ceil(log2 N) + 3 rounds.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from crdtmerge.store import hash_file
from node.auth_cluster import ClusterAuth, ClusterKey
from node.routes import replication as replication_routes
from tests.replication_sim import (
    SECRET,
    Simulation,
    converge_from_random_pushes,
    log2_bound,
    model_bytes,
)

LINEAR = {"strategy": "linear", "version": 1, "params": {"weight": 1.0}}


def run(coro):
    return asyncio.run(coro)


async def _rounds_until(sim: Simulation, predicate, limit: int = 30) -> int:
    for r in range(1, limit + 1):
        await sim.round()
        if predicate():
            return r
    raise AssertionError(f"not converged after {limit} rounds")


@pytest.mark.slow
def test_100_nodes_converge_from_random_pushes_within_log2_bound(tmp_path, record_property):
    result = run(converge_from_random_pushes(tmp_path, 100, pushes=5, seed=3))
    record_property("metadata_rounds", result["metadata_rounds"])
    record_property("object_rounds", result["object_rounds"])
    summary = {k: v for k, v in result.items() if k != "roots"}
    print(f"\n100 nodes: {summary}")
    assert result["metadata_rounds"] is not None
    assert result["metadata_rounds"] <= log2_bound(100) == 10
    assert result["object_rounds"] is not None and result["object_rounds"] <= 2 * log2_bound(100)
    assert result["bad_chunks"] == 0


def test_three_nodes_reach_the_same_merged_hash(tmp_path):
    async def scenario():
        async with Simulation(tmp_path, 3, merges=True) as sim:
            await sim.set_recipe(0, "m", LINEAR)
            roots = {bytes.fromhex(await sim.push(i, "m", model_bytes(10 + i))) for i in range(3)}
            await _rounds_until(
                sim, lambda: sim.metadata_converged("m", roots) and sim.objects_complete(roots)
            )
            # the merge worker runs in threads: poll (bounded) until every node reports it
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                statuses = [await sim.status(i, "m") for i in range(3)]
                if all(s and s["merged_hash"] for s in statuses):
                    break
                assert loop.time() < deadline, statuses
                await sim.round()
            assert len({s["merged_hash"] for s in statuses}) == 1
            assert len({s["digest"] for s in statuses}) == 1
            assert all(s["converged"] and len(s["peers_agreeing"]) == 2 for s in statuses)
            for node in sim.nodes:
                for root in roots:
                    assert hash_file(node.runtime.store.path(root)) == root

    run(scenario())


def test_concurrent_add_and_remove_across_a_partition_add_wins(tmp_path):
    async def scenario():
        async with Simulation(tmp_path, 3) as sim:
            root = bytes.fromhex(await sim.push(0, "m", model_bytes(1)))
            await _rounds_until(sim, lambda: sim.metadata_converged("m", {root}))
            sim.net.partition(["n0"], ["n1", "n2"])
            await sim.remove(1, "m", root.hex())  # n1 removes the add it observed
            # n0 removes and re-adds: a fresh dot, concurrent with n1's remove
            await sim.remove(0, "m", root.hex())
            await sim.push(0, "m", model_bytes(1))
            await sim.quiesce()
            assert sim.live(0, "m") == {root} and sim.live(1, "m") == set()
            sim.net.cut.clear()
            sim.now += 100  # backoffs of the failed notices expire
            await _rounds_until(sim, lambda: sim.metadata_converged("m", {root}))
            assert all(sim.live(i, "m") == {root} for i in range(3))

    run(scenario())


def test_re_push_of_a_live_root_wins_over_a_concurrent_remove(tmp_path):
    """Bug found by Jepsen-lite (seed 1412824649): a push of a root that was already live was
    answered 200 without a new dot, so a remove of that root across a partition erased an
    acknowledged add after the heal. Every acknowledged add now mints a fresh dot."""

    async def scenario():
        async with Simulation(tmp_path, 3) as sim:
            root = bytes.fromhex(await sim.push(0, "m", model_bytes(1)))
            await _rounds_until(sim, lambda: sim.metadata_converged("m", {root}))
            sim.net.partition(["n0"], ["n1", "n2"])
            await sim.remove(1, "m", root.hex())
            await sim.push(0, "m", model_bytes(1))  # live on n0: acknowledged with 200
            await sim.quiesce()
            sim.net.cut.clear()
            sim.now += 100
            await _rounds_until(sim, lambda: sim.metadata_converged("m", {root}))
            assert all(sim.live(i, "m") == {root} for i in range(3))

    run(scenario())


def test_peers_are_learned_by_hello_and_peer_exchange(tmp_path):
    """Node i is configured with node i+1 only; everyone ends up knowing everyone."""

    async def scenario():
        async with Simulation(tmp_path, 5, topology="ring") as sim:
            root = bytes.fromhex(await sim.push(2, "m", model_bytes(3)))
            await _rounds_until(
                sim,
                lambda: all(len(n.replication.directory.by_id) == 4 for n in sim.nodes),
                limit=40,
            )
            assert sim.nodes[0].replication.directory.learned  # not all from configuration
            await _rounds_until(sim, lambda: sim.metadata_converged("m", {root}))
            await _rounds_until(sim, lambda: sim.objects_complete({root}))

    run(scenario())


def test_removal_observed_everywhere_converges_to_empty(tmp_path):
    async def scenario():
        async with Simulation(tmp_path, 3) as sim:
            a = bytes.fromhex(await sim.push(0, "m", model_bytes(1)))
            b = bytes.fromhex(await sim.push(1, "m", model_bytes(2)))
            await _rounds_until(sim, lambda: sim.metadata_converged("m", {a, b}))
            await sim.remove(2, "m", a.hex())
            await _rounds_until(sim, lambda: sim.metadata_converged("m", {b}))

    run(scenario())


def test_corrupting_peer_is_penalised_and_the_object_comes_from_another(tmp_path, monkeypatch):
    """n1 is a cluster member that serves flipped bytes (its requests are validly signed, and
    chunk answers carry no MAC by design, so only the chunk hashes can catch it)."""

    class Evil(replication_routes.ChunkReader):
        def __init__(self, store, root, refs):
            super().__init__(store, root, refs)
            self.lies = store.dir.parent.name == "n1"

        def __iter__(self):
            data = bytearray(b"".join(super().__iter__()))
            if self.lies:
                data[len(data) // 2] ^= 0x01
            yield bytes(data)

    monkeypatch.setattr(replication_routes, "ChunkReader", Evil)

    async def scenario():
        async with Simulation(tmp_path, 3) as sim:
            root = bytes.fromhex(await sim.push(0, "m", model_bytes(7)))
            # n1 gets the object first (n0 -> n1 only), then n2 must fetch it while n0 is
            # reachable and n1 lies
            sim.net.cut |= {("n2", "n0")}
            await _rounds_until(sim, lambda: sim.nodes[1].runtime.store.has(root))
            rep2 = sim.nodes[2].replication
            await _rounds_until(sim, lambda: sim.metadata_converged("m", {root}))
            assert not sim.nodes[2].runtime.store.has(root)  # only n1 was reachable: refused
            assert rep2.fetcher.stats.bad_chunks >= 1
            sim.net.cut.clear()
            await _rounds_until(sim, lambda: sim.objects_complete({root}))
            assert hash_file(sim.nodes[2].runtime.store.path(root)) == root
            assert rep2.fetcher.stats.bad_peers.get("http://n1", 0) >= 1

    run(scenario())


def test_unauthenticated_and_replayed_requests_are_refused(tmp_path):
    async def scenario():
        async with Simulation(tmp_path, 2) as sim:
            app = sim.net.apps["n0"]
            hello = sim.nodes[1].replication._hello_body()
            async with httpx.AsyncClient(transport=app, base_url="http://n0") as anon:
                r = await anon.post("/v1/replication/hello", content=hello)
                assert r.status_code == 401 and r.json()["error"] == "unauthorized"
            wrong = ClusterAuth(ClusterKey("not the cluster secret at all"), "n1")
            async with httpx.AsyncClient(transport=app, base_url="http://n0", auth=wrong) as c:
                r = await c.post("/v1/replication/hello", content=hello)
                assert r.status_code == 401
            # a captured, validly signed request replayed verbatim is refused
            good = ClusterAuth(ClusterKey(SECRET), "n1")
            captured: list[httpx.Request] = []

            async def capture(request: httpx.Request):
                captured.append(request)
                return await app.handle_async_request(request)

            transport = httpx.AsyncClient(transport=httpx.MockTransport(capture))
            async with transport as c:
                r = await c.post("http://n0/v1/replication/hello", content=hello, auth=good)
                assert r.status_code == 200
            replay = captured[0]
            resp = await app.handle_async_request(
                httpx.Request(replay.method, replay.url, headers=replay.headers, content=hello)
            )
            await resp.aread()
            assert resp.status_code == 401

    run(scenario())


def test_log2_bound_formula():
    assert [log2_bound(n) for n in (3, 10, 30, 100)] == [5, 7, 8, 10]
    assert log2_bound(100) == math.ceil(math.log2(100)) + 3
