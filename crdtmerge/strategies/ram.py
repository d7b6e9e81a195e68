"""RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572), as in mergekit ``ram`` and
``ramplus_tl``.

Per tensor, an entry of task vector ``delta_i = x_i - base`` is *active* when
``|delta_i| > epsilon`` (default 1e-5); inactive entries count as 0. With ``c`` the number of
contributions active at a position:

- ``ram``: ``out = base + (sum of the active entries) / max(c, 1)`` -- an entry active in one
  contribution is taken as is, an entry active in several is their mean, an entry active in
  none keeps the base. (mergekit divides every overlapping term by ``c`` before summing; we sum
  then divide once, the same value up to rounding.)
- ``ramplus_tl`` (tensor-local RAM+): per contribution ``rho_i = shared_i / max(unique_i,
  epsilon)`` where ``shared_i``/``unique_i`` count its active entries with ``c > 1`` / ``c == 1``
  in this tensor; its unique entries are scaled by ``1 + r * clip(rho_i, 0, alpha)`` (``r``
  default 0.1, ``alpha`` 0.2); overlapping entries are averaged as in ``ram``.

The per-contribution ``weight`` is not used (as in mergekit).
"""

from __future__ import annotations

import torch

from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["RAM", "RAMPLUS_TL", "SPECS", "ram", "ramplus_tl"]


def _active(
    task: TensorTask,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """base, zeroed deltas, activity masks, activity counts (int32)."""
    base, deltas = sp.base_and_deltas(task)
    eps = float(task.params["epsilon"])
    masks = []
    count = torch.zeros(base.shape, dtype=torch.int32)
    for d in deltas:
        active = d.abs() > eps
        d.masked_fill_(~active, 0.0)
        count += active
        masks.append(active)
    return base, deltas, masks, count


def ram(task: TensorTask) -> torch.Tensor:
    base, deltas, _, count = _active(task)
    total = sp.ordered_sum(deltas)
    total /= count.clamp(min=1).to(total.dtype)
    return total.add_(base)


def ramplus_tl(task: TensorTask) -> torch.Tensor:
    base, deltas, masks, count = _active(task)
    eps = float(task.params["epsilon"])
    r = float(task.params["r"])
    alpha = float(task.params["alpha"])
    unique = count == 1
    overlap = count > 1
    scaled: list[torch.Tensor] = []
    for d, active in zip(deltas, masks, strict=True):
        n_shared = int(torch.count_nonzero(active & overlap))
        n_unique = int(torch.count_nonzero(active & unique))
        denom = max(float(n_unique), eps)
        # no unique entries and epsilon = 0: the ratio is infinite (0/0 counts as 0)
        infinite = alpha if n_shared > 0 else 0.0
        rho = n_shared / denom if denom > 0.0 else infinite
        factor = 1.0 + r * min(max(rho, 0.0), alpha)
        scaled.append(d * factor)
    shared_mean = sp.ordered_sum(deltas)
    shared_mean /= count.clamp(min=1).to(shared_mean.dtype)
    unique_sum = sp.ordered_sum(scaled)
    return torch.where(unique, unique_sum, shared_mean).add_(base)


EPSILON = ParamSpec(
    "epsilon", float, 1e-5, doc="an entry is active when |delta| > epsilon", minimum=0.0
)

RAM = StrategySpec(
    name="ram",
    version=1,
    summary="RAM: unique active entries kept, overlapping ones averaged",
    merge=ram,
    params=(EPSILON,),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2601.13572",),
)

RAMPLUS_TL = StrategySpec(
    name="ramplus_tl",
    version=1,
    summary="RAM+ (tensor-local): unique entries boosted by the shared/unique ratio",
    merge=ramplus_tl,
    params=(
        EPSILON,
        ParamSpec("r", float, 0.1, doc="boost rate of unique entries", minimum=0.0),
        ParamSpec("alpha", float, 0.2, doc="clip of the shared/unique ratio", minimum=0.0),
    ),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2601.13572",),
)

SPECS: tuple[StrategySpec, ...] = (RAM, RAMPLUS_TL)
