"""ExPO: model extrapolation (Zheng et al., 2024, "Weak-to-Strong Extrapolation Expedites
Alignment"), FusionBench ``expo`` semantics.

With the base ``b`` as the weaker (e.g. SFT) model and the contributions as the stronger
(aligned) ones:

    m = sum_i w_i x_i / sum_i w_i,     out = m + extrapolation_factor * (m - b)

i.e. keep going in the direction the alignment moved the weights. FusionBench's
``extrapolation_factor`` (its example config uses 0.1; the paper sweeps about 0.1-0.5) is the
paper's alpha. FusionBench takes one aligned model, or simple-averages several first; we take
the weighted average (per-model ``weight``, default 1 = FusionBench's simple average). A
negative factor interpolates back towards the base.

Determinism: ``exact`` (plain ``*``, ``+``, ``-``, ``/`` in canonical order).
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidRecipe
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["SPECS"]


def _merge(task: TensorTask) -> torch.Tensor:
    base = task.base
    if base is None:
        raise InvalidRecipe("expo needs a base model (the model to extrapolate away from)")
    xs = list(task.inputs)
    weights = task.weights
    total = math.fsum(weights)
    if total == 0.0:
        raise InvalidRecipe("expo: the weights sum to zero")
    m = torch.tensor(weights[0], dtype=xs[0].dtype) * xs[0]
    for w, x in zip(weights[1:], xs[1:], strict=True):
        m = m + torch.tensor(w, dtype=x.dtype) * x
    m = m / torch.tensor(total, dtype=m.dtype)
    alpha = torch.tensor(float(task.params["extrapolation_factor"]), dtype=m.dtype)
    return m + alpha * (m - base)


SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="expo",
        version=1,
        summary="ExPO: extrapolate the (weighted mean of the) contributions away from the base",
        merge=_merge,
        params=(
            ParamSpec(
                "extrapolation_factor",
                float,
                0.1,
                doc="alpha in m + alpha (m - base)",
            ),
        ),
        needs_base=True,
        min_models=1,
        determinism="exact",
        references=("https://arxiv.org/abs/2404.16792", "FusionBench expo"),
    ),
)
