"""PCB-merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging", NeurIPS).

Not in mergekit or FusionBench; follows the reference implementation's root script
(``pcb_merging``) applied **per tensor** (the reference flattens the whole model; see
"Deviations"). With task vectors ``tau_i = x_i - base`` of ``d`` entries and ``n``
contributions:

1. **Winsorise** ``|tau_i|`` per contribution at the ``clamp_ratio`` quantiles (low value
   ``sorted[int(d * clamp_ratio)]``, high ``sorted[int(d * (1 - clamp_ratio)) - 1]``, default
   0.0001 as in the reference), keeping signs: ``tau'_i``.
2. **Intra-balancing**: ``exp(n * norm(|tau'_i|)^2)`` with ``norm`` the per-contribution
   min-max normalisation.
3. **Inter-balancing**: ``tanh(tau_i * sum_j tau_j)`` (the root script's variant; the vision
   scripts use sign-normalised variants).
4. **Drop and weights**: score ``s_i = intra * inter``; clamp from below at its
   ``int(d * (1 - pcb_ratio))``-th smallest value and min-max normalise, so everything outside
   the top ``pcb_ratio`` fraction (default 0.1) gets weight 0 and the largest 1.
5. **Merge**: ``out = base + lambda * sum_i w_i tau'_i s_i / max(sum_i s_i, 1e-12)``; the
   per-contribution ``weight`` plays the paper's per-task ``lambda_i`` (default 1) and ``lambda``
   (default 1.0; the paper's scripts tune it, typically 0.8-1.3) scales the result.

Deviations, all documented choices: quantiles and min-max are per tensor (``trim_scope`` of the
reference is the whole model); quantiles are exact order statistics (``kthvalue``); a min-max
normalisation of a constant vector gives 0 for the intra term (equal importance, ``exp(0)=1``)
and 1 for the final weights (no competition: keep all), where the reference divides 0 by 0.
Arithmetic is elementwise in the compute dtype; ``exp`` and ``tanh`` are evaluated in float64
from basic IEEE operations (``_detmath.exp``: torch's SLEEF kernels differ between CPU
instruction sets) and rounded once; sums over contributions run in canonical order.
"""

from __future__ import annotations

import torch

from . import _detmath as dm
from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["PCB", "SPECS", "pcb"]


def _kth_smallest(flat: torch.Tensor, index: int) -> torch.Tensor:
    """``sorted(flat)[index]`` (0-based, clamped to the valid range) as a 0-d tensor."""
    i = min(max(index, 0), flat.numel() - 1)
    return torch.kthvalue(flat, i + 1).values


def _tanh(y: torch.Tensor) -> torch.Tensor:
    """``tanh`` from basic operations: ``(1 - e) / (1 + e)`` with ``e = exp(-2|y|)``, signed."""
    e = dm.exp(y.abs().to(torch.float64) * -2.0)
    t = ((1.0 - e) / (1.0 + e)).to(y.dtype)
    return torch.where(y < 0, -t, t)


def _minmax(x: torch.Tensor, constant: float) -> torch.Tensor:
    lo = x.min()
    hi = x.max()
    if bool(hi == lo):
        return torch.full_like(x, constant)
    return (x - lo) / (hi - lo)


def pcb(task: TensorTask) -> torch.Tensor:
    base, deltas = sp.base_and_deltas(task)
    n = len(deltas)
    d = base.numel()
    clamp_ratio = float(task.params["clamp_ratio"])
    ratio = float(task.params["pcb_ratio"])
    if ratio <= 0.0:
        return base.clone()  # no entry keeps a weight: the merged task vector is 0
    total = sp.ordered_sum(deltas)
    clamped: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    for tau in deltas:
        mag = tau.abs().reshape(-1)
        lo = _kth_smallest(mag, int(d * clamp_ratio))
        hi = _kth_smallest(mag, int(d * (1.0 - clamp_ratio)) - 1)
        mag = mag.clamp(min=lo, max=hi)
        intra = _minmax(mag, 0.0)
        intra *= intra
        intra *= float(n)
        intra = dm.exp(intra).to(mag.dtype)
        inter = _tanh(tau.reshape(-1) * total.reshape(-1))
        score = intra * inter
        floor = _kth_smallest(score, int(d * (1.0 - ratio)))
        scores.append(_minmax(score.clamp(min=floor), 1.0))
        clamped.append(torch.sign(tau).reshape(-1) * mag)
    num: torch.Tensor | None = None
    den: torch.Tensor | None = None
    for tau_c, s, w in zip(clamped, scores, task.weights, strict=True):
        term = tau_c * s
        if w != 1.0:
            term *= w
        num = term if num is None else num.add_(term)
        den = s.clone() if den is None else den.add_(s)
    assert num is not None and den is not None
    num /= den.clamp_(min=1e-12)
    lam = float(task.params["lambda"])
    if lam != 1.0:
        num *= lam
    return num.reshape(base.shape).add_(base)


PCB = StrategySpec(
    name="pcb",
    version=1,
    summary="PCB-merging: intra/inter parameter competition balancing (per tensor)",
    merge=pcb,
    params=(
        ParamSpec(
            "pcb_ratio",
            float,
            0.1,
            doc="fraction of entries per contribution that keep a non-zero weight",
            minimum=0.0,
            maximum=1.0,
        ),
        ParamSpec(
            "clamp_ratio",
            float,
            0.0001,
            doc="winsorisation quantile of |tau| at both ends",
            minimum=0.0,
            maximum=0.5,
        ),
        ParamSpec("lambda", float, 1.0, doc="scale of the merged task vector"),
    ),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2410.02396",),
)

SPECS: tuple[StrategySpec, ...] = (PCB,)
