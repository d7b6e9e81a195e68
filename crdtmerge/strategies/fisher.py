"""Fisher merging (Matena & Raffel, 2022), FusionBench ``fisher_merging`` semantics.

Each contribution ships its diagonal Fisher information as side tensors ``fisher:<name>`` (same
shape as ``<name>``; the mean of squared gradients, however the contributor estimated it). Per
element, with ``F_i`` the Fisher of contribution ``i`` and ``c_i`` its coefficient:

    out = sum_i c_i (F_i + m) x_i / sum_i c_i (F_i + m),     m = minimal_fisher_weight

Parameters (FusionBench's names):

- ``minimal_fisher_weight`` (default 1e-6): added to every Fisher value, so an all-zero Fisher
  degrades to the plain weighted average instead of 0/0;
- ``normalize_fisher_weight`` (default true): ``c_i`` is further multiplied by
  ``(1 / (|F_i| + m)) / sum_j (1 / (|F_j| + m))`` where ``|F_i|`` is the L2 norm of contribution
  ``i``'s Fisher over *all* tensors of the model, so a contributor whose Fisher is globally
  larger (more data, a different loss scale) does not dominate. The norms come from the engine's
  whole-model pre-pass (``observe`` returns each contribution's float64 sum of squares for the
  tensor, ``reduce`` sums them in name order and takes the square root), keeping memory
  O(contributions x largest tensor).
- per-model ``weight`` plays FusionBench's ``fisher_scaling_coefficients`` (default 1 each;
  only ratios matter, FusionBench's default 1/n gives the same result).

Tensors for which no contribution ships a Fisher are merged by the weighted average
``sum_i w_i x_i / sum_i w_i`` (FusionBench takes excluded parameters from the pretrained model;
we have no base here). A tensor for which only some contributions ship one is an error
(:class:`~crdtmerge.errors.IncompatibleInputs`): mixing Fisher-weighted and unweighted
contributions has no meaning. Fisher merging operates on full weights; a base, if named, is not
used.

Determinism: ``exact``: element-wise ``+``/``*``/``/`` in the compute dtype, in canonical order;
the norms are float64 sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import IncompatibleInputs, InvalidInput, InvalidRecipe
from . import _detmath as dm
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["SPECS"]


def _fishers(task: TensorTask) -> list[torch.Tensor] | None:
    """The contributions' Fisher tensors for this tensor, or None when none ships one."""
    sides = list(task.side) or [{} for _ in task.inputs]
    have = [("fisher" in s) for s in sides]
    if not any(have):
        return None
    if not all(have):
        missing = [i for i, h in enumerate(have) if not h]
        raise IncompatibleInputs(
            f"fisher: tensor {task.name!r}: contribution(s) at canonical position(s) {missing} "
            "ship no Fisher (fisher:<name>) while others do; every contribution needs one"
        )
    out = []
    for i, s in enumerate(sides):
        f = s["fisher"]
        if tuple(f.shape) != tuple(task.inputs[i].shape):
            raise IncompatibleInputs(
                f"fisher: tensor {task.name!r}: the Fisher of contribution {i} has shape "
                f"{tuple(f.shape)}, expected {tuple(task.inputs[i].shape)}"
            )
        out.append(f.to(task.inputs[i].dtype))
    return out


def _observe(task: TensorTask) -> tuple[float | None, ...] | None:
    if not task.params["normalize_fisher_weight"]:
        return None
    fishers = _fishers(task)
    if fishers is None:
        return None
    return tuple(dm.dot64(f, f) for f in fishers)


def _reduce(summaries: list[Any], params: Mapping[str, Any]) -> tuple[float, ...] | None:
    if not params.get("normalize_fisher_weight", True):
        return None
    totals: list[list[float]] | None = None
    for s in summaries:
        if s is None:
            continue
        if totals is None:
            totals = [[] for _ in s]
        for i, v in enumerate(s):
            totals[i].append(v)
    if totals is None:
        return None
    return tuple(math.sqrt(math.fsum(t)) for t in totals)


def _weighted_average(xs: Sequence[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = math.fsum(weights)
    if total == 0.0:
        raise InvalidRecipe("fisher: the weights sum to zero")
    acc = torch.tensor(weights[0], dtype=xs[0].dtype) * xs[0]
    for w, x in zip(weights[1:], xs[1:], strict=True):
        acc = acc + torch.tensor(w, dtype=x.dtype) * x
    return acc / torch.tensor(total, dtype=acc.dtype)


def _merge(task: TensorTask) -> torch.Tensor:
    xs = list(task.inputs)
    fishers = _fishers(task)
    if fishers is None:
        return _weighted_average(xs, task.weights)
    floor = float(task.params["minimal_fisher_weight"])
    coeffs = list(task.weights)
    if task.params["normalize_fisher_weight"]:
        norms = task.stats
        if norms is None or len(norms) != len(xs):
            raise InvalidInput(
                "fisher: normalize_fisher_weight needs the whole-model pre-pass "
                "(observe/reduce) to have run; got no norms"
            )
        if any(n + floor == 0.0 for n in norms):
            raise IncompatibleInputs(
                "fisher: a contribution's Fisher is zero everywhere and minimal_fisher_weight "
                "is 0; cannot normalize by its norm"
            )
        inv = [1.0 / (n + floor) for n in norms]
        inv_total = math.fsum(inv)
        coeffs = [c * v / inv_total for c, v in zip(coeffs, inv, strict=True)]
    floor_t = torch.tensor(floor, dtype=xs[0].dtype)
    cfs = [
        torch.tensor(c, dtype=x.dtype) * (f + floor_t)
        for c, f, x in zip(coeffs, fishers, xs, strict=True)
    ]
    num = cfs[0] * xs[0]
    den = cfs[0]
    for cf, x in zip(cfs[1:], xs[1:], strict=True):
        num = num + cf * x
        den = den + cf
    out = num / den
    if floor == 0.0:
        # all-zero Fisher at an element and no floor: 0/0 -> the weighted average there
        out = torch.where(den == 0, _weighted_average(xs, task.weights), out)
    return out


SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="fisher",
        version=1,
        summary="Fisher-weighted average with diagonal Fisher side tensors (fisher:<name>)",
        merge=_merge,
        params=(
            ParamSpec(
                "normalize_fisher_weight",
                bool,
                True,
                doc="divide each model's coefficient by the global L2 norm of its Fisher",
                varying=False,
            ),
            ParamSpec(
                "minimal_fisher_weight",
                float,
                1e-6,
                doc="added to every Fisher value (numerical floor)",
                minimum=0.0,
                varying=False,
            ),
        ),
        min_models=1,
        determinism="exact",
        side_inputs=("fisher",),
        observe=_observe,
        reduce=_reduce,
        references=("https://arxiv.org/abs/2111.09832", "FusionBench fisher_merging"),
    ),
)
