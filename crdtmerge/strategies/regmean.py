"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion"), FusionBench semantics.

For a linear layer ``y = W x`` with weight ``W_i`` of shape ``(out, in)``, contribution ``i``
ships the Gram matrix of that layer's inputs as the side tensor ``gram:<name>``,
``G_i = X_i^T X_i / N`` of shape ``(in, in)``. RegMean solves the merged least-squares problem
in closed form:

    W* = ((sum_i w_i G'_i)^-1 sum_i w_i G'_i W_i^T)^T

where ``G'_i`` is ``G_i`` with every off-diagonal entry multiplied by
``reduce_non_diagonal_ratio`` (alpha; the diagonal is kept). alpha = 1 is plain RegMean, alpha
= 0 reduces to a per-input-feature weighted average; FusionBench's function default is 1.0, its
CLIP config uses 0.95, and values below 1 also regularise a singular sum.

Tensors that are not 2-D, or for which no contribution ships a Gram matrix (biases, norms,
embeddings), are merged by the weighted average ``sum_i w_i x_i / sum_i w_i`` (FusionBench: the
plain mean). A 2-D tensor for which only some contributions ship a Gram matrix is an error
(:class:`~crdtmerge.errors.IncompatibleInputs`), as is a Gram matrix of the wrong shape.

Deviations: per-model ``weight`` scales ``G_i`` (a weighted regression; all weights 1 is
FusionBench's RegMean); the system is solved with ``torch.linalg.solve`` in float64 rather than
an explicit float32 inverse, falling back to the pseudo-inverse (least-norm least squares) when
the sum is singular. A base, if named, is not used (RegMean merges full weights). RegMean++
(Gram matrices of the merged model's activations) needs the model and data at merge time and is
not offered.

Determinism: ``platform``: the matrix products and the solve run in LAPACK/BLAS on one thread
(see ``_linalg``), whose bits depend on the library build and CPU but not the thread count. Everything else is in canonical order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import IncompatibleInputs, InvalidRecipe
from ._linalg import single_threaded
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["SPECS", "regmean_solve"]


def _weighted_average(xs: Sequence[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = math.fsum(weights)
    if total == 0.0:
        raise InvalidRecipe("regmean: the weights sum to zero")
    acc = torch.tensor(weights[0], dtype=xs[0].dtype) * xs[0]
    for w, x in zip(weights[1:], xs[1:], strict=True):
        acc = acc + torch.tensor(w, dtype=x.dtype) * x
    return acc / torch.tensor(total, dtype=acc.dtype)


def _grams(task: TensorTask) -> list[torch.Tensor] | None:
    sides = list(task.side) or [{} for _ in task.inputs]
    have = [("gram" in s) for s in sides]
    if not any(have):
        return None
    if task.inputs[0].dim() != 2:
        raise IncompatibleInputs(
            f"regmean: tensor {task.name!r} is not a 2-D weight but ships a Gram matrix"
        )
    if not all(have):
        missing = [i for i, h in enumerate(have) if not h]
        raise IncompatibleInputs(
            f"regmean: tensor {task.name!r}: contribution(s) at canonical position(s) {missing} "
            "ship no Gram matrix (gram:<name>) while others do; every contribution needs one"
        )
    n_in = task.inputs[0].shape[1]
    out = []
    for i, s in enumerate(sides):
        g = s["gram"]
        if tuple(g.shape) != (n_in, n_in):
            raise IncompatibleInputs(
                f"regmean: tensor {task.name!r}: the Gram matrix of contribution {i} has shape "
                f"{tuple(g.shape)}, expected ({n_in}, {n_in}) for a weight of shape "
                f"{tuple(task.inputs[i].shape)}"
            )
        out.append(g)
    return out


def regmean_solve(
    weights_2d: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    reduce_non_diagonal_ratio: float,
) -> torch.Tensor:
    """The RegMean closed form for one linear weight (see the module docstring)."""
    n_in = grams[0].shape[0]
    eye = torch.eye(n_in, dtype=torch.bool)
    alpha = torch.tensor(reduce_non_diagonal_ratio, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    scale = torch.where(eye, one, alpha)
    sum_g = None
    sum_gw = None
    for c, g, w in zip(coeffs, grams, weights_2d, strict=True):
        gi = g.to(torch.float64) * scale * c
        gw = gi @ w.to(torch.float64).T
        sum_g = gi if sum_g is None else sum_g + gi
        sum_gw = gw if sum_gw is None else sum_gw + gw
    if sum_g is None or sum_gw is None:
        raise InvalidRecipe("regmean: no contributions")
    sol: torch.Tensor  # torch.linalg is untyped
    sol, info = torch.linalg.solve_ex(sum_g, sum_gw)
    if int(info.item()) != 0 or not bool(torch.isfinite(sol).all()):
        sol = torch.linalg.pinv(sum_g, hermitian=True) @ sum_gw
    return sol.T.to(weights_2d[0].dtype).contiguous()


@single_threaded
def _merge(task: TensorTask) -> torch.Tensor:
    xs = list(task.inputs)
    grams = _grams(task)
    if grams is None:
        return _weighted_average(xs, task.weights)
    return regmean_solve(xs, grams, task.weights, float(task.params["reduce_non_diagonal_ratio"]))


SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="regmean",
        version=1,
        summary="RegMean: closed-form least-squares merge of linear weights from Gram matrices",
        merge=_merge,
        params=(
            ParamSpec(
                "reduce_non_diagonal_ratio",
                float,
                1.0,
                doc="multiply the Gram matrices' off-diagonal entries by this (alpha)",
                minimum=0.0,
                maximum=1.0,
            ),
        ),
        min_models=1,
        determinism="platform",
        side_inputs=("gram",),
        references=("https://arxiv.org/abs/2212.09849", "FusionBench regmean"),
    ),
)
