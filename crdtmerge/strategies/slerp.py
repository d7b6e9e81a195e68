"""Spherical interpolation: ``slerp``, ``nuslerp`` and ``multislerp`` (mergekit semantics).

**slerp** (mergekit ``slerp``, parameter ``t``). Two endpoints ``v0`` (``t = 0``) and ``v1``
(``t = 1``), each tensor flattened to one vector. Both are normalised for the angle (a norm
``<= 1e-8`` is left unnormalised, as in mergekit); if ``|cos theta| > 0.9995`` the result is the
lerp ``(1 - t) v0 + t v1`` of the *unnormalised* tensors, else
``sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1`` (again on the
unnormalised tensors, so norms are not preserved exactly). mergekit's slerp takes exactly two
models, one of them the base, and ``t`` is the fraction from the base towards the other. Our
contributions are an unordered set (canonical order = sorted by root), so the endpoints are:

- base + one contribution: ``v0 = base``, ``v1 = x`` -- exactly mergekit's form; use this one
  whenever ``t`` is not 0.5 (e.g. the usual per-layer ``t`` gradient);
- two contributions, no base: ``v0``/``v1`` are the contributions with the smaller/larger root;
- base + two contributions: ``base + slerp(x_0 - base, x_1 - base)`` (slerp of the task
  vectors, as mergekit's ``nuslerp`` does with a base).

With two contributions, *which* one is ``v0`` is decided by content hashes, not by the user, so
only ``t = 0.5`` is meaningful there: at ``t = 0.5`` the two coefficients are the same float,
every reduction is symmetric, and the result is bit-identical under swapping the inputs (a test
checks this). Other ``t`` values are deterministic but favour an arbitrary side. One
contribution without a base is returned unchanged (mergekit does the same with a lone input), so
a set that shrinks to one member still has a defined merge.

**nuslerp** (mergekit ``nuslerp``): exactly two contributions; ``t = w_1 / (w_0 + w_1)`` from
the per-model ``weight`` (mergekit requires it; ours defaults to 1, i.e. ``t = 0.5``; and
``t = 0.5`` when ``|w_0 + w_1| < 1e-6``), so the result does not depend on the order beyond
float rounding. With a base, the task vectors are slerped and added to the base.
``nuslerp_flatten`` (default true) treats the tensor as one vector; otherwise each vector along
the last dimension (each row of a matrix) is slerped on its own, or, with ``nuslerp_row_wise``,
each vector along dimension 0 (each *column* of a matrix -- mergekit's naming, kept). Norms are
clamped at ``1e-7`` for the angle and lerp is used only where ``|sin theta| < 1e-8`` (no 0.9995
threshold).

**multislerp** (mergekit ``multislerp``, "barycentric interpolation on a hypersphere"): ``n``
contributions (task vectors when a base is given), ``weight`` per model (divided by their sum
when ``normalize_weights``, default true), ``eps`` (default 1e-8). Each tensor is projected onto
the unit sphere (``x / (|x| + eps)``), the weighted mean of the unit vectors gives the direction
and the weighted mean of the original norms gives the length. mergekit then projects the unit
vectors to the tangent space at the normalised mean, sums them with the weights and takes one
exponential-map step; at the weighted mean that tangent sum is exactly zero in real arithmetic
(``sum w_i (u_i - (u_i.m) m) = M - |M| m = 0`` with ``M = sum w_i u_i``), so mergekit's output is
this closed form plus float32 rounding noise. We compute the closed form. If the weighted mean
of the unit vectors is shorter than ``eps`` (antipodal inputs), two inputs fall back to the
weighted lerp and more raise :class:`~crdtmerge.errors.IncompatibleInputs`. One contribution is
returned unchanged (as in mergekit).

Idempotence: in all three, identical endpoints/contributions are returned unchanged (the
formulas give them back only up to float rounding, e.g. ``0.7 x + 0.3 x``).

Determinism: ``exact``. Norms and dot products are float64 sums, the angles come from
:mod:`._detmath` (basic IEEE operations only), and the tensors are combined with plain ``*`` and
``+`` in the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import IncompatibleInputs, InvalidRecipe
from . import _detmath as dm
from .base import REQUIRED, ParamSpec, StrategySpec, TensorTask, unstored

__all__ = ["SPECS", "all_equal", "nuslerp_tensors", "slerp_tensors"]

_DOT_THRESHOLD = 0.9995
_SLERP_EPS = 1e-8
_NU_NORM_EPS = 1e-7
_NU_COLINEAR_EPS = 1e-8


def all_equal(xs: list[torch.Tensor]) -> bool:
    """True when every tensor equals the first (then merges return it unchanged)."""
    return all(torch.equal(xs[0], x) for x in xs[1:])


def _coef(c: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(c, dtype=like.dtype)


def _combine(c0: float, v0: torch.Tensor, c1: float, v1: torch.Tensor) -> torch.Tensor:
    """``c0 * v0 + c1 * v1`` in the compute dtype, written tile by tile into the result.

    The same two products and one sum per element as on whole tensors (so the same bits),
    with a tile-sized temporary instead of two full-size ones.
    """
    out = torch.empty(v0.shape, dtype=torch.result_type(v0, v1))
    f0, f1 = v0.reshape(1, -1), v1.reshape(1, -1)
    _combine_into(
        c0,
        lambda a, b: f0[:, a:b],
        c1,
        lambda a, b: f1[:, a:b],
        out.view(1, -1),
        out.dtype,
    )
    return out


Piece = Callable[[int, int], torch.Tensor]


def _combine_into(
    c0: float, p0: Piece, c1: float, p1: Piece, out: torch.Tensor, dtype: torch.dtype
) -> None:
    """``c0 * v0 + c1 * v1`` into the ``1 x n`` ``out``, ``p0(a, b)`` / ``p1(a, b)`` giving
    columns ``a .. b - 1`` of ``v0`` / ``v1`` in the compute ``dtype``; an ``out`` of another
    dtype receives each tile cast (the same bits as one cast of the whole result)."""
    k0 = torch.tensor(c0, dtype=dtype)
    k1 = torch.tensor(c1, dtype=dtype)
    tiles = dm.tiles2d(1, out.shape[1])
    scratch = None
    if out.dtype != dtype and tiles:
        scratch = torch.empty(1, max(b - a for _, _, a, b in tiles), dtype=dtype)
    for _, _, a, b in tiles:
        acc = out[:, a:b] if scratch is None else scratch[:, : b - a]
        torch.mul(p0(a, b), k0, out=acc)
        acc += p1(a, b) * k1
        if scratch is not None:
            out[:, a:b].copy_(acc)


def _norms_and_dot(v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float]:
    """``(|v0|, |v1|, v0 . v1)`` from one float64 pass (each equals norm64 / dot64)."""
    f0, f1 = v0.reshape(1, -1), v1.reshape(1, -1)
    return _gram(dm.tiles_of(f0, f1), f0.shape[1])


def _gram(load: dm.Loader, n: int) -> tuple[float, float, float]:
    g = dm.rowgram64(load, 2, [(0, 0), (1, 1), (0, 1)], 1, n)
    return math.sqrt(float(g[0, 0])), math.sqrt(float(g[1, 0])), float(g[2, 0])


def _coefficients(t: float, n0: float, n1: float, dot: float) -> tuple[float, float]:
    """mergekit's slerp weights of ``v0`` and ``v1`` from their norms and dot product."""
    d0 = n0 if n0 > _SLERP_EPS else 1.0
    d1 = n1 if n1 > _SLERP_EPS else 1.0
    dot = dot / (d0 * d1)
    if abs(dot) > _DOT_THRESHOLD:
        return 1.0 - t, t
    theta = dm.acos(dot)
    sin_theta = dm.scalar(dm.sin(theta))
    c0 = dm.scalar(dm.sin(theta * (1.0 - t))) / sin_theta
    c1 = dm.scalar(dm.sin(theta * t)) / sin_theta
    return c0, c1


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's ``slerp(t, v0, v1)`` on whole tensors (see the module docstring)."""
    if torch.equal(v0, v1):
        return v0.clone()
    c0, c1 = _coefficients(t, *_norms_and_dot(v0, v1))
    return _combine(c0, v0, c1, v1)


def _slerp(task: TensorTask) -> torch.Tensor:
    t = float(task.params["t"])
    xs = list(task.inputs)
    if task.base is not None and len(xs) == 1:
        return slerp_tensors(t, task.base, xs[0])
    if len(xs) == 2 and all_equal(xs):
        return xs[0].clone()
    if len(xs) == 1:
        return xs[0].clone()  # no second endpoint: mergekit returns the lone model too
    if task.base is None:
        return slerp_tensors(t, xs[0], xs[1])
    d = task.deltas()
    return task.base + slerp_tensors(t, d[0], d[1])


def _slerp_stored(task: TensorTask) -> torch.Tensor:
    """:func:`_slerp` from the stored inputs when the two endpoints are stored tensors (base
    and one contribution, or two contributions without a base): one float64 pass for the
    norms and the dot product and one for the blend, each tile upcast on the way, the result
    written in the output dtype. Other cases take the whole-tensor path."""
    st = task.stored
    assert st is not None
    keys: tuple[int | None, int]
    if st.base is not None and len(st.inputs) == 1:
        ends, keys = (st.base, st.inputs[0]), (None, 0)
    elif st.base is None and len(st.inputs) == 2:
        ends, keys = (st.inputs[0], st.inputs[1]), (0, 1)
    else:
        return _slerp(unstored(task)).to(st.out_dtype)
    n = ends[0].numel()
    if torch.equal(ends[0], ends[1]):
        st.check(keys[0])  # the other endpoint holds the same values
        return ends[0].to(st.dtype).to(st.out_dtype).view(st.shape)
    tiles = [st.tile(k, 1, n) for k in keys]
    t = float(task.params["t"])
    c0, c1 = _coefficients(t, *_gram(lambda *r: [tile(*r) for tile in tiles], n))
    out = torch.empty(1, n, dtype=st.out_dtype)
    _combine_into(
        c0,
        lambda a, b: tiles[0](0, 1, a, b),
        c1,
        lambda a, b: tiles[1](0, 1, a, b),
        out,
        st.dtype,
    )
    return out.view(st.shape)


def _nuslerp_rows(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """nuslerp of each row of the 2-D tensors ``a`` and ``b``, vectorised over rows."""
    dot = dm.rowdot64(a, b)
    n0 = torch.sqrt(dm.rowdot64(a, a)).clamp(min=_NU_NORM_EPS)
    n1 = torch.sqrt(dm.rowdot64(b, b)).clamp(min=_NU_NORM_EPS)
    cos = torch.clamp(dot / (n0 * n1), -1.0, 1.0)
    theta = dm.acos(cos)
    sin_theta = dm.sin(theta)
    colinear = torch.abs(sin_theta) < _NU_COLINEAR_EPS
    safe = torch.where(colinear, torch.ones_like(sin_theta), sin_theta)
    c0 = torch.where(colinear, torch.full_like(safe, 1.0 - t), dm.sin(theta * (1.0 - t)) / safe)
    c1 = torch.where(colinear, torch.full_like(safe, t), dm.sin(theta * t) / safe)
    return c0.to(a.dtype).unsqueeze(-1) * a + c1.to(b.dtype).unsqueeze(-1) * b


def nuslerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True, row_wise: bool = False
) -> torch.Tensor:
    """mergekit's ``nuslerp(t, v0, v1)`` (``dim = 0`` when ``row_wise`` else ``-1``)."""
    shape = v0.shape
    if flatten or v0.dim() <= 1:
        return _nuslerp_rows(t, v0.reshape(1, -1), v1.reshape(1, -1)).reshape(shape)
    if row_wise:
        a = v0.transpose(0, -1)
        b = v1.transpose(0, -1)
    else:
        a, b = v0, v1
    moved = a.shape
    res = _nuslerp_rows(t, a.reshape(-1, moved[-1]), b.reshape(-1, moved[-1])).reshape(moved)
    if row_wise:
        res = res.transpose(0, -1)
    return res.contiguous()


def _nuslerp(task: TensorTask) -> torch.Tensor:
    if all_equal(list(task.inputs)):
        return task.inputs[0].clone()
    w0, w1 = task.weights
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    flatten = bool(task.params["nuslerp_flatten"])
    row_wise = bool(task.params["nuslerp_row_wise"])
    if task.base is None:
        return nuslerp_tensors(
            t, task.inputs[0], task.inputs[1], flatten=flatten, row_wise=row_wise
        )
    d = task.deltas()
    return task.base + nuslerp_tensors(t, d[0], d[1], flatten=flatten, row_wise=row_wise)


def _multislerp(task: TensorTask) -> torch.Tensor:
    xs = list(task.inputs)
    if all_equal(xs):
        return xs[0].clone()
    eps = float(task.params["eps"])
    weights = task.weights
    if task.params["normalize_weights"]:
        total = math.fsum(weights)
        if total == 0.0:
            raise InvalidRecipe("multislerp: the weights sum to zero; cannot normalize them")
        weights = [w / total for w in weights]
    ds = task.deltas() if task.base is not None else xs
    norms = [dm.norm64(d) for d in ds]
    # (a zero task vector with eps = 0 contributes nothing instead of 0/0)
    terms = [
        _coef(w / (n + eps) if n + eps > 0.0 else 0.0, d) * d
        for w, d, n in zip(weights, ds, norms, strict=True)
    ]
    mean = terms[0]
    for term in terms[1:]:
        mean = mean + term
    mean_norm = dm.norm64(mean)
    if mean_norm < eps or mean_norm == 0.0:
        if len(ds) != 2:
            raise IncompatibleInputs(
                f"multislerp: tensor {task.name!r}: the weighted mean of the directions is ~0 "
                "(antipodal inputs with balancing weights); change the weights"
            )
        res = _combine(weights[0], ds[0], weights[1], ds[1])
    else:
        avg_norm = math.fsum(n * w for n, w in zip(norms, weights, strict=True))
        res = _coef(avg_norm / mean_norm, mean) * mean
    return res if task.base is None else task.base + res


_T = ParamSpec(
    "t",
    float,
    REQUIRED,
    doc="interpolation fraction from the first endpoint (the base, if any) to the second",
    minimum=0.0,
    maximum=1.0,
)

SLERP = StrategySpec(
    name="slerp",
    version=1,
    summary="spherical interpolation: base->contribution, or between two contributions",
    merge=_slerp,
    params=(_T,),
    min_models=1,
    max_models=2,
    determinism="exact",
    references=("https://github.com/arcee-ai/mergekit (slerp)",),
    merge_stored=_slerp_stored,
)

NUSLERP = StrategySpec(
    name="nuslerp",
    version=1,
    summary="slerp of two contributions with t from their weights; task vectors with a base",
    merge=_nuslerp,
    params=(
        ParamSpec(
            "nuslerp_flatten",
            bool,
            True,
            doc="slerp the whole tensor as one vector (else per row, or per column if row_wise)",
            varying=True,
        ),
        ParamSpec(
            "nuslerp_row_wise",
            bool,
            False,
            doc="without flatten: slerp vectors along dim 0 (mergekit's naming) instead of rows",
        ),
    ),
    min_models=2,
    max_models=2,
    determinism="exact",
    references=("https://github.com/arcee-ai/mergekit (nuslerp)",),
)

MULTISLERP = StrategySpec(
    name="multislerp",
    version=1,
    summary="weighted spherical mean of n contributions (of task vectors with a base)",
    merge=_multislerp,
    params=(
        ParamSpec(
            "normalize_weights", bool, True, doc="divide the weights by their sum", varying=False
        ),
        ParamSpec("eps", float, 1e-8, doc="numerical floor for norms", minimum=0.0),
    ),
    min_models=1,
    determinism="exact",
    references=("https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",),
)

SPECS: tuple[StrategySpec, ...] = (SLERP, NUSLERP, MULTISLERP)
