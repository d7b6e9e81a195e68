"""``crdtmerge strategies``: the registered merge strategies and their parameters.

A table on a terminal (name, version, base needed, determinism class, parameters with their
defaults, summary); ``--json`` prints every strategy's full description.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "strategies",
        help="list merge strategies, their versions and parameters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the full descriptions as JSON")
    p.set_defaults(func=run)


def _param_text(p: dict[str, Any]) -> str:
    value = "required" if p["required"] else json.dumps(p["default"])
    scope = "*" if p["scope"] == "model" else ""
    return f"{p['name']}{scope}={value}"


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A plain left-aligned text table."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..strategies import list_strategies

    described = [s.describe() for s in list_strategies()]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    rows = []
    for d in described:
        models = str(d["min_models"]) + ("+" if d["max_models"] is None else f"-{d['max_models']}")
        rows.append(
            [
                d["name"],
                str(d["version"]),
                "yes" if d["needs_base"] else "no",
                models,
                d["determinism"] + (" (global pass)" if d["global_pass"] else ""),
                " ".join(_param_text(p) for p in d["params"]),
                d["summary"],
            ]
        )
    print(table(rows, ["name", "v", "base", "models", "determinism", "params", "summary"]))
    print("\n* per-model parameter (set per contribution, the recipe's value is the default)")
    return 0
