"""Durability helpers shared by the writers: fsync a file or a directory by path."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_path"]


def fsync_path(path: str | os.PathLike[str] | Path) -> None:
    """Flush a file's data, or a directory's entries (after a rename), to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
