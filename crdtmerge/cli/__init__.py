"""The ``crdtmerge`` command line.

Each verb lives in its own module under ``crdtmerge.cli`` and exports ``register(subparsers)``,
which adds a sub-parser whose ``func(args) -> int`` runs the verb. The table below is literal:
nothing is discovered by scanning. Errors from the library are printed as one clear line (or a
JSON object with ``--json``) and give a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..errors import CrdtMergeError

__all__ = ["main"]

# verb modules, in the order `crdtmerge --help` lists them
_VERB_MODULES = (
    "hash_cmd",
    "strategies_cmd",
    "merge_cmd",
    "laws_cmd",
    "node_cmd",
    "remote_cmd",
    "keygen_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="crdtmerge",
        description="Replicated, deterministic model merging.",
    )
    parser.add_argument("--version", action="version", version=f"crdtmerge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for modname in _VERB_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{modname}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{modname}":
                continue  # verb not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except CrdtMergeError as exc:
        if getattr(args, "json", False):
            print(json.dumps(exc.to_json()))
        else:
            print(f"crdtmerge: error: {exc.detail} [{exc.code}]", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def console() -> NoReturn:
    """The ``crdtmerge`` command: :func:`main`, then a quick exit.

    Tearing the interpreter down after torch is imported takes ~0.5 s here (torch unregisters
    its operator libraries, modules are collected): a third of a small merge's time. Every
    command has closed (and, for outputs, fsynced and renamed) what it wrote before
    :func:`main` returns, so the process only flushes its standard streams and leaves with
    ``os._exit``.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach the reader
            code = code or 1
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
