"""Shared pieces of the sparsify-and-combine strategies (private).

Every piece here is written once and reused by ``linear``, ``ties``, ``dare``, ``della``,
``breadcrumbs``, ``magmax``, ``sce``, ``ram``, ``pcb`` and ``consensus``:

- :func:`fixed_sum` and :func:`l1_norm`: full reductions whose bits do not depend on the thread
  count (torch's plain ``sum`` of a large tensor splits the work across threads and so changes
  its rounding with ``torch.set_num_threads``; a row-wise ``sum(dim=1)`` does not, because every
  output row is reduced by exactly one thread with a fixed algorithm);
- exact top-k selection and the magnitude trim rules of TIES and breadcrumbs live in
  :mod:`._topk` and are re-exported here;
- :func:`keep_bits`, :func:`rank_drop`, :func:`rank_keep_prob`: the random drops of DARE
  (mergekit ``bernoulli``) and DELLA (``della_magprune``), with uniforms from the task's
  counter-based generator (:class:`Uniforms`); :class:`L1Rows` for a norm taken on the way;
- :func:`apply_mask`: zero the dropped entries, with mergekit's L1-norm-matching rescale;
- :func:`elect_sign` and :func:`combine`: mergekit's generalized task arithmetic (weights
  applied before the sign election, disjoint merge, ``normalize``, ``lambda``);
All arithmetic is plain elementwise ``+``, ``*``, ``/`` in the compute dtype, contributions are
accumulated in the given (canonical) order by a Python loop over contributions (never over
elements), and no fused kernel (``lerp``, ``add(alpha=)``, ``addcmul``) is used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import InvalidRecipe
from ._detmath import ROW, lastdim_sum
from ._topk import (
    _LITTLE,
    CHUNK,
    HIST_BINS,
    Band,
    Chunks,
    Cut,
    Keep,
    chunked_cut,
    chunked_cuts,
    histogram_summary,
    mag_bits,
    magnitude_cut,
    magnitude_key,
    magnitude_mask,
    magnitude_topk,
    materialize,
    outlier_counts,
    outlier_mask,
    threshold_from_histograms,
    topk_count,
    topk_mask,
    zero_unkept,
)
from .base import TensorTask

__all__ = [
    "CHUNK",
    "HIST_BINS",
    "Chunks",
    "Band",
    "Cut",
    "Keep",
    "apply_mask",
    "base_and_deltas",
    "chunked_cut",
    "chunked_cuts",
    "combine",
    "combine_chunk",
    "combine_into",
    "combine_task_vectors",
    "elect_sign",
    "fixed_sum",
    "histogram_summary",
    "l1_norm",
    "magnitude_key",
    "magnitude_mask",
    "magnitude_cut",
    "materialize",
    "outlier_counts",
    "magnitude_topk",
    "mag_bits",
    "Prune",
    "ordered_sum",
    "outlier_mask",
    "L1Rows",
    "DropNorms",
    "Uniforms",
    "keep_bits",
    "random_mask",
    "rank_drop",
    "rank_keep_bits",
    "rank_keep_prob",
    "stored_task_vectors",
    "threshold_from_histograms",
    "topk_count",
    "topk_mask",
    "weight_totals",
    "zero_dropped",
    "zero_unkept",
]

# Row length of the fixed-order reduction (l1_norm's first level must match fixed_sum's).
_ROW = ROW


def fixed_sum(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The sum of all elements of ``x`` in ``dtype``, bit-identical for any thread count.

    The flat tensor reduced by :func:`._detmath.lastdim_sum` (rows of 4096, each reduced by one
    thread, the row sums again as rows; a tail that does not fill a row summed on its own).

    Returns:
        a 0-d tensor of ``dtype``.
    """
    return lastdim_sum(x.reshape(-1), dtype)


def l1_norm(x: torch.Tensor) -> float:
    """``sum |x|`` in float64, bit-identical to ``fixed_sum(x.abs())``, as a Python float.

    The first level of :func:`fixed_sum` (rows of 4096) is computed chunk by chunk
    (:class:`L1Rows`), so ``|x|`` is never materialised in full.
    """
    v = x.reshape(-1)
    acc = L1Rows(v.numel())
    for start in range(0, v.numel(), CHUNK):
        acc.add(start, v[start : start + CHUNK])
    return acc.total()


class L1Rows:
    """:func:`l1_norm` of an ``n``-element vector fed piece by piece (``add``, then ``total``).

    Lets a loop that produces the vector chunk by chunk (e.g. DARE's masked deltas) take its L1
    norm on the way, without the whole vector: each piece's rows of 4096 ``|x|`` are summed
    into the first level of :func:`fixed_sum`, whose result does not depend on the pieces.
    Pieces must start at multiples of 4096 (``CHUNK`` is one), except in a vector of at most
    4096 elements, which is kept and summed whole at the end.
    """

    def __init__(self, n: int) -> None:
        self._m = n // _ROW
        tail = 1 if n > self._m * _ROW else 0
        self._rows = torch.empty(self._m + tail, dtype=torch.float64) if n > _ROW else None
        self._small = torch.zeros(n if n <= _ROW else 0, dtype=torch.float32)

    def add(self, start: int, piece: torch.Tensor) -> None:
        """Account for ``piece``, the elements ``start .. start + len(piece) - 1``."""
        self.add_abs(start, piece.abs())

    def add_abs(self, start: int, mags: torch.Tensor) -> None:
        """:meth:`add` of a piece whose magnitudes ``mags = |piece|`` the caller already has."""
        if self._rows is None:  # summed whole at the end, however it arrived
            self._small[start : start + mags.numel()] = mags
            return
        stop = start + mags.numel()
        full = min(stop, self._m * _ROW)
        if full > start:
            self._rows[start // _ROW : full // _ROW] = (
                mags[: full - start].view(-1, _ROW).sum(dim=1, dtype=torch.float64)
            )
        if stop > self._m * _ROW:
            self._rows[self._m] = mags[self._m * _ROW - start :].sum(dtype=torch.float64)

    def total(self) -> float:
        """The L1 norm of everything added, as :func:`l1_norm` computes it."""
        if self._rows is None:
            return float(self._small.sum(dtype=torch.float64))
        return float(fixed_sum(self._rows, torch.float64))


class DropNorms:
    """The L1 norms of a delta before and after a drop by keep bits (see
    :func:`zero_dropped`), fed chunk by chunk as :class:`L1Rows` is."""

    def __init__(self, n: int) -> None:
        self._before, self._after = L1Rows(n), L1Rows(n)

    def add(self, start: int, mags: torch.Tensor, keep: torch.Tensor) -> None:
        """Account for the chunk at ``start`` given its magnitudes (consumed: the dropped
        ones are zeroed) and its keep bits."""
        self._before.add_abs(start, mags)
        self._after.add_abs(start, zero_dropped(mags, keep))  # |dropped d| = dropped |d|

    def totals(self) -> tuple[float, float]:
        """``(before, after)``."""
        return self._before.total(), self._after.total()


def ordered_sum(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``terms[0] + terms[1] + ...`` left to right (a new tensor; the terms are untouched)."""
    acc = terms[0].clone()
    for t in terms[1:]:
        acc += t
    return acc


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

    def drop(self, start: int, stop: int, p: float) -> torch.Tensor:
        """``self(start, stop) >= float32(p)``, decided on the words without making floats."""
        words = self._words[start:stop]
        t = _drop_bound(p)
        if t >= 1 << 24 or t <= 0:
            return torch.full(words.shape, t <= 0, dtype=torch.bool)
        return torch.from_numpy(words >= np.uint32(t << 8))


def _drop_bound(p: float) -> int:
    """``t = ceil(float32(p) * 2**24)``: the drop ``u >= float32(p)`` is ``w >= t << 8``.

    ``u = k * 2**-24`` with ``k = w >> 8``, so ``u < p`` iff ``k < t`` (``p`` as float32 scaled
    by a power of two is exact) iff ``w < t << 8``: one integer comparison per element,
    bit-identical to comparing the uniforms. ``t >= 2**24`` keeps every element, ``t <= 0``
    drops every element.
    """
    return math.ceil(float(np.float32(p)) * 2.0**24)


def keep_bits(task: TensorTask, i: int, n: int, p: float) -> torch.Tensor:
    """DARE's keep mask for contribution ``i`` as int8: -1 (all bits set) keep, 0 drop.

    The same decision as ``Uniforms(task, i, n).drop(0, n, p)``, bit for bit. As bits it is
    applied with :func:`zero_dropped` (an AND: 20x faster than ``masked_fill_`` with a random
    mask, whose per-element branch mispredicts half the time). Built a ``CHUNK`` of words at a
    time on two threads (the generator seeks exactly; BLAKE3's output and numpy release the
    GIL), so the ``4 n`` bytes of words never exist at once.
    """
    t = _drop_bound(p)
    if t >= 1 << 24 or t <= 0:
        return torch.full((n,), -1 if t >= 1 << 24 else 0, dtype=torch.int8)
    bound = np.uint32(t << 8)
    out = np.empty(n, dtype=np.int8)

    def fill(start: int) -> None:
        stop = min(n, start + CHUNK)
        words = task.rng.words(stop - start, task.streams[i], start)
        dropped = np.greater_equal(words, bound).view(np.int8)  # 1 drop, 0 keep
        np.subtract(dropped, np.int8(1), out=out[start:stop])  # 0 drop, -1 keep

    starts = range(0, n, CHUNK)
    if len(starts) < 2:
        for start in starts:
            fill(start)
    else:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(fill, starts))
    return torch.from_numpy(out)


_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def zero_dropped(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x.masked_fill_(keep == 0, 0.0)`` bit for bit, as an AND of ``x``'s bits with ``keep``.

    ``keep`` holds -1 (sign-extended to all bits set: ``x`` unchanged) or 0 (``+0.0``);
    ``x`` must be contiguous. Returns ``x``.
    """
    x.view(_SAME_WIDTH_INT[x.dtype]).bitwise_and_(keep)
    return x


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
    fast = delta.dtype == torch.float32 and delta.is_contiguous() and delta.device.type == "cpu"
    for r0 in range(0, rows.shape[0], step):
        block = rows[r0 : r0 + step]
        p = rank_keep_prob(block, density, epsilon)
        draws = u(r0 * cols, r0 * cols + block.numel())
        if fast:  # the same test on numpy, applied as an AND of the bits (see zero_unkept)
            zero_unkept(block, np.less(draws.numpy(), p.reshape(-1).numpy()))
        else:
            block.masked_fill_(draws.view_as(p) >= p, 0.0)
        if rescale == "inverse":
            block /= p.to(block.dtype)
    if rescale == "l1":
        after = l1_norm(delta)
        if before >= 1e-7 and after >= 1e-7:
            delta *= before / after
    return delta


def rank_keep_bits(
    task: TensorTask,
    i: int,
    n: int,
    cols: int,
    delta_at: Callable[[int, int], torch.Tensor],
    density: float,
    epsilon: float,
    *,
    l1: bool = False,
) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """:func:`rank_drop`'s decisions as int8 keep bits (-1 keep, 0 drop; see
    :func:`zero_dropped`) over a float32 delta of ``n`` elements in rows of ``cols``, given as
    ``delta_at(a, b)`` (flat elements ``a .. b - 1``), read once. The same ranks and uniforms
    (the generator seeks to each block of rows), so the same bits as ``rank_drop``.

    With ``l1``, also the L1 norms of the delta before and after the drop, taken on the way
    (:class:`L1Rows`: row blocks start at multiples of its rows of 4096); None without ``l1``,
    or when such blocks would be too large (rows of an odd width), for the caller to take them
    in a pass of its own.

    The keep test ``u < p`` with ``u = (w >> 8) * 2**-24`` is evaluated on the words ``w``
    themselves: it holds exactly when ``w < ceil(p * 2**24) * 256`` (:func:`_keep_word_table`).
    """
    out = np.empty(n, dtype=np.int8)
    rows = n // cols if cols else 0
    step, aligned = _row_block(cols, rows)
    norms = DropNorms(n) if l1 and aligned else None
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        a, b = r0 * cols, r1 * cols
        mags = delta_at(a, b).abs_()
        limits = _rank_scatter(mags.view(r1 - r0, cols), _keep_word_table(cols, density, epsilon))
        words = task.rng.words(b - a, task.streams[i], a)
        keep = np.less(words, limits.reshape(-1).numpy().view(np.uint32))
        bits = np.negative(keep.view(np.int8), out=out[a:b])
        if norms is not None:
            norms.add(a, mags, torch.from_numpy(bits))
    return torch.from_numpy(out), norms.totals() if norms is not None else None


def _row_block(cols: int, rows: int) -> tuple[int, bool]:
    """``(rows per block, aligned)`` for :func:`rank_keep_bits`: blocks of about ``CHUNK``
    elements, made a whole number of :class:`L1Rows` rows (4096 elements) when that takes at
    most 8 chunks (``aligned``; one block is always aligned)."""
    step = max(1, CHUNK // max(cols, 1))
    if rows <= step:
        return step, True
    align = _ROW // math.gcd(max(cols, 1), _ROW)  # rows per multiple of 4096 elements
    if align * cols > 8 * CHUNK:
        return step, False
    return max(align, step - step % align), True


def rank_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA (mergekit ``della_magprune``) keep probabilities, float32.

    Per row (the last dimension; a 1-D tensor is one row; higher ranks are flattened to
    (rows, last dim)): rank ``|delta|`` ascending (ties by index), ``r = rank / (cols - 1)``,
    ``p = density - epsilon + 2 * epsilon * r``. A row of one element gets ``p = density``.
    """
    cols = delta.shape[-1] if delta.dim() else 1
    if cols == 1:
        return torch.full(delta.shape, density, dtype=torch.float32)
    p = _rank_scatter(delta.reshape(-1, cols).abs(), _keep_prob_table(cols, density, epsilon))
    return p.reshape(delta.shape)


def _rank_scatter(mags: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[r, c] = table[rank of mags[r, c] in row r]``: ranks ascending by (value, column).

    ``table`` has one entry per column (a one-column row takes ``table[0]``)."""
    order = _row_order(mags)
    out = torch.empty(order.shape, dtype=table.dtype)
    return out.scatter_(1, order, table.expand(order.shape))


def _row_order(rows: torch.Tensor) -> torch.Tensor:
    """Per row of the non-negative ``rows``, the column indices in ascending (value, column)
    order (int64): the order of a stable sort, whatever sort runs.

    float32 rows sort packed integer keys with numpy's SIMD sort. The value bits of a float32
    ``>= 0`` are in the same order as the values, so ``(bits >> s) << b | column`` (``b``
    column bits, ``s`` the fewest value bits dropped to fit 32 bits) sorts as (value, column)
    unless two values of a row differ only in the dropped bits; rows where that reorders
    anything (their values read in key order are not ascending) are sorted again with exact
    64-bit keys. Only rows with a nonzero dropped bit are checked (about one in eight of a
    bf16 fine-tune's delta rows), and few need it (one row in a few hundred).
    """
    r, cols = rows.shape
    bits = (cols - 1).bit_length()
    if rows.dtype != torch.float32 or bits > 31 or not _LITTLE:
        return torch.sort(rows, dim=1, stable=True).indices
    m = rows.contiguous().view(torch.int32).numpy()
    ors = np.bitwise_or.reduce(m, axis=1)  # a row's OR: its top bit and any low bit it sets
    top = int(np.bitwise_or.reduce(ors)) if ors.size else 0
    shift = max(0, top.bit_length() - (32 - bits))
    keys = np.right_shift(m, np.int32(shift))
    keys <<= np.int32(bits)
    keys ^= _flipped_columns(cols)  # | column (the low bits are 0), and unsigned order as
    keys.sort(axis=1)  # signed order (the top bit flipped): numpy sorts int32 fastest
    order = np.empty(keys.shape, dtype=np.int64)
    np.bitwise_and(keys, np.int32((1 << bits) - 1), out=order)
    if shift:
        # only a row with a nonzero dropped bit can be out of order: check those alone
        maybe = np.flatnonzero(ors & np.int32((1 << shift) - 1))
        redo = _misordered(m, order, maybe) if maybe.size else maybe
        if redo.size:
            order[redo] = _row_order_exact(rows[torch.from_numpy(redo)]).numpy()
    return torch.from_numpy(order)


def _misordered(m: np.ndarray, order: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Those of ``rows`` whose values ``m`` (int32 bits) read in ``order`` are not ascending."""
    cols = m.shape[1]
    at = order[rows] + (np.arange(rows.size, dtype=np.int64) * cols)[:, None]
    seen = m[rows].reshape(-1)[at]
    out: np.ndarray = rows[(seen[:, 1:] < seen[:, :-1]).any(axis=1)]
    return out


@functools.lru_cache(maxsize=8)
def _flipped_columns(cols: int) -> np.ndarray:
    """``column ^ 2**31`` for columns ``0 .. cols - 1``, as int32 (see :func:`_row_order`)."""
    return (np.arange(cols, dtype=np.uint32) ^ np.uint32(1 << 31)).view(np.int32)


def _row_order_exact(rows: torch.Tensor) -> torch.Tensor:
    """:func:`_row_order` of float32 rows by unique int64 keys (value bits, column)."""
    cols = rows.shape[1]
    shift = (cols - 1).bit_length()
    keys = rows.contiguous().view(torch.int32).to(torch.int64).numpy()
    keys <<= shift
    keys |= np.arange(cols, dtype=np.int64)
    keys.sort(axis=1)
    keys &= (1 << shift) - 1
    return torch.from_numpy(keys)


@functools.lru_cache(maxsize=16)
def _keep_word_table(cols: int, density: float, epsilon: float) -> torch.Tensor:
    """For ranks ``0 .. cols - 1``: the least 32-bit word that fails the keep test (``u < p``
    iff ``w < _drop_bound(p) << 8``), as the bits of a uint32 held in int32 (torch scatters
    int32). ``0 < p < 1``, so it fits. A one-column row has ``p = density``."""
    p = [density] if cols == 1 else _keep_prob_table(cols, density, epsilon).tolist()
    limits = np.array([_drop_bound(v) << 8 for v in p], dtype=np.uint32)
    return torch.from_numpy(limits.view(np.int32))


@functools.lru_cache(maxsize=16)
def _keep_prob_table(cols: int, density: float, epsilon: float) -> torch.Tensor:
    """``p`` for ranks ``0 .. cols - 1``: ``r = rank / (cols - 1)``,
    ``p = (density - epsilon) + r * (2 epsilon)``, float32, each step rounded as written.
    Cached (one table serves every row block of a tensor); callers only read it."""
    r = torch.arange(cols, dtype=torch.int64).to(torch.float32) / torch.tensor(
        float(cols - 1), dtype=torch.float32
    )
    lo = torch.tensor(density - epsilon, dtype=torch.float32)
    return lo + r * torch.tensor(2.0 * epsilon, dtype=torch.float32)


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
            mask.zero_dropped(c, start)
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
    vote = _vote(weighted, method)
    vote.sign_()
    return vote.masked_fill_(vote == 0, 1.0)


def _vote(weighted: Sequence[torch.Tensor], method: str) -> torch.Tensor:
    if method == "sum":
        return ordered_sum(weighted)
    if method == "count":
        vote = torch.sign(weighted[0])
        for w in weighted[1:]:
            vote.add_(torch.sign(w))
        return vote
    raise InvalidRecipe(f"sign_method must be 'sum' or 'count', got {method!r}")


_SIGN_BIT = -(1 << 31)


def _minus_bits(weighted: Sequence[torch.Tensor], method: str) -> torch.Tensor | None:
    """:func:`elect_sign` as the sign bit of the elected sign: int32 ``-2**31`` where it is
    ``-1``, else 0 (None for float64 chunks, which take :func:`elect_sign`).

    Multiplying by ``+1``/``-1`` is exact and only flips the sign bit, so XOR-ing a float32
    chunk's bits with this is bit-identical to ``chunk *= elect_sign(...)``, without the
    comparison and ``masked_fill_`` (together ~20x the cost of an add on a 256K chunk).
    ``vote + 0.0`` turns ``-0.0`` (a zero vote, elected ``+``) into ``+0.0``; every other vote
    keeps its sign bit.
    """
    if weighted[0].dtype != torch.float32:
        return None
    vote = _vote(weighted, method)
    vote += 0.0
    return vote.view(torch.int32).bitwise_and_(_SIGN_BIT)


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
    out = torch.empty(deltas[0].shape, dtype=deltas[0].dtype)
    flat = [d.reshape(-1) for d in deltas]
    combine_into(
        out.view(-1),
        lambda start, stop: [d[start:stop] for d in flat],
        weights,
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
        base=base.reshape(-1) if base is not None else None,
    )
    return out


def combine_into(
    out: torch.Tensor,
    deltas_at: Callable[[int, int], list[torch.Tensor]],
    weights: Sequence[float],
    *,
    consensus: str | None,
    normalize: bool,
    lambda_: float,
    base: torch.Tensor | None,
) -> None:
    """:func:`combine` written into the flat ``out``, ``CHUNK`` elements at a time.

    ``deltas_at(start, stop)`` gives every contribution's (sparsified) task-vector elements
    ``start .. stop - 1``, which are overwritten; they may be computed on the fly, so the whole
    task vectors never need to exist. ``base`` is flat (or None). An ``out`` of another dtype
    than the deltas receives each chunk cast (through a reused chunk of the deltas' dtype).
    """
    unit, total = weight_totals(weights)
    n = out.numel()
    scratch: torch.Tensor | None = None
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        deltas = deltas_at(start, stop)
        target = out[start:stop]
        if deltas[0].dtype != out.dtype:
            if scratch is None:
                scratch = torch.empty(min(CHUNK, n), dtype=deltas[0].dtype)
            target = scratch[: stop - start]
        combine_chunk(
            target,
            deltas,
            weights,
            consensus=consensus,
            normalize=normalize,
            lambda_=lambda_,
            base=base[start:stop] if base is not None else None,
            unit=unit,
            total=total,
        )
        if scratch is not None:
            out[start:stop].copy_(target)


#: ``prune(i, delta, start)``: sparsify contribution ``i``'s task-vector chunk (flat elements
#: ``start ..``) in place and return it.
Prune = Callable[[int, torch.Tensor, int], torch.Tensor]


def combine_task_vectors(
    task: TensorTask,
    consensus: str | None,
    out: torch.Tensor,
    base: torch.Tensor,
    base_at: Callable[[int, int], torch.Tensor],
    input_at: Callable[[int, int, int], torch.Tensor],
    prune: Prune | None = None,
) -> torch.Tensor:
    """:func:`combine_into` of the task vectors ``x_i - b`` formed chunk by chunk: the flat
    ``out`` receives the merge with ``task``'s weights, ``normalize`` and ``lambda``.

    ``base_at(a, b)`` / ``input_at(i, a, b)`` give flat elements ``a .. b - 1`` of the base /
    input ``i`` in the compute dtype (e.g. :class:`~.base.Stored` reads); ``base`` is the flat
    base in any float dtype (added last); ``prune`` sparsifies each chunk's task vectors.
    Returns ``out``.
    """
    n_inputs = len(task.model_params)

    def deltas_at(start: int, stop: int) -> list[torch.Tensor]:
        b = base_at(start, stop)
        ds = [input_at(i, start, stop) - b for i in range(n_inputs)]
        if prune is not None:
            ds = [prune(i, d, start) for i, d in enumerate(ds)]
        return ds

    combine_into(
        out,
        deltas_at,
        task.weights,
        consensus=consensus,
        normalize=bool(task.params["normalize"]),
        lambda_=float(task.params["lambda"]),
        base=base,
    )
    return out


def stored_task_vectors(
    task: TensorTask, consensus: str | None, prune: Prune | None = None
) -> torch.Tensor:
    """:func:`combine_task_vectors` over ``task.stored`` (each chunk upcast on the way), the
    result written in the output dtype and shaped like the tensor."""
    st = task.stored
    assert st is not None
    if st.base is None:
        raise InvalidRecipe(f"tensor {task.name!r}: this strategy needs a base model")
    out = torch.empty(st.base.numel(), dtype=st.out_dtype)
    combine_task_vectors(task, consensus, out, st.base, st.base_at, st.input_at, prune)
    return out.view(st.shape)


def weight_totals(weights: Sequence[float]) -> tuple[bool, float]:
    """``(unit, total)`` for :func:`combine_chunk`.

    ``unit``: all weights are 1 (the divisor is then the agreeing count, whose zeros become 1
    by a clamp; small counts are exact, so it equals the float sum of the agreeing 1.0 weights
    bit for bit). ``total``: the sum of
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
    """One chunk of the TIES election + disjoint merge, written into ``mixed``.

    Each weighted delta is turned towards the elected sign and clamped at 0, so it keeps its
    magnitude where it agrees and is 0 elsewhere; ``sign`` of that is 1 exactly where it
    agrees, so the divisor (the sum of agreeing weights) needs no bool tensor. With unit
    weights the divisor is the agreeing count, whose zeros ``clamp(min=1)`` replaces.
    """
    minus = _minus_bits(weighted, consensus)
    majority = elect_sign(weighted, consensus) if minus is None else None
    divisor: torch.Tensor | None = None
    for i, (wd, w) in enumerate(zip(weighted, weights, strict=True)):
        if minus is not None:
            wd.view(torch.int32).bitwise_xor_(minus)
        else:
            assert majority is not None  # elected above whenever minus is None
            wd.mul_(majority)
        wd.clamp_(min=0.0)
        if normalize:
            agree = torch.sign(wd)  # 1 where it agrees, +-0 elsewhere
            if not unit:
                agree *= w
            divisor = agree if divisor is None else divisor.add_(agree)
        if i == 0:
            mixed.copy_(wd)
        else:
            mixed += wd
    if minus is not None:
        mixed.view(torch.int32).bitwise_xor_(minus)
    else:
        assert majority is not None
        mixed *= majority
    if divisor is not None:
        if unit:
            divisor.clamp_(min=1.0)
        else:
            divisor.masked_fill_(divisor == 0, 1.0)
        mixed /= divisor
