"""DARE: Drop And REscale (Yu et al. 2024, "Language Models are Super Mario").

Follows mergekit ``dare_linear`` and ``dare_ties``: per contribution and tensor, each task-vector
entry is kept with probability ``density`` (keep test ``u < density`` on the contribution's
float32 uniforms ``task.rng.uniform(n, stream=task.streams[i])`` -- never torch's RNG, so every
replica draws the same mask); ``density >= 1`` keeps everything and draws nothing. Survivors are
rescaled when ``rescale`` (default true):

- ``rescale_mode="l1"`` (mergekit since 2024, PR #245, default): multiply by
  ``L1(delta) / L1(kept)`` (float64, fixed-order norms; skipped when either is < 1e-7);
- ``rescale_mode="inverse"`` (the paper, FusionBench): divide by ``density``.

Then generalized task arithmetic (see ``ties``): ``dare_linear`` sums ``w_i * delta_i``
(``normalize`` default false), ``dare_ties`` adds TIES sign election and the disjoint merge
(``normalize`` default **false**, unlike ``ties``); ``* lambda``, ``+ base``.
At density 1 both equal their undropped counterparts (``task_arithmetic`` / ``ties`` with
the same ``normalize``) bit for bit.
"""

from __future__ import annotations

import torch

from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask
from .ties import DENSITY, LAMBDA, SIGN_METHOD, gta_merge, normalize_param

__all__ = ["DARE_LINEAR", "DARE_TIES", "SPECS", "dare_linear", "dare_ties", "drop_and_rescale"]


def drop_and_rescale(task: TensorTask, i: int, delta: torch.Tensor) -> torch.Tensor:
    """Random drop of contribution ``i``'s delta with its ``density``, then the rescale rule."""
    density = float(task.model_params[i]["density"])
    if density >= 1.0:
        return delta
    rescale = str(task.params["rescale_mode"]) if task.params["rescale"] else None
    return sp.random_drop(task, i, delta, density, rescale)


def dare_linear(task: TensorTask) -> torch.Tensor:
    return gta_merge(task, drop_and_rescale, None)


def dare_ties(task: TensorTask) -> torch.Tensor:
    return gta_merge(task, drop_and_rescale, str(task.params["sign_method"]))


RESCALE_TRUE = ParamSpec(
    "rescale", bool, True, doc="rescale the survivors after the drop", varying=False
)
RESCALE_MODE = ParamSpec(
    "rescale_mode",
    str,
    "l1",
    doc="l1: match the L1 norm (mergekit); inverse: divide by density (paper)",
    choices=("l1", "inverse"),
    varying=False,
)

DARE_LINEAR = StrategySpec(
    name="dare_linear",
    version=1,
    summary="DARE random drop + rescale, then weighted task arithmetic",
    merge=dare_linear,
    params=(DENSITY, LAMBDA, normalize_param(False), RESCALE_TRUE, RESCALE_MODE),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2311.03099",),
)

DARE_TIES = StrategySpec(
    name="dare_ties",
    version=1,
    summary="DARE random drop + rescale, then TIES sign election and disjoint merge",
    merge=dare_ties,
    params=(DENSITY, LAMBDA, normalize_param(False), RESCALE_TRUE, RESCALE_MODE, SIGN_METHOD),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2311.03099", "https://arxiv.org/abs/2306.01708"),
)

SPECS: tuple[StrategySpec, ...] = (DARE_LINEAR, DARE_TIES)
