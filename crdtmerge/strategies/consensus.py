"""Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information for
Improved Model Merging and Compression"), as in FusionBench ``consensus_*``.

With task vectors ``tau_t = x_t - base`` and the multi-task vector
``tau_MTL = sum_t w_t tau_t`` (weights default 1, the paper's plain sum):

1. **TALL mask** per contribution: ``m_t = |tau_t| > tall_mask_lambda_t * |tau_MTL - tau_t|``
   (strict ``>`` as in the reference code; ``tall_mask_lambda`` per contribution, default 0.6,
   the paper picks it from 0.2-0.6 on validation data -- we have none).
2. **Consensus mask**: positions where at least ``k`` (default 2) TALL masks agree; entries
   used by fewer tasks ("selfish" or "catastrophic" weights) are removed.
3. The merged task vector of the underlying method is multiplied by the consensus mask and
   added to the base:
   - ``consensus_ta``: task arithmetic (``lambda`` default 1, ``normalize`` default false);
   - ``consensus_ties``: TIES (``density``, ``sign_method``, ``normalize`` default true,
     ``rescale``, all as in ``ties`` with ``trim_scope="tensor"``).

Choice: the TALL masks always use the (weighted) task-arithmetic sum as ``tau_MTL`` and the
mask is applied to the merged vector (after ``lambda``), as in the paper's consensus
definition; FusionBench's per-task TALL-mask models (one per task, chosen by task id) are not a
single merged model and are not offered.
"""

from __future__ import annotations

import torch

from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask
from .ties import DENSITY, LAMBDA, RESCALE_FALSE, SIGN_METHOD, normalize_param

__all__ = ["CONSENSUS_TA", "CONSENSUS_TIES", "SPECS", "consensus_mask"]


def consensus_mask(task: TensorTask, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Positions kept by at least ``k`` TALL masks (bool)."""
    weighted = [d * w if w != 1.0 else d for d, w in zip(deltas, task.weights, strict=True)]
    mtl = sp.ordered_sum(weighted)
    votes = torch.zeros(mtl.shape, dtype=torch.int32)
    for d, mp in zip(deltas, task.model_params, strict=True):
        lam = float(mp["tall_mask_lambda"])
        other = (mtl - d).abs_()
        if lam != 1.0:
            other *= lam
        votes += d.abs() > other
    return votes >= int(task.params["k"])


def _merge(task: TensorTask, consensus: str | None) -> torch.Tensor:
    base, deltas = sp.base_and_deltas(task)
    keep = consensus_mask(task, deltas)
    if consensus is not None:
        for i, d in enumerate(deltas):
            mask = sp.magnitude_mask(d, float(task.model_params[i]["density"]))
            sp.apply_mask(d, mask, "l1" if task.params["rescale"] else None)
    mixed = sp.combine(
        None,
        deltas,
        task.weights,
        consensus=consensus,
        normalize=bool(task.params["normalize"]),
        lambda_=float(task.params["lambda"]),
    )
    mixed.masked_fill_(~keep, 0.0)
    return mixed.add_(base)


def consensus_ta(task: TensorTask) -> torch.Tensor:
    return _merge(task, None)


def consensus_ties(task: TensorTask) -> torch.Tensor:
    return _merge(task, str(task.params["sign_method"]))


TALL_LAMBDA = ParamSpec(
    "tall_mask_lambda",
    float,
    0.6,
    scope="model",
    doc="TALL mask: keep |tau_t| > lambda * |tau_MTL - tau_t|",
    minimum=0.0,
)
K = ParamSpec("k", int, 2, doc="minimum number of agreeing TALL masks", minimum=0)

CONSENSUS_TA = StrategySpec(
    name="consensus_ta",
    version=1,
    summary="task arithmetic restricted to positions where >= k TALL masks agree",
    merge=consensus_ta,
    params=(TALL_LAMBDA, K, LAMBDA, normalize_param(False)),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2405.07813",),
)

CONSENSUS_TIES = StrategySpec(
    name="consensus_ties",
    version=1,
    summary="TIES restricted to positions where >= k TALL masks agree",
    merge=consensus_ties,
    params=(
        TALL_LAMBDA,
        K,
        DENSITY,
        LAMBDA,
        normalize_param(True),
        RESCALE_FALSE,
        SIGN_METHOD,
    ),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2405.07813", "https://arxiv.org/abs/2306.01708"),
)

SPECS: tuple[StrategySpec, ...] = (CONSENSUS_TA, CONSENSUS_TIES)
