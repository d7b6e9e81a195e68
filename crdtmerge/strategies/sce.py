"""SCE: Select, Calculate, Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat
Models"), as in mergekit ``sce``.

Per tensor, with task vectors ``delta_i = x_i - base``:

1. **Select** (when ``select_topk < 1``): the element-wise variance across contributions
   (population variance: ``mean((delta_i - mean)^2)``, contributions summed in canonical
   order) ranks positions; ``k = int(select_topk * #positions with non-zero variance)``
   positions with the highest variance are kept (ties by flat index), all others are zeroed
   in every task vector. ``select_topk <= 0`` (or ``k = 0``) zeroes everything.
2. **Calculate**: per contribution the weight ``m_i = mean(delta_i^2)`` over the tensor
   (float64, fixed-order sum), normalised to sum 1 (uniform ``1/n`` when the total is
   < 1e-6).
3. **Erase**: TIES ``sum`` sign election on the (unweighted) selected task vectors; entries
   whose sign disagrees are erased (zeros never agree).
4. ``out = base + sum_i m_i delta_i [agree] / max(sum_i m_i [agree], 1e-6)``.

The per-contribution ``weight`` is not used (mergekit: SCE computes its own weights).
"""

from __future__ import annotations

import torch

from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["SCE", "SPECS", "sce"]


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    n = len(deltas)
    mean = sp.ordered_sum(deltas)
    mean /= n
    var: torch.Tensor | None = None
    for d in deltas:
        sq = d - mean
        sq *= sq
        var = sq if var is None else var.add_(sq)
    assert var is not None
    var /= n
    return var


def sce(task: TensorTask) -> torch.Tensor:
    base, deltas = sp.base_and_deltas(task)
    n = len(deltas)
    topk = float(task.params["select_topk"])
    if topk < 1.0:
        if topk <= 0.0:
            keep = torch.zeros(base.shape, dtype=torch.bool)
        else:
            var = _variance(deltas)
            k = int(int(torch.count_nonzero(var)) * topk)
            keep = sp.topk_mask(var, k)
        for d in deltas:
            d.masked_fill_(~keep, 0.0)
    numel = max(base.numel(), 1)
    raw = [float(sp.fixed_sum(d * d, torch.float64)) / numel for d in deltas]
    total = 0.0
    for r in raw:
        total += r
    weights = [1.0 / n] * n if abs(total) < 1e-6 else [r / total for r in raw]
    majority = sp.elect_sign(deltas, "sum")
    num: torch.Tensor | None = None
    den: torch.Tensor | None = None
    for d, w in zip(deltas, weights, strict=True):
        d.mul_(majority).clamp_(min=0.0)  # |delta| where it agrees, else 0
        share = (d > 0).to(base.dtype)
        share *= w
        d *= w
        num = d if num is None else num.add_(d)
        den = share if den is None else den.add_(share)
    assert num is not None and den is not None
    num.mul_(majority)
    num /= den.clamp_(min=1e-6)
    return num.add_(base)


SCE = StrategySpec(
    name="sce",
    version=1,
    summary="SCE (FuseChat): variance top-k select, mean-square weights, sign erase",
    merge=sce,
    params=(
        ParamSpec(
            "select_topk",
            float,
            1.0,
            doc="fraction of highest-variance positions kept (1 = all)",
            minimum=0.0,
            maximum=1.0,
        ),
    ),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2408.07990",),
)

SPECS: tuple[StrategySpec, ...] = (SCE,)
