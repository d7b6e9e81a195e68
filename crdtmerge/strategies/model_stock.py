"""Model Stock (Jang et al., 2024, arXiv:2403.19522), mergekit ``model_stock`` semantics.

Per tensor, with base ``b`` and ``N >= 2`` contributions ``x_i``: offsets ``d_i = x_i - b``;
the cosine of every pair ``(i, j), i < j`` is ``sum(d_i d_j) / max(|d_i| |d_j|, 1e-6)`` clamped
to [-1, 1]; they are aggregated into one ``cos``; then

    t = N cos / (1 + (N - 1) cos),    out = t * mean(x_i) + (1 - t) * b.

``aggregation`` chooses how the pairwise values are combined, a question the paper leaves open
for ``N > 2`` (mergekit issue #453):

- ``"cosine"`` (default, mergekit): the mean of the pairwise cosines;
- ``"angle"`` (FusionBench and the paper's authors): the mean of the pairwise angles, then its
  cosine. For ``N = 2`` both agree up to rounding.

``filter_wise`` (mergekit, default false): one ``t`` per row (per vector along the last
dimension; a 1-D tensor is one row) instead of one per tensor.

Deviations and edge cases: where ``|1 + (N - 1) cos| < 1e-6`` (``t`` undefined) the base is
returned for that tensor/row, as mergekit 0.1.5 does; ``t`` may be negative or exceed 1 when the
offsets point apart (as in mergekit). Per-model ``weight`` is ignored (the method has none);
``mean(x_i)`` is the plain mean summed in canonical order. Identical contributions are returned
unchanged (the formula gives ``t = 1`` and their mean, which is ``x`` only up to rounding).

Determinism: ``exact``: float64 sums for the dot products and norms, angles from
:mod:`._detmath`, plain ``*``/``+`` for the output in the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import InvalidRecipe
from . import _detmath as dm
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["SPECS"]

_NORM_FLOOR = 1e-6
_DENOM_EPS = 1e-6


def stock_t(cos: torch.Tensor, n: int) -> torch.Tensor:
    """``N cos / (1 + (N-1) cos)`` in float64; 0 (keep the base) where the denominator is ~0."""
    denom = 1.0 + (n - 1) * cos
    bad = torch.abs(denom) < _DENOM_EPS
    safe = torch.where(bad, torch.ones_like(denom), denom)
    return torch.where(bad, torch.zeros_like(denom), n * cos / safe)


def _merge(task: TensorTask) -> torch.Tensor:
    base = task.base
    if base is None:
        raise InvalidRecipe("model_stock needs a base model")
    xs = list(task.inputs)
    if base.numel() == 0:
        return base.clone()
    if all(torch.equal(xs[0], x) for x in xs[1:]):
        return xs[0].clone()  # t = 1 and mean = x, up to rounding
    rows, width = _grid(task, base.shape)
    b2 = base.reshape(rows, width)
    x2 = [x.reshape(rows, width) for x in xs]
    tiles = [lambda r0, r1, c0, c1, x=x: x[r0:r1, c0:c1] for x in x2]
    out = torch.empty_like(b2)
    _stock(task, lambda r0, r1, c0, c1: b2[r0:r1, c0:c1], tiles, out, base.dtype)
    return out.reshape(base.shape)


def _merge_stored(task: TensorTask) -> torch.Tensor:
    """:func:`_merge` from the stored inputs, tile by tile: each tile is upcast on the way and
    the result written in the output dtype (the same elementwise operations and the same
    fixed-order sums, so the same bits)."""
    st = task.stored
    assert st is not None
    if st.base is None:
        raise InvalidRecipe("model_stock needs a base model")
    if st.base.numel() == 0:
        return torch.empty(st.shape, dtype=st.out_dtype)
    if all(torch.equal(st.inputs[0], x) for x in st.inputs[1:]):
        st.check(None)  # returned without reading the base; the others equal input 0
        st.check(0)
        return st.inputs[0].to(st.dtype).to(st.out_dtype).view(st.shape)
    rows, width = _grid(task, st.shape)
    out = torch.empty(rows, width, dtype=st.out_dtype)
    tiles = [st.tile(i, rows, width) for i in range(len(st.inputs))]
    _stock(task, st.tile(None, rows, width), tiles, out, st.dtype)
    return out.view(st.shape)


def _grid(task: TensorTask, shape: Sequence[int]) -> tuple[int, int]:
    """``rows x width`` of the per-row (``filter_wise``) or per-tensor ``t``."""
    n = math.prod(shape)
    if bool(task.params["filter_wise"]):
        width = shape[-1] if len(shape) >= 1 else 1
        return n // width, width
    return 1, n


Tile = Callable[[int, int, int, int], torch.Tensor]


def _stock(
    task: TensorTask, base: Tile, xs: Sequence[Tile], out: torch.Tensor, dtype: torch.dtype
) -> None:
    """Model Stock of ``rows x width`` inputs given as tile readers (of the compute ``dtype``),
    written into the ``rows x width`` ``out``."""
    n = len(xs)
    rows, width = out.shape
    pairs = [(i, j) for i in range(n) for j in range(i, n)]

    def offsets(r0: int, r1: int, c0: int, c1: int) -> list[torch.Tensor]:
        b = base(r0, r1, c0, c1)
        return [x(r0, r1, c0, c1) - b for x in xs]

    # row-wise float64 dot products of the offsets d_i = x_i - b, all pairs in one pass
    gram = dm.rowgram64(offsets, n, pairs, rows, width)
    cos = _aggregate_cos({pair: gram[p] for p, pair in enumerate(pairs)}, n, rows, task)
    _blend(stock_t(cos, n), base, xs, out, dtype)


def _aggregate_cos(
    gram: dict[tuple[int, int], torch.Tensor], n: int, rows: int, task: TensorTask
) -> torch.Tensor:
    """The aggregated cosine per row (float64), from the pairwise cosines of the offsets."""
    aggregation = str(task.params["aggregation"])
    norms = [torch.sqrt(gram[(i, i)]) for i in range(n)]
    total = torch.zeros(rows, dtype=torch.float64)
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            cos = gram[(i, j)] / (norms[i] * norms[j]).clamp(min=_NORM_FLOOR)
            cos = torch.clamp(cos, -1.0, 1.0)
            total = total + (dm.acos(cos) if aggregation == "angle" else cos)
            pairs += 1
    mean = total / pairs
    return dm.cos(mean) if aggregation == "angle" else mean


def _blend(
    t: torch.Tensor, base: Tile, xs: Sequence[Tile], out: torch.Tensor, dtype: torch.dtype
) -> None:
    """``t * mean(x_i) + (1 - t) * b`` per row in ``dtype``, tile by tile, into ``out``.

    The same elementwise operations in the same order as on whole tensors (so the same bits),
    accumulated in the output itself (or, for another output dtype, in one reused tile that
    is then cast into it).
    """
    t_c = t.to(dtype).unsqueeze(-1)
    one_minus_t = (1.0 - t).to(dtype).unsqueeze(-1)
    count = torch.tensor(float(len(xs)), dtype=dtype)
    rows, width = out.shape
    tiles = dm.tiles2d(rows, width)
    scratch = None
    if out.dtype != dtype:
        scratch = torch.empty(max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles), dtype=dtype)
    for r0, r1, c0, c1 in tiles:
        target = out[r0:r1, c0:c1]
        acc = target if scratch is None else scratch[: target.numel()].view(target.shape)
        torch.add(xs[0](r0, r1, c0, c1), xs[1](r0, r1, c0, c1), out=acc)
        for x in xs[2:]:
            acc += x(r0, r1, c0, c1)
        acc /= count
        acc *= t_c[r0:r1]
        acc += one_minus_t[r0:r1] * base(r0, r1, c0, c1)
        if scratch is not None:
            target.copy_(acc)


SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="model_stock",
        version=1,
        summary="Model Stock: interpolate base->average by the geometry of the fine-tunes",
        merge=_merge,
        params=(
            ParamSpec("filter_wise", bool, False, doc="one t per row instead of per tensor"),
            ParamSpec(
                "aggregation",
                str,
                "cosine",
                doc="combine pairwise cosines (mergekit) or pairwise angles (paper authors)",
                choices=("cosine", "angle"),
            ),
        ),
        needs_base=True,
        min_models=2,
        determinism="exact",
        references=("https://arxiv.org/abs/2403.19522", "https://github.com/arcee-ai/mergekit"),
        merge_stored=_merge_stored,
    ),
)
