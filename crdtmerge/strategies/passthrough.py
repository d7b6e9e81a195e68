"""Passthrough (mergekit ``passthrough``): one contribution, each tensor copied or scaled.

With exactly one contribution ``x``: ``out = scale * x``, and ``out = x`` bit for bit when
``scale`` is 1 (the default, mergekit's "no scale"). ``scale`` is a per-model parameter that may
vary by tensor (``[{filter, value}]`` lists and layer gradients), which is what passthrough is
for in mergekit: zeroing or damping chosen tensors (e.g. ``o_proj``/``down_proj`` of some
layers), or changing only the output dtype.

Not supported: mergekit's ``slices`` (stacking layer ranges of several models into a deeper
model), which changes the architecture rather than merging tensors of one. A recipe's base
object is not an input (as in ``linear``); the per-model ``weight`` is accepted and unused.

Determinism: ``exact`` (a copy, or one plain ``*`` per element).
"""

from __future__ import annotations

import torch

from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["SPECS", "passthrough"]


def passthrough(task: TensorTask) -> torch.Tensor:
    """The contribution, multiplied by its ``scale`` unless that is 1."""
    (x,) = task.inputs
    scale = float(task.model_params[0]["scale"])
    return x.clone() if scale == 1.0 else x * scale


SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="passthrough",
        version=1,
        summary="one contribution, copied, or scaled per tensor (filters, gradients)",
        merge=passthrough,
        params=(
            ParamSpec(
                "scale",
                float,
                1.0,
                scope="model",
                doc="multiply the tensor by this (1 = copy it bit for bit)",
            ),
        ),
        needs_base=False,
        min_models=1,
        max_models=1,
        determinism="exact",
        references=("https://github.com/arcee-ai/mergekit",),
    ),
)
