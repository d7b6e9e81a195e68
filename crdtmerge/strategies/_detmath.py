"""Bit-reproducible float64 helpers for the geometric strategies.

torch's (and numpy's, and libm's) transcendental functions are not bit-identical across CPU
instruction sets: ``acos``/``sin``/``exp`` run SLEEF kernels under AVX2/AVX-512 and the C
library's scalar code under ``ATEN_CPU_CAPABILITY=default`` (and for the tail of every
vectorised chunk, whose boundaries move with the thread count). The slerp family needs a handful
of angles per tensor or per row, so this module evaluates them with IEEE-754 ``+ - * /`` and
``sqrt`` only (all correctly rounded, hence identical everywhere), in float64, on tensors of any
shape (a Python float is evaluated as a 0-d tensor). The accuracy (~1e-15 relative) is far below
the float32 rounding of the coefficients the results feed.

Reductions that feed these functions are order-fixed float64 sums (:func:`dot64`,
:func:`rowdot64`): DESIGN section 4 measured ``sum`` in float64 as identical for every ISA and
thread count, unlike ``dot``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "ROW",
    "TILE",
    "Tile",
    "acos",
    "cos",
    "dot64",
    "exp",
    "lastdim_sum",
    "log",
    "norm64",
    "rowdot64",
    "rowgram64",
    "scalar",
    "sin",
    "tiles2d",
    "tiles_of",
]

_PI = math.pi
_HALF_PI = math.pi / 2
_TWO_PI = 2 * math.pi
# Taylor coefficients of sin(r)/r in powers of r^2, up to r^24 (error < 1e-20 on [0, pi/2]).
_SIN_COEFFS = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(13)]
# Taylor coefficients of asin(s)/s in powers of s^2, up to s^12 (s <= 0.025 after halving).
_ASIN_COEFFS = [
    math.factorial(2 * k) / (4.0**k * math.factorial(k) ** 2 * (2 * k + 1)) for k in range(7)
]
_HALVINGS = 6
# ln 2 split for Cody-Waite reduction: _LN2_HI has trailing zero bits, so k * _LN2_HI is exact.
_LN2_HI = 0.693147180369123816490
_LN2_LO = 1.90821492927058770002e-10
_LN2 = math.log(2.0)
_INV_LN2 = 1.0 / math.log(2.0)
# Taylor coefficients of exp(r), r in [-0.35, 0.35], up to r^14 (error < 1e-18).
_EXP_COEFFS = [1.0 / math.factorial(k) for k in range(15)]
# log(m) = 2 atanh(z) = 2 (z + z^3/3 + ...), z = (m-1)/(m+1), |z| <= 0.1716: up to z^25.
_ATANH_COEFFS = [1.0 / (2 * k + 1) for k in range(13)]
_MANT_MASK = (1 << 52) - 1
_EXP_ONE = 1023 << 52


def _t(x: torch.Tensor | float) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64)
    return torch.tensor(float(x), dtype=torch.float64)


def sin(x: torch.Tensor | float) -> torch.Tensor:
    """``sin(x)`` in float64 from basic operations only (any real ``x``)."""
    x = _t(x)
    r = x - torch.floor(x / _TWO_PI) * _TWO_PI  # [0, 2pi)
    neg = r > _PI
    r = torch.where(neg, r - _PI, r)  # [0, pi]
    r = torch.where(r > _HALF_PI, _PI - r, r)  # [0, pi/2]
    r2 = r * r
    acc = torch.full_like(r, _SIN_COEFFS[-1])
    for c in reversed(_SIN_COEFFS[:-1]):
        acc = acc * r2 + c
    out = acc * r
    return torch.where(neg, -out, out)


def cos(x: torch.Tensor | float) -> torch.Tensor:
    """``cos(x)`` in float64 (``sin(x + pi/2)``)."""
    return sin(_t(x) + _HALF_PI)


def acos(c: torch.Tensor | float) -> torch.Tensor:
    """``acos(c)`` in float64 for ``c`` clamped to [-1, 1], from basic operations only.

    The angle of ``|c|`` is halved ``_HALVINGS`` times with the half-angle formulas (keeping
    its sine, so there is no cancellation near ``|c| = 1``), then ``asin`` of the small sine
    is a short series; negative ``c`` gives ``pi - acos(|c|)``.
    """
    c = torch.clamp(_t(c), -1.0, 1.0)
    a = torch.abs(c)
    co = a
    si = torch.sqrt((1.0 - a) * (1.0 + a))
    for _ in range(_HALVINGS):
        co = torch.sqrt((1.0 + co) * 0.5)
        si = si / (2.0 * co)
    s2 = si * si
    acc = torch.full_like(si, _ASIN_COEFFS[-1])
    for k in reversed(_ASIN_COEFFS[:-1]):
        acc = acc * s2 + k
    theta = acc * si * float(2**_HALVINGS)
    return torch.where(c < 0, _PI - theta, theta)


def exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` in float64 from basic operations and exact power-of-two scaling.

    ``x = k ln2 + r`` with integer ``k`` and ``|r| <= ln2 / 2``; ``exp(r)`` is a Taylor
    polynomial (Horner, in place: the same IEEE operations without temporaries) and ``2**k`` is
    built from its bits. Results below the smallest normal float64 flush to 0 (their float32
    images are 0 anyway).
    """
    x = _t(x)
    k = torch.floor(x * _INV_LN2 + 0.5)
    r = x - k * _LN2_HI
    r.sub_(k * _LN2_LO)
    acc = torch.full_like(r, _EXP_COEFFS[-1])
    for c in reversed(_EXP_COEFFS[:-1]):
        acc.mul_(r).add_(c)
    ki = k.clamp_(-1100.0, 1100.0).to(torch.int64)
    scale = ((ki.clamp(min=-1022) + 1023).clamp_(0, 2046) << 52).view(torch.float64)
    acc.mul_(scale)
    return acc.masked_fill_(ki < -1022, 0.0)


def log(y: torch.Tensor) -> torch.Tensor:
    """Natural log in float64 of positive normal ``y``, from basic operations and bit fields."""
    y = _t(y).contiguous()
    bits = y.view(torch.int64)
    e = (bits >> 52) - 1023
    m = ((bits & _MANT_MASK) | _EXP_ONE).view(torch.float64)  # [1, 2)
    big = m > math.sqrt(2.0)
    m = torch.where(big, m * 0.5, m)
    e = e.add_(big.to(torch.int64)).to(torch.float64)
    z = (m - 1.0).div_(m + 1.0)
    z2 = z * z
    acc = torch.full_like(z, _ATANH_COEFFS[-1])
    for c in reversed(_ATANH_COEFFS[:-1]):
        acc.mul_(z2).add_(c)
    acc.mul_(z).mul_(2.0).add_(e * _LN2_LO)
    return acc.add_(e.mul_(_LN2_HI))


def scalar(x: torch.Tensor) -> float:
    """A 0-d (or one-element) tensor as a Python float."""
    return float(x.reshape(()).item())


#: elements per float64 chunk in the reductions: bounds their temporary memory (3 x 32 MiB).
_CHUNK = 1 << 22


#: reduction rows: a last dimension wider than this is reduced in levels of rows this wide, so
#: every partial sum is computed by one thread in one fixed order, whatever the thread count
#: (a single wide reduction is split between threads, and its rounding follows the split).
ROW = 4096
_ROW = ROW  # below torch's GRAIN_SIZE (32768), so a row is always reduced serially

#: elements per tile of :func:`rowgram64` and :func:`tiles2d`. A tile's float64 scratch (a few
#: MiB) is allocated once and stays in the CPU cache, instead of fresh whole-tensor temporaries
#: whose pages the kernel must fault in and zero (40% of model_stock's time before); each op
#: on a tile is still large enough for torch to split it between threads cheaply. (Tiles
#: below torch's GRAIN_SIZE, run on two Python threads, were slower: per-op overhead and GIL.)
TILE = 1 << 17

#: ``load(r0, r1, c0, c1)``: the operands' tiles ``op[r0:r1, c0:c1]`` (see :func:`rowgram64`).
Loader = Callable[[int, int, int, int], Sequence[torch.Tensor]]
Tile = tuple[int, int, int, int]


def lastdim_sum(p: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``p.sum(dim=-1, dtype=dtype)`` in an order fixed by ``_ROW`` alone (any thread count).

    The last dimension is summed in rows of ``_ROW`` (each row by one thread), the part that
    does not fill a row on its own, and the row sums again the same way until at most ``_ROW``
    remain.
    """
    while p.shape[-1] > _ROW:
        width = p.shape[-1]
        m = width // _ROW
        head = p[..., : m * _ROW].reshape(*p.shape[:-1], m, _ROW).sum(dim=-1, dtype=dtype)
        if width > m * _ROW:
            tail = p[..., m * _ROW :].sum(dim=-1, keepdim=True, dtype=dtype)
            head = torch.cat([head, tail], dim=-1)
        p = head
    return p.sum(dim=-1, dtype=dtype)


def tiles2d(rows: int, width: int, size: int | None = None) -> list[Tile]:
    """``(r0, r1, c0, c1)`` tiles of at most ``size`` (default :data:`TILE`) elements covering a
    ``rows x width`` array.

    Whole rows when a row is narrower than ``size``, else ``size``-wide pieces of one row: a
    loop over the tiles touches each element once, with temporaries of bounded size.
    """
    size = TILE if size is None else size
    if width >= size:
        return [
            (r, r + 1, c0, min(width, c0 + size))
            for r in range(rows)
            for c0 in range(0, width, size)
        ]
    step = max(1, size // max(width, 1))
    return [(r0, min(rows, r0 + step), 0, width) for r0 in range(0, rows, step)]


class _Scratch:
    """float64 buffers for the tiles of one :func:`rowgram64` call, reused by every tile."""

    def __init__(self, n_ops: int, size: int) -> None:
        self.ops = torch.empty(n_ops * size, dtype=torch.float64)
        self.prod = torch.empty(size, dtype=torch.float64)

    def reduce(
        self,
        ops: Sequence[torch.Tensor],
        pairs: Sequence[tuple[int, int]],
        groups: int,
        out: torch.Tensor,
    ) -> None:
        """``out[p] = sums of `groups` equal runs of each row of op_i * op_j`` (float64).

        Each operand is converted to float64 once however many pairs use it (float32 products
        are exact in float64); ``out`` is a ``(len(pairs), rows, groups)`` view of the results.
        """
        r, c = ops[0].shape
        buf = self.ops[: len(ops) * r * c].view(len(ops), r, c)
        for i, op in enumerate(ops):
            buf[i].copy_(op)
        prod = self.prod[: r * c].view(r, c)
        for p, (i, j) in enumerate(pairs):
            torch.mul(buf[i], buf[j], out=prod)
            torch.sum(prod.view(r, groups, c // groups), dim=-1, out=out[p])


def _gram_tiles(rows: int, width: int) -> list[Tile]:
    """Tiles for :func:`_narrow_gram`: whole ``_ROW`` groups of a row, then the rows' tails."""
    full, tail = divmod(width, _ROW)
    tiles = []
    if full:
        cols = min(full, max(1, TILE // _ROW)) * _ROW
        step = max(1, TILE // cols)
        tiles += [
            (r0, min(rows, r0 + step), c0, min(full * _ROW, c0 + cols))
            for r0 in range(0, rows, step)
            for c0 in range(0, full * _ROW, cols)
        ]
    if tail:
        step = max(1, TILE // tail)
        tiles += [(r0, min(rows, r0 + step), full * _ROW, width) for r0 in range(0, rows, step)]
    return tiles


def _narrow_gram(
    load: Loader, n_ops: int, pairs: Sequence[tuple[int, int]], rows: int, width: int
) -> torch.Tensor:
    """:func:`rowgram64` for ``width <= _CHUNK``: ``lastdim_sum`` of each row's products.

    The first level of :func:`lastdim_sum` (sums of ``_ROW`` consecutive products, and of the
    tail of a row that does not fill a ``_ROW``) is computed tile by tile into a small
    ``(pairs, rows, groups)`` tensor; the rest of the reduction runs on that, as it would on
    the whole products.
    """
    full, tail = divmod(width, _ROW)
    groups = full + (1 if tail else 0)
    level1 = torch.empty(len(pairs), rows, groups, dtype=torch.float64)
    tiles = _gram_tiles(rows, width)
    scratch = _Scratch(n_ops, max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles))
    for r0, r1, c0, c1 in tiles:
        g0 = c0 // _ROW
        g1 = g0 + 1 if c1 - c0 < _ROW else c1 // _ROW  # the tail is one group
        scratch.reduce(load(r0, r1, c0, c1), pairs, g1 - g0, level1[:, r0:r1, g0:g1])
    if groups == 1:  # a row of at most _ROW elements: its one sum is the result
        return level1[..., 0]
    return lastdim_sum(level1)


def rowgram64(
    load: Loader, n_ops: int, pairs: Sequence[tuple[int, int]], rows: int, width: int
) -> torch.Tensor:
    """Several row-wise dot products in one pass: ``out[p] == rowdot64(op_i, op_j)``, bit for bit.

    ``load(r0, r1, c0, c1)`` returns the ``n_ops`` operands' tiles ``op[r0:r1, c0:c1]`` of the
    ``rows x width`` operands (any float dtype; they may be computed on the fly, e.g. offsets
    ``x - base``, so the whole operands never exist). Each tile is converted to float64 once
    for all ``pairs`` and reduced in cache-sized pieces with the same fixed-order sums as
    :func:`rowdot64` (``lastdim_sum`` per row; rows wider than ``_CHUNK`` as ``_CHUNK`` pieces
    added with ``math.fsum``), so the values equal those of separate calls.

    Returns:
        a ``(len(pairs), rows)`` float64 tensor.
    """
    if rows == 0 or width == 0:
        return torch.zeros(len(pairs), rows, dtype=torch.float64)
    if width <= _CHUNK:
        return _narrow_gram(load, n_ops, pairs, rows, width)
    out = torch.empty(len(pairs), rows, dtype=torch.float64)
    for r in range(rows):
        parts: list[list[float]] = [[] for _ in pairs]
        for s in range(0, width, _CHUNK):

            def load_piece(
                r0: int, r1: int, c0: int, c1: int, r: int = r, s: int = s
            ) -> Sequence[torch.Tensor]:
                return load(r + r0, r + r1, s + c0, s + c1)

            piece = _narrow_gram(
                load_piece,
                n_ops,
                pairs,
                1,
                min(_CHUNK, width - s),
            )
            for p, acc in enumerate(parts):
                acc.append(float(piece[p, 0]))
        out[:, r] = torch.tensor([math.fsum(acc) for acc in parts], dtype=torch.float64)
    return out


def tiles_of(*tensors: torch.Tensor) -> Loader:
    """A :func:`rowgram64` loader over existing 2-D tensors (views, no copies)."""
    return lambda r0, r1, c0, c1: [t[r0:r1, c0:c1] for t in tensors]


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum(a * b)`` over all elements in float64, as :func:`rowdot64` of one flat row.

    The chunking is a constant of this module (never the thread count), so the value is a pure
    function of the inputs; pieces of more than ``_CHUNK`` elements are added with
    ``math.fsum`` (a single rounding).
    """
    return scalar(rowdot64(a.reshape(-1), b.reshape(-1)))


def norm64(a: torch.Tensor) -> float:
    """The L2 norm of all elements, from :func:`dot64` of ``a`` with itself."""
    return math.sqrt(dot64(a, a))


def rowdot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b, dim=-1)`` in float64 (one value per row): :func:`rowgram64` of one pair."""
    width = max(int(a.shape[-1]), 1) if a.dim() else 1
    a2 = a.reshape(-1, width)
    b2 = b.reshape(-1, width)
    if not (a2.is_contiguous() and b2.is_contiguous()):
        out = _strided_rowdot64(a2, b2)
    elif a is b:
        out = rowgram64(tiles_of(a2), 1, [(0, 0)], a2.shape[0], width)[0]
    else:
        out = rowgram64(tiles_of(a2, b2), 2, [(0, 1)], a2.shape[0], width)[0]
    return out.reshape(a.shape[:-1]) if a.dim() else out.reshape(())


def _strided_rowdot64(a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """:func:`rowdot64` of non-contiguous rows (nuslerp ``row_wise`` walks matrix columns).

    ``.to(float64)`` keeps a dense tensor's strides, so these products are reduced along the
    strided dimension, in a different (equally fixed) order than contiguous rows. Merges
    already made this way must keep their bits, so this path stays as it was.
    """
    width = a2.shape[1]
    if width > _CHUNK:
        return torch.tensor(
            [_strided_dot64(a2[r], b2[r]) for r in range(a2.shape[0])], dtype=torch.float64
        )
    rows = max(1, _CHUNK // width)
    parts = [
        lastdim_sum(a2[i : i + rows].to(torch.float64) * b2[i : i + rows].to(torch.float64))
        for i in range(0, a2.shape[0], rows)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _strided_dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """One wide strided row of :func:`_strided_rowdot64`: ``_CHUNK`` pieces, ``math.fsum``."""
    fa = a.reshape(-1)
    fb = b.reshape(-1)
    parts = []
    for i in range(0, fa.numel(), _CHUNK):
        ca = fa[i : i + _CHUNK].to(torch.float64)
        cb = fb[i : i + _CHUNK].to(torch.float64)
        parts.append(float(lastdim_sum(ca * cb).item()))
    return math.fsum(parts)
