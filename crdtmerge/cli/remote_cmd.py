"""Client verbs that talk to a node: ``recipe set``, ``push``, ``status``, ``rm``, ``pull``.

Each takes the node's URL first and ``--token`` (else ``CRDTMERGE_TOKEN``); ``--json`` prints
one JSON object on stdout. ``push`` accepts a safetensors file or a Hugging Face directory; a
directory (sharded or not) is canonicalised on the client into one safetensors stream, sent
without ever being held in memory. ``pull`` writes the merged model and checks that it hashes
to the root the node reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, InvalidInput

__all__ = ["canonical_stream", "register"]

_ROOT_RE = re.compile(r"^[0-9a-f]{64}$")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser, merge: bool = True) -> None:
        p.add_argument("url", metavar="URL", help="the node, e.g. http://127.0.0.1:8470")
        if merge:
            p.add_argument("--merge", required=True, metavar="NAME", help="the merge's name")
        p.add_argument("--token", help="Bearer token (default: $CRDTMERGE_TOKEN)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--timeout", type=float, default=300.0, help="network timeout (s)")

    p = subparsers.add_parser("recipe", help="set a merge's recipe on a node")
    rsub = p.add_subparsers(dest="recipe_verb", metavar="ACTION", required=True)
    ps = rsub.add_parser("set", help="create or replace a merge's recipe")
    common(ps)
    ps.add_argument("--strategy", required=True, help="strategy name (`crdtmerge strategies`)")
    ps.add_argument("--version", type=int, default=1, help="strategy version")
    ps.add_argument(
        "--param", action="append", default=[], metavar="K=V", help="parameter (JSON value)"
    )
    ps.add_argument("--base", metavar="PATH|ROOT", help="base model: a file/dir (uploaded) or root")
    ps.add_argument("--out-dtype", help="float32, float16, bfloat16, float64")
    ps.set_defaults(func=run_recipe_set)

    p = subparsers.add_parser("push", help="upload a contribution to a merge on a node")
    common(p)
    p.add_argument("path", metavar="PATH", help="a safetensors file or Hugging Face directory")
    p.add_argument(
        "--sign",
        metavar="KEY",
        help="sign it with this Ed25519 private key file (`crdtmerge keygen`); needed when the "
        "merge has trusted keys",
    )
    p.set_defaults(func=run_push)

    p = subparsers.add_parser("status", help="show a merge's status on a node")
    common(p)
    p.set_defaults(func=run_status)

    p = subparsers.add_parser("rm", help="remove a contribution from a merge on a node")
    common(p)
    p.add_argument("root", metavar="ROOT", help="the contribution's root (64 hex)")
    p.set_defaults(func=run_rm)

    p = subparsers.add_parser("pull", help="download a merge's merged model")
    common(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=run_pull)


# -- helpers --------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from ..client import Client

    token = args.token or os.environ.get("CRDTMERGE_TOKEN") or None
    return Client(args.url, token=token, timeout=args.timeout)


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(obj, sort_keys=True))
    else:
        print(text)


class _Bar:
    """A one-line byte progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.t0 = self.last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < 0.1 and (self.total is None or self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9) / 1e6
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
            sys.stderr.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% {rate:8.1f} MB/s")
        else:
            sys.stderr.write(f"\r{self.label} {self.done / 1e6:10.1f} MB {rate:8.1f} MB/s")
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")


def _progress(label: str, total: int | None) -> _Bar | None:
    return _Bar(label, total) if sys.stderr.isatty() else None


def canonical_stream(
    path: Path, metadata: dict[str, Any] | None = None
) -> tuple[int, Iterator[bytes]]:
    """A tensor set (file or HF directory) as ONE canonical safetensors byte stream.

    Returns ``(size, chunks)``; tensors are read lazily, one at a time (never the whole model
    in memory). The merge-relevant metadata is carried over (or replaced by ``metadata``, e.g.
    a signed one); free-form labels are not.
    """
    from ..identity import read_contribution_metadata
    from ..store import file_metadata
    from ..tensors import canonical_header, open_tensors

    source = open_tensors(path)
    infos = source.infos()
    meta = read_contribution_metadata(source) if metadata is None else metadata
    header = canonical_header(infos, file_metadata(meta))
    size = 8 + len(header) + sum(i.nbytes for i in infos)

    def chunks() -> Iterator[bytes]:
        try:
            yield struct.pack("<Q", len(header)) + header
            for info in infos:
                buf = source.buffer(info.name)
                for start in range(0, len(buf), 8 << 20):
                    yield bytes(buf[start : start + (8 << 20)])
        finally:
            source.close()

    return size, chunks()


def _upload(
    client: Any, path: Path, merge: str | None, metadata: dict[str, Any] | None = None
) -> Any:
    if not path.exists():
        raise InvalidInput(f"{path}: no such file or directory")
    data: Iterator[bytes] | Path  # a file is sent as it is, by path
    if path.is_dir() or metadata is not None:
        size, data = canonical_stream(path, metadata)
    else:
        size, data = path.stat().st_size, path
    bar = _progress(f"push {path.name}", size)
    try:
        if merge is None:
            return client.put_object(data, size=size, progress=bar)
        return client.push(merge, data, size=size, progress=bar)
    finally:
        if bar:
            bar.finish()


def _status_json(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "merge": s["name"],
        "digest": s["digest"],
        "merged_hash": s["merged_hash"],
        "state": s["state"],
        "contributions": s["contributions"],
        "missing": s["missing"],
        "recipe": s["recipe"],
        "complete": s["complete"],
        "error": s.get("error"),
        "detail": s.get("detail"),
    }


def _status_text(s: dict[str, Any]) -> str:
    recipe = s["recipe"]
    lines = [
        f"merge        {s['name']}",
        f"recipe       {recipe['strategy']} v{recipe['version']} {json.dumps(recipe['params'])}"
        if recipe
        else "recipe       (none)",
        f"digest       {s['digest']}",
        f"state        {s['state']}" + (f": {s['detail']}" if s.get("detail") else ""),
        f"merged hash  {s['merged_hash'] or '-'}",
        f"contributions ({len(s['contributions'])}):",
        *(f"  {r}" for r in s["contributions"]),
    ]
    if s["missing"]:
        lines += [f"missing ({len(s['missing'])}):", *(f"  {r}" for r in s["missing"])]
    return "\n".join(lines)


# -- verbs ----------------------------------------------------------------------------------


def run_recipe_set(args: argparse.Namespace) -> int:
    from ..recipe import Recipe
    from .merge_cmd import parse_param

    params = dict(parse_param(p) for p in args.param)
    with _client(args) as client:
        base: bytes | None = None
        if args.base:
            if _ROOT_RE.match(args.base) and not Path(args.base).exists():
                base = bytes.fromhex(args.base)
            else:
                base = bytes.fromhex(_upload(client, Path(args.base), None).root)
        recipe = Recipe(args.strategy, args.version, params, base, args.out_dtype)
        status = client.set_recipe(args.merge, recipe)
    _emit(args, _status_json(status), _status_text(status))
    return 0


def run_push(args: argparse.Namespace) -> int:
    signed = None
    if args.sign:
        from .keygen_cmd import signed_metadata

        signed = signed_metadata(Path(args.path), args.sign)
    with _client(args) as client:
        result = _upload(client, Path(args.path), args.merge, signed)
    obj = {"root": result.root, "created": result.created, "size": result.size}
    if signed is not None:
        obj["signer"] = signed["signer"]
    _emit(args, obj, f"{result.root} {'added' if result.created else 'already present'}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status(args.merge)
    _emit(args, _status_json(status), _status_text(status))
    return 0


def run_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.remove(args.merge, args.root)
    _emit(args, _status_json(status), f"removed {args.root}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from ..store import hash_file

    out_dir = Path(args.out)
    out = out_dir / "model.safetensors"
    with _client(args) as client:
        bar = _progress(f"pull {args.merge}", None)
        root = client.download_merged(args.merge, out, progress=bar)
        if bar:
            bar.finish()
    actual = hash_file(out).hex()
    if actual != root:
        out.unlink(missing_ok=True)
        raise IntegrityError(
            f"the downloaded model hashes to {actual}, but the node reported {root}; "
            "nothing was kept"
        )
    _emit(args, {"root": root, "path": str(out)}, f"{root} -> {out}")
    return 0
