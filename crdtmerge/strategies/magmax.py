"""MagMax (Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual
Learning"), as in FusionBench ``magmax``.

Per element, the task-vector entry with the largest magnitude across contributions is taken:
contributions are scanned in canonical order and a later one replaces the current choice when
``|delta| >= |current|`` (FusionBench's ``>=``: later models win ties). Then
``out = base + scaling_factor * chosen`` (``scaling_factor`` default 0.5, FusionBench's name
and default).

Extension: a per-contribution ``weight`` multiplies its task vector before the selection (the
default 1 gives FusionBench's method; a negative weight selects by magnitude of the negated
task).
"""

from __future__ import annotations

import torch

from ..errors import InvalidRecipe
from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["MAGMAX", "SPECS", "magmax"]


def magmax(task: TensorTask) -> torch.Tensor:
    base, deltas = sp.base_and_deltas(task)
    chosen: torch.Tensor | None = None
    best: torch.Tensor | None = None
    for d, w in zip(deltas, task.weights, strict=True):
        if w != 1.0:
            d *= w
        mag = d.abs()
        if chosen is None or best is None:
            chosen, best = d, mag
            continue
        take = mag >= best
        chosen = torch.where(take, d, chosen)
        best = torch.where(take, mag, best)
    if chosen is None:
        raise InvalidRecipe("magmax needs at least one contribution")
    scale = float(task.params["scaling_factor"])
    if scale != 1.0:
        chosen *= scale
    return chosen.add_(base)  # the deltas are this call's own temporaries


MAGMAX = StrategySpec(
    name="magmax",
    version=1,
    summary="per element the task-vector entry of largest magnitude, scaled, added to base",
    merge=magmax,
    params=(ParamSpec("scaling_factor", float, 0.5, doc="scale of the selected task vector"),),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2407.06322",),
)

SPECS: tuple[StrategySpec, ...] = (MAGMAX,)
