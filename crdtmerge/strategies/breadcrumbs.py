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

import math
import sys
from collections.abc import Mapping
from typing import Any

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


def _stored(task: TensorTask, consensus: str | None) -> torch.Tensor:
    """The merge from the stored inputs (``rescale`` false): each contribution's band of kept
    ranks is found by two exact cuts over its task vector formed chunk by chunk (the same
    :class:`~._topk.Cut` s as :func:`._topk.outlier_mask` finds on the whole vector), then the
    chunks are masked and combined as :func:`gta_merge` does, written in the output dtype."""
    st = task.stored
    assert st is not None
    n = math.prod(st.shape)
    rules = [_band(task, i, n) for i in range(len(st.inputs))]

    def prune(i: int, d: torch.Tensor, start: int) -> torch.Tensor:
        rule = rules[i]
        if rule is _DROP_ALL:
            return d.zero_()
        if isinstance(rule, sp.Band):
            return rule.zero_dropped(d, start)
        return d

    return sp.stored_task_vectors(task, consensus, prune)


#: the keep rule that drops every entry
_DROP_ALL = object()


def _band(task: TensorTask, i: int, n: int) -> sp.Band | object | None:
    """Contribution ``i``'s keep rule over the stored inputs: None (keep all), ``_DROP_ALL``,
    or the band between two cuts."""
    st = task.stored
    assert st is not None
    density = float(task.model_params[i]["density"])
    gamma = float(task.model_params[i]["gamma"])
    n_top, n_bot = sp.outlier_counts(n, density, gamma)
    if n_top == 0 and n_bot == 0:
        return None
    if n - n_bot - n_top <= 0:
        return _DROP_ALL

    def delta_at(a: int, b: int) -> torch.Tensor:
        return st.input_at(i, a, b) - st.base_at(a, b)

    def sample(step: int) -> torch.Tensor:
        return st.sample(i, step) - st.sample(None, step)

    wanted = [(0, n - n_bot)] if n_bot > 0 else []
    wanted += [(0, n_top)] if n_top > 0 else []
    cuts = iter(sp.chunked_cuts(lambda a, b: (delta_at(a, b),), n, wanted, [sample]))
    lo = next(cuts) if n_bot > 0 else None  # both cuts counted in one pass
    hi = next(cuts) if n_top > 0 else None
    return sp.Band(lo=lo, hi=hi)


def breadcrumbs_stored(task: TensorTask) -> torch.Tensor:
    return _stored(task, None)


def breadcrumbs_ties_stored(task: TensorTask) -> torch.Tensor:
    return _stored(task, str(task.params["sign_method"]))


def _no_rescale(params: Mapping[str, Any]) -> bool:
    return not params["rescale"] and sys.byteorder == "little"


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
    merge_stored=breadcrumbs_stored,
    uses_stored=_no_rescale,
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
    merge_stored=breadcrumbs_ties_stored,
    uses_stored=_no_rescale,
)

SPECS: tuple[StrategySpec, ...] = (BREADCRUMBS, BREADCRUMBS_TIES)
