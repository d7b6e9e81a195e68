"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks").

Follows mergekit ``breadcrumbs`` / ``breadcrumbs_ties`` (sparsifier ``magnitude_outliers``): per
contribution and tensor of ``n`` entries ranked by ``|delta|`` (ties by flat index, see
``_sparsify.topk_mask``), drop the largest ``n_top = int(gamma * n)`` (outliers; the paper calls
this fraction beta) and the smallest ``n_bot = n - int(density * n) - n_top``; when
``n_bot < 0`` fewer top entries are dropped so that ``int(density * n)`` remain (so with the
default ``density = 1`` nothing is dropped, whatever ``gamma``). ``rescale`` (default false):
L1-norm matching. Selection uses two radix selects instead of mergekit's full sort (and has no
off-by-slice at ``n_top = 0``, fixed in mergekit 0.1.5 too).

Then generalized task arithmetic (see ``ties``): ``breadcrumbs`` sums ``w_i * delta_i``;
``breadcrumbs_ties`` adds sign election (``sign_method``) and the disjoint merge; both have
``normalize`` default **false**; ``* lambda``, ``+ base``.
"""

from __future__ import annotations

import torch

from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask
from .ties import DENSITY, LAMBDA, RESCALE_FALSE, SIGN_METHOD, gta_merge, normalize_param

__all__ = ["BREADCRUMBS", "BREADCRUMBS_TIES", "SPECS", "breadcrumbs", "breadcrumbs_ties"]


def _prune(task: TensorTask, i: int, delta: torch.Tensor) -> torch.Tensor:
    density = float(task.model_params[i]["density"])
    gamma = float(task.model_params[i]["gamma"])
    mask = sp.outlier_mask(delta, density, gamma)
    return sp.apply_mask(delta, mask, "l1" if task.params["rescale"] else None)


def breadcrumbs(task: TensorTask) -> torch.Tensor:
    return gta_merge(task, _prune, None)


def breadcrumbs_ties(task: TensorTask) -> torch.Tensor:
    return gta_merge(task, _prune, str(task.params["sign_method"]))


GAMMA = ParamSpec(
    "gamma",
    float,
    0.01,
    scope="model",
    doc="fraction of the largest-|delta| entries dropped as outliers",
    minimum=0.0,
    maximum=1.0,
)

BREADCRUMBS = StrategySpec(
    name="breadcrumbs",
    version=1,
    summary="Model Breadcrumbs: drop outliers and small entries, then task arithmetic",
    merge=breadcrumbs,
    params=(DENSITY, GAMMA, LAMBDA, normalize_param(False), RESCALE_FALSE),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2312.06795",),
)

BREADCRUMBS_TIES = StrategySpec(
    name="breadcrumbs_ties",
    version=1,
    summary="Model Breadcrumbs masks, then TIES election and disjoint merge",
    merge=breadcrumbs_ties,
    params=(DENSITY, GAMMA, LAMBDA, normalize_param(False), RESCALE_FALSE, SIGN_METHOD),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2312.06795", "https://arxiv.org/abs/2306.01708"),
)

SPECS: tuple[StrategySpec, ...] = (BREADCRUMBS, BREADCRUMBS_TIES)
