"""Spool a streamed request body to a file without blocking the event loop.

The event loop appends chunks to a batch and hands full batches (4 MiB) to a writer thread
through a bounded queue, so receiving from the socket and writing to the disk overlap, and at
most ``depth`` batches (16 MiB by default) wait in memory: when the disk is slower than the
network the producer awaits (backpressure reaches the client through TCP). A write error is
raised, as the ``OSError`` it was, from the next :meth:`Spool.write` or from :meth:`close`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from pathlib import Path
from typing import BinaryIO

__all__ = ["Spool"]

BATCH = 4 << 20


class Spool:
    """Write an async stream of chunks to ``path`` through one writer thread."""

    def __init__(self, f: BinaryIO, depth: int = 4, batch: int = BATCH) -> None:
        self._f = f
        self._batch = batch
        self._buf = bytearray()
        self._queue: queue.Queue[bytearray | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._finished = asyncio.Event()
        self._closed = False
        threading.Thread(target=self._run, name="crdtmerge-spool", daemon=True).start()

    @classmethod
    async def open(cls, path: Path, depth: int = 4) -> Spool:
        f = await asyncio.to_thread(open, path, "wb")
        return cls(f, depth)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._error is None:  # after an error, keep draining so the producer never hangs
                try:
                    self._f.write(item)
                except BaseException as exc:
                    self._error = exc
        try:
            self._f.close()
        except BaseException as exc:
            self._error = self._error or exc
        self._loop.call_soon_threadsafe(self._finished.set)

    async def _put(self, item: bytearray | None) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            await asyncio.to_thread(self._queue.put, item)

    async def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._buf += chunk
        if len(self._buf) >= self._batch:
            data, self._buf = self._buf, bytearray()
            await self._put(data)

    async def close(self) -> None:
        """Flush, wait for the writer, and raise its error if it had one."""
        if not self._closed:
            self._closed = True
            if self._buf:
                data, self._buf = self._buf, bytearray()
                await self._put(data)
            await self._put(None)
        await self._finished.wait()
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        """Stop and close the file (its error, if any, is dropped: the caller is failing)."""
        self._buf = bytearray()
        if not self._closed:
            self._closed = True
            await self._put(None)
        await self._finished.wait()
