"""The node runtime: owns the replica state, the object store, SQLite, the HTTP client and the
merge worker, and does all of their I/O. Routes call one runtime method each.

Write paths, in the order that keeps the promises of DESIGN §3/§5:

- **upload** (contribution or plain object): the body is streamed into a temporary file in the
  store (bytes counted against ``max_body_bytes`` -> 413, never held in memory), then, in a
  worker thread, validated as safetensors (header size, tensor count), hashed, checked against
  the merge's base (names, shapes -> 422) and published atomically in the store. Only then is
  the root added to the merge's OR-Set; the new document is committed to SQLite (fsynced)
  *before* the answer leaves (dot safety: an acknowledged add survives ``kill -9``).
- **recipe**: parsed and validated against the strategy registry, then set in the LWW register
  and committed before the answer.
- **remove**: observed-remove of a live root, committed before the answer.

All state transitions go through :class:`~node.state.ReplicaState` (the swap point for the
sans-I/O replica core) under one ``asyncio.Lock``; blocking work (SQLite, hashing, fsync, the
engine) runs in threads. After a change the runtime calls every change listener: the merge
worker, and later the gossip driver (``add_listener``), so replication can be added without
touching the write paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from crdtmerge.errors import (
    IncompatibleInputs,
    InvalidInput,
    NotFound,
    TooLarge,
)
from crdtmerge.recipe import Recipe
from crdtmerge.store import IngestLimits, ObjectStore, Prepared

from .db import Database
from .metrics import Metrics
from .settings import Settings
from .state import MergeSnapshot, Pending, ReplicaState
from .worker import MergeOutcome, MergeWorker

__all__ = ["MergeStatus", "NodeRuntime", "UploadResult", "check_merge_name", "parse_root_hex"]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ROOT_RE = re.compile(r"^[0-9a-f]{64}$")
_WRITE_BATCH = 4 << 20

ChangeListener = Callable[[str], None]


def check_merge_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InvalidInput(
            f"merge name {name!r} is invalid: use 1-128 of A-Z a-z 0-9 . _ - "
            "(starting with a letter or digit)"
        )
    return name


def parse_root_hex(root_hex: str) -> bytes:
    if not _ROOT_RE.match(root_hex):
        raise InvalidInput(f"{root_hex!r} is not a root: expected 64 lower-case hex characters")
    return bytes.fromhex(root_hex)


@dataclass(frozen=True)
class UploadResult:
    root: bytes
    created: bool
    size: int


@dataclass(frozen=True)
class MergeStatus:
    """The public view of one merge (see ``schemas.MergeStatusOut``)."""

    name: str
    recipe: Recipe | None
    contributions: tuple[bytes, ...]
    digest: bytes
    missing: tuple[bytes, ...]
    state: str  # no_recipe | incomplete | waiting | computing | ready | unsupported | failed
    merged_hash: bytes | None
    error: str | None = None
    detail: str | None = None


class NodeRuntime:
    """Everything a running node owns. Build with settings; ``await start()``/``stop()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._http = http
        self._owns_http = http is None
        self._lock = asyncio.Lock()
        self._listeners: list[ChangeListener] = []
        self.ready = False
        self.replica_id = ""
        self.epoch = 0
        self.store: ObjectStore
        self.db: Database
        self.state: ReplicaState
        self.worker: MergeWorker

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await asyncio.to_thread(s.data_dir.mkdir, parents=True, exist_ok=True)
        self.db = await asyncio.to_thread(Database.open, s.db_path)
        self.store = await asyncio.to_thread(ObjectStore.at, s.store_dir)
        self.replica_id, self.epoch = await asyncio.to_thread(
            self.db.start_incarnation, s.replica_id
        )
        docs = await asyncio.to_thread(self.db.load_documents)
        self.state = ReplicaState.load(self.replica_id, self.epoch, docs)
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))
        self.worker = MergeWorker(self, debounce=s.merge_debounce_s, enabled=s.merge_enabled)
        self._listeners.insert(0, self.worker.notify)
        self.worker.start()
        for name in self.state.names():
            self.worker.notify(name)
        self.metrics.objects.set(len(self.store.list()))
        self.ready = True
        log.info(
            "node started",
            extra={
                "replica": self.replica_id,
                "epoch": self.epoch,
                "data_dir": str(s.data_dir),
                "merges": len(self.state.names()),
            },
        )

    async def stop(self) -> None:
        self.ready = False
        await self.worker.stop()
        if self._owns_http and self._http is not None:
            await self._http.aclose()
        await asyncio.to_thread(self.db.close)
        log.info("node stopped", extra={"replica": self.replica_id})

    @property
    def http(self) -> httpx.AsyncClient:
        """The shared outgoing HTTP client (injected in tests; used by the gossip driver)."""
        assert self._http is not None
        return self._http

    def add_listener(self, listener: ChangeListener) -> None:
        """Call ``listener(merge_name)`` after every committed change of a merge."""
        self._listeners.append(listener)

    def _changed(self, name: str) -> None:
        snap = self.state.snapshot(name)
        self.metrics.live_contributions.labels(merge=name).set(len(snap.roots))
        for listener in self._listeners:
            listener(name)

    # -- reads ------------------------------------------------------------------------------

    def merge_names(self) -> list[str]:
        return self.state.names()

    def snapshot(self, name: str) -> MergeSnapshot:
        return self.state.snapshot(name)

    def missing(self, snap: MergeSnapshot) -> list[bytes]:
        """Roots the merge needs (live contributions and the base) that the store lacks."""
        needed = list(snap.roots)
        if snap.recipe is not None and snap.recipe.base is not None:
            needed.append(snap.recipe.base)
        return sorted({r for r in needed if not self.store.has(r)})

    async def merged_root_for(self, digest: bytes) -> bytes | None:
        root = await asyncio.to_thread(self.db.merged_root, digest)
        if root is not None and not self.store.has(root):
            return None
        return root

    async def status(self, name: str) -> MergeStatus:
        check_merge_name(name)
        if name not in self.state.names():
            raise NotFound(f"no merge named {name!r} on this node")
        snap = self.state.snapshot(name)
        missing = tuple(self.missing(snap))
        merged: bytes | None = None
        outcome: MergeOutcome | None = None
        if snap.recipe is None:
            state = "no_recipe"
        elif missing:
            state = "incomplete"
        elif (merged := await self.merged_root_for(snap.digest)) is not None:
            state = "ready"
        elif (outcome := self.worker.outcome(snap.digest)) is not None:
            state = outcome.state
            merged = outcome.root
        else:
            state = "waiting" if self.settings.merge_enabled else "disabled"
        return MergeStatus(
            name=name,
            recipe=snap.recipe,
            contributions=snap.roots,
            digest=snap.digest,
            missing=missing,
            state=state,
            merged_hash=merged if state == "ready" else None,
            error=outcome.error if outcome else None,
            detail=outcome.detail if outcome else None,
        )

    def contributions(self, name: str) -> list[dict[str, Any]]:
        check_merge_name(name)
        if name not in self.state.names():
            raise NotFound(f"no merge named {name!r} on this node")
        out = []
        for root in self.state.snapshot(name).roots:
            present = self.store.has(root)
            out.append(
                {
                    "root": root.hex(),
                    "present": present,
                    "size": self.store.size(root) if present else None,
                }
            )
        return out

    def object_path(self, root_hex: str) -> tuple[Path, bytes]:
        root = parse_root_hex(root_hex)
        if not self.store.has(root):
            raise NotFound(f"object {root_hex} is not in this node's store")
        return self.store.path(root), root

    def object_info(self, root_hex: str) -> dict[str, Any]:
        root = parse_root_hex(root_hex)
        return self.store.info(root)

    def object_manifest(self, root_hex: str) -> bytes:
        root = parse_root_hex(root_hex)
        if not self.store.has(root):
            raise NotFound(f"object {root_hex} is not in this node's store")
        return self.store.manifest(root).to_bytes()

    async def merged_path(self, name: str) -> tuple[Path, bytes]:
        status = await self.status(name)
        if status.merged_hash is None:
            raise NotFound(
                f"merge {name!r} has no merged model yet (state: {status.state})",
                code="not_ready",
            )
        return self.store.path(status.merged_hash), status.merged_hash

    # -- writes -----------------------------------------------------------------------------

    async def set_recipe(self, name: str, body: Any) -> MergeStatus:
        check_merge_name(name)
        recipe = Recipe.from_dict(body).validated()
        async with self._lock:
            await self._apply(self.state.set_recipe(name, recipe))
        log.info(
            "recipe set",
            extra={"merge": name, "strategy": recipe.strategy, "recipe": recipe.hash().hex()[:12]},
        )
        self._changed(name)
        return await self.status(name)

    async def add_contribution(
        self, name: str, body: AsyncIterator[bytes], content_length: int | None
    ) -> UploadResult:
        check_merge_name(name)
        prepared = await self._prepare_upload(body, content_length, kind="contribution")
        try:
            await asyncio.to_thread(self._check_compatible, name, prepared)
            created_obj = await asyncio.to_thread(self.store.commit, prepared)
        except BaseException:
            self.metrics.uploads_total.labels(kind="contribution", result="rejected").inc()
            await asyncio.to_thread(self.store.discard, prepared)
            raise
        root = prepared.root
        async with self._lock:
            pending = self.state.add(name, root)
            await self._apply(pending)
        added = pending.changed
        self.metrics.uploads_total.labels(kind="contribution", result="ok").inc()
        if created_obj:
            self.metrics.objects.inc()
        log.info(
            "contribution %s",
            "added" if added else "already live",
            extra={"merge": name, "root": root.hex()[:16], "bytes": prepared.size},
        )
        if added:
            self._changed(name)
        return UploadResult(root=root, created=added, size=prepared.size)

    async def put_object(
        self, body: AsyncIterator[bytes], content_length: int | None
    ) -> UploadResult:
        prepared = await self._prepare_upload(body, content_length, kind="object")
        try:
            created = await asyncio.to_thread(self.store.commit, prepared)
        except BaseException:
            await asyncio.to_thread(self.store.discard, prepared)
            raise
        self.metrics.uploads_total.labels(kind="object", result="ok").inc()
        if created:
            self.metrics.objects.inc()
            log.info("object stored", extra={"root": prepared.root.hex()[:16]})
            # an object may complete a merge (e.g. its base)
            for name in self.state.names():
                self._changed(name)
        return UploadResult(root=prepared.root, created=created, size=prepared.size)

    async def remove_contribution(self, name: str, root_hex: str) -> MergeStatus:
        check_merge_name(name)
        root = parse_root_hex(root_hex)
        async with self._lock:
            if name not in self.state.names() or not self.state.contains(name, root):
                raise NotFound(f"{root_hex} is not a live contribution of merge {name!r}")
            await self._apply(self.state.remove(name, root))
        log.info("contribution removed", extra={"merge": name, "root": root_hex[:16]})
        self._changed(name)
        return await self.status(name)

    async def _apply(self, pending: Pending) -> None:
        """Persist (fsynced) a transition, then make it visible. Call with the lock held."""
        if not pending.changed:
            return
        await asyncio.to_thread(self.db.save_documents, pending.encoded)
        self.state.commit(pending)
        self.metrics.state_writes_total.inc()

    async def join_document(self, name: str, remote: Any) -> bool:
        """Join a peer's document for ``name`` (replication); True if the state changed."""
        check_merge_name(name)
        async with self._lock:
            pending = self.state.join_document(name, remote)
            await self._apply(pending)
        if pending.changed:
            self._changed(name)
        return pending.changed

    # -- uploads ----------------------------------------------------------------------------

    async def _prepare_upload(
        self, body: AsyncIterator[bytes], content_length: int | None, *, kind: str
    ) -> Prepared:
        limit = self.settings.max_body_bytes
        if content_length is not None and content_length > limit:
            self.metrics.uploads_total.labels(kind=kind, result="too_large").inc()
            raise TooLarge(
                f"the upload is {content_length} bytes; this node accepts at most {limit}"
            )
        tmp = self.store.temp_path("upload")
        size = 0
        try:
            f = await asyncio.to_thread(open, tmp, "wb")
            try:
                buf = bytearray()
                async for chunk in body:
                    size += len(chunk)
                    if size > limit:
                        self.metrics.uploads_total.labels(kind=kind, result="too_large").inc()
                        raise TooLarge(f"the upload exceeds this node's limit of {limit} bytes")
                    buf += chunk
                    if len(buf) >= _WRITE_BATCH:
                        data, buf = buf, bytearray()
                        await asyncio.to_thread(f.write, data)
                if buf:
                    await asyncio.to_thread(f.write, buf)
            finally:
                await asyncio.to_thread(f.close)
            self.metrics.upload_bytes_total.inc(size)
            if content_length is not None and size != content_length:
                raise InvalidInput(
                    f"the upload ended after {size} of {content_length} announced bytes"
                )
            limits = IngestLimits(
                max_header_bytes=self.settings.max_header_bytes,
                max_tensors=self.settings.max_tensors,
            )
            return await asyncio.to_thread(self.store.prepare, tmp, limits)
        except BaseException:
            await asyncio.to_thread(_unlink, tmp)
            if kind:
                self.metrics.uploads_total.labels(kind=kind, result="rejected").inc()
            raise

    def _check_compatible(self, name: str, prepared: Prepared) -> None:
        """A contribution must have the base's tensor names and shapes (blocking)."""
        if name not in self.state.names():
            return
        recipe = self.state.snapshot(name).recipe
        if recipe is None or recipe.base is None or not self.store.has(recipe.base):
            return
        base = self.store.tensor_schema(recipe.base)
        mine = prepared.tensor_schema()
        check_against_base(base, mine)

    # -- merge worker hooks -----------------------------------------------------------------

    def compute_merge(self, snap: MergeSnapshot) -> bytes:
        """Run layer 2 for ``snap`` and publish the result in the store (blocking; a thread)."""
        from crdtmerge.engine import Contribution, merge

        assert snap.recipe is not None
        contributions = [
            Contribution(root=r, source=self.store.open(r), metadata=self.store.metadata(r))
            for r in snap.roots
        ]
        base = self.store.open(snap.recipe.base) if snap.recipe.base is not None else None
        out = self.store.temp_path("merge", suffix=".safetensors")
        try:
            result = merge(snap.recipe, contributions, base=base, out=out, threads=None)
            self.store.adopt(out, result.manifest)
        finally:
            _unlink(out)
        return result.root

    async def record_merged(self, name: str, digest: bytes, root: bytes) -> None:
        await asyncio.to_thread(self.db.record_merged, digest, name, root)


def check_against_base(
    base: dict[str, tuple[str, tuple[int, ...]]], mine: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    """Raise IncompatibleInputs unless ``mine`` has ``base``'s main tensor names and shapes.

    Side tensors (``fisher:<name>``, ``gram:<name>``) are allowed when they refer to a tensor
    of the base.
    """
    from crdtmerge.plan import split_side

    base_main, _ = split_side(list(base))
    my_main, side = split_side(list(mine))
    missing = sorted(set(base_main) - set(my_main))
    extra = sorted(set(my_main) - set(base_main))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if extra:
            parts.append(f"unexpected {_few(extra)}")
        raise IncompatibleInputs(
            "the contribution does not have the base model's tensor names: " + "; ".join(parts)
        )
    orphans = sorted(set(side) - set(base_main))
    if orphans:
        raise IncompatibleInputs(f"side tensors refer to unknown tensors {_few(orphans)}")
    for n in base_main:
        if tuple(mine[n][1]) != tuple(base[n][1]):
            raise IncompatibleInputs(
                f"tensor {n!r} has shape {list(mine[n][1])}; the base model has {list(base[n][1])}"
            )


def _few(names: list[str]) -> str:
    head = ", ".join(repr(n) for n in names[:5])
    return head + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
