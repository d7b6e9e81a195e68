"""A peer that accepts a manifest request and never answers (a black-holed link) must not hold
an object's fetch for the whole request timeout when another peer holds the object.

Found by the Jepsen-lite run (docs/reliability.md): after a black-hole partition healed, one
fetch waited out the 30 s request timeout on the first peer it had asked, and the merged hash
waited for it.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import msgpack
import numpy as np
import pytest
from safetensors.numpy import save_file

from crdtmerge.store import ObjectStore, hash_file
from node.routes.replication import read_chunks
from node.transfer import ObjectFetcher


@pytest.fixture
def source(tmp_path):
    store = ObjectStore.at(tmp_path / "src")
    rng = np.random.Generator(np.random.PCG64(9))
    path = tmp_path / "obj.safetensors"
    save_file({"w": rng.standard_normal((64, 8), dtype=np.float32)}, str(path))
    root, _ = store.ingest(path)
    return store, root


def test_a_silent_peer_does_not_hold_the_manifest_for_the_request_timeout(source, tmp_path):
    src, root = source
    dest = ObjectStore.at(tmp_path / "dest")

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "silent":
            await asyncio.sleep(3600)  # accepted, never answered (black hole)
        if request.url.path.endswith("/manifest"):
            return httpx.Response(200, content=src.manifest(root).to_bytes())
        refs = [tuple(c) for c in msgpack.unpackb(request.content)["chunks"]]
        return httpx.Response(200, content=read_chunks(src, root, refs))

    async def run() -> tuple[bool, float]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        fetcher = ObjectFetcher(
            dest,
            client,
            lambda: ["http://silent", "http://good"],
            timeout=30.0,
            rng=random.Random(1),
        )
        t0 = time.monotonic()
        try:
            (task,) = fetcher.ensure([root], prefer=["http://silent"])
            ok = await asyncio.wait_for(task, 20)
        finally:
            await fetcher.close()
            await client.aclose()
        return ok, time.monotonic() - t0

    ok, seconds = asyncio.run(run())
    assert ok and dest.has(root) and hash_file(dest.path(root)) == root
    assert seconds < 10, f"the fetch waited {seconds:.1f} s on a silent peer"
