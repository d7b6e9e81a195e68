"""Run the LAPACK/BLAS strategies on one thread.

The ``platform`` strategies (``tsv_m``, ``iso_c``, ``iso_cts``, ``regmean``) call MKL's SVD,
solve and matrix products. Two reasons to keep those calls on the calling thread alone:

- **Liveness.** In this project's CI a 256 x 160 float32 SVD through MKL's threaded ``gesdd``
  (after ``torch.set_num_threads(2)``) ran past the 300 s test timeout, twice, while the same
  tests take milliseconds here; other projects report the same class of hang of
  OpenMP-threaded LAPACK on Linux 6.19+ kernels. One thread takes the threaded path out.
- **Determinism.** A threaded factorisation's rounding depends on the thread count; with one
  thread the result no longer does (it still depends on the CPU and the MKL build, hence
  ``platform``).

``torch.set_num_threads`` is per thread for both OpenMP and MKL (it also seeds the default of
threads created later, which :func:`single_threaded` restores), so the other merge worker keeps
its own setting. The cost: an SVD uses one core instead of two; the engine's second worker
still runs another tensor meanwhile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["single_threaded"]

_R = TypeVar("_R")


def single_threaded(fn: Callable[..., _R]) -> Callable[..., _R]:
    """Decorate ``fn`` so that its torch calls run with one intra-op thread."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> _R:
        saved = torch.get_num_threads()
        if saved == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(saved)

    return wrapper
