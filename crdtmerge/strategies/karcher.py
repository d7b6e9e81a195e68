"""Karcher (Riemannian / Frechet) mean on the unit sphere, mergekit ``karcher`` semantics.

Each contribution's tensor is one vector ``x_i = |x_i| u_i``. Inputs with ``|x_i| <= tol``
drop out of the direction (all of them -> zeros). With ``alpha_i`` the weights renormalised over
the remaining inputs, start at the normalised weighted mean of the ``u_i`` (the first ``u_i`` if
that mean is shorter than ``tol``) and iterate at most ``max_iter`` times:

    tangent = sum_i alpha_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),  theta_i = acos(u_i.m)

(terms with ``theta_i < tol`` skipped, and -- a deviation, mergekit divides by zero there --
exactly antipodal ones, ``sin(theta_i) < 1e-12``, whose geodesic direction is undefined); stop when ``|tangent| < tol``, else step along the
geodesic ``m <- cos|T| m + sin|T| T/|T|`` and renormalise. The output is ``m`` times the weighted
mean of the norms of *all* inputs (``sum_i w_i |x_i| / sum_i w_i``).

Parameters (mergekit's): ``max_iter`` (default 10), ``tol`` (default 1e-5). Deviation: mergekit's
YAML path uses equal weights and ignores ``weight``; we use the per-model ``weight`` (default 1,
i.e. mergekit's result). A base, if the recipe names one, is not used (mergekit's karcher has
no base either). Identical contributions (one included) are returned unchanged; the formula
gives them back only up to rounding.

Determinism: ``exact``: float64 sums for every dot product and norm, the angles from
:mod:`._detmath`, the vectors updated with plain ``*``/``+``/``-`` in the compute dtype.
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidRecipe
from . import _detmath as dm
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["SPECS", "karcher_mean"]


_ANTIPODAL = 1e-12


def _c(x: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x, dtype=like.dtype)


def karcher_mean(
    xs: list[torch.Tensor], weights: list[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """The weighted Karcher mean of ``xs`` (see the module docstring)."""
    if all(torch.equal(xs[0], x) for x in xs[1:]):
        return xs[0].clone()  # idempotence (the formula returns it up to rounding)
    total = math.fsum(weights)
    if total == 0.0:
        raise InvalidRecipe("karcher: the weights sum to zero")
    alphas = [w / total for w in weights]
    norms = [dm.norm64(x) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    vsum = math.fsum(alphas[i] for i in valid)
    if vsum == 0.0:
        raise InvalidRecipe("karcher: the weights of the non-zero inputs sum to zero")
    va = [alphas[i] / vsum for i in valid]
    units = [xs[i] / _c(norms[i], xs[i]) for i in valid]

    mean = _c(va[0], units[0]) * units[0]
    for a, u in zip(va[1:], units[1:], strict=True):
        mean = mean + _c(a, u) * u
    mean_norm = dm.norm64(mean)
    degenerate = mean_norm < tol or mean_norm == 0.0
    mean = units[0].clone() if degenerate else mean / _c(mean_norm, mean)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(va, units, strict=True):
            dot = min(max(dm.dot64(mean, u), -1.0), 1.0)
            theta = dm.scalar(dm.acos(dot))
            sin_theta = dm.scalar(dm.sin(theta))
            if theta < tol or sin_theta < _ANTIPODAL:
                continue  # at the mean already, or antipodal (no defined direction)
            k = a * theta / sin_theta
            tangent = tangent + _c(k, u) * (u - _c(dot, mean) * mean)
        tn = dm.norm64(tangent)
        if tn < tol or tn == 0.0:
            break
        mean = _c(dm.scalar(dm.cos(tn)), mean) * mean + _c(dm.scalar(dm.sin(tn)), mean) * (
            tangent / _c(tn, tangent)
        )
        unit_norm = dm.norm64(mean)
        if unit_norm > tol:
            mean = mean / _c(unit_norm, mean)

    scale = math.fsum(a * n for a, n in zip(alphas, norms, strict=True))
    return _c(scale, mean) * mean


def _merge(task: TensorTask) -> torch.Tensor:
    return karcher_mean(
        list(task.inputs),
        task.weights,
        max_iter=int(task.params["max_iter"]),
        tol=float(task.params["tol"]),
    )


SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="karcher",
        version=1,
        summary="Karcher (Riemannian) mean of the contributions on the unit sphere",
        merge=_merge,
        params=(
            ParamSpec("max_iter", int, 10, doc="maximum iterations", minimum=0, maximum=10_000),
            ParamSpec("tol", float, 1e-5, doc="convergence tolerance", minimum=0.0),
        ),
        min_models=1,
        determinism="exact",
        references=("https://en.wikipedia.org/wiki/Karcher_mean", "mergekit karcher"),
    ),
)
