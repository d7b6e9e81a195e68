"""Real uvicorn node processes killed with SIGKILL mid-merge and mid-upload, then restarted
from the same data directory: nothing partial is visible, every acknowledged contribution is
there, and the merged hash is recomputed identically (equal to the offline engine's)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crdtmerge.client import Client
from crdtmerge.engine import Contribution, merge
from crdtmerge.identity import hash_tensors
from crdtmerge.recipe import Recipe
from crdtmerge.store import ObjectStore, hash_file
from crdtmerge.tensors import open_tensors, write_tensors
from tests.models import make_finetune, make_model

pytestmark = pytest.mark.slow

TOKEN = "crash-test-token"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
    return value


class NodeProc:
    """One ``python -m node`` process on a free loopback port."""

    def __init__(self, data_dir: Path, log: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> NodeProc:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRDTMERGE_")}
        env.update(
            PYTHONPATH=str(ROOT),
            CRDTMERGE_TOKEN=TOKEN,
            CRDTMERGE_MERGE_DEBOUNCE_S="0.05",
            CRDTMERGE_LOG_JSON="true",
            **self.env,
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "node",
                    "--data-dir",
                    str(self.data_dir),
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        poll(self._ready, 60, f"node ready (log: {self.log})", interval=0.05)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def client(self) -> Client:
        return Client(self.url, token=TOKEN, timeout=60)

    def status(self, merge: str) -> dict[str, Any]:
        with self.client() as c:
            return c.status(merge)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., NodeProc]]:
    procs: list[NodeProc] = []

    def start(data_dir: Path, **env: str) -> NodeProc:
        p = NodeProc(data_dir, tmp_path / f"node-{len(procs)}.log", **env).start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill9()


LAYOUT = {f"model.layers.{i}.mlp.weight": (512, 1024) for i in range(8)}  # 16 MB / model


def test_kill9_mid_merge_and_mid_upload_then_restart(nodes, tmp_path):
    models = tmp_path / "models"
    base_t = make_model(1, LAYOUT)
    write_tensors(models / "base.safetensors", base_t)
    fts = []
    for i in range(2):
        write_tensors(models / f"ft{i}.safetensors", make_finetune(base_t, i + 1))
        fts.append(models / f"ft{i}.safetensors")
    data = tmp_path / "node"

    # 1. push, then kill -9 while the merge is computing
    a = nodes(data)
    with a.client() as c:
        base = c.put_object(models / "base.safetensors").root
        recipe = Recipe("dare_ties", 1, {"density": 0.5}, bytes.fromhex(base))
        c.set_recipe("m", recipe)
        acked = sorted(c.push("m", p).root for p in fts)
    tmp = data / "objects" / "tmp"
    poll(
        lambda: a.status("m")["state"] == "computing" and any(tmp.iterdir()),
        30,
        "the merge writing its output",
        interval=0.005,
    )
    a.kill9()

    # offline engine root for the same inputs
    contribs = [Contribution(hash_tensors(p).root, open_tensors(p), {}) for p in fts]
    expected = merge(
        recipe.validated(),
        contribs,
        base=open_tensors(models / "base.safetensors"),
        out=tmp_path / "offline.safetensors",
    ).root.hex()

    # 2. restart: the acknowledged state is there and the merge is recomputed identically
    b = nodes(data)
    assert b.status("m")["contributions"] == acked
    status = poll(lambda: (s := b.status("m"))["state"] == "ready" and s, 60, "merge ready")
    assert status["merged_hash"] == expected

    # 3. kill -9 in the middle of a streamed upload (raw socket: half the body sent)
    write_tensors(models / "ft2.safetensors", make_finetune(base_t, 3))
    body = (models / "ft2.safetensors").read_bytes()
    host, port = b.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            (
                f"POST /v1/merges/m/contributions HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[: len(body) // 2]
        )
        poll(
            lambda: any(f.stat().st_size > 0 for f in tmp.iterdir()),
            30,
            "upload bytes on disk",
        )
        b.kill9()

    # 4. restart: no partial object, the acknowledged contributions, the same merged hash
    c3 = nodes(data)
    assert list((data / "objects" / "tmp").iterdir()) == []
    status = c3.status("m")
    assert status["contributions"] == acked
    assert status["state"] == "ready" and status["merged_hash"] == expected
    c3.stop()
    # graceful SIGTERM shutdown: the lifespan ran (uvicorn then re-raises the signal)
    assert c3.proc is not None and c3.proc.returncode in (0, -signal.SIGTERM)
    assert '"msg":"node stopped"' in c3.log.read_text()
    store = ObjectStore.at(data / "objects")
    objects = store.list()
    # base, contributions, the merged model (and merges of earlier digests); never ft2
    assert {bytes.fromhex(r) for r in (base, *acked, expected)} <= set(objects)
    assert hash_tensors(models / "ft2.safetensors").root not in objects
    assert store.partials() == []
    for root in objects:  # every visible object is whole
        assert hash_file(store.path(root)) == root


def rss_kib(pid: int) -> dict[str, int]:
    """RssAnon / RssFile of a process in KiB (Linux ``/proc``)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def zeros_model(path: Path, n_tensors: int, tensor_bytes: int) -> int:
    """A safetensors file of zeros, written streaming (never whole in memory)."""
    from crdtmerge.tensors import StreamingWriter, TensorInfo

    infos = [
        TensorInfo(f"t.{i:04d}", "F32", (tensor_bytes // 4,), tensor_bytes)
        for i in range(n_tensors)
    ]
    w = StreamingWriter(path, infos)
    zeros = bytes(tensor_bytes)
    for info in infos:
        w.write(info.name, zeros)
    w.close()
    return path.stat().st_size


def test_large_upload_keeps_node_memory_bounded(nodes, tmp_path):
    """A ~200 MB upload: the node's anonymous memory grows by far less than the body."""
    import threading

    size = zeros_model(tmp_path / "big.safetensors", 50, 4 << 20)  # 200 MiB
    a = nodes(tmp_path / "node")
    assert a.proc is not None
    pid = a.proc.pid
    before = rss_kib(pid)
    peak = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = rss_kib(pid)
            for k, v in now.items():
                peak[k] = max(peak[k], v)
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with a.client() as c:
            result = c.push("big", tmp_path / "big.safetensors")  # a contribution, no recipe
    finally:
        done.set()
        sampler.join()
    assert result.created and result.size == size
    assert a.status("big")["contributions"] == [result.root]
    growth_mib = (peak["RssAnon"] - before["RssAnon"]) / 1024
    print(
        f"upload {size / 2**20:.0f} MiB: RssAnon +{growth_mib:.1f} MiB, peak VmRSS "
        f"{peak['VmRSS'] / 1024:.0f} MiB (file-backed pages are the mmap'd hash input)"
    )
    assert growth_mib < 64, f"anonymous memory grew by {growth_mib:.1f} MiB for a {size} B body"
