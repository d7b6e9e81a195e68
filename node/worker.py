"""The background merge worker: computes a merge's model when its live set is complete and stable.

The worker is triggered by state changes (:meth:`MergeWorker.notify`), never by requests
directly, and never blocks the event loop: the engine (CPU heavy, torch) runs in a daemon
thread, one merge at a time. For each merge it looks at a snapshot (recipe, live roots, digest):

- no recipe, or an object missing (a contribution or the base): nothing to do (status says so);
- the digest already has a merged root in SQLite (``merged`` table) and the object is in the
  store: ready, nothing to do; this is how a restart avoids recomputing;
- otherwise, once the digest has not changed for ``debounce`` seconds, run the engine into the
  store's temporary directory, publish the output atomically as a store object, and record
  ``digest -> merged root`` (fsynced). If the digest moved while the merge ran, the result is
  still recorded (it is correct for that digest) and the worker goes round again.

A deterministic failure (unsupported strategy, incompatible inputs, bad parameters) is
remembered per digest and reported in the merge status instead of being retried; an I/O error
is retried on the next change. A ``kill -9`` mid-merge leaves only a temporary file, which the
store removes at the next start; the merge is then recomputed (identically: layer 2 is a pure
function of the digest's inputs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from crdtmerge.errors import (
    CrdtMergeError,
    IncompatibleInputs,
    InvalidInput,
    UnsupportedStrategy,
)

if TYPE_CHECKING:
    from .runtime import NodeRuntime

__all__ = ["MergeOutcome", "MergeWorker", "run_in_daemon_thread"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: failures that depend only on the inputs, so retrying the same digest cannot help
_DETERMINISTIC = (UnsupportedStrategy, IncompatibleInputs, InvalidInput)
#: seconds before a merge that failed for a transient reason (disk full ...) is retried
RETRY_S = 5.0


@dataclass(frozen=True)
class MergeOutcome:
    """What the worker knows about one digest: ``state`` is ``computing``, ``ready``,
    ``unsupported`` or ``failed`` (with ``error``/``detail``)."""

    state: str
    root: bytes | None = None
    error: str | None = None
    detail: str | None = None
    seconds: float | None = None


async def run_in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a fresh daemon thread and await its result.

    Unlike ``asyncio.to_thread`` this never holds up interpreter shutdown: a merge abandoned by
    a graceful shutdown is simply dropped (its temporary output is cleaned at the next start).
    """
    fut: Future[T] = Future()

    def target() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=target, name="crdtmerge-merge", daemon=True).start()
    return await asyncio.wrap_future(fut)


class MergeWorker:
    """One asyncio task that merges, per merge, the latest stable digest."""

    def __init__(self, runtime: NodeRuntime, *, debounce: float, enabled: bool = True) -> None:
        self._rt = runtime
        self._debounce = debounce
        self._enabled = enabled
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._changed_at: dict[str, float] = {}
        self._retry_at: dict[bytes, float] = {}  # digest -> when to retry a transient failure
        self.outcomes: dict[bytes, MergeOutcome] = {}  # digest -> outcome (in memory)
        self.current: tuple[str, bytes] | None = None  # (merge, digest) being computed

    def start(self) -> None:
        if self._enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="crdtmerge-merge-worker")
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def notify(self, merge: str) -> None:
        """A merge's state changed (local write, joined peer state, object arrived)."""
        self._changed_at[merge] = time.monotonic()
        self._wake.set()

    def outcome(self, digest: bytes) -> MergeOutcome | None:
        if self.current is not None and self.current[1] == digest:
            return MergeOutcome("computing")
        return self.outcomes.get(digest)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            delay = await self._pass()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _pass(self) -> float | None:
        """Merge what is due; return how long until the next merge becomes due (or None)."""
        next_due: float | None = None
        for name in self._rt.merge_names():
            snap = self._rt.snapshot(name)
            if snap.recipe is None or snap.digest in self.outcomes:
                continue
            if await self._rt.merged_root_for(snap.digest) is not None:
                continue
            if self._rt.missing(snap):
                continue
            now = time.monotonic()
            due = max(
                self._changed_at.get(name, 0.0) + self._debounce,
                self._retry_at.get(snap.digest, 0.0),
            )
            if now < due:
                next_due = due - now if next_due is None else min(next_due, due - now)
                continue
            await self._merge(name, snap)
            return 0.0  # look again at once: states may have moved meanwhile
        return next_due

    async def _merge(self, name: str, snap: Any) -> None:
        digest = snap.digest
        self.current = (name, digest)
        t0 = time.monotonic()
        self._rt.metrics.merges_running.set(1)
        try:
            root = await run_in_daemon_thread(self._rt.compute_merge, snap)
        except _DETERMINISTIC as exc:
            state = "unsupported" if isinstance(exc, UnsupportedStrategy) else "failed"
            self.outcomes[digest] = MergeOutcome(state, error=exc.code, detail=exc.detail)
            self._rt.metrics.merges_total.labels(result=state).inc()
            log.warning("merge %s digest %s %s: %s", name, digest.hex()[:12], state, exc.detail)
        except CrdtMergeError as exc:
            # transient (storage ...): retry this digest later
            self._retry_at[digest] = time.monotonic() + RETRY_S
            self._rt.metrics.merges_total.labels(result="error").inc()
            log.error("merge %s digest %s error: %s", name, digest.hex()[:12], exc.detail)
        except Exception:
            self._rt.metrics.merges_total.labels(result="error").inc()
            self.outcomes[digest] = MergeOutcome(
                "failed", error="internal_error", detail="the merge crashed; see the node log"
            )
            log.exception("merge %s digest %s crashed", name, digest.hex()[:12])
        else:
            seconds = time.monotonic() - t0
            await self._rt.record_merged(name, digest, root)
            self.outcomes[digest] = MergeOutcome("ready", root=root, seconds=seconds)
            self._rt.metrics.merges_total.labels(result="ready").inc()
            self._rt.metrics.merge_seconds.observe(seconds)
            log.info(
                "merged %s digest %s -> %s in %.2fs",
                name,
                digest.hex()[:12],
                root.hex()[:12],
                seconds,
                extra={"merge": name, "root": root.hex()},
            )
        finally:
            self.current = None
            self._rt.metrics.merges_running.set(0)
