"""Shared pieces of the sparsify-and-combine strategies (private).

Every piece here is written once and reused by ``linear``, ``ties``, ``dare``, ``della``,
``breadcrumbs``, ``magmax``, ``sce``, ``ram``, ``pcb`` and ``consensus``:

- :func:`fixed_sum` and :func:`l1_norm`: full reductions whose bits do not depend on the thread
  count (torch's plain ``sum`` of a large tensor splits the work across threads and so changes
  its rounding with ``torch.set_num_threads``; a row-wise ``sum(dim=1)`` does not, because every
  output row is reduced by exactly one thread with a fixed algorithm);
- :func:`topk_mask`: keep exactly ``k`` entries of a non-negative score, ties broken by
  (score descending, flat index ascending). The k-th largest value is found by a radix select on
  the IEEE-754 bit patterns (``bincount`` of 16-bit digits), which is linear time and several
  times faster than ``kthvalue`` and far faster than a full ``argsort``;
- :func:`magnitude_mask`, :func:`outlier_mask`, :func:`random_mask`, :func:`rank_keep_prob`:
  the trim rules of TIES (mergekit ``magnitude``), breadcrumbs (``magnitude_outliers``), DARE
  (``bernoulli``) and DELLA (``della_magprune``);
- :func:`apply_mask`: zero the dropped entries, with mergekit's L1-norm-matching rescale;
- :func:`elect_sign` and :func:`combine`: mergekit's generalized task arithmetic (weights
  applied before the sign election, disjoint merge, ``normalize``, ``lambda``);
- :func:`magnitude_key` / :func:`histogram_summary` / :func:`threshold_from_histograms`: the
  streaming whole-model ("global") top-k threshold used by ``trim_scope="model"``.

All arithmetic is plain elementwise ``+``, ``*``, ``/`` in the compute dtype, contributions are
accumulated in the given (canonical) order by a Python loop over contributions (never over
elements), and no fused kernel (``lerp``, ``add(alpha=)``, ``addcmul``) is used.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InvalidRecipe
from .base import TensorTask

__all__ = [
    "HIST_BINS",
    "Band",
    "Cut",
    "Keep",
    "apply_mask",
    "base_and_deltas",
    "chunked_cut",
    "combine",
    "combine_chunk",
    "elect_sign",
    "fixed_sum",
    "histogram_summary",
    "l1_norm",
    "magnitude_key",
    "magnitude_mask",
    "magnitude_cut",
    "materialize",
    "magnitude_topk",
    "ordered_sum",
    "outlier_mask",
    "Uniforms",
    "random_drop",
    "random_mask",
    "rank_drop",
    "rank_keep_prob",
    "threshold_from_histograms",
    "topk_count",
    "topk_mask",
    "weight_totals",
]

#: elements per chunk of the elementwise stages (1 MiB of float32: stays in the CPU cache).
CHUNK = 1 << 18

# Row length of the fixed-order reduction; below torch's GRAIN_SIZE (32768) so the last
# reduction is always serial.
_ROW = 4096


def fixed_sum(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The sum of all elements of ``x`` in ``dtype``, bit-identical for any thread count.

    The flat tensor is summed as rows of 4096 (each row reduced by one thread), the row sums
    again as rows, until fewer than 4096 values remain; the tail that does not fill a row is
    summed on its own (serially) and appended.

    Returns:
        a 0-d tensor of ``dtype``.
    """
    v = x.reshape(-1)
    while v.numel() > _ROW:
        m = v.numel() // _ROW
        head = v[: m * _ROW].view(m, _ROW).sum(dim=1, dtype=dtype)
        if v.numel() > m * _ROW:
            tail = v[m * _ROW :].sum(dtype=dtype).reshape(1)
            head = torch.cat([head, tail])
        v = head
    return v.sum(dtype=dtype)


def l1_norm(x: torch.Tensor) -> float:
    """``sum |x|`` in float64, bit-identical to ``fixed_sum(x.abs())``, as a Python float.

    The first level of :func:`fixed_sum` (rows of 4096) is computed chunk by chunk, so ``|x|``
    is never materialised in full; the row sums are then reduced by :func:`fixed_sum` itself.
    """
    v = x.reshape(-1)
    n = v.numel()
    if n <= _ROW:
        return float(v.abs().sum(dtype=torch.float64))
    m = n // _ROW
    rows = torch.empty(m + (1 if n > m * _ROW else 0), dtype=torch.float64)
    step = CHUNK - CHUNK % _ROW
    for start in range(0, m * _ROW, step):
        stop = min(start + step, m * _ROW)
        rows[start // _ROW : stop // _ROW] = (
            v[start:stop].abs().view(-1, _ROW).sum(dim=1, dtype=torch.float64)
        )
    if n > m * _ROW:
        rows[m] = v[m * _ROW :].abs().sum(dtype=torch.float64)
    return float(fixed_sum(rows, torch.float64))


def ordered_sum(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``terms[0] + terms[1] + ...`` left to right (a new tensor; the terms are untouched)."""
    acc = terms[0].clone()
    for t in terms[1:]:
        acc += t
    return acc


# ----------------------------------------------------------------------------- top-k selection

_DIGIT = 16
_DIGIT_MASK = (1 << _DIGIT) - 1


def _int_view(score: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a non-negative float tensor as integers (order-preserving)."""
    flat = score.reshape(-1)
    if flat.dtype == torch.float32:
        return flat.view(torch.int32)
    if flat.dtype == torch.float64:
        return flat.view(torch.int64)
    return flat.to(torch.float32).view(torch.int32)


def _kth_largest_key(keys: torch.Tensor, k: int) -> tuple[int, int, int]:
    """Radix select on non-negative integer keys (int32 < 2**31 or int64 < 2**63).

    Returns:
        ``(key, above, equal)``: the k-th largest key (1-based), how many keys are strictly
        greater, and how many are equal to it.
    """
    bits = 32 if keys.dtype == torch.int32 else 64
    shifts = list(range(bits - _DIGIT, -1, -_DIGIT))
    cand = keys
    rank = k  # wanted: the rank-th largest among cand
    prefix = 0
    above = 0
    equal = 0
    for level, shift in enumerate(shifts):
        digits = (cand >> shift) & _DIGIT_MASK if shift else cand & _DIGIT_MASK
        # small histograms in numpy: torch launches thread-pool work even for 65536 bins
        counts = np.bincount(digits.numpy(), minlength=1 << _DIGIT)
        from_top = np.cumsum(counts[::-1])  # from_top[j] = #digits >= (65535 - j)
        j = int(np.searchsorted(from_top, rank))
        d = _DIGIT_MASK - j
        n_d = int(counts[d])
        greater = int(from_top[j]) - n_d
        above += greater
        rank -= greater
        prefix |= d << shift
        equal = n_d
        if level + 1 < len(shifts):
            cand = cand[digits == d]
    return prefix, above, equal


_LITTLE = sys.byteorder == "little"


Chunks = Callable[[int, int], torch.Tensor]


def _flat_chunks(x: torch.Tensor) -> Chunks:
    flat = x.reshape(-1)
    return lambda start, stop: flat[start:stop]


def _magnitude_kth_float32(chunks: Chunks, n: int, k: int) -> tuple[torch.Tensor, int, int]:
    """Radix select of the k-th largest ``|x|`` of float32 values, without ``abs``.

    ``chunks(start, stop)`` yields the contiguous float32 values ``x[start:stop]`` (a view, or
    computed on the fly, e.g. ``x_i - base``). Level 1 histograms the high 16 bits of every
    element (sign folded away) from a strided int16 view; level 2 histograms the low 16 bits of
    the few elements in the chosen bucket. Everything is chunked, so nothing full-size is
    allocated (``np.bincount`` widens its input to 8-byte integers).

    Returns:
        ``(threshold, above, equal)``: the k-th largest magnitude as a 0-d float32 tensor, how
        many magnitudes are strictly greater, and how many are equal to it.
    """
    raw = np.zeros(1 << 16, dtype=np.int64)
    for start in range(0, n, CHUNK):
        halves = chunks(start, min(start + CHUNK, n)).view(torch.int16)[1::2]
        raw += np.bincount(halves.numpy().view(np.uint16), minlength=1 << 16)
    counts = raw[: 1 << 15] + raw[1 << 15 :]
    from_top = np.cumsum(counts[::-1])
    j = int(np.searchsorted(from_top, k))
    d = (1 << 15) - 1 - j
    above = int(from_top[j]) - int(counts[d])
    rank = k - above
    counts2 = np.zeros(1 << 16, dtype=np.int64)
    for start in range(0, n, CHUNK):
        c = chunks(start, min(start + CHUNK, n))
        h = c.view(torch.int16)[1::2]
        in_bucket = (h == d) | (h == d - (1 << 15))
        low = c.view(torch.int32)[in_bucket] & _DIGIT_MASK
        counts2 += np.bincount(low.numpy(), minlength=1 << 16)
    from_top2 = np.cumsum(counts2[::-1])
    j2 = int(np.searchsorted(from_top2, rank))
    lo = _DIGIT_MASK - j2
    above += int(from_top2[j2]) - int(counts2[lo])
    key = (d << 16) | lo
    threshold = torch.tensor([key], dtype=torch.int32).view(torch.float32)[0]
    return threshold, above, int(counts2[lo])


@dataclass(frozen=True)
class Cut:
    """The top ``k`` entries by magnitude, as a rule: ``|x| > t``, or ``|x| == t`` at a flat
    index below ``until`` (the index tie-break of :func:`topk_mask`; ``until = n`` keeps every
    tie)."""

    t: torch.Tensor
    until: int

    def top(self, c: torch.Tensor, start: int) -> torch.Tensor:
        """Bool mask of the entries of chunk ``c`` (flat offset ``start``) inside the top k."""
        stop = start + c.numel()
        if self.until >= stop:
            return (c >= self.t) | (c <= -self.t)
        if self.until <= start:
            return (c > self.t) | (c < -self.t)
        split = self.until - start
        return torch.cat([self.top(c[:split], start), self.top(c[split:], self.until)])


@dataclass(frozen=True)
class Band:
    """A keep rule by magnitude rank: inside the top ``lo`` and outside the top ``hi`` (a
    missing cut is no bound). Evaluated chunk by chunk, never materialised in full."""

    lo: Cut | None = None
    hi: Cut | None = None

    def drop(self, c: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Bool mask of the entries of chunk ``c`` (flat offset ``start``) to drop."""
        out: torch.Tensor | None = None
        if self.lo is not None:
            out = self.lo.top(c, start).logical_not_()
        if self.hi is not None:
            high = self.hi.top(c, start)
            out = high if out is None else out.logical_or_(high)
        return out if out is not None else torch.zeros(c.shape, dtype=torch.bool)


Keep = torch.Tensor | Band | None


def materialize(keep: Keep, x: torch.Tensor) -> torch.Tensor:
    """The keep rule as a bool tensor shaped like ``x``."""
    if keep is None:
        return torch.ones(x.shape, dtype=torch.bool)
    if isinstance(keep, Band):
        return keep.drop(x.reshape(-1)).logical_not_().reshape(x.shape)
    return keep


def magnitude_cut(x: torch.Tensor, k: int) -> Cut | None:
    """The rule selecting exactly the top ``k`` of ``|x|`` (``0 < k < n``), or None when the
    fast path does not apply (not contiguous little-endian float32); see :func:`magnitude_topk`.
    """
    n = x.numel()
    if not 0 < k < n or x.dtype != torch.float32 or not _LITTLE or not x.is_contiguous():
        return None
    return chunked_cut(_flat_chunks(x), n, k)


def chunked_cut(chunks: Chunks, n: int, k: int) -> Cut:
    """:func:`magnitude_cut` over float32 values given chunk by chunk (``0 < k < n``)."""
    t, above, equal = _magnitude_kth_float32(chunks, n, k)
    need = k - above
    if need == equal:
        return Cut(t, n)
    seen = 0
    for start in range(0, n, CHUNK):
        c = chunks(start, min(start + CHUNK, n))
        ties = (c == t) | (c == -t)
        here = int(torch.count_nonzero(ties))
        if seen + here >= need:
            pos = torch.nonzero(ties).reshape(-1)[need - seen - 1]
            return Cut(t, start + int(pos) + 1)
        seen += here
    raise AssertionError("unreachable: the k-th value has ties")


def magnitude_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask of exactly ``k`` entries of ``x`` by ``|x|`` (same order as :func:`topk_mask`).

    Equivalent to ``topk_mask(x.abs(), k)``; float32 tensors take a faster path that never
    materialises ``|x|`` (``-0.0`` counts as a zero magnitude).
    """
    n = x.numel()
    if k >= n:
        return torch.ones(x.shape, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool)
    cut = magnitude_cut(x, k)
    if cut is None:
        return topk_mask(x.abs(), k)
    return cut.top(x.reshape(-1), 0).reshape(x.shape)


def topk_count(n: int, density: float) -> int:
    """mergekit's ``k`` for a density: ``int(density * n)``, at least 1 when density > 0."""
    if density <= 0.0:
        return 0
    if density >= 1.0:
        return n
    return max(1, int(density * n))


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries of a non-negative, finite ``score``.

    The kept entries are the first ``k`` in the order (score descending, flat index ascending):
    the k-th largest value is found exactly (radix select on the bit patterns); every entry
    above it is kept and, of the entries equal to it, those with the smallest flat indices.
    ``-0.0`` is never passed here (scores are ``abs`` values or non-negative products).

    Returns:
        a bool tensor shaped like ``score``.
    """
    n = score.numel()
    if k >= n:
        return torch.ones(score.shape, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(score.shape, dtype=torch.bool)
    keys = _int_view(score)
    key, above, equal = _kth_largest_key(keys, k)
    need = k - above
    if need == equal:
        mask = keys >= key
    else:
        mask = keys > key
        ties = torch.nonzero(keys == key).reshape(-1)[:need]
        mask[ties] = True
    return mask.reshape(score.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> Keep:
    """mergekit ``magnitude``: keep the top ``int(density * n)`` entries by ``|delta|``.

    Returns:
        None when everything is kept (density >= 1), a :class:`Band` when no tie needs
        breaking, else the keep mask.
    """
    if density >= 1.0:
        return None
    n = delta.numel()
    k = topk_count(n, density)
    if k >= n:
        return None
    if k <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    cut = magnitude_cut(delta, k)
    return Band(lo=cut) if cut is not None else magnitude_topk(delta, k)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> Keep:
    """mergekit ``magnitude_outliers`` (Model Breadcrumbs).

    With ``n`` entries ranked by ``|delta|``: drop the top ``n_top = int(gamma * n)`` and the
    bottom ``n_bot = n - int(density * n) - n_top``; when ``n_bot < 0`` fewer top entries are
    dropped (``n_top += n_bot``) so that ``int(density * n)`` entries remain. Ranks use the
    order of :func:`topk_mask` (ties by flat index).

    Returns:
        None when everything is kept, a :class:`Band` when no tie needs breaking, else the
        keep mask.
    """
    if density >= 1.0 and gamma <= 0.0:
        return None
    n = delta.numel()
    target = int(density * n) if density < 1.0 else n
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    if n_bot == 0 and n_top == 0:
        return None
    if n - n_bot <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    lo = magnitude_cut(delta, n - n_bot) if n_bot > 0 else None
    hi = magnitude_cut(delta, n_top) if n_top > 0 else None
    if (lo is not None or n_bot == 0) and (hi is not None or n_top == 0):
        return Band(lo=lo, hi=hi)
    keep = magnitude_topk(delta, n - n_bot)
    if n_top > 0:
        keep &= ~magnitude_topk(delta, n_top)
    return keep


class Uniforms:
    """Contribution ``i``'s float32 uniforms for this tensor, read chunk by chunk.

    Bit-identical to ``task.rng.uniform(n, stream=task.streams[i])[start:stop]`` (the top 24
    bits of each 32-bit word times ``2**-24``), without materialising all ``n`` floats.
    """

    def __init__(self, task: TensorTask, i: int, n: int) -> None:
        self._words = task.rng.words(n, stream=task.streams[i])

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        w = self._words[start:stop] >> np.uint32(8)
        return torch.from_numpy(w.astype(np.float32) * np.float32(2.0**-24))


def random_mask(
    task: TensorTask, i: int, shape: torch.Size, p: float | torch.Tensor
) -> torch.Tensor:
    """Keep mask ``u < p`` with float32 uniforms of contribution ``i``'s stream."""
    n = 1
    for s in shape:
        n *= int(s)
    u = task.rng.uniform(n, stream=task.streams[i]).reshape(tuple(shape))
    if isinstance(p, torch.Tensor):
        return u < p.to(torch.float32)
    return u < torch.tensor(p, dtype=torch.float32)


def random_drop(
    task: TensorTask, i: int, delta: torch.Tensor, density: float, rescale: str | None
) -> torch.Tensor:
    """DARE's drop in place: keep where ``u < density`` (float32), chunk by chunk.

    ``rescale``: ``"l1"`` (mergekit L1 matching), ``"inverse"`` (divide by ``density``) or
    None. Returns ``delta``.
    """
    flat = delta.view(-1)
    n = flat.numel()
    u = Uniforms(task, i, n)
    p = torch.tensor(density, dtype=torch.float32)
    before = l1_norm(delta) if rescale == "l1" else 0.0
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        flat[start:stop].masked_fill_(u(start, stop) >= p, 0.0)
    if rescale == "l1":
        after = l1_norm(delta)
        if before >= 1e-7 and after >= 1e-7:
            delta *= before / after
    elif rescale == "inverse" and density > 0.0:
        delta /= density
    return delta


def rank_drop(
    task: TensorTask,
    i: int,
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: str | None,
) -> torch.Tensor:
    """DELLA's drop in place: keep where ``u < rank_keep_prob``, a block of rows at a time.

    ``rescale``: ``"l1"``, ``"inverse"`` (divide each survivor by its own ``p``) or None.
    """
    cols = delta.shape[-1] if delta.dim() else 1
    rows = delta.view(-1, cols)
    n = rows.numel()
    u = Uniforms(task, i, n)
    before = l1_norm(delta) if rescale == "l1" else 0.0
    step = max(1, CHUNK // cols)
    for r0 in range(0, rows.shape[0], step):
        block = rows[r0 : r0 + step]
        p = rank_keep_prob(block, density, epsilon)
        block.masked_fill_(u(r0 * cols, r0 * cols + block.numel()).view_as(p) >= p, 0.0)
        if rescale == "inverse":
            block /= p.to(block.dtype)
    if rescale == "l1":
        after = l1_norm(delta)
        if before >= 1e-7 and after >= 1e-7:
            delta *= before / after
    return delta


def rank_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA (mergekit ``della_magprune``) keep probabilities, float32.

    Per row (the last dimension; a 1-D tensor is one row; higher ranks are flattened to
    (rows, last dim)): rank ``|delta|`` ascending (ties by index), ``r = rank / (cols - 1)``,
    ``p = density - epsilon + 2 * epsilon * r``. A row of one element gets ``p = density``.
    """
    cols = delta.shape[-1] if delta.dim() else 1
    if cols == 1:
        return torch.full(delta.shape, density, dtype=torch.float32)
    rows = delta.reshape(-1, cols).abs()
    shift = (cols - 1).bit_length()
    if rows.dtype == torch.float32 and shift <= 32:
        # unique int64 keys (|x| bits, column index): sorting the keys alone orders by
        # (|x|, index) whatever the algorithm, and numpy's SIMD sort is much faster than an
        # argsort; the column index comes back from the low bits.
        keys = rows.contiguous().view(torch.int32).to(torch.int64).numpy()
        keys <<= shift
        keys |= np.arange(cols, dtype=np.int64)
        keys.sort(axis=1)
        keys &= (1 << shift) - 1
        order = torch.from_numpy(keys)
    else:
        order = torch.sort(rows, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, dtype=order.dtype).expand_as(order))
    r = ranks.to(torch.float32) / torch.tensor(float(cols - 1), dtype=torch.float32)
    lo = torch.tensor(density - epsilon, dtype=torch.float32)
    p = lo + r * torch.tensor(2.0 * epsilon, dtype=torch.float32)
    return p.reshape(delta.shape)


def apply_mask(
    delta: torch.Tensor, mask: Keep, rescale: str | None = None, eps: float = 1e-7
) -> torch.Tensor:
    """Zero the dropped entries of ``delta`` in place; optionally rescale the survivors.

    ``mask`` is a keep mask, a :class:`Band` or None (keep all). ``rescale="l1"`` is mergekit's
    L1-norm matching: the survivors are multiplied by ``L1(delta before) / L1(delta after)``
    (norms accumulated in float64 with a fixed order, the ratio applied as one scalar multiply
    in the compute dtype), skipped when either norm is below ``eps``. ``None`` leaves the
    survivors as they are. Works chunk by chunk. Returns ``delta``.
    """
    if rescale not in (None, "l1"):
        raise InvalidRecipe(f"unknown rescale rule {rescale!r}")
    if mask is None:
        return delta
    before = l1_norm(delta) if rescale == "l1" else 0.0
    flat = delta.view(-1)
    flat_mask = mask.reshape(-1) if isinstance(mask, torch.Tensor) else None
    for start in range(0, flat.numel(), CHUNK):
        c = flat[start : start + CHUNK]
        if flat_mask is not None:
            c.masked_fill_(~flat_mask[start : start + CHUNK], 0.0)
        else:
            assert isinstance(mask, Band)
            c.masked_fill_(mask.drop(c, start), 0.0)
    if rescale == "l1":
        after = l1_norm(delta)
        if before >= eps and after >= eps:
            delta *= before / after
    return delta


def base_and_deltas(task: TensorTask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base and fresh task vectors (raises ``InvalidRecipe`` without a base)."""
    deltas = [d.contiguous() for d in task.deltas()]  # the in-place stages use flat views
    assert task.base is not None  # for the type checker: deltas() raised otherwise
    return task.base, deltas


# ------------------------------------------------------------------------- election and merge


def elect_sign(weighted: Sequence[torch.Tensor], method: str) -> torch.Tensor:
    """mergekit ``get_mask`` majority sign: +1 where the vote is >= 0, else -1.

    ``method="sum"``: the vote is the sum of the (weighted) deltas; ``"count"``: the sum of
    their signs. Returns a new tensor of +1/-1 in the compute dtype.
    """
    if method == "sum":
        vote = ordered_sum(weighted)
    elif method == "count":
        vote = torch.sign(weighted[0])
        for w in weighted[1:]:
            vote.add_(torch.sign(w))
    else:
        raise InvalidRecipe(f"sign_method must be 'sum' or 'count', got {method!r}")
    vote.sign_()
    return vote.masked_fill_(vote == 0, 1.0)


def combine(
    base: torch.Tensor | None,
    deltas: list[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: str | None,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """mergekit generalized task arithmetic, after sparsification.

    ``w_i * delta_i`` (weights applied **before** the sign election, as in mergekit, issue
    #474); with ``consensus`` (``"sum"``/``"count"``) each weighted delta keeps only entries
    whose sign equals the elected sign (zeros never agree) and the divisor is the element-wise
    sum of the agreeing weights (0 replaced by 1); without it the divisor is ``sum w_i``
    (replaced by 1 when ``|sum| < 1e-8``). Then ``/ divisor`` if ``normalize``, ``* lambda``,
    ``+ base`` (``base=None`` returns the merged task vector itself).

    The agreeing entries are summed as magnitudes ``max(w_i delta_i * s, 0)`` (``s`` the
    elected sign, +1/-1) and multiplied by ``s`` at the end: IEEE rounding is symmetric in the
    sign, so this is bit-identical to summing the signed agreeing values, in fewer passes.

    The work runs in chunks of ``CHUNK`` elements so that every temporary stays in the CPU
    cache (elementwise results do not depend on the chunking). ``deltas`` are consumed
    (overwritten).
    """
    if not deltas:
        raise InvalidRecipe("a merge needs at least one contribution")
    shape = deltas[0].shape
    out = torch.empty(shape, dtype=deltas[0].dtype)
    flat_out = out.view(-1)
    flat = [d.reshape(-1) for d in deltas]
    flat_base = base.reshape(-1) if base is not None else None
    unit, total = weight_totals(weights)
    n = flat_out.numel()
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        combine_chunk(
            flat_out[start:stop],
            [d[start:stop] for d in flat],
            weights,
            consensus=consensus,
            normalize=normalize,
            lambda_=lambda_,
            base=flat_base[start:stop] if flat_base is not None else None,
            unit=unit,
            total=total,
        )
    return out


def weight_totals(weights: Sequence[float]) -> tuple[bool, float]:
    """``(unit, total)`` for :func:`combine_chunk`.

    ``unit``: all weights are 1 (then the agreeing contributions are counted in uint8 -- a bool
    viewed as uint8 adds in place without a promoted temporary; small counts are exact, so the
    divisor equals the float sum of the agreeing 1.0 weights bit for bit). ``total``: the sum of
    the weights in order, 1 when ``|sum| < 1e-8`` (mergekit).
    """
    unit = len(weights) < 256 and all(w == 1.0 for w in weights)
    total = 0.0
    for w in weights:
        total += w
    if abs(total) < 1e-8:
        total = 1.0
    return unit, total


def combine_chunk(
    mixed: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: str | None,
    normalize: bool,
    lambda_: float,
    base: torch.Tensor | None,
    unit: bool,
    total: float,
) -> None:
    """One chunk of :func:`combine`, written into ``mixed`` (``deltas`` are overwritten)."""
    weighted = []
    for c, w in zip(deltas, weights, strict=True):
        if w != 1.0:
            c *= w
        weighted.append(c)
    if consensus is not None:
        _disjoint_merge(mixed, weighted, weights, consensus, normalize, unit)
    else:
        mixed.copy_(weighted[0])
        for c in weighted[1:]:
            mixed += c
        if normalize:
            mixed /= total
    if lambda_ != 1.0:
        mixed *= lambda_
    if base is not None:
        mixed += base


def _disjoint_merge(
    mixed: torch.Tensor,
    weighted: list[torch.Tensor],
    weights: Sequence[float],
    consensus: str,
    normalize: bool,
    unit: bool,
) -> None:
    """One chunk of the TIES election + disjoint merge, written into ``mixed``."""
    majority = elect_sign(weighted, consensus)
    count: torch.Tensor | None = None
    divisor: torch.Tensor | None = None
    scratch: torch.Tensor | None = None
    for i, (wd, w) in enumerate(zip(weighted, weights, strict=True)):
        wd.mul_(majority).clamp_(min=0.0)
        if normalize:
            agree = wd > 0
            if unit:
                if count is None:
                    count = torch.zeros(wd.shape, dtype=torch.uint8)
                count.add_(agree.view(torch.uint8))
            else:
                if scratch is None:
                    scratch = torch.empty_like(wd)
                scratch.copy_(agree).mul_(w)
                divisor = scratch.clone() if divisor is None else divisor.add_(scratch)
        if i == 0:
            mixed.copy_(wd)
        else:
            mixed += wd
    mixed *= majority
    if count is not None:
        mixed /= count.clamp_(min=1).to(mixed.dtype)
    elif divisor is not None:
        divisor.masked_fill_(divisor == 0, 1.0)
        mixed /= divisor


# --------------------------------------------------------------- whole-model ("global") top-k

#: magnitude keys keep the float32 exponent and the top 11 mantissa bits (relative bucket
#: width 2**-11); 2**19 possible keys for non-negative values.
_KEY_SHIFT = 12
HIST_BINS = 1 << (31 - _KEY_SHIFT)


def magnitude_key(delta: torch.Tensor) -> torch.Tensor:
    """Bucket key of ``|delta|`` (int64, order-preserving, ``HIST_BINS`` values).

    float64 deltas are rounded to float32 first (a monotone map), so the key only depends on
    the value.
    """
    a = delta.abs().reshape(-1)
    if a.dtype != torch.float32:
        a = a.to(torch.float32)
    return (a.view(torch.int32) >> _KEY_SHIFT).to(torch.int64)


def histogram_summary(delta: torch.Tensor, target: float) -> dict[str, Any]:
    """Sparse histogram of :func:`magnitude_key` for one tensor of one model.

    Returns:
        ``{"keys": int64 tensor, "counts": int64 tensor, "target": float, "n": int}`` where
        ``target`` is the number of entries this tensor asks to keep (``density * numel``).
    """
    counts = torch.bincount(magnitude_key(delta), minlength=HIST_BINS)
    keys = torch.nonzero(counts).reshape(-1)
    return {"keys": keys, "counts": counts[keys], "target": float(target), "n": delta.numel()}


def threshold_from_histograms(parts: Sequence[dict[str, Any]]) -> int:
    """The key of the global k-th largest ``|delta|`` over many tensor summaries.

    ``k = int(sum of targets)`` (summed in the given order), clamped to ``[0, total]``.
    Returns ``HIST_BINS`` (keep nothing) when ``k == 0``; entries with ``key >= threshold`` are
    kept, so slightly more than ``k`` survive (the bucket of the k-th value is kept whole, as
    the paper's ``>=`` threshold keeps ties).
    """
    dense = np.zeros(HIST_BINS, dtype=np.int64)
    target = 0.0
    total = 0
    for p in parts:
        np.add.at(dense, p["keys"].numpy(), p["counts"].numpy())
        target += p["target"]
        total += p["n"]
    k = min(int(target), total)
    if k <= 0:
        return HIST_BINS
    from_top = np.cumsum(dense[::-1])
    j = int(np.searchsorted(from_top, k))
    return HIST_BINS - 1 - j
