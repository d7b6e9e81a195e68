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

Ranking is one row-wise sort of packed 32-bit (value, column) keys, rows whose keys collide
sorted again exactly; the result is that of a stable sort (mergekit: two argsorts per row). The
stored path decides ``u < p`` on the generator's words against per-rank integer limits and
takes the L1 rescale's norms on the same pass as the ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InvalidRecipe
from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask
from .dare import RESCALE_TRUE, Chunk, Drop, stored_drop_merge
from .ties import DENSITY, LAMBDA, SIGN_METHOD, gta_merge, normalize_param

__all__ = ["DELLA", "DELLA_LINEAR", "SPECS", "della", "della_linear", "magprune"]


def _density_epsilon(task: TensorTask, i: int) -> tuple[float, float]:
    density = float(task.model_params[i]["density"])
    epsilon = float(task.model_params[i]["epsilon"])
    if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise InvalidRecipe(
            f"tensor {task.name!r}: della needs 0 < density - epsilon and density + epsilon < 1, "
            f"got density={density}, epsilon={epsilon}; lower epsilon"
        )
    return density, epsilon


def magprune(task: TensorTask, i: int, delta: torch.Tensor) -> torch.Tensor:
    """DELLA's rank-dependent random drop of contribution ``i``'s delta, then the rescale."""
    density, epsilon = _density_epsilon(task, i)
    if density >= 1.0:
        return delta
    rescale = str(task.params["rescale_mode"]) if task.params["rescale"] else None
    return sp.rank_drop(task, i, delta, density, epsilon, rescale)


def della(task: TensorTask) -> torch.Tensor:
    return gta_merge(task, magprune, str(task.params["sign_method"]))


def della_linear(task: TensorTask) -> torch.Tensor:
    return gta_merge(task, magprune, None)


def _stored_drop(task: TensorTask, i: int, n: int, delta_at: Chunk) -> Drop:
    """:func:`magprune` as keep bits decided row block by row block (the same ranks, the same
    uniforms, the same ``u < p`` test), with the L1 rescale's two norms taken on the same
    pass."""
    density, epsilon = _density_epsilon(task, i)
    if density >= 1.0:
        return Drop(None, n, delta_at)
    assert task.stored is not None
    shape = task.stored.shape
    cols = shape[-1] if shape else 1
    l1 = bool(task.params["rescale"])
    keep, norms = sp.rank_keep_bits(task, i, n, cols, delta_at, density, epsilon, l1=l1)
    return Drop(keep, n, delta_at, l1=l1, norms=norms)


def della_stored(task: TensorTask) -> torch.Tensor:
    return stored_drop_merge(task, str(task.params["sign_method"]), _stored_drop)


def della_linear_stored(task: TensorTask) -> torch.Tensor:
    return stored_drop_merge(task, None, _stored_drop)


def uses_stored(params: Mapping[str, Any]) -> bool:
    """The stored path covers the L1 rescale (mergekit's) and no rescale; ``inverse`` divides
    by each entry's own ``p`` and takes the whole-tensor path."""
    return (not params["rescale"] or params["rescale_mode"] == "l1") and sys.byteorder == "little"


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
    merge_stored=della_stored,
    uses_stored=uses_stored,
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
    merge_stored=della_linear_stored,
    uses_stored=uses_stored,
)

SPECS: tuple[StrategySpec, ...] = (DELLA, DELLA_LINEAR)
