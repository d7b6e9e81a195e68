"""Node benchmark: upload/download throughput on loopback vs a plain file copy, the node's
memory during a large upload, and the time from the last push to a ready merged hash.

Everything is measured in the same run against its peer:

- **upload**: ``Client.push`` of one safetensors file as a contribution to a merge without a
  recipe (streamed body; the node writes it to a temporary file, validates, hashes, fsyncs and
  renames it, then commits the OR-Set add) vs ``shutil.copyfile`` +
  ``fsync`` of the same bytes, and vs the same client posting to a bare uvicorn ASGI app that
  only drains the body (:func:`drain_app`: the HTTP stack's own ceiling);
- **download**: ``Client.download_object`` (streamed, fsynced) vs the same copy;
- **memory**: the node's anonymous RSS (``RssAnon``) growth while receiving the upload,
  sampled every 10 ms (file-backed pages of the memory-mapped hash input are page cache);
- **time to merged hash**: ``linear`` over N contributions: from the acknowledgement of the
  last push to ``GET /v1/merges/{name}`` reporting ``ready``, vs the offline engine
  (:func:`crdtmerge.engine.merge`) on the same inputs.

Run: ``.venv/bin/python bench/node_bench.py [--size-mib 1024] [--merge-mib 128 --models 3]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crdtmerge.client import Client  # noqa: E402
from crdtmerge.engine import Contribution, merge  # noqa: E402
from crdtmerge.identity import hash_tensors  # noqa: E402
from crdtmerge.recipe import Recipe  # noqa: E402
from crdtmerge.tensors import StreamingWriter, TensorInfo, open_tensors  # noqa: E402

TOKEN = "bench-token-0123"
MiB = 1 << 20


async def drain_app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    """A bare ASGI app that reads and discards the request body (the upload baseline)."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def write_model(path: Path, total_bytes: int, seed: int, tensor_bytes: int = 64 * MiB) -> None:
    """A float32 tensor set of random N(0,1) values, written streaming."""
    n = max(1, total_bytes // tensor_bytes)
    infos = [
        TensorInfo(f"layers.{i:04d}.weight", "F32", (tensor_bytes // 4,), tensor_bytes)
        for i in range(n)
    ]
    rng = np.random.Generator(np.random.PCG64(seed))
    w = StreamingWriter(path, infos)
    for info in infos:
        w.write(info.name, rng.standard_normal(tensor_bytes // 4, dtype=np.float32).tobytes())
    w.close()


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            yield chunk


def copy_fsync(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop, self.base = pid, threading.Event(), rss(pid)
        self.peak = dict(self.base)

    def run(self) -> None:
        while not self.stop.is_set():
            for k, v in rss(self.pid).items():
                self.peak[k] = max(self.peak[k], v)
            self.stop.wait(0.01)


def start_node(data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["-m", "node", "--data-dir", str(data_dir), "--port", str(port)]
    return spawn(cmd, log, port, "/readyz")


def start_drain(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        "-m",
        "uvicorn",
        "bench.node_bench:drain_app",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return spawn(cmd, log, port, "/")


def spawn(cmd: list[str], log: Path, port: int, probe: str) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDTMERGE_")}
    env.update(PYTHONPATH=str(ROOT), CRDTMERGE_TOKEN=TOKEN, CRDTMERGE_MERGE_DEBOUNCE_S="0.05")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, *cmd], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}{probe}", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"node did not start; see {log}")
        time.sleep(0.05)  # poll interval, bounded by the deadline


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="upload/download object size")
    ap.add_argument("--merge-mib", type=int, default=128, help="size of each contribution")
    ap.add_argument("--models", type=int, default=3, help="contributions in the merge")
    ap.add_argument("--workdir", help="scratch directory (default: a temp dir, removed)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="node-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    big = work / "big.safetensors"
    print(f"writing a {args.size_mib} MiB object ...", flush=True)
    write_model(big, args.size_mib * MiB, seed=1)
    size = big.stat().st_size
    copy_s = min(copy_fsync(big, work / f"copy{i}.safetensors") for i in range(2))
    for i in range(2):
        (work / f"copy{i}.safetensors").unlink()

    drain, drain_url = start_drain(work / "drain.log")
    try:
        with Client(drain_url, timeout=600) as c:
            t0 = time.perf_counter()
            c._request("POST", "/", content=_chunks(big), headers={"content-length": str(size)})
            drain_s = time.perf_counter() - t0
    finally:
        drain.terminate()
        drain.wait(30)

    proc, url = start_node(work / "node", work / "node.log")
    try:
        sampler = Sampler(proc.pid)
        sampler.start()
        with Client(url, token=TOKEN, timeout=600) as c:
            t0 = time.perf_counter()
            up = c.push("upload", big)
            upload_s = time.perf_counter() - t0
            sampler.stop.set()
            sampler.join()
            t0 = time.perf_counter()
            c.download_object(up.root, work / "down.safetensors")
            download_s = time.perf_counter() - t0
            assert (work / "down.safetensors").stat().st_size == size
            (work / "down.safetensors").unlink()
            anon_growth = sampler.peak["RssAnon"] - sampler.base["RssAnon"]

            # time to merged hash
            paths = []
            for i in range(args.models):
                p = work / f"ft{i}.safetensors"
                write_model(p, args.merge_mib * MiB, seed=100 + i, tensor_bytes=16 * MiB)
                paths.append(p)
            c.set_recipe("bench", Recipe("linear", 1, {}))
            for p in paths[:-1]:
                c.push("bench", p)
            # wait for the intermediate merge to settle so we time only the last change
            deadline = time.monotonic() + 600
            while c.status("bench")["state"] not in ("ready", "failed"):
                if time.monotonic() > deadline:
                    raise SystemExit("intermediate merge did not finish")
                time.sleep(0.02)  # poll interval, bounded by the deadline
            c.push("bench", paths[-1])
            t_push = time.perf_counter()
            while (st := c.status("bench"))["state"] != "ready":
                if st["state"] == "failed" or time.monotonic() > deadline:
                    raise SystemExit(f"merge failed: {st}")
                time.sleep(0.01)  # poll interval, bounded by the deadline
            to_ready_s = time.perf_counter() - t_push
            merged = st["merged_hash"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    contribs = [Contribution(hash_tensors(p).root, open_tensors(p), {}) for p in paths]
    t0 = time.perf_counter()
    offline = merge(Recipe("linear", 1, {}), contribs, out=work / "offline.safetensors")
    offline_s = time.perf_counter() - t0
    assert offline.root.hex() == merged, "node and offline engine disagree"

    mb = size / 1e6
    print()
    print(f"object size                     {size / MiB:.0f} MiB")
    print(f"plain copy + fsync              {copy_s:.2f} s  ({mb / copy_s:.0f} MB/s)")
    print(
        f"upload (validate, hash, fsync)  {upload_s:.2f} s  ({mb / upload_s:.0f} MB/s)"
        f"  = {copy_s / upload_s:.2f}x copy"
    )
    print(
        f"bare uvicorn drain, same client {drain_s:.2f} s  ({mb / drain_s:.0f} MB/s)"
        f"  node upload = {drain_s / upload_s:.2f}x drain"
    )
    print(
        f"download (streamed, fsync)      {download_s:.2f} s  ({mb / download_s:.0f} MB/s)"
        f"  = {copy_s / download_s:.2f}x copy"
    )
    print(
        f"node RssAnon growth in upload   {anon_growth / MiB:.1f} MiB (body {size / MiB:.0f} MiB)"
    )
    print(f"node peak VmRSS                 {sampler.peak['VmRSS'] / MiB:.0f} MiB")
    print(
        f"last push -> merged hash ready  {to_ready_s:.2f} s  "
        f"(linear, {args.models} x {args.merge_mib} MiB; offline engine {offline_s:.2f} s)"
    )
    print(f"merged hash                     {merged} (= offline engine)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
