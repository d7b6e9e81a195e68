"""Averaging and task arithmetic: ``linear`` (model soup) and ``task_arithmetic``.

``linear`` (mergekit ``linear``; Wortsman et al. 2022, "Model soups"): the weighted sum
``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize`` (default true). There is no
base: a recipe's base object is not an input (push it as a contribution to include it). With
``normalize`` and weights summing to zero the merge is undefined and raises ``InvalidRecipe``
(mergekit would emit inf/NaN).

``task_arithmetic`` (mergekit ``task_arithmetic``; Ilharco et al. 2023, "Editing models with
task arithmetic"): ``b + lambda * sum_i w_i (x_i - b)``, divided by ``sum_i w_i`` when
``normalize`` (default **false**, as in mergekit; a weight sum with ``|sum| < 1e-8`` divides by
1). Negative weights subtract ("negate") a task. FusionBench's ``scaling_factor`` is
``lambda`` with all weights 1.

Arithmetic: compute dtype, contributions accumulated in canonical order with plain ``+`` and
``*`` (the weight multiplies each input, then the running sum adds it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import InvalidRecipe
from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["LINEAR", "SPECS", "TASK_ARITHMETIC", "linear", "task_arithmetic"]


def linear(task: TensorTask) -> torch.Tensor:
    """Weighted average (``normalize``) or weighted sum of the inputs."""
    weights = task.weights
    total = _linear_total(task)
    acc = task.inputs[0] * weights[0]
    _accumulate(acc, task.inputs[1:], weights[1:], total)
    return acc


def _linear_total(task: TensorTask) -> float | None:
    """The divisor (``sum w_i`` in order) when ``normalize``, else None; a zero sum is refused."""
    if not task.params["normalize"]:
        return None
    weights = task.weights
    total = 0.0
    for w in weights:
        total += w
    if total == 0.0:
        raise InvalidRecipe(
            f"tensor {task.name!r}: linear with normalize=true needs weights that do not "
            f"sum to zero (got {weights}); set normalize=false or change the weights"
        )
    return total


def _accumulate(
    acc: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], total: float | None
) -> None:
    """``acc += x_i * w_i`` in order, then ``acc /= total`` (when given), in place."""
    for x, w in zip(xs, weights, strict=True):
        acc += x * w
    if total is not None:
        acc /= total


def linear_stored(task: TensorTask) -> torch.Tensor:
    """:func:`linear` from the stored inputs, upcast and written chunk by chunk (same bits:
    every operation is elementwise)."""
    st = task.stored
    assert st is not None
    weights = task.weights
    total = _linear_total(task)
    n = math.prod(st.shape)
    out = torch.empty(n, dtype=st.out_dtype)
    acc = torch.empty(min(sp.CHUNK, n), dtype=st.dtype)
    for start in range(0, n, sp.CHUNK):
        stop = min(start + sp.CHUNK, n)
        part = acc[: stop - start]
        torch.mul(st.input_at(0, start, stop), weights[0], out=part)
        rest = [st.input_at(i, start, stop) for i in range(1, len(weights))]
        _accumulate(part, rest, weights[1:], total)
        out[start:stop].copy_(part)
    return out.view(st.shape)


def task_arithmetic(task: TensorTask) -> torch.Tensor:
    """``base + lambda * sum_i w_i delta_i`` (``/ sum_i w_i`` when ``normalize``)."""
    base, deltas = sp.base_and_deltas(task)
    return sp.combine(
        base,
        deltas,
        task.weights,
        consensus=None,
        normalize=bool(task.params["normalize"]),
        lambda_=float(task.params["lambda"]),
    )


def task_arithmetic_stored(task: TensorTask) -> torch.Tensor:
    """:func:`task_arithmetic` from the stored inputs: the task vectors are formed chunk by
    chunk (``x_i - b`` is elementwise) and the result written in the output dtype."""
    return sp.stored_task_vectors(task, None)


NORMALIZE_TRUE = ParamSpec(
    "normalize", bool, True, doc="divide by the sum of weights", varying=False
)
NORMALIZE_FALSE = ParamSpec(
    "normalize", bool, False, doc="divide by the sum of weights", varying=False
)
LAMBDA = ParamSpec("lambda", float, 1.0, doc="scale of the merged task vector")

LINEAR = StrategySpec(
    name="linear",
    version=1,
    summary="weighted average of the inputs (model soup); no base",
    merge=linear,
    params=(NORMALIZE_TRUE,),
    needs_base=False,
    min_models=1,
    references=("https://arxiv.org/abs/2203.05482",),
    merge_stored=linear_stored,
)

TASK_ARITHMETIC = StrategySpec(
    name="task_arithmetic",
    version=1,
    summary="base + lambda * weighted sum of task vectors (negative weight = negation)",
    merge=task_arithmetic,
    params=(NORMALIZE_FALSE, LAMBDA),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2212.04089",),
    merge_stored=task_arithmetic_stored,
)

SPECS: tuple[StrategySpec, ...] = (LINEAR, TASK_ARITHMETIC)
