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

All state transitions belong to the sans-I/O replica core (:class:`crdtmerge.replica.Replica`):
the runtime turns requests into core events and executes the returned effects in order
(:meth:`NodeRuntime.handle`, one ``asyncio.Lock``): ``Persist``/``PersistEpoch`` are committed
to SQLite (fsynced) before the next effect, ``Ack`` answers the request, ``DigestChanged``
wakes the merge worker and the change listeners, and ``Send``/``FetchObjects`` go to the
handlers registered by the replication driver (:meth:`on_send`, :meth:`on_fetch`; without one
they are dropped). Blocking work (SQLite, hashing, fsync, the engine) runs in threads.

A replication driver needs only: ``runtime.replica`` (the core, for ``Tick`` and received
messages through :meth:`handle`), ``runtime.store`` (``read_chunk``, ``begin_partial``), the
injected ``runtime.http`` client, and :meth:`object_stored` after a fetched object completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from crdtmerge.errors import (
    IncompatibleInputs,
    IntegrityError,
    InvalidInput,
    NotFound,
    StorageError,
    TooLarge,
)
from crdtmerge.recipe import Recipe
from crdtmerge.replica import (
    Ack,
    AddContribution,
    AddTrustedKey,
    DigestChanged,
    Effect,
    Event,
    FetchObjects,
    ObjectsPresent,
    ObjectStored,
    Persist,
    PersistEpoch,
    RemoveContribution,
    RemoveTrustedKey,
    Replica,
    Send,
    SetRecipe,
)
from crdtmerge.signing import check_trusted, eligible_roots, verify_manifest
from crdtmerge.store import IngestLimits, ObjectStore, Prepared
from crdtmerge.tensors import TensorSource

from .db import Database
from .metrics import Metrics
from .settings import Settings
from .spool import Spool
from .state import MergeSnapshot, snapshot
from .worker import MergeOutcome, MergeWorker

__all__ = ["MergeStatus", "NodeRuntime", "UploadResult", "check_merge_name", "parse_root_hex"]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ROOT_RE = re.compile(r"^[0-9a-f]{64}$")
#: free disk space is checked again after every this many bytes of an upload
_DISK_CHECK_EVERY = 64 << 20

ChangeListener = Callable[[str], None]
SendHandler = Callable[[Send], None]
FetchHandler = Callable[[FetchObjects], None]


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
    peers_agreeing: tuple[str, ...] = ()
    peers_differing: tuple[str, ...] = ()
    trusted_keys: tuple[bytes, ...] = ()
    untrusted: tuple[bytes, ...] = ()  # live roots left out: not signed by a trusted key


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
        self._send_handlers: list[SendHandler] = []
        self._fetch_handlers: list[FetchHandler] = []
        # verified signer per stored root (a pure function of the root's bytes, so cacheable)
        self._signers: dict[bytes, bytes | None | IntegrityError] = {}
        self.ready = False
        self.replica_id = ""
        self.epoch = 0
        self.store: ObjectStore
        self.db: Database
        self.replica: Replica
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
        self.replica = Replica.restore(self.replica_id, self.epoch, docs)
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))
        self.worker = MergeWorker(self, debounce=s.merge_debounce_s, enabled=s.merge_enabled)
        self._listeners.insert(0, self.worker.notify)
        self.worker.start()
        objects = await asyncio.to_thread(self.store.list)
        await self.handle(ObjectsPresent(frozenset(objects)))
        for name in self.merge_names():
            self.worker.notify(name)
        self.metrics.objects.set(len(objects))
        self.ready = True
        log.info(
            "node started",
            extra={
                "replica": self.replica_id,
                "epoch": self.epoch,
                "data_dir": str(s.data_dir),
                "merges": len(self.merge_names()),
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
    def owns_http(self) -> bool:
        """True when the node made its own outgoing client, i.e. it talks to real peers over
        the network (tests inject an in-process client instead)."""
        return self._owns_http

    @property
    def http(self) -> httpx.AsyncClient:
        """The shared outgoing HTTP client (injected in tests; used by the gossip driver)."""
        assert self._http is not None
        return self._http

    def add_listener(self, listener: ChangeListener) -> None:
        """Call ``listener(merge_name)`` when a merge's digest or completeness changed."""
        self._listeners.append(listener)

    def on_send(self, handler: SendHandler) -> None:
        """Deliver the core's ``Send`` effects (best effort; must not block)."""
        self._send_handlers.append(handler)

    def on_fetch(self, handler: FetchHandler) -> None:
        """Deliver the core's ``FetchObjects`` effects (must not block)."""
        self._fetch_handlers.append(handler)

    # -- the driver -------------------------------------------------------------------------

    async def handle(self, event: Event) -> list[Ack]:
        """Feed one event to the replica core and execute its effects in order.

        Returns the ``Ack`` effects (for local requests). Raises what the core raises (bad
        request, bad peer message: nothing changed) or StorageError if a Persist fails: the
        remaining effects, including the Ack, are not executed and the core goes back to the
        state it had before the event (:meth:`Replica.revert`), so what is not on disk is
        never gossiped.
        """
        async with self._lock:
            return await self._apply(event)

    async def _apply(self, event: Event) -> list[Ack]:
        """:meth:`handle` for a caller that already holds the lock."""
        before = self.replica.state
        effects = self.replica.handle(event)
        try:
            return await self._execute(effects)
        except StorageError:
            self.replica.revert(before)
            raise

    async def _execute(self, effects: list[Effect]) -> list[Ack]:
        acks: list[Ack] = []
        for effect in effects:
            if isinstance(effect, Persist):
                await asyncio.to_thread(self.db.save_documents, dict(effect.documents))
                self.metrics.state_writes_total.inc()
            elif isinstance(effect, PersistEpoch):
                await asyncio.to_thread(self.db.set_meta, "epoch", str(effect.epoch))
                self.epoch = effect.epoch
                log.warning("stale incarnation detected: moved to epoch %d", effect.epoch)
            elif isinstance(effect, Ack):
                acks.append(effect)
            elif isinstance(effect, DigestChanged):
                self._changed(effect.merge)
            elif isinstance(effect, Send):
                for send in self._send_handlers:
                    send(effect)
            elif isinstance(effect, FetchObjects):
                for fetch in self._fetch_handlers:
                    fetch(effect)
        return acks

    async def object_stored(self, root: bytes) -> None:
        """An object became complete in the store (upload, merge output, replication)."""
        await self.handle(ObjectStored(root))

    def _changed(self, name: str) -> None:
        self.metrics.live_contributions.labels(merge=name).set(len(self.snapshot(name).roots))
        for listener in self._listeners:
            listener(name)

    # -- reads ------------------------------------------------------------------------------

    def merge_names(self) -> list[str]:
        return self.replica.state.names()

    def snapshot(self, name: str) -> MergeSnapshot:
        return snapshot(self.replica.state, name)

    def missing(self, snap: MergeSnapshot) -> list[bytes]:
        """Roots the merge needs (live contributions and the base) that the store lacks."""
        return self.replica.missing_roots(snap.name)

    async def merged_root_for(self, digest: bytes) -> bytes | None:
        root = await asyncio.to_thread(self.db.merged_root, digest)
        if root is not None and not self.store.has(root):
            return None
        return root

    async def status(self, name: str) -> MergeStatus:
        check_merge_name(name)
        if name not in self.replica.state:
            raise NotFound(f"no merge named {name!r} on this node")
        core = self.replica.status(name)
        snap = self.snapshot(name)
        missing = core.missing_roots
        untrusted: list[bytes] = []
        if snap.trusted_keys and not missing:
            _, untrusted = eligible_roots(snap.roots, snap.trusted_keys, self.signer_of)
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
            peers_agreeing=core.peers_agreeing,
            peers_differing=core.peers_differing,
            trusted_keys=snap.trusted_keys,
            untrusted=tuple(untrusted),
        )

    def signer_of(self, root: bytes) -> bytes | None:
        """The verified signer of a stored object, None if unsigned (blocking; cached).

        Raises:
            IntegrityError: the object's signature does not verify.
        """
        if root not in self._signers:
            try:
                self._signers[root] = verify_manifest(self.store.manifest(root))
            except IntegrityError as exc:
                self._signers[root] = exc
        signer = self._signers[root]
        if isinstance(signer, IntegrityError):
            raise signer
        return signer

    def contributions(self, name: str) -> list[dict[str, Any]]:
        check_merge_name(name)
        if name not in self.replica.state:
            raise NotFound(f"no merge named {name!r} on this node")
        out = []
        for root in self.snapshot(name).roots:
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
        await self.handle(SetRecipe(name, recipe))
        log.info(
            "recipe set",
            extra={"merge": name, "strategy": recipe.strategy, "recipe": recipe.hash().hex()[:12]},
        )
        return await self.status(name)

    async def add_contribution(
        self, name: str, body: AsyncIterator[bytes], content_length: int | None
    ) -> UploadResult:
        check_merge_name(name)
        prepared = await self._prepare_upload(body, content_length, kind="contribution")
        try:
            await asyncio.to_thread(self._check_compatible, name, prepared)
            check_trusted(prepared.manifest, self.replica.state.get(name).live_keys())
            created_obj = await asyncio.to_thread(self.store.commit, prepared)
        except BaseException:
            self.metrics.uploads_total.labels(kind="contribution", result="rejected").inc()
            await asyncio.to_thread(self.store.discard, prepared)
            raise
        root = prepared.root
        await self.object_stored(root)
        async with self._lock:
            # every acknowledged add mints a fresh dot, even for a root that is live here:
            # a remove of the same root on the far side of a partition has not seen that dot,
            # so this add wins over it (add-wins; found by the Jepsen-lite run, seed
            # 1412824649). The answer still says whether the root was new to this replica.
            added = root not in self.replica.state.get(name).contributions
            await self._apply(AddContribution(name, root))
        self.metrics.uploads_total.labels(kind="contribution", result="ok").inc()
        if created_obj:
            self.metrics.objects.inc()
        log.info(
            "contribution %s",
            "added" if added else "already live",
            extra={"merge": name, "root": root.hex()[:16], "bytes": prepared.size},
        )
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
        await self.object_stored(prepared.root)  # it may complete a merge (e.g. its base)
        return UploadResult(root=prepared.root, created=created, size=prepared.size)

    async def remove_contribution(self, name: str, root_hex: str) -> MergeStatus:
        check_merge_name(name)
        root = parse_root_hex(root_hex)
        acks = await self.handle(RemoveContribution(name, root))
        if not acks or not acks[0].changed:
            raise NotFound(f"{root_hex} is not a live contribution of merge {name!r}")
        log.info("contribution removed", extra={"merge": name, "root": root_hex[:16]})
        return await self.status(name)

    async def add_trusted_key(self, name: str, key: bytes) -> MergeStatus:
        """Trust ``key`` to sign contributions to ``name`` (admin; replicated, add-wins)."""
        check_merge_name(name)
        await self.handle(AddTrustedKey(name, key))
        log.info("trusted key added", extra={"merge": name, "key": key.hex()[:16]})
        return await self.status(name)

    async def remove_trusted_key(self, name: str, key: bytes) -> MergeStatus:
        """Stop trusting ``key`` (observed-remove; a concurrent re-add on a peer wins)."""
        check_merge_name(name)
        acks = await self.handle(RemoveTrustedKey(name, key))
        if not acks or not acks[0].changed:
            raise NotFound(f"{key.hex()} is not a trusted key of merge {name!r}")
        log.info("trusted key removed", extra={"merge": name, "key": key.hex()[:16]})
        return await self.status(name)

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
        try:
            self.check_disk(content_length or 0)
        except StorageError:
            self.metrics.uploads_total.labels(kind=kind, result="no_space").inc()
            raise
        tmp = self.store.temp_path("upload")
        size = 0
        checked = 0
        t0 = time.perf_counter()
        try:
            spool = await Spool.open(tmp)  # a writer thread: socket and disk overlap
            try:
                async for chunk in body:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"the upload exceeds this node's limit of {limit} bytes")
                    if content_length is None and size - checked >= _DISK_CHECK_EVERY:
                        checked = size
                        self.check_disk(0)
                    await spool.write(chunk)
            except BaseException:
                await spool.abort()
                raise
            await spool.close()
            self.metrics.upload_bytes_total.inc(size)
            if content_length is not None and size != content_length:
                raise InvalidInput(
                    f"the upload ended after {size} of {content_length} announced bytes"
                )
            limits = IngestLimits(
                max_header_bytes=self.settings.max_header_bytes,
                max_tensors=self.settings.max_tensors,
            )
            t1 = time.perf_counter()
            prepared = await asyncio.to_thread(self.store.prepare, tmp, limits)
            log.info(
                "upload received",
                extra={
                    "kind": kind,
                    "root": prepared.root.hex()[:16],
                    "bytes": size,
                    "receive_s": round(t1 - t0, 3),
                    "verify_s": round(time.perf_counter() - t1, 3),
                    "canonical": prepared.canonical,
                },
            )
            return prepared
        except OSError as exc:  # disk full or I/O error while receiving: 507, nothing kept
            await asyncio.to_thread(_unlink, tmp)
            self.metrics.uploads_total.labels(kind=kind, result="no_space").inc()
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StorageError(
                f"cannot receive the upload: {exc.strerror or exc}",
                code="insufficient_storage" if full else "storage_error",
            ) from exc
        except BaseException as exc:
            await asyncio.to_thread(_unlink, tmp)
            result = "too_large" if isinstance(exc, TooLarge) else "rejected"
            self.metrics.uploads_total.labels(kind=kind, result=result).inc()
            raise

    def check_disk(self, incoming: int) -> None:
        """Refuse (507) ``incoming`` more bytes if they would leave less than
        ``min_free_bytes`` free on the store's filesystem."""
        free = shutil.disk_usage(self.settings.store_dir).free
        reserve = self.settings.min_free_bytes
        if free - incoming < reserve:
            raise StorageError(
                f"not enough disk space: {free} bytes free, {incoming} more announced, and "
                f"this node keeps {reserve} free; free some space or raise the limit",
                code="insufficient_storage",
            )

    def _check_compatible(self, name: str, prepared: Prepared) -> None:
        """A contribution must have the base's tensor names and shapes (blocking)."""
        recipe = self.snapshot(name).recipe
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
        # the replicated state decides, not arrival order: with trusted keys, only roots
        # signed by one of them count (the digest covers the keys, see crdtmerge.signing)
        roots, left_out = eligible_roots(snap.roots, snap.trusted_keys, self.signer_of)
        if snap.roots and not roots:
            raise InvalidInput(
                f"none of the {len(left_out)} contribution(s) of merge {snap.name!r} is "
                "signed by a trusted key",
                code="no_trusted_contribution",
            )
        sources: list[TensorSource] = []
        out = self.store.temp_path("merge", suffix=".safetensors")
        try:
            contributions = []
            for r in roots:
                sources.append(self.store.open(r))
                contributions.append(Contribution(r, sources[-1], self.store.metadata(r)))
            base = None
            if snap.recipe.base is not None:
                base = self.store.open(snap.recipe.base)
                sources.append(base)
            result = merge(snap.recipe, contributions, base=base, out=out)
            self.store.adopt(out, result.manifest)
        finally:
            for src in sources:
                src.close()
            _unlink(out)
        return result.root

    async def record_merged(self, name: str, digest: bytes, root: bytes) -> None:
        """Remember ``digest -> merged root`` (fsynced), so a restart does not recompute."""
        await asyncio.to_thread(self.db.record_merged, digest, name, root)
        await self.object_stored(root)


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
