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
    filter_wise = bool(task.params["filter_wise"])
    aggregation = str(task.params["aggregation"])
    shape = base.shape
    if base.numel() == 0:
        return base.clone()
    if all(torch.equal(xs[0], x) for x in xs[1:]):
        return xs[0].clone()  # t = 1 and mean = x, up to rounding
    if filter_wise:
        b2 = base.reshape(-1, shape[-1] if base.dim() >= 1 else 1)
    else:
        b2 = base.reshape(1, -1)
    x2 = [x.reshape(b2.shape) for x in xs]
    t = stock_t(_aggregate_cos(b2, x2, aggregation), len(xs))
    return _blend(t, b2, x2).reshape(shape)


def _offset_gram(b2: torch.Tensor, x2: list[torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    """Row-wise float64 dot products of the offsets ``d_i = x_i - b``: ``(i, j) -> (rows,)``.

    All the pairs (``i <= j``) in one pass over the inputs: each tile's offsets are formed in the
    compute dtype (exactly as ``x - b`` would be) and reduced by :func:`._detmath.rowgram64`, so
    the offsets never exist as whole tensors and every value equals ``rowdot64(d_i, d_j)``.
    """
    n = len(x2)
    pairs = [(i, j) for i in range(n) for j in range(i, n)]

    def load(r0: int, r1: int, c0: int, c1: int) -> list[torch.Tensor]:
        b = b2[r0:r1, c0:c1]
        return [x[r0:r1, c0:c1] - b for x in x2]

    gram = dm.rowgram64(load, n, pairs, b2.shape[0], b2.shape[1])
    return {pair: gram[p] for p, pair in enumerate(pairs)}


def _aggregate_cos(b2: torch.Tensor, x2: list[torch.Tensor], aggregation: str) -> torch.Tensor:
    """The aggregated cosine per row (float64), from the pairwise cosines of the offsets."""
    n = len(x2)
    gram = _offset_gram(b2, x2)
    norms = [torch.sqrt(gram[(i, i)]) for i in range(n)]
    total = torch.zeros(b2.shape[0], dtype=torch.float64)
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            cos = gram[(i, j)] / (norms[i] * norms[j]).clamp(min=_NORM_FLOOR)
            cos = torch.clamp(cos, -1.0, 1.0)
            total = total + (dm.acos(cos) if aggregation == "angle" else cos)
            pairs += 1
    mean = total / pairs
    return dm.cos(mean) if aggregation == "angle" else mean


def _blend(t: torch.Tensor, b2: torch.Tensor, x2: list[torch.Tensor]) -> torch.Tensor:
    """``t * mean(x_i) + (1 - t) * b`` per row, in the compute dtype, tile by tile.

    The same elementwise operations in the same order as on whole tensors (so the same bits),
    accumulated in the output itself, with one tile-sized temporary instead of five
    full-size tensors.
    """
    dtype = b2.dtype
    t_c = t.to(dtype).unsqueeze(-1)
    one_minus_t = (1.0 - t).to(dtype).unsqueeze(-1)
    count = torch.tensor(float(len(x2)), dtype=dtype)
    out = torch.empty_like(b2)
    for r0, r1, c0, c1 in dm.tiles2d(*b2.shape):
        acc = out[r0:r1, c0:c1]
        torch.add(x2[0][r0:r1, c0:c1], x2[1][r0:r1, c0:c1], out=acc)
        for x in x2[2:]:
            acc += x[r0:r1, c0:c1]
        acc /= count
        acc *= t_c[r0:r1]
        acc += one_minus_t[r0:r1] * b2[r0:r1, c0:c1]
    return out


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
    ),
)
