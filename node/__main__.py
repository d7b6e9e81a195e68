"""``python -m node``: the same as ``crdtmerge node``."""

from __future__ import annotations

import argparse
import sys

from crdtmerge.cli.node_cmd import add_arguments, run
from crdtmerge.errors import CrdtMergeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node", description="Run a crdtmerge node.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CrdtMergeError as exc:
        print(f"node: error: {exc.detail} [{exc.code}]", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
