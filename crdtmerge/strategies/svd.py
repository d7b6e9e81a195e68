"""Spectral task-vector merges: ``tsv_m``, ``iso_c``, ``iso_cts`` (FusionBench semantics).

All three need a base; with task vectors ``d_i = x_i - b`` (``T`` contributions in canonical
order), every 2-D tensor gets the spectral treatment below and every other tensor the mean
``sum_i d_i / T``; the output is ``b + scale * merged``.

**tsv_m** (Task Singular Vectors: Merging, Gargiulo et al., CVPR 2025; FusionBench
``task_singular_vector``), scale ``alpha`` (default 1.0). Each ``d_i = U_i S_i V_i^T`` keeps its
top ``k = r // T`` singular triplets (``r = min(out, in)``); they are placed side by side
(``U = [U_1k .. U_Tk]``, ``S``, ``V``), ``U`` and ``V`` are replaced by their polar factors
(nearest orthonormal matrices, ``P Q^T`` from their SVDs) to remove interference, and the merged
delta is ``polar(U) diag(S) polar(V)^T``. FusionBench pads the blocks with zero columns up to
``r``; those columns meet zero singular values, so we drop them (same result). Deviations:
``k = r // T`` (FusionBench computes ``int(r * (1/T))``, which rounds ``49 * (1/49)`` down to 0);
when ``T > r`` (``k = 0``, FusionBench would return the base) the mean of the task vectors is
used for that matrix.

**iso_c** (Iso-C, Marczak et al., "No Task Left Behind", ICML 2025), scale ``scaling_factor``
(default 1.0): the sum of the task vectors is decomposed, every singular value is replaced by
their mean (a flat, "isotropic" spectrum), and the matrix is rebuilt.

**iso_cts** (Iso-CTS, same paper), ``scaling_factor`` (1.0) and ``common_space_fraction``
(0.8): the top ``c`` left/right singular vectors of the summed task vectors span a common
subspace; each task vector minus its projection onto the common left subspace contributes its
own top ``s`` directions, with ``s = min(r // T, round((r - int(r * fraction)) / T))`` and
``c = r - T s`` (the reference allocation, capped so ``c >= 0``); the task-specific blocks and
the common block are concatenated, orthogonalised (polar factors) and rebuilt with a flat
spectrum equal to the mean of all the kept singular values.

FusionBench skips CLIP's ``text_projection``; we treat every 2-D tensor (embeddings included)
as a matrix. Per-model ``weight`` is ignored (none of the methods has one).

SVD sign ambiguity: every singular pair ``(u_j, v_j)`` is flipped so that the entry of ``u_j``
with the largest magnitude (the first such) is positive. The three results are mathematically
invariant under these flips (the polar factors and the flat spectrum absorb them), and fixing
the signs keeps intermediate bits stable across LAPACK builds that choose differently.

Determinism: ``platform``: SVDs and matrix products run in LAPACK/BLAS, on one thread (see
``_linalg``); the result is reproducible on one platform and build, whatever the thread count,
but not bit-identical across them. Non-matrix tensors are
exact means in canonical order.
"""

from __future__ import annotations

import torch

from ..errors import InvalidRecipe
from ._linalg import single_threaded
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["SPECS", "iso_c_matrix", "iso_cts_matrix", "svd_fixed", "tsv_m_matrix"]


def svd_fixed(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(S) Vh`` with each pair's sign fixed (see the module docstring)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    idx = torch.argmax(torch.abs(u), dim=0)
    pivot = u.gather(0, idx.unsqueeze(0)).squeeze(0)
    sign = torch.where(pivot < 0, -torch.ones_like(pivot), torch.ones_like(pivot))
    return u * sign, s, vh * sign.unsqueeze(-1)


def _polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = svd_fixed(a)
    return u @ vh


def _mean(ds: list[torch.Tensor]) -> torch.Tensor:
    acc = ds[0]
    for d in ds[1:]:
        acc = acc + d
    return acc / torch.tensor(float(len(ds)), dtype=acc.dtype)


def _sum(ds: list[torch.Tensor]) -> torch.Tensor:
    acc = ds[0]
    for d in ds[1:]:
        acc = acc + d
    return acc


def tsv_m_matrix(ds: list[torch.Tensor]) -> torch.Tensor:
    """The TSV-M merged delta of 2-D task vectors ``ds``."""
    t = len(ds)
    r = min(ds[0].shape)
    k = r // t
    if k == 0:
        return _mean(ds)
    us, ss, vs = [], [], []
    for d in ds:
        u, s, vh = svd_fixed(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k, :])
    u_cat = torch.cat(us, dim=1)
    s_cat = torch.cat(ss)
    v_cat = torch.cat(vs, dim=0)
    return (_polar(u_cat) * s_cat) @ _polar(v_cat)


def iso_c_matrix(ds: list[torch.Tensor]) -> torch.Tensor:
    """The Iso-C merged delta: the summed task vectors with a flat spectrum."""
    u, s, vh = svd_fixed(_sum(ds))
    return (u * s.mean()) @ vh


def _iso_cts_split(r: int, t: int, fraction: float) -> tuple[int, int]:
    per_task = min(r // t, round((r - int(r * fraction)) / t))
    return r - t * per_task, per_task


def iso_cts_matrix(ds: list[torch.Tensor], common_space_fraction: float) -> torch.Tensor:
    """The Iso-CTS merged delta (common + task-specific subspaces, flat spectrum)."""
    t = len(ds)
    r = min(ds[0].shape)
    common, per_task = _iso_cts_split(r, t, common_space_fraction)
    u, s, vh = svd_fixed(_sum(ds))
    cu, cs, cv = u[:, :common], s[:common], vh[:common, :]
    us, ss, vs = [], [], []
    if per_task > 0:
        for d in ds:
            d_ts = d - cu @ (cu.T @ d)
            tu, ts, tvh = svd_fixed(d_ts)
            us.append(tu[:, :per_task])
            ss.append(ts[:per_task])
            vs.append(tvh[:per_task, :])
    u_cat = torch.cat([*us, cu], dim=1)
    s_cat = torch.cat([*ss, cs])
    v_cat = torch.cat([*vs, cv], dim=0)
    return (_polar(u_cat) * s_cat.mean()) @ _polar(v_cat)


def _deltas(task: TensorTask, strategy: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if task.base is None:
        raise InvalidRecipe(f"{strategy} needs a base model")
    return task.base, task.deltas()


def _finish(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
    return base + torch.tensor(scale, dtype=base.dtype) * merged.to(base.dtype)


@single_threaded
def _tsv_m(task: TensorTask) -> torch.Tensor:
    base, ds = _deltas(task, "tsv_m")
    merged = tsv_m_matrix(ds) if base.dim() == 2 else _mean(ds)
    return _finish(base, merged, float(task.params["alpha"]))


@single_threaded
def _iso_c(task: TensorTask) -> torch.Tensor:
    base, ds = _deltas(task, "iso_c")
    merged = iso_c_matrix(ds) if base.dim() == 2 else _mean(ds)
    return _finish(base, merged, float(task.params["scaling_factor"]))


@single_threaded
def _iso_cts(task: TensorTask) -> torch.Tensor:
    base, ds = _deltas(task, "iso_cts")
    if base.dim() == 2:
        merged = iso_cts_matrix(ds, float(task.params["common_space_fraction"]))
    else:
        merged = _mean(ds)
    return _finish(base, merged, float(task.params["scaling_factor"]))


_SCALING = ParamSpec(
    "scaling_factor", float, 1.0, doc="multiplier of the merged task vector (alpha)"
)

SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="tsv_m",
        version=1,
        summary="TSV-M: top singular vectors of each task, orthogonalised, per 2-D matrix",
        merge=_tsv_m,
        params=(ParamSpec("alpha", float, 1.0, doc="multiplier of the merged task vector"),),
        needs_base=True,
        min_models=1,
        determinism="platform",
        references=("https://arxiv.org/abs/2412.00081", "FusionBench task_singular_vector"),
    ),
    StrategySpec(
        name="iso_c",
        version=1,
        summary="Iso-C: summed task vectors with a flat (isotropic) spectrum per 2-D matrix",
        merge=_iso_c,
        params=(_SCALING,),
        needs_base=True,
        min_models=1,
        determinism="platform",
        references=("https://arxiv.org/abs/2502.04959", "FusionBench iso_c_merging"),
    ),
    StrategySpec(
        name="iso_cts",
        version=1,
        summary="Iso-CTS: common + task-specific subspaces with a flat spectrum per 2-D matrix",
        merge=_iso_cts,
        params=(
            _SCALING,
            ParamSpec(
                "common_space_fraction",
                float,
                0.8,
                doc="fraction of the rank given to the common subspace",
                minimum=0.0,
                maximum=1.0,
            ),
        ),
        needs_base=True,
        min_models=1,
        determinism="platform",
        references=("https://arxiv.org/abs/2502.04959", "FusionBench iso_cts_merging"),
    ),
)
