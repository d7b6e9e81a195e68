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
    polynomial and ``2**k`` is built from its bits. Results below the smallest normal float64
    flush to 0 (their float32 images are 0 anyway).
    """
    x = _t(x)
    k = torch.floor(x * _INV_LN2 + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    acc = torch.full_like(r, _EXP_COEFFS[-1])
    for c in reversed(_EXP_COEFFS[:-1]):
        acc = acc * r + c
    ki = k.clamp(-1100.0, 1100.0).to(torch.int64)
    lo = torch.clamp(ki, min=-1022)
    hi = ki - lo  # <= 0: a second scale for results far below 2**-1022 (then 0)
    two_lo = ((lo + 1023).clamp(0, 2046) << 52).view(torch.float64)
    two_hi = torch.where(hi < 0, torch.zeros_like(acc), torch.ones_like(acc))
    return acc * two_lo * two_hi


def log(y: torch.Tensor) -> torch.Tensor:
    """Natural log in float64 of positive normal ``y``, from basic operations and bit fields."""
    y = _t(y).contiguous()
    bits = y.view(torch.int64)
    e = (bits >> 52) - 1023
    m = ((bits & _MANT_MASK) | _EXP_ONE).view(torch.float64)  # [1, 2)
    big = m > math.sqrt(2.0)
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e).to(torch.float64)
    z = (m - 1.0) / (m + 1.0)
    z2 = z * z
    acc = torch.full_like(z, _ATANH_COEFFS[-1])
    for c in reversed(_ATANH_COEFFS[:-1]):
        acc = acc * z2 + c
    return e * _LN2_HI + (2.0 * z * acc + e * _LN2_LO)


def scalar(x: torch.Tensor) -> float:
    """A 0-d (or one-element) tensor as a Python float."""
    return float(x.reshape(()).item())


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum(a * b)`` over all elements, computed in float64 (order-fixed reduction)."""
    return float((a.to(torch.float64) * b.to(torch.float64)).sum().item())


def norm64(a: torch.Tensor) -> float:
    """The L2 norm of all elements, from a float64 sum of squares."""
    a64 = a.to(torch.float64)
    return math.sqrt(float((a64 * a64).sum().item()))


def rowdot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b, dim=-1)`` in float64 (one value per row)."""
    return (a.to(torch.float64) * b.to(torch.float64)).sum(dim=-1)
