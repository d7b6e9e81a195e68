"""A recorded history of operations, Jepsen style: invoke, then ok / fail / info.

Every client operation is two records: an ``invoke`` when the request is about to leave, and a
completion when the client learns the outcome:

- ``ok``: the node acknowledged it (the effect happened and is durable);
- ``fail``: the node definitely did not apply it (a 4xx answer such as 404 "not live");
- ``info``: the outcome is unknown (timeout, refused after sending, dropped answer): the effect
  may happen, now or later.

The nemesis records its actions the same way (process ``"nemesis"``), so the checker can see
when partitions were in force. Times are ``time.monotonic_ns()`` relative to the history's
start; :meth:`History.dump` writes JSON lines, :meth:`History.load` reads them back.

Example::

    h = History()
    op = h.invoke("w0", "add", "ab12...", node=1)
    h.complete(op, "ok")
    h.dump(path)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["History", "Op", "pairs"]

TYPES = ("invoke", "ok", "fail", "info")


@dataclass(frozen=True)
class Op:
    """One record. ``index`` is its position in the history; ``time`` is ns since start."""

    index: int
    type: str
    process: str
    f: str
    value: Any = None
    node: int | None = None
    time: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Op:
        d = json.loads(line)
        return cls(**d)


class History:
    """Thread-safe, append-only list of :class:`Op`, with monotonic timestamps."""

    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._lock = threading.Lock()
        self._t0 = time.monotonic_ns()

    def now(self) -> int:
        return time.monotonic_ns() - self._t0

    def _append(self, **kw: Any) -> Op:
        if kw["type"] not in TYPES:
            raise ValueError(f"op type {kw['type']!r}: expected one of {TYPES}")
        with self._lock:
            op = Op(index=len(self._ops), time=self.now(), **kw)
            self._ops.append(op)
            return op

    def invoke(
        self, process: str, f: str, value: Any = None, *, node: int | None = None, **extra: Any
    ) -> Op:
        return self._append(
            type="invoke", process=process, f=f, value=value, node=node, extra=extra
        )

    def complete(self, invoked: Op, type: str, value: Any = None, **extra: Any) -> Op:
        """The completion of ``invoked`` (same process, f and node); ``value`` defaults to its."""
        if type == "invoke":
            raise ValueError("a completion cannot be an invoke")
        return self._append(
            type=type,
            process=invoked.process,
            f=invoked.f,
            value=invoked.value if value is None else value,
            node=invoked.node,
            extra={**invoked.extra, **extra},
        )

    @property
    def ops(self) -> list[Op]:
        with self._lock:
            return list(self._ops)

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def dump(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for op in self.ops:
                f.write(op.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> History:
        h = cls()
        with open(path, encoding="utf-8") as f:
            h._ops = [Op.from_json(line) for line in f if line.strip()]
        return h

    @classmethod
    def of(cls, ops: list[Op]) -> History:
        h = cls()
        h._ops = list(ops)
        return h


def pairs(ops: list[Op]) -> list[tuple[Op, Op | None]]:
    """Match every invoke with its process's next completion (None if it never completed).

    A process runs one operation at a time, as in Jepsen; a second invoke by a process whose
    previous operation never completed is an error in the recorder.
    """
    open_: dict[str, Op] = {}
    out: list[tuple[Op, Op | None]] = []
    slot: dict[int, int] = {}
    for op in ops:
        if op.type == "invoke":
            if op.process in open_:
                raise ValueError(f"process {op.process!r} invoked {op.f} while busy")
            open_[op.process] = op
            slot[op.index] = len(out)
            out.append((op, None))
        else:
            inv = open_.pop(op.process, None)
            if inv is None:
                raise ValueError(f"completion without invoke: {op}")
            out[slot[inv.index]] = (inv, op)
    return out
