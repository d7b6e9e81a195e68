"""``crdtmerge keygen`` and ``crdtmerge trust``: contributor signing keys.

- ``crdtmerge keygen PATH`` writes an Ed25519 private key to ``PATH`` (PKCS#8 PEM, mode 0600)
  and its public key to ``PATH.pub`` (64 hex), refusing to overwrite either, and prints the
  public key. Contributors keep ``PATH`` and push with ``crdtmerge push --sign PATH``.
- ``crdtmerge trust URL --merge NAME KEY`` (``--remove`` to stop trusting) adds the public key
  (64 hex or a ``.pub``/PEM file) to the merge's replicated trusted-key set; it needs the
  admin token (``--token`` or ``$CRDTMERGE_TOKEN``). While a merge has trusted keys, only
  contributions signed by one of them are accepted and merged.

See :mod:`crdtmerge.signing` for what is signed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["register", "signed_metadata"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keygen`` and ``trust`` verbs."""
    p = subparsers.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing contributions",
        description="Write PATH (private key, PEM, mode 0600) and PATH.pub (public key, hex).",
    )
    p.add_argument("path", metavar="PATH", help="where to write the private key")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_keygen)

    p = subparsers.add_parser(
        "trust",
        help="trust (or stop trusting) a signing key for a merge on a node (admin)",
    )
    p.add_argument("url", metavar="URL", help="the node, e.g. http://127.0.0.1:8470")
    p.add_argument("--merge", required=True, metavar="NAME", help="the merge's name")
    p.add_argument("key", metavar="KEY", help="public key: 64 hex, or a .pub / PEM file")
    p.add_argument("--remove", action="store_true", help="stop trusting the key")
    p.add_argument("--token", help="admin Bearer token (default: $CRDTMERGE_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout (s)")
    p.set_defaults(func=run_trust)


def signed_metadata(path: Path, key_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The merge-relevant metadata of ``path`` signed with the key in ``key_file``.

    The tensors are hashed once (lazily, one at a time); the result (``params`` kept,
    ``signer`` and ``signature`` added) is what the upload's ``__metadata__`` must carry.
    """
    from ..identity import read_contribution_metadata
    from ..signing import load_private_key, sign_tensors
    from ..tensors import open_tensors

    key = load_private_key(key_file)
    with open_tensors(path) as source:
        manifest = sign_tensors(source, key, read_contribution_metadata(source))
    return dict(manifest.metadata)


def run_keygen(args: argparse.Namespace) -> int:
    from ..signing import generate_key, public_key_bytes, save_private_key

    key = generate_key()
    priv, pub = save_private_key(key, args.path)
    public = public_key_bytes(key).hex()
    if args.json:
        print(json.dumps({"private_key": str(priv), "public_key": public, "public_file": str(pub)}))
    else:
        print(public)
    return 0


def run_trust(args: argparse.Namespace) -> int:
    from ..client import Client
    from ..signing import load_public_key

    key = load_public_key(args.key).hex()
    token = args.token or os.environ.get("CRDTMERGE_TOKEN") or None
    with Client(args.url, token=token, timeout=args.timeout) as client:
        if args.remove:
            status = client.untrust_key(args.merge, key)
        else:
            status = client.trust_key(args.merge, key)
    if args.json:
        print(json.dumps({"merge": args.merge, "trusted_keys": status["trusted_keys"]}))
    else:
        print(f"{'removed' if args.remove else 'trusted'} {key} for merge {args.merge}")
    return 0
