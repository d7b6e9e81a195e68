"""In-process cluster simulation: N full node apps in one event loop, no sockets.

Every node is the real FastAPI app (``create_app``) with its own data directory, SQLite file,
object store, replica core and gossip driver; its outgoing ``httpx.AsyncClient`` goes through
:class:`SimNetwork`, which routes each request by host name (``http://n7``) to that node's app
over ``httpx.ASGITransport``. The network can cut directed links and count bytes.

The gossip timer is off (``extra={"gossip_loop": False}``): :meth:`Simulation.round` makes every
node tick once, concurrently, then waits (bounded) until every exchange and object fetch those
ticks caused has finished, so rounds are counted exactly. Time seen by the replica core is a
virtual clock advanced by one gossip interval per round.

Used by ``tests/node/test_replication_inprocess.py`` and ``bench/replication_bench.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save

from node.app import create_app
from node.settings import Settings

SECRET = "simulation-cluster-secret-0123456789"
LAYOUT = {"a.weight": (8, 4), "b.weight": (4,), "c.weight": (6, 2)}


def model_bytes(seed: int) -> bytes:
    """A tiny safetensors file (deterministic per seed)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return save({n: rng.standard_normal(s, dtype=np.float32) for n, s in LAYOUT.items()})


@contextlib.contextmanager
def shared_route_compilation():
    """Compile each FastAPI route once for all node apps of a simulation.

    FastAPI builds a route's dependency and validation state lazily, per app, on the first
    request (~15 ms per route, ~0.5 s per node app); with 100 apps that alone would take
    most of a minute. Every node app is built from the same module-level routers with the same
    prefixes, so the compiled state is identical; this memoises it by route and path. Each node
    is still a complete, separate app with its own state. A no-op if FastAPI's internals differ.
    """
    from fastapi import routing

    ctx_cls = getattr(routing, "_EffectiveRouteContext", None)
    original = getattr(ctx_cls, "from_api_route", None)
    if original is None:
        yield
        return
    cache: dict[tuple[int, str], Any] = {}

    def memo(cls: Any, *, original_route: Any, include_context: Any) -> Any:
        key = (id(original_route), include_context.path_for(original_route))
        if key not in cache:
            cache[key] = original.__func__(
                cls, original_route=original_route, include_context=include_context
            )
        return cache[key]

    ctx_cls.from_api_route = classmethod(memo)  # type: ignore[union-attr]
    try:
        yield
    finally:
        ctx_cls.from_api_route = original  # type: ignore[union-attr]


class SimNetwork:
    """Routes requests by host to ASGI apps; can cut directed links; counts bytes."""

    def __init__(self) -> None:
        self.apps: dict[str, httpx.ASGITransport] = {}
        self.cut: set[tuple[str, str]] = set()
        self.drop_paths: set[str] = set()
        self.requests = 0
        self.bytes = 0

    def transport(self, src: str) -> httpx.AsyncBaseTransport:
        return _NodeTransport(self, src)

    def partition(self, *groups: Sequence[str]) -> None:
        """Cut every link, both ways, between nodes of different groups."""
        for g, h in itertools.combinations(groups, 2):
            for x, y in itertools.product(g, h):
                self.cut |= {(x, y), (y, x)}


class _NodeTransport(httpx.AsyncBaseTransport):
    def __init__(self, net: SimNetwork, src: str) -> None:
        self.net = net
        self.src = src

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        dst = request.url.host
        app = self.net.apps.get(dst)
        if app is None or (self.src, dst) in self.net.cut:
            raise httpx.ConnectError(f"{self.src} -> {dst}: unreachable", request=request)
        if any(p in request.url.path for p in self.net.drop_paths):
            raise httpx.ConnectError(f"{self.src} -> {dst}: dropped", request=request)
        self.net.requests += 1
        response = await app.handle_async_request(request)
        body = await response.aread()
        self.net.bytes += len(request.content) + len(body)
        return httpx.Response(
            response.status_code, headers=response.headers, content=body, request=request
        )


@dataclass
class SimNode:
    name: str
    app: Any
    client: httpx.AsyncClient

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    @property
    def replication(self) -> Any:
        return self.app.state.replication


@dataclass
class Simulation:
    """N nodes; use as ``async with Simulation(tmp, n) as sim: ...``."""

    workdir: Path
    n: int
    merges: bool = False
    seed: int = 0
    interval: float = 1.0
    #: "full": every node is given every other (ids and URLs); "ring": node i is configured
    #: with node i+1's URL only and learns the rest by hello and peer exchange
    topology: str = "full"
    nodes: list[SimNode] = field(default_factory=list)
    net: SimNetwork = field(default_factory=SimNetwork)
    now: float = 0.0
    rounds: int = 0

    async def __aenter__(self) -> Simulation:
        self._stack = contextlib.AsyncExitStack()
        await self._stack.__aenter__()
        self._stack.enter_context(shared_route_compilation())
        rng = random.Random(self.seed)
        for i in range(self.n):
            name = f"n{i}"
            settings = Settings(
                data_dir=self.workdir / name,
                host=name,
                port=80,
                advertise_url=f"http://{name}",
                replica_id=name,
                cluster_secret=SECRET,
                merge_enabled=self.merges,
                merge_debounce_s=0.0,
                gossip_interval_s=self.interval,
                peers=(f"http://n{(i + 1) % self.n}",) if self.topology == "ring" else (),
                peer_exchange=self.topology == "ring",
                log_json=False,
                extra={"gossip_loop": False},
            ).validated()
            client = httpx.AsyncClient(transport=self.net.transport(name), timeout=30)
            await self._stack.enter_async_context(client)
            app = create_app(settings, http=client)
            await self._stack.enter_async_context(app.router.lifespan_context(app))
            self.net.apps[name] = httpx.ASGITransport(app)
            node = SimNode(name, app, client)
            node.replication.clock = lambda: self.now
            node.replication.rng = random.Random(rng.getrandbits(64))
            self.nodes.append(node)
        # "configuration": every node knows every other node's id and URL
        for node in self.nodes if self.topology == "full" else ():
            rep = node.replication
            for other in self.nodes:
                if other is not node:
                    rep.directory.learn(other.name, f"http://{other.name}", configured=True)
            rep._sync_core_peers()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)

    # -- client operations ------------------------------------------------------------------
    def api(self, i: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=self.net.apps[self.nodes[i].name], base_url=f"http://{self.nodes[i].name}"
        )

    async def push(self, i: int, merge: str, data: bytes) -> str:
        async with self.api(i) as c:
            r = await c.post(f"/v1/merges/{merge}/contributions", content=data)
            r.raise_for_status()
            return str(r.json()["root"])

    async def put_object(self, i: int, data: bytes) -> str:
        async with self.api(i) as c:
            r = await c.post("/v1/objects", content=data)
            r.raise_for_status()
            return str(r.json()["root"])

    async def set_recipe(self, i: int, merge: str, recipe: dict[str, Any]) -> None:
        async with self.api(i) as c:
            (await c.put(f"/v1/merges/{merge}/recipe", json=recipe)).raise_for_status()

    async def remove(self, i: int, merge: str, root: str) -> None:
        async with self.api(i) as c:
            (await c.delete(f"/v1/merges/{merge}/contributions/{root}")).raise_for_status()

    async def status(self, i: int, merge: str) -> dict[str, Any] | None:
        async with self.api(i) as c:
            r = await c.get(f"/v1/merges/{merge}")
            return r.json() if r.status_code == 200 else None

    # -- rounds -----------------------------------------------------------------------------
    async def round(self, timeout: float = 60.0) -> None:
        """Every node ticks once; wait until the exchanges and fetches it caused are done."""
        self.rounds += 1
        self.now += self.interval
        await asyncio.gather(*(n.replication.round() for n in self.nodes))
        await self.quiesce(timeout)

    async def quiesce(self, timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await asyncio.gather(
                *(n.replication.quiesce(max(0.1, deadline - loop.time())) for n in self.nodes)
            )
            fetches = [t for n in self.nodes for t in n.replication.fetcher._inflight.values()]
            if not fetches and not any(n.replication._tasks for n in self.nodes):
                return
            if loop.time() > deadline:
                raise TimeoutError("simulation did not quiesce")
            if fetches:
                await asyncio.wait(fetches, timeout=max(0.1, deadline - loop.time()))

    def digests(self, merge: str) -> set[bytes]:
        return {n.runtime.replica.state.get(merge).digest() for n in self.nodes}

    def live(self, i: int, merge: str) -> set[bytes]:
        return set(self.nodes[i].runtime.replica.state.get(merge).live_roots())

    def metadata_converged(self, merge: str, expected_live: set[bytes]) -> bool:
        return len(self.digests(merge)) == 1 and self.live(0, merge) == expected_live

    def objects_complete(self, roots: set[bytes]) -> bool:
        return all(n.runtime.store.has(r) for n in self.nodes for r in roots)


def log2_bound(n: int) -> int:
    """The goal: metadata converges within ceil(log2 N) + 3 rounds."""
    return math.ceil(math.log2(n)) + 3


async def converge_from_random_pushes(
    workdir: Path,
    n: int,
    *,
    pushes: int = 5,
    seed: int = 0,
    notices: bool = False,
    max_rounds: int = 60,
) -> dict[str, Any]:
    """Push ``pushes`` contributions to random nodes, then run rounds until every node has the
    same digest (metadata) and every object (transfer). ``notices=False`` drops the eager
    change notices, measuring anti-entropy alone."""
    rng = random.Random(seed)
    async with Simulation(workdir, n, seed=seed) as sim:
        if not notices:
            sim.net.drop_paths.add("/v1/replication/messages")
        roots = set()
        for k in range(pushes):
            roots.add(bytes.fromhex(await sim.push(rng.randrange(n), "sim", model_bytes(k))))
        await sim.quiesce()
        sim.net.drop_paths.clear()
        sim.now += 10 * sim.interval  # failed notices' backoff has expired
        bytes_before = sim.net.bytes
        meta_rounds = obj_rounds = None
        for r in range(1, max_rounds + 1):
            await sim.round()
            if meta_rounds is None and sim.metadata_converged("sim", roots):
                meta_rounds = r
            if meta_rounds is not None and sim.objects_complete(roots):
                obj_rounds = r
                break
        return {
            "n": n,
            "metadata_rounds": meta_rounds,
            "object_rounds": obj_rounds,
            "requests": sim.net.requests,
            "bytes": sim.net.bytes - bytes_before,
            "bad_chunks": sum(x.replication.fetcher.stats.bad_chunks for x in sim.nodes),
            "roots": roots,
        }
