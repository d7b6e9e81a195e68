"""NearSwap, mergekit ``nearswap`` semantics (after alchemonaut's QuartetAnemoi merges).

With base ``b`` and one contribution ``x``, element-wise:

    w = clamp(t / |b - x|, 0, 1)    (1 where b == x),    out = w * x + (1 - w) * b

so the contribution's value is taken where it is already within ``t`` of the base, and only a
``t / |b - x|`` step towards it elsewhere: a "sameness threshold" that keeps the base where the
models disagree strongly. ``t`` (required, > 0) is mergekit's parameter; mergekit raises for
``t <= 0`` and so do we. Exactly one contribution (mergekit: the base plus one model).

Determinism: ``exact`` (element-wise ``-``, ``abs``, ``/``, ``clamp``, ``*``, ``+`` only).
"""

from __future__ import annotations

import torch

from ..errors import InvalidRecipe
from .base import REQUIRED, ParamSpec, StrategySpec, TensorTask

__all__ = ["SPECS", "nearswap_tensors"]


def nearswap_tensors(t: float, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mergekit's ``nearswap(t, v0=base, v1=x)``."""
    if not t > 0:
        raise InvalidRecipe(f"nearswap: parameter 't' must be > 0, got {t!r}")
    diff = torch.abs(base - x)
    w = torch.tensor(t, dtype=base.dtype) / diff  # t/0 = inf -> 1 after the clamp
    w = torch.clamp(w, 0.0, 1.0)
    return w * x + (1.0 - w) * base


def _merge(task: TensorTask) -> torch.Tensor:
    if task.base is None:
        raise InvalidRecipe("nearswap needs a base model")
    return nearswap_tensors(float(task.params["t"]), task.base, task.inputs[0])


SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="nearswap",
        version=1,
        summary="take the contribution where it is within t of the base, interpolate elsewhere",
        merge=_merge,
        params=(ParamSpec("t", float, REQUIRED, doc="sameness threshold (> 0)", minimum=0.0),),
        needs_base=True,
        min_models=1,
        max_models=1,
        determinism="exact",
        references=("https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",),
    ),
)
