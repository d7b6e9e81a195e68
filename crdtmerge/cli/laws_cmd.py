"""``crdtmerge laws``: which CRDT laws a raw strategy breaks, and that the two-layer form keeps.

On small random models (made with numpy), the raw strategy used as a pairwise merge is checked
for commutativity (``m(a,b) == m(b,a)``), associativity (``m(m(a,b),c) == m(a,m(b,c))``) and
idempotency (``m(a,a) == a``), bit for bit; then the two-layer form (OR-Set union of the
contributions, one deterministic merge of the set sorted by root) is checked for the same laws
on merged roots. Exit status 0 when the two-layer form holds every law.

Example::

    crdtmerge laws --strategy ties
    crdtmerge laws --strategy linear --json --trials 5
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "laws",
        help="show which CRDT laws a raw strategy breaks and that the two-layer form keeps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--strategy", required=True, help="strategy name (or 'all')")
    p.add_argument("--version", type=int, default=None, help="strategy version (default newest)")
    p.add_argument("--trials", type=int, default=3, help="random model triples (default 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _mark(value: bool | None) -> str:
    return "n/a" if value is None else ("holds" if value else "VIOLATED")


def run(args: argparse.Namespace) -> int:
    from ..laws import check_laws
    from ..strategies import get_strategy, list_strategies
    from .strategies_cmd import table

    if args.trials < 1:
        from ..errors import InvalidInput

        raise InvalidInput("--trials must be at least 1")
    if args.strategy == "all":
        specs = list_strategies()
    else:
        specs = [get_strategy(args.strategy, args.version)]
    report: list[dict[str, Any]] = []
    for spec in specs:
        results = check_laws(spec.name, spec.version, trials=args.trials)
        report.append(
            {
                "strategy": spec.name,
                "version": spec.version,
                "laws": [r.to_json() for r in results],
            }
        )
    ok = all(law["two_layer_holds"] for entry in report for law in entry["laws"])
    if args.json:
        print(json.dumps(report if args.strategy == "all" else report[0], indent=2))
        return 0 if ok else 1
    rows = []
    for entry in report:
        for law in entry["laws"]:
            raw = _mark(law["raw_holds"])
            if law["raw_holds"] is False:
                raw += f" (max |diff| {law['raw_max_diff']:.3g})"
            rows.append(
                [
                    f"{entry['strategy']} v{entry['version']}",
                    law["law"],
                    raw,
                    _mark(law["two_layer_holds"]),
                ]
            )
    print(table(rows, ["strategy", "law", "raw pairwise merge", "two-layer (OR-Set + merge)"]))
    print(
        "\nraw: m(a,b) vs m(b,a); m(m(a,b),c) vs m(a,m(b,c)); m(a,a) vs a (bit-identical).\n"
        "two-layer: merged root of A∪B vs B∪A; (A∪B)∪C vs A∪(B∪C); S∪S vs S."
    )
    return 0 if ok else 1
