"""The upload spool: batches reach the file in order; write errors surface as the OSError."""

from __future__ import annotations

import asyncio
import io

import pytest

from node.spool import Spool


def test_chunks_reach_the_file_in_order(tmp_path):
    async def go() -> None:
        spool = await Spool.open(tmp_path / "f", depth=2)
        for i in range(1000):
            await spool.write(bytes([i % 256]) * 10_000)
        await spool.close()

    asyncio.run(go())
    data = (tmp_path / "f").read_bytes()
    assert data == b"".join(bytes([i % 256]) * 10_000 for i in range(1000))


class Failing(io.RawIOBase):
    def __init__(self) -> None:
        self.calls = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def]
        self.calls += 1
        raise OSError(28, "No space left on device")


def test_a_write_error_is_raised_and_never_hangs_the_producer():
    async def go() -> None:
        spool = Spool(Failing(), depth=1, batch=10)  # type: ignore[arg-type]
        with pytest.raises(OSError, match="No space"):
            for _ in range(10_000):
                await spool.write(b"x" * 10)
            await spool.close()
        await spool.abort()

    asyncio.run(go())


def test_abort_closes_without_raising(tmp_path):
    async def go() -> None:
        spool = await Spool.open(tmp_path / "f")
        await spool.write(b"abc")
        await spool.abort()

    asyncio.run(go())
    assert (tmp_path / "f").read_bytes() == b""
