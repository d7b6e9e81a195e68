"""Exact top-k selection by magnitude, the trim rules built on it, and the whole-model
histogram threshold (private; re-exported by :mod:`._sparsify`).

- :func:`topk_mask` / :func:`magnitude_topk`: keep exactly ``k`` entries, ties broken by
  (magnitude descending, flat index ascending). The k-th largest value is found by a radix
  select on the IEEE-754 bit patterns (histograms of 16-bit digits), which is linear time and
  several times faster than ``kthvalue`` and far faster than a full ``argsort``; float32 takes a
  chunked path that never materialises ``|x|``.
- :class:`Cut` / :class:`Band`: the same selections as rules evaluated chunk by chunk (a
  threshold plus the flat index up to which ties at the threshold are kept).
- :func:`magnitude_mask` (mergekit ``magnitude``, TIES) and :func:`outlier_mask` (mergekit
  ``magnitude_outliers``, breadcrumbs).
- :func:`magnitude_key`, :func:`histogram_summary`, :func:`threshold_from_histograms`: the
  streaming whole-model top-k threshold of TIES ``trim_scope="model"``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHUNK",
    "HIST_BINS",
    "Band",
    "Chunks",
    "Cut",
    "Keep",
    "chunked_cut",
    "chunked_cuts",
    "histogram_summary",
    "magnitude_cut",
    "magnitude_key",
    "magnitude_mask",
    "mag_bits",
    "magnitude_topk",
    "materialize",
    "outlier_mask",
    "threshold_from_histograms",
    "topk_count",
    "topk_mask",
    "zero_unkept",
]

#: elements per chunk of the elementwise stages (1 MiB of float32: stays in the CPU cache).
CHUNK = 1 << 18

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

    def keep_np(self, mags: np.ndarray, start: int) -> np.ndarray:
        """:meth:`top` on the magnitude bits ``mags`` of a float32 chunk (see :func:`mag_bits`),
        as a numpy bool array: ``|x| >= t`` is ``mags >= bits(t)`` and ``|x| > t`` is
        ``mags >= bits(t) + 1`` (order-preserving bits; ``-0.0`` has magnitude bits 0)."""
        key = int(self.t.reshape(1).view(torch.int32)[0])
        stop = start + mags.size
        if self.until >= stop:
            return mags >= key
        if self.until <= start:
            return mags > key
        split = self.until - start
        return np.concatenate([mags[:split] >= key, mags[split:] > key])


def mag_bits(c: torch.Tensor) -> np.ndarray:
    """The magnitude bits (int32, sign cleared) of a contiguous float32 CPU chunk.

    Integer order equals the order of ``|x|``. Comparisons go through numpy: a float32 torch
    comparison that yields a bool tensor runs ~10x slower on a 256K chunk than numpy's.
    """
    return np.bitwise_and(c.numpy().view(np.int32), np.int32(0x7FFFFFFF))


def zero_unkept(c: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """``c.masked_fill_(~keep, 0.0)`` bit for bit: the float bits ANDed with an all-ones or
    all-zeros word (``masked_fill_`` with a random mask mispredicts a branch per element and
    runs ~20x slower). ``c`` is a contiguous float32 CPU chunk; ``keep`` a numpy bool array
    (consumed). Returns ``c``."""
    ones = keep.reshape(-1).view(np.int8)
    np.negative(ones, out=ones)  # 1 -> -1 (all bits set), 0 -> 0
    bits = c.view(-1).numpy().view(np.int32)
    np.bitwise_and(bits, ones, out=bits)
    return c


@dataclass(frozen=True)
class Band:
    """A keep rule by magnitude rank: inside the top ``lo`` and outside the top ``hi`` (a
    missing cut is no bound). Evaluated chunk by chunk, never materialised in full."""

    lo: Cut | None = None
    hi: Cut | None = None

    def zero_dropped(self, c: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``c.masked_fill_(self.drop(c, start), 0.0)`` bit for bit, faster (float32 chunks;
        other dtypes take ``masked_fill_``). Returns ``c``."""
        if c.dtype != torch.float32 or not c.is_contiguous() or c.device.type != "cpu":
            return c.masked_fill_(self.drop(c, start), 0.0)
        mags = mag_bits(c)
        keep = self.lo.keep_np(mags, start) if self.lo is not None else None
        if self.hi is not None:
            outside = np.logical_not(self.hi.keep_np(mags, start))
            keep = outside if keep is None else np.logical_and(keep, outside, out=keep)
        if keep is None:
            return c
        return zero_unkept(c, keep)

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
    flat = x.reshape(-1)
    return chunked_cut(_flat_chunks(x), n, k, sample=lambda step: flat[::step])


def chunked_cut(
    chunks: Chunks, n: int, k: int, sample: Callable[[int], torch.Tensor] | None = None
) -> Cut:
    """:func:`magnitude_cut` over float32 values given chunk by chunk (``0 < k < n``).

    ``sample(step)``, if given, returns the float32 values at flat positions ``0, step, 2 step,
    ...``: then the k-th largest magnitude is first bracketed from that sample and found in one
    pass (:func:`chunked_cuts`); the exact radix select runs only when the bracket misses.
    Either way the result is the same exact cut.
    """
    return chunked_cuts(lambda a, b: (chunks(a, b),), n, [(0, k)], [sample])[0]


Sample = Callable[[int], torch.Tensor]


def chunked_cuts(
    chunks: Callable[[int, int], Sequence[torch.Tensor]],
    n: int,
    wanted: Sequence[tuple[int, int]],
    samples: Sequence[Sample | None],
) -> list[Cut]:
    """Several :func:`chunked_cut` at once over vectors of ``n`` float32 values read together:
    ``chunks(a, b)`` gives elements ``a .. b - 1`` of every vector (e.g. the deltas
    ``x_i - base`` of all contributions, from one read of the base), ``wanted`` lists
    ``(vector, k)`` with ``0 < k < n`` and ``samples[vector]`` is that vector's strided sample
    (or None).

    Every cut with a sample is bracketed from it (:class:`_BandCount`), and one pass over the
    chunks counts all the brackets; a cut whose bracket misses (or that has no sample) takes the
    exact radix select over its own vector. The results are those of separate calls.
    """
    counts: list[_BandCount | None] = []
    sorted_samples: dict[int, np.ndarray] = {}
    for j, k in wanted:
        sample = samples[j]
        if sample is None or n < 4 * _SAMPLE:
            counts.append(None)
            continue
        if j not in sorted_samples:
            step = max(1, n // _SAMPLE) | 1  # odd: does not walk one column of a 2**j-wide matrix
            sorted_samples[j] = np.sort(mag_bits(sample(step).contiguous()))
        counts.append(_BandCount(sorted_samples[j], n, k))
    if any(c is not None for c in counts):
        for start in range(0, n, CHUNK):
            live = [(c, j) for c, (j, _) in zip(counts, wanted, strict=True) if c and c.alive]
            if not live:
                break
            values = chunks(start, min(start + CHUNK, n))
            mags: dict[int, np.ndarray] = {}
            for c, j in live:
                if j not in mags:
                    mags[j] = mag_bits(values[j])
                c.add(mags[j])
    cuts = []
    for count, (j, k) in zip(counts, wanted, strict=True):

        def one(a: int, b: int, j: int = j) -> torch.Tensor:
            return chunks(a, b)[j]

        found = count.result(k) if count is not None else None
        cuts.append(_tie_break(one, n, k, found))
    return cuts


def _tie_break(
    chunks: Chunks, n: int, k: int, found: tuple[torch.Tensor, int, int, list[np.ndarray]] | None
) -> Cut:
    """The cut of the ``k`` largest magnitudes from the bracket's ``found`` (else the radix
    select over ``chunks``), with the index tie-break of :func:`topk_mask`."""
    band: list[np.ndarray] | None = None
    if found is not None:
        t, above, equal, band = found
    else:
        t, above, equal = _magnitude_kth_float32(chunks, n, k)
    need = k - above
    if need == equal:
        return Cut(t, n)
    # the index tie-break: the flat position of the need-th entry equal to the k-th value. The
    # bracket kept each chunk's in-band magnitudes (every tie is in the band), so only the
    # chunk holding that entry is read again.
    key = int(t.reshape(1).view(torch.int32)[0])
    seen = 0
    for index, start in enumerate(range(0, n, CHUNK)):
        if band is not None:
            here = int(np.count_nonzero(band[index] == key))
            if seen + here < need:
                seen += here
                continue
        ties = mag_bits(chunks(start, min(start + CHUNK, n))) == key
        here = int(np.count_nonzero(ties))
        if seen + here >= need:
            pos = np.flatnonzero(ties)[need - seen - 1]
            return Cut(t, start + int(pos) + 1)
        seen += here
    raise AssertionError("unreachable: the k-th value has ties")


#: sample size for the bracket of :class:`_BandCount`
_SAMPLE = 1 << 16


class _BandCount:
    """The ``(threshold, above, equal)`` of :func:`_magnitude_kth_float32` from one pass, or
    None; also each ``CHUNK``'s magnitude bits inside the band, in order (every entry equal to
    the threshold is among them).

    A strided sample of about ``_SAMPLE`` magnitudes (sorted: ``mags``) gives a band of keys
    that holds the k-th largest with overwhelming probability (its sample rank +- 6 standard
    deviations of a binomial rank, plus slack); one pass (:meth:`add`, chunk by chunk) counts
    the magnitudes above the band and collects the few inside it, and the k-th is selected
    exactly among those (:meth:`result`). When the band misses (or would hold more than an
    eighth of the tensor: a sample that does not represent it) the result is None and the
    caller runs the radix select. The sample only decides the speed, never the result.
    """

    def __init__(self, mags: np.ndarray, n: int, k: int) -> None:
        m = mags.size
        q = k / n
        pos = m - q * m  # where the k-th largest falls in the ascending sample
        margin = 6.0 * math.sqrt(m * q * (1.0 - q)) + 16.0
        lo_i, hi_i = math.floor(pos - margin), math.ceil(pos + margin)
        self.lo = int(mags[lo_i]) if lo_i >= 0 else 0
        self.hi = int(mags[hi_i]) + 1 if hi_i < m else None
        self.limit = n // 8 + CHUNK
        self.above = 0
        self.held = 0
        self.band: list[np.ndarray] = []
        self.alive = True

    def add(self, c: np.ndarray) -> None:
        """Count the next chunk's magnitude bits ``c``."""
        inside = c >= self.lo
        if self.hi is not None:
            over = c >= self.hi
            self.above += int(np.count_nonzero(over))
            np.logical_and(inside, np.logical_not(over, out=over), out=inside)
        vals = c[inside]
        self.held += vals.size
        self.band.append(vals)
        if self.held > self.limit:
            self.alive = False
            self.band = []

    def result(self, k: int) -> tuple[torch.Tensor, int, int, list[np.ndarray]] | None:
        if not self.alive or self.above >= k or self.above + self.held < k:
            return None
        vals = np.concatenate(self.band)
        r = k - self.above  # the r-th largest of the band
        key = int(np.partition(vals, vals.size - r)[vals.size - r])
        above = self.above + int(np.count_nonzero(vals > key))
        equal = int(np.count_nonzero(vals == key))
        threshold = torch.tensor([key], dtype=torch.int32).view(torch.float32)[0]
        return threshold, above, equal, self.band


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
    n_top, n_bot = outlier_counts(n, density, gamma)
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


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """``(n_top, n_bot)`` of :func:`outlier_mask` for ``n`` entries: how many of the largest
    and of the smallest magnitudes are dropped."""
    target = int(density * n) if density < 1.0 else n
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_top, n_bot


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
