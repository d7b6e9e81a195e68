"""Replication between real node processes on loopback, every link through a fault proxy.

One 3-node cluster serves the whole module (each test uses its own merge), gossiping every
0.15 s. Every test ends the same way: all nodes report equal digests and equal merged hashes,
the live set is exactly what the acknowledged operations imply (nothing acknowledged is lost),
and every object re-hashes to its root on every node. Waits are bounded polls.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.process.cluster import Cluster, wait_until
from tests.replication_sim import model_bytes

pytestmark = pytest.mark.slow

LINEAR = {"strategy": "linear", "version": 1, "params": {"weight": 1.0}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), 3, gossip_interval_s=0.15)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture(autouse=True)
def healed(cluster):
    cluster.heal()
    yield
    cluster.heal()


def _finish(cluster: Cluster, merge: str, live: set[str], timeout: float = 60) -> None:
    reports = cluster.wait_converged(merge, live=live, timeout=timeout)
    assert len({(r.digest, r.merged) for r in reports}) == 1
    cluster.check_objects(live)


def test_concurrent_pushes_to_different_nodes_converge(cluster):
    cluster.set_recipe(0, "concurrent", LINEAR)
    with ThreadPoolExecutor(3) as pool:
        roots = set(
            pool.map(lambda i: cluster.push(i, "concurrent", model_bytes(100 + i)), range(3))
        )
    _finish(cluster, "concurrent", roots)


def test_node_killed_and_restarted_while_others_receive_pushes(cluster):
    cluster.set_recipe(1, "crash", LINEAR)
    first = cluster.push(2, "crash", model_bytes(200))
    cluster.wait_converged("crash", live={first}, timeout=30)
    cluster.kill(2)  # SIGKILL: no shutdown handler runs
    acked = {first}
    for k in range(3):
        acked.add(cluster.push(k % 2, "crash", model_bytes(201 + k)))
    cluster.start(2)
    acked.add(cluster.push(2, "crash", model_bytes(210)))  # the restarted node accepts writes
    _finish(cluster, "crash", acked)


def test_partition_and_heal(cluster):
    cluster.set_recipe(0, "split", LINEAR)
    cluster.partition([0], [1, 2])
    a = cluster.push(0, "split", model_bytes(300))
    b = cluster.push(1, "split", model_bytes(301))
    c = cluster.push(2, "split", model_bytes(302))
    # the majority side converges on its own; the minority does not see it
    wait_until(
        lambda: (
            (r1 := cluster.report(1, "split"))
            and set(r1.live) == {b, c}
            and cluster.report(2, "split").digest == r1.digest
        ),
        timeout=30,
        what="majority side converged",
    )
    assert set(cluster.report(0, "split").live) == {a}
    cluster.heal()
    _finish(cluster, "split", {a, b, c})


def test_concurrent_add_and_remove_across_a_partition_add_wins(cluster):
    cluster.set_recipe(0, "addwins", LINEAR)
    root = cluster.push(0, "addwins", model_bytes(400))
    other = cluster.push(1, "addwins", model_bytes(401))
    cluster.wait_converged("addwins", live={root, other}, timeout=30)
    cluster.partition([0], [1, 2], mode="blackhole")
    cluster.remove(1, "addwins", root)  # observed-remove on the majority side
    cluster.remove(0, "addwins", root)  # the minority removes and re-adds: a new dot,
    cluster.push(0, "addwins", model_bytes(400))  # concurrent with the majority's remove
    cluster.remove(2, "addwins", other)  # an uncontested remove must stick
    cluster.heal()
    _finish(cluster, "addwins", {root})


def test_lossy_delayed_links_still_converge(cluster):
    """20% of requests and of answers dropped and 20 ms of delay on every link (an answer
    dropped after the peer joined is the nasty case: the effect happened, the caller thinks it
    failed)."""
    cluster.set_recipe(0, "lossy", LINEAR)
    cluster.proxy.set_all(drop_request=0.2, drop_response=0.2, delay_s=0.02)
    a = cluster.push(0, "lossy", model_bytes(600))
    b = cluster.push(1, "lossy", model_bytes(601))
    c = cluster.push(2, "lossy", model_bytes(602))
    cluster.remove(2, "lossy", c)
    _finish(cluster, "lossy", {a, b}, timeout=90)
    dropped = sum(
        cluster.proxy.stats(n).dropped_requests + cluster.proxy.stats(n).dropped_responses
        for n in cluster.proxy.links()
    )
    assert dropped > 0


def test_corrupted_chunks_are_refused_and_fetched_from_another_peer(cluster):
    cluster.set_recipe(0, "corrupt", LINEAR)
    # n2 cannot reach n0, and everything n1 sends n2 for /chunks has one bit flipped
    cluster.proxy.set("2->0", mode="refuse")
    cluster.proxy.set("0->2", mode="refuse")
    cluster.proxy.set("2->1", bitflip=1.0, match="/chunks")
    root = cluster.push(0, "corrupt", model_bytes(500))
    wait_until(
        lambda: cluster.proxy.stats("2->1").flipped >= 1,
        timeout=30,
        what="n2 asked n1 for chunks and got flipped bytes",
    )
    assert root not in {r.hex() for r in _objects(cluster, 2)}
    cluster.proxy.set("2->0")
    cluster.proxy.set("0->2")
    _finish(cluster, "corrupt", {root})
    info = cluster.info(2)
    assert info["transfer"]["bad_chunks"] >= 1


def _objects(cluster: Cluster, i: int) -> list[bytes]:
    from crdtmerge.store import ObjectStore

    return ObjectStore(cluster.nodes[i].data_dir / "objects").list()
