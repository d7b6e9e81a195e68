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

import torch

__all__ = ["acos", "cos", "dot64", "exp", "log", "norm64", "rowdot64", "scalar", "sin"]

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


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum(a * b)`` over all elements in float64: fixed chunks, partial sums added exactly.

    The chunking is a constant of this module (never the thread count), so the value is a pure
    function of the inputs; ``math.fsum`` adds the per-chunk sums with a single rounding.
    """
    fa = a.reshape(-1)
    fb = b.reshape(-1)
    parts = []
    for i in range(0, fa.numel(), _CHUNK):
        ca = fa[i : i + _CHUNK].to(torch.float64)
        cb = fb[i : i + _CHUNK].to(torch.float64)
        parts.append(float(lastdim_sum(ca * cb).item()))
    return math.fsum(parts)


def norm64(a: torch.Tensor) -> float:
    """The L2 norm of all elements, from :func:`dot64` of ``a`` with itself."""
    return math.sqrt(dot64(a, a))


def rowdot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b, dim=-1)`` in float64 (one value per row), in chunks of whole rows."""
    width = max(int(a.shape[-1]), 1) if a.dim() else 1
    a2 = a.reshape(-1, width)
    b2 = b.reshape(-1, width)
    if width > _CHUNK:  # a few very wide rows: chunked per row, never a whole float64 copy
        out = torch.tensor([dot64(a2[r], b2[r]) for r in range(a2.shape[0])], dtype=torch.float64)
        return out.reshape(a.shape[:-1]) if a.dim() else out.reshape(())
    rows = max(1, _CHUNK // width)
    parts = [
        lastdim_sum(a2[i : i + rows].to(torch.float64) * b2[i : i + rows].to(torch.float64))
        for i in range(0, a2.shape[0], rows)
    ]
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return out.reshape(a.shape[:-1]) if a.dim() else out.reshape(())
