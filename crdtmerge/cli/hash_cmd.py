"""``crdtmerge hash PATH``: print the Merkle root of a tensor set.

PATH is a ``.safetensors`` file, a Hugging Face directory (index + shards) or a directory with
one ``.safetensors`` file. The merge-relevant metadata is read from the file's
``__metadata__["crdtmerge"]``, as on upload, so the printed root is the one a node will give
the same file.

Output: the 64 hex characters of the root and a newline; with ``--json``,
``{"root": ..., "tensors": N, "bytes": B}``; with ``--manifest``, the whole manifest as JSON.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``hash`` verb."""
    parser = subparsers.add_parser(
        "hash",
        help="print the Merkle root of a tensor set",
        description="Print the Merkle root (object identity) of a safetensors file or "
        "Hugging Face directory.",
    )
    parser.add_argument("path", metavar="PATH", help=".safetensors file or model directory")
    parser.add_argument(
        "--json", action="store_true", help='print {"root", "tensors", "bytes"} as JSON'
    )
    parser.add_argument(
        "--manifest", action="store_true", help="print the full manifest (chunk leaves) as JSON"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Hash ``args.path`` and print the result; library errors propagate to ``cli.main``."""
    from ..identity import hash_tensors

    manifest = hash_tensors(args.path)
    if args.manifest:
        print(json.dumps(manifest.to_json(), sort_keys=True))
    elif args.json:
        summary = {
            "root": manifest.root_hex,
            "tensors": len(manifest.tensors),
            "bytes": manifest.total_bytes,
        }
        print(json.dumps(summary, sort_keys=True))
    else:
        print(manifest.root_hex)
    return 0
