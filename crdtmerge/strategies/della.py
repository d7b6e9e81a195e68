"""DELLA: magnitude-ranked stochastic drop (Deep et al. 2024, "DELLA-Merging").

Follows mergekit ``della`` / ``della_linear`` (sparsifier ``della_magprune``):

- per row (the last dimension; a 1-D tensor is one row; tensors of rank > 2 are flattened to
  ``(-1, last dim)`` -- mergekit ranks along dim 1), rank ``|delta|`` ascending (ties by index
  ascending; mergekit: argsort order), ``r = rank / (cols - 1)`` in [0, 1], and keep each entry
  with probability ``p = density - epsilon + 2 * epsilon * r`` (the smallest gets
  ``density - epsilon``, the largest ``density + epsilon``). A one-element row gets
  ``p = density`` (mergekit divides 0 by 0 there);
- keep test ``u < p`` on contribution ``i``'s float32 uniforms from ``task.rng`` with stream
  ``task.streams[i]`` (never torch's RNG); ``density >= 1`` keeps everything, draws nothing;
- ``density - epsilon`` must be > 0 and ``density + epsilon`` < 1 when ``density < 1``
  (mergekit raises the same error);
- ``rescale`` (default true): ``rescale_mode="l1"`` (mergekit) matches the L1 norm of the kept
  entries to the original's per tensor; ``"inverse"`` (the paper) divides each survivor by its
  own keep probability ``p``.

Then generalized task arithmetic (see ``ties``): ``della`` elects signs (``sign_method``, default
``sum``) with the disjoint merge and ``normalize`` default **true**; ``della_linear`` sums
``w_i * delta_i`` with ``normalize`` default false; ``* lambda``, ``+ base``.

Ranking is one stable row-wise sort (mergekit: two argsorts per row).
"""

from __future__ import annotations

import torch

from ..errors import InvalidRecipe
from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask
from .dare import RESCALE_TRUE
from .ties import DENSITY, LAMBDA, SIGN_METHOD, gta_merge, normalize_param

__all__ = ["DELLA", "DELLA_LINEAR", "SPECS", "della", "della_linear", "magprune"]


def magprune(task: TensorTask, i: int, delta: torch.Tensor) -> torch.Tensor:
    """DELLA's rank-dependent random drop of contribution ``i``'s delta, then the rescale."""
    density = float(task.model_params[i]["density"])
    epsilon = float(task.model_params[i]["epsilon"])
    if density >= 1.0:
        return delta
    if not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise InvalidRecipe(
            f"tensor {task.name!r}: della needs 0 < density - epsilon and density + epsilon < 1, "
            f"got density={density}, epsilon={epsilon}; lower epsilon"
        )
    rescale = str(task.params["rescale_mode"]) if task.params["rescale"] else None
    return sp.rank_drop(task, i, delta, density, epsilon, rescale)


def della(task: TensorTask) -> torch.Tensor:
    return gta_merge(task, magprune, str(task.params["sign_method"]))


def della_linear(task: TensorTask) -> torch.Tensor:
    return gta_merge(task, magprune, None)


EPSILON = ParamSpec(
    "epsilon",
    float,
    0.15,
    scope="model",
    doc="keep probabilities span density +- epsilon by magnitude rank",
    minimum=0.0,
    maximum=1.0,
)
RESCALE_MODE = ParamSpec(
    "rescale_mode",
    str,
    "l1",
    doc="l1: match the L1 norm (mergekit); inverse: divide by each keep probability (paper)",
    choices=("l1", "inverse"),
    varying=False,
)

DELLA = StrategySpec(
    name="della",
    version=1,
    summary="DELLA magnitude-ranked random drop, then TIES election and disjoint merge",
    merge=della,
    params=(
        DENSITY,
        EPSILON,
        LAMBDA,
        normalize_param(True),
        RESCALE_TRUE,
        RESCALE_MODE,
        SIGN_METHOD,
    ),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2406.11617",),
)

DELLA_LINEAR = StrategySpec(
    name="della_linear",
    version=1,
    summary="DELLA magnitude-ranked random drop, then weighted task arithmetic",
    merge=della_linear,
    params=(DENSITY, EPSILON, LAMBDA, normalize_param(False), RESCALE_TRUE, RESCALE_MODE),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2406.11617",),
)

SPECS: tuple[StrategySpec, ...] = (DELLA, DELLA_LINEAR)
