"""``make demo``: a 3-node cluster on loopback converging on one merged model.

What it does, in order:

1. generates a tiny base model and three fine-tunes of it (numpy, seeded: same bytes on every
   machine) under ``.demo/``;
2. starts three nodes (``python -m crdtmerge node``) on free loopback ports, each configured
   through ``CRDTMERGE_*`` variables with the other two as peers and a shared cluster secret;
3. uploads the base to node 1 and sets a TIES recipe on node 1, then pushes fine-tune *i* to
   node *i* (concurrently, to three different nodes);
4. polls every node's merge status (bounded by ``--timeout``) until all three report the same
   state digest and the same merged hash, with all three contributions live;
5. prints one line per node (digest, merged hash, seconds from the last push acknowledgement
   until that node first reported the final digest and merged hash) and stops the nodes.

``--attach URL,URL,URL`` skips step 2 and drives running nodes instead (the docker-compose
``demo`` service does this). The exit status is 0 only if the cluster converged in time.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from safetensors.numpy import save_file

from crdtmerge.client import Client, NodeUnavailable
from crdtmerge.errors import CrdtMergeError
from crdtmerge.recipe import Recipe

__all__ = ["main"]

MERGE = "demo"
LAYOUT: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (64, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.mlp.up_proj.weight": (48, 32),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.layers.1.self_attn.q_proj.weight": (32, 32),
    "model.layers.1.mlp.up_proj.weight": (48, 32),
    "model.layers.1.input_layernorm.weight": (32,),
    "model.norm.weight": (32,),
    "lm_head.weight": (64, 32),
}


def _noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


def generate_models(out: Path, n_finetunes: int = 3) -> tuple[Path, list[Path]]:
    """Write ``base.safetensors`` and ``ft{i}.safetensors`` (base + small task noise)."""
    out.mkdir(parents=True, exist_ok=True)
    base = {name: _noise(shape, 1000 + i) for i, (name, shape) in enumerate(sorted(LAYOUT.items()))}
    base_path = out / "base.safetensors"
    save_file(base, str(base_path))
    paths = []
    for k in range(1, n_finetunes + 1):
        ft = {
            name: t
            + np.float32(0.02) * (0.5 * _noise(t.shape, 7 + i) + _noise(t.shape, k * 97 + i))
            for i, (name, t) in enumerate(sorted(base.items()))
        }
        path = out / f"ft{k}.safetensors"
        save_file({n: np.ascontiguousarray(v, dtype=np.float32) for n, v in ft.items()}, str(path))
        paths.append(path)
    return base_path, paths


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class NodeProcess:
    """One spawned node: its URL, process and log file."""

    name: str
    url: str
    data_dir: Path
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crdtmerge", "node"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def node_env(
    *,
    data_dir: Path,
    port: int,
    peers: Sequence[str],
    secret: str,
    token: str,
    replica_id: str,
    gossip_interval_s: float,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment that configures one loopback node (``CRDTMERGE_*`` variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDTMERGE_")}
    env.update(
        {
            "CRDTMERGE_DATA_DIR": str(data_dir),
            "CRDTMERGE_HOST": "127.0.0.1",
            "CRDTMERGE_PORT": str(port),
            "CRDTMERGE_PEERS": ",".join(peers),
            "CRDTMERGE_CLUSTER_SECRET": secret,
            "CRDTMERGE_TOKEN": token,
            "CRDTMERGE_REPLICA_ID": replica_id,
            "CRDTMERGE_ADVERTISE_URL": f"http://127.0.0.1:{port}",
            "CRDTMERGE_GOSSIP_INTERVAL_S": str(gossip_interval_s),
            "CRDTMERGE_MERGE_DEBOUNCE_S": "0.1",
            "CRDTMERGE_LOG_JSON": "false",
            "CRDTMERGE_LOG_LEVEL": "INFO",
        }
    )
    env.update(extra or {})
    return env


def wait_ready(urls: Sequence[str], procs: Sequence[NodeProcess] = (), timeout: float = 60) -> None:
    """Poll ``/readyz`` on every node until all answer 200 (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        for p in procs:
            if p.proc is not None and p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}; see {p.log_path}")
        still = []
        for url in pending:
            try:
                with Client(url, timeout=2) as c:
                    c.health()
            except CrdtMergeError:
                still.append(url)
        pending = still
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"nodes not ready after {timeout:.0f} s: {pending}")
        if pending:
            time.sleep(0.1)  # poll interval


@dataclass
class NodeView:
    url: str
    digest: str | None = None
    merged: str | None = None
    live: int = 0
    first_seen: dict[tuple[str | None, str | None], float] = field(default_factory=dict)


def _status(url: str, token: str | None) -> dict[str, Any]:
    with Client(url, token=token, timeout=5) as c:
        return c.status(MERGE)


def poll_converged(
    urls: Sequence[str], *, token: str | None, expect_live: int, t0: float, timeout: float
) -> tuple[list[NodeView], bool]:
    """Poll every node's status until all agree on digest and merged hash (bounded)."""
    views = [NodeView(u) for u in urls]
    deadline = time.monotonic() + timeout
    while True:
        for v in views:
            try:
                st = _status(v.url, token)
            except CrdtMergeError:
                continue
            v.digest = st.get("digest")
            v.merged = st.get("merged_hash")
            contributions = st.get("contributions") or []
            v.live = contributions if isinstance(contributions, int) else len(contributions)
            v.first_seen.setdefault((v.digest, v.merged), time.monotonic() - t0)
        done = (
            all(v.merged for v in views)
            and len({(v.digest, v.merged) for v in views}) == 1
            and all(v.live == expect_live for v in views)
        )
        if done or time.monotonic() > deadline:
            return views, done
        time.sleep(0.1)  # poll interval


def print_table(views: Sequence[NodeView], names: Sequence[str], out: IO[str] = sys.stdout) -> None:
    print(f"{'node':<6} {'digest':<18} {'merged hash':<18} {'converged after':>15}", file=out)
    for name, v in zip(names, views, strict=True):
        seconds = v.first_seen.get((v.digest, v.merged))
        shown = f"{seconds:.2f} s" if seconds is not None and v.merged else "-"
        print(
            f"{name:<6} {(v.digest or '-')[:16]:<18} {(v.merged or '-')[:16]:<18} {shown:>15}",
            file=out,
        )


def run_demo(
    urls: Sequence[str],
    names: Sequence[str],
    *,
    token: str | None,
    workdir: Path,
    timeout: float,
    strategy: str = "ties",
) -> bool:
    """Set the recipe, push one fine-tune per node, wait for convergence, print the table."""
    base_path, ft_paths = generate_models(workdir / "models", n_finetunes=len(urls))
    with Client(urls[0], token=token) as c:
        base_root = c.put_object(base_path).root
        recipe = Recipe(strategy, 1, {"density": 0.5, "weight": 1.0}, bytes.fromhex(base_root))
        c.set_recipe(MERGE, recipe)
    print(f"recipe {strategy} (base {base_root[:16]}) set on {names[0]}")

    def push(i: int) -> str:
        with Client(urls[i], token=token) as c:
            return c.push(MERGE, ft_paths[i]).root

    with ThreadPoolExecutor(len(urls)) as pool:
        roots = list(pool.map(push, range(len(urls))))
    t0 = time.monotonic()
    for name, root in zip(names, roots, strict=True):
        print(f"pushed {root[:16]} to {name}")
    views, ok = poll_converged(urls, token=token, expect_live=len(urls), t0=t0, timeout=timeout)
    print()
    print_table(views, names)
    print()
    if ok:
        worst = max(v.first_seen[(v.digest, v.merged)] for v in views)
        print(f"converged: {len(urls)} nodes, same digest and merged hash after {worst:.2f} s")
        print(f"merged model hash: {views[0].merged}")
    else:
        print(f"NOT converged within {timeout:.0f} s", file=sys.stderr)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--attach", help="comma-separated URLs of running nodes (no spawning)")
    parser.add_argument("--nodes", type=int, default=3, help="nodes to spawn (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="convergence bound, seconds")
    parser.add_argument("--interval", type=float, default=0.2, help="gossip interval, seconds")
    parser.add_argument("--strategy", default="ties")
    parser.add_argument("--keep", action="store_true", help="keep the demo directory")
    args = parser.parse_args(argv)
    token = os.environ.get("CRDTMERGE_TOKEN") or "demo-token-" + secrets.token_hex(8)

    if args.attach:
        urls = [u.strip().rstrip("/") for u in args.attach.split(",") if u.strip()]
        names = [f"n{i + 1}" for i in range(len(urls))]
        with tempfile.TemporaryDirectory(prefix="crdtmerge-demo-") as tmp:
            wait_ready(urls, timeout=args.timeout)
            ok = run_demo(
                urls,
                names,
                token=token,
                workdir=Path(tmp),
                timeout=args.timeout,
                strategy=args.strategy,
            )
        return 0 if ok else 1

    root = Path(".demo").resolve()
    root.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    ports = free_ports(args.nodes)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    names = [f"n{i + 1}" for i in range(args.nodes)]
    secret = secrets.token_urlsafe(32)
    nodes = []
    for i, (name, port) in enumerate(zip(names, ports, strict=True)):
        data_dir = workdir / name
        data_dir.mkdir()
        env = node_env(
            data_dir=data_dir,
            port=port,
            peers=[u for j, u in enumerate(urls) if j != i],
            secret=secret,
            token=token,
            replica_id=name,
            gossip_interval_s=args.interval,
        )
        nodes.append(NodeProcess(name, urls[i], data_dir, env, workdir / f"{name}.log"))
    print(
        f"starting {args.nodes} nodes on 127.0.0.1 ports {ports} (gossip every {args.interval} s)"
    )
    print(f"logs and data: {workdir}")
    ok = False
    try:
        for n in nodes:
            n.start()
        wait_ready(urls, nodes, timeout=60)
        ok = run_demo(
            urls, names, token=token, workdir=workdir, timeout=args.timeout, strategy=args.strategy
        )
    except (CrdtMergeError, NodeUnavailable, RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
    finally:
        for n in nodes:
            n.stop()
        if ok and not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        print("nodes stopped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
