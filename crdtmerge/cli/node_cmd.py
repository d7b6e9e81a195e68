"""``crdtmerge node``: run a replica node (the ``node`` package is imported only when run).

Flags override ``CRDTMERGE_*`` environment variables (``CRDTMERGE_DATA_DIR``,
``CRDTMERGE_TOKEN``, ``CRDTMERGE_CLUSTER_SECRET``, ``CRDTMERGE_PEERS`` comma-separated, ...).
``python -m node`` takes the same arguments.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "node",
        help="run a replica node (REST API, storage, merge worker)",
        description="Run a crdtmerge replica node. Stops gracefully on SIGINT/SIGTERM.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="state and object store directory (CRDTMERGE_DATA_DIR)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8470)")
    p.add_argument(
        "--peer", action="append", default=None, metavar="URL", help="a peer node (repeatable)"
    )
    p.add_argument("--token", help="Bearer token required by write endpoints (CRDTMERGE_TOKEN)")
    p.add_argument("--read-token", help="Bearer token required by read endpoints")
    p.add_argument(
        "--admin-token",
        help="Bearer token for admin endpoints (trusted signing keys); default: the write token",
    )
    p.add_argument("--cluster-secret", help="shared secret of the cluster (replication)")
    p.add_argument("--replica-id", help="this replica's id (default: generated once, persisted)")
    p.add_argument("--max-body-bytes", type=int, help="largest accepted upload in bytes")
    p.add_argument("--max-header-bytes", type=int, help="largest safetensors header in bytes")
    p.add_argument("--max-tensors", type=int, help="most tensors per object")
    p.add_argument("--merge-debounce", type=float, help="seconds the digest must be stable")
    p.add_argument("--gossip-interval", type=float, help="anti-entropy period in seconds")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING ... (default INFO)")
    p.add_argument("--log-text", action="store_true", help="plain-text logs instead of JSON")


def settings_from_args(args: argparse.Namespace) -> object:
    from node.settings import Settings

    return Settings.from_env(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        peers=tuple(args.peer) if args.peer else None,
        token=args.token,
        read_token=args.read_token,
        admin_token=args.admin_token,
        cluster_secret=args.cluster_secret,
        replica_id=args.replica_id,
        max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_tensors=args.max_tensors,
        merge_debounce_s=args.merge_debounce,
        gossip_interval_s=args.gossip_interval,
        log_level=args.log_level,
        log_json=False if args.log_text else None,
    )


def run(args: argparse.Namespace) -> int:
    from node.serve import serve

    serve(settings_from_args(args))  # type: ignore[arg-type]
    return 0
