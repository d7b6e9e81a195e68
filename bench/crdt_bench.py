"""Benchmark: join, digest and encoding of 10,000-element merge documents.

Run: ``.venv/bin/python bench/crdt_bench.py`` (prints a Markdown table; numbers are the minimum CPU time (process_time)
of several repetitions, measured in this process).

Scenarios (two replicas A and B, each holding 10,000 live contributions):
* ``equal copies``: B is A decoded from bytes (distinct objects, equal state);
* ``typical gossip``: B = A plus 10 adds and 10 removes of its own;
* ``half overlap``: 5,000 shared elements, 5,000 each added on one side only;
* ``disjoint``: no element in common (20,000 after join).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from crdtmerge.crdt import MergeDocument, ORSet, make_actor
from crdtmerge.crdt.clock import Dot, VersionVector
from crdtmerge.recipe import Recipe

N = 10_000


def root(i: int, salt: int = 0) -> bytes:
    return (i.to_bytes(8, "big") + salt.to_bytes(8, "big")) * 2


def bulk_orset(roots: list[bytes], actor: str, start: int = 0) -> ORSet:
    """As if ``actor`` added ``roots`` one by one (same state, built without O(n^2) copies)."""
    entries = {r: frozenset((Dot(actor, start + i + 1),)) for i, r in enumerate(roots)}
    s = ORSet._make(VersionVector._make({actor: start + len(roots)}), entries)
    s.check_invariants()
    return s


def timeit(fn: Callable[[], object], repeat: int = 25) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times) * 1000


def main() -> None:
    a_actor, b_actor = make_actor("node-a", 1), make_actor("node-b", 1)
    recipe = Recipe("ties", 1, {"density": 0.5})
    base = MergeDocument(contributions=bulk_orset([root(i) for i in range(N)], a_actor))
    a = base.set_recipe(recipe, a_actor)

    b_typ = MergeDocument.from_bytes(a.to_bytes())
    for i in range(10):
        b_typ = b_typ.add(root(i, 7), b_actor).remove(root(i))

    half = MergeDocument(
        contributions=bulk_orset([root(i) for i in range(N // 2)], a_actor).join(
            bulk_orset([root(i, 9) for i in range(N // 2)], b_actor)
        )
    )
    half_a = MergeDocument(
        contributions=bulk_orset([root(i) for i in range(N // 2)], a_actor).join(
            bulk_orset([root(i, 5) for i in range(N // 2)], make_actor("node-c", 1))
        )
    )
    disjoint = MergeDocument(contributions=bulk_orset([root(i, 3) for i in range(N)], b_actor))

    scenarios = {
        "equal copies": (a, MergeDocument.from_bytes(a.to_bytes())),
        "typical gossip (10 adds, 10 removes)": (a, b_typ),
        "half overlap": (half_a, half),
        "disjoint": (base, disjoint),
    }
    print(f"python {sys.version.split()[0]}, {N:,} live elements per side\n")
    print("| scenario | join ms | elements after | digest ms (uncached) | state hash ms |")
    print("|---|---:|---:|---:|---:|")
    for name, (x, y) in scenarios.items():
        j = x.join(y)
        t_join = timeit(lambda x=x, y=y: x.contributions.join(y.contributions))
        t_digest = timeit(lambda j=j: MergeDocument(j.recipe, j.contributions).digest())
        t_hash = timeit(lambda j=j: MergeDocument(j.recipe, j.contributions).state_hash())
        print(
            f"| {name} | {t_join:.2f} | {len(j.live_roots()):,} | {t_digest:.2f} | {t_hash:.2f} |"
        )

    data = a.to_bytes()
    t_enc = timeit(lambda: MergeDocument(a.recipe, a.contributions).to_bytes())
    t_dec = timeit(lambda: MergeDocument.from_bytes(data))
    print()
    print("| encoding (10,000 elements) | bytes | bytes/element | encode ms | decode+validate ms |")
    print("|---|---:|---:|---:|---:|")
    print(f"| merge document | {len(data):,} | {len(data) / N:.1f} | {t_enc:.2f} | {t_dec:.2f} |")


if __name__ == "__main__":
    main()
