"""Arcee Fusion, mergekit ``arcee_fusion`` semantics (base + exactly one contribution).

Per tensor with base ``b`` and contribution ``x`` (a 1-D tensor is one row; a matrix has one
row per leading index, softmax over the last dimension):

    importance = |x - b| * KL(p || q),   p = softmax(x_row) + 1e-8,  q = softmax(b_row) + 1e-8
    threshold  = median + 1.5 * (Q3 - Q1)      of all importance values
    out        = b + (x - b) * (importance >= threshold)

so only the entries that changed the most, in rows whose output distribution moved the most,
are taken from the contribution (a dynamic, outlier-style threshold). No parameters.

Deviations from mergekit, both for determinism:

- quantiles: mergekit sorts the importance values (a uniform random sample of 1M with
  replacement, from the global torch RNG, when the tensor is larger) and takes
  ``sorted[int(q * (n - 1))]``; we compute that order statistic *exactly* over all entries with
  ``kthvalue`` (identical to mergekit for tensors of at most 1M entries, and no RNG at all);
- the softmax and KL are computed in float64 with the basic-operation ``exp``/``log`` of
  :mod:`._detmath` (mergekit: torch's float32 kernels, whose bits depend on the CPU's
  instruction set), then rounded to the compute dtype.

Determinism: ``exact``.
"""

from __future__ import annotations

import torch

from ..errors import InvalidRecipe
from . import _detmath as dm
from .base import StrategySpec, TensorTask

__all__ = ["SPECS", "fusion_importance"]

_EPS = 1e-8
#: float64 working set per chunk of rows (elements), to bound memory on large matrices.
_CHUNK_ELEMENTS = 1 << 22


def _softmax_rows(a: torch.Tensor) -> torch.Tensor:
    a64 = a.to(torch.float64)
    e = dm.exp(a64 - a64.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def fusion_importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|x - b| * KL(softmax(x) || softmax(b))`` row-wise, in the compute dtype."""
    shape = x.shape
    width = shape[-1] if x.dim() >= 1 else 1
    x2 = x.reshape(-1, width)
    b2 = base.reshape(-1, width)
    rows = max(1, _CHUNK_ELEMENTS // max(width, 1))
    kls = []
    for start in range(0, x2.shape[0], rows):  # rows are independent: chunking bounds memory
        p = _softmax_rows(x2[start : start + rows]) + _EPS
        q = _softmax_rows(b2[start : start + rows]) + _EPS
        kls.append((p * (dm.log(p) - dm.log(q))).sum(dim=-1))
    kl = torch.cat(kls)
    return (torch.abs(x2 - b2) * kl.to(x.dtype).unsqueeze(-1)).reshape(shape)


def _order_stat(flat: torch.Tensor, q: float) -> torch.Tensor:
    k = int(q * (flat.numel() - 1)) + 1
    return torch.kthvalue(flat, k).values


def _merge(task: TensorTask) -> torch.Tensor:
    base = task.base
    if base is None:
        raise InvalidRecipe("arcee_fusion needs a base model")
    x = task.inputs[0]
    if x.numel() == 0:
        return x.clone()
    imp = fusion_importance(x, base)
    flat = imp.reshape(-1)
    q1 = _order_stat(flat, 0.25)
    med = _order_stat(flat, 0.5)
    q3 = _order_stat(flat, 0.75)
    threshold = med + torch.tensor(1.5, dtype=imp.dtype) * (q3 - q1)
    mask = (imp >= threshold).to(x.dtype)
    return base + (x - base) * mask


SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="arcee_fusion",
        version=1,
        summary="take the contribution's most important changes (|delta| x row KL outliers)",
        merge=_merge,
        needs_base=True,
        min_models=1,
        max_models=1,
        determinism="exact",
        references=("https://github.com/arcee-ai/mergekit (arcee_fusion)",),
    ),
)
