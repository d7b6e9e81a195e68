"""DARE: Drop And REscale (Yu et al. 2024, "Language Models are Super Mario").

Follows mergekit ``dare_linear`` and ``dare_ties``: per contribution and tensor, each task-vector
entry is kept with probability ``density`` (keep test ``u < density`` on the contribution's
float32 uniforms ``task.rng.uniform(n, stream=task.streams[i])`` -- never torch's RNG, so every
replica draws the same mask); ``density >= 1`` keeps everything and draws nothing. Survivors are
rescaled when ``rescale`` (default true):

- ``rescale_mode="l1"`` (mergekit since 2024, PR #245, default): multiply by
  ``L1(delta) / L1(kept)`` (float64, fixed-order norms; skipped when either is < 1e-7);
- ``rescale_mode="inverse"`` (the paper, FusionBench): divide by ``density``.

Then generalized task arithmetic (see ``ties``): ``dare_linear`` sums ``w_i * delta_i``
(``normalize`` default false), ``dare_ties`` adds TIES sign election and the disjoint merge
(``normalize`` default **false**, unlike ``ties``); ``* lambda``, ``+ base``.
At density 1 both equal their undropped counterparts (``task_arithmetic`` / ``ties`` with
the same ``normalize``) bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InvalidRecipe
from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask
from .ties import DENSITY, LAMBDA, SIGN_METHOD, normalize_param

__all__ = ["DARE_LINEAR", "DARE_TIES", "SPECS", "dare_linear", "dare_ties"]

#: ``chunk(a, b)``: elements ``a .. b - 1`` of a flat tensor, in the compute dtype.
Chunk = Callable[[int, int], torch.Tensor]


class Drop:
    """Contribution ``i``'s drop for one tensor: its keep mask and the survivors' rescale.

    Decided up front (the L1 rescale needs the norms of the whole delta before and after the
    drop), so that the merge itself can then form, drop, rescale and combine the deltas one
    chunk at a time. The operations per element are those of dropping and rescaling the whole
    delta in place (zero the dropped entries, then ``*= before / after`` or ``/= divisor``).

    Args:
        keep: int8 keep bits over the flat delta (-1 keep, 0 drop; see
            :func:`._sparsify.zero_dropped`), or None to keep everything (no rescale then).
        n: the number of elements.
        delta_at: ``delta_at(a, b)``: elements ``a .. b - 1`` of the delta (a new tensor).
        l1: rescale by ``L1(delta) / L1(kept)`` (fixed-order float64 norms; skipped when
            either is < 1e-7).
        divisor: else divide the survivors by this (None: no rescale).
        norms: with ``l1``, the two norms when the caller took them on its own pass over the
            delta (:func:`._sparsify.rank_keep_bits`); else they are taken here.
    """

    def __init__(
        self,
        keep: torch.Tensor | None,
        n: int,
        delta_at: Chunk,
        *,
        l1: bool = False,
        divisor: float | None = None,
        norms: tuple[float, float] | None = None,
    ) -> None:
        self.keep = keep
        self.scale: float | None = None
        self.divisor: float | None = None
        if keep is None:
            return
        if l1:
            b, a = norms if norms is not None else _l1_norms(keep, n, delta_at)
            if b >= 1e-7 and a >= 1e-7:
                self.scale = b / a
        else:
            self.divisor = divisor

    def apply(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        """Drop and rescale ``delta`` (elements ``start ..`` of the task vector) in place."""
        if self.keep is not None:
            sp.zero_dropped(delta, self.keep[start : start + delta.numel()])
        if self.scale is not None:
            delta *= self.scale
        elif self.divisor is not None:
            delta /= self.divisor
        return delta


def _l1_norms(keep: torch.Tensor, n: int, delta_at: Chunk) -> tuple[float, float]:
    """The L1 norms of the delta before and after the drop by ``keep`` (one chunked pass)."""
    norms = sp.DropNorms(n)
    for start in range(0, n, sp.CHUNK):
        mags = delta_at(start, min(n, start + sp.CHUNK)).abs_()
        norms.add(start, mags, keep[start : start + sp.CHUNK])
    return norms.totals()


def _dare_drop(task: TensorTask, i: int, n: int, delta_at: Chunk) -> Drop:
    """DARE's drop of contribution ``i``: keep ``u < density``, then the rescale."""
    density = float(task.model_params[i]["density"])
    if density >= 1.0:
        return Drop(None, n, delta_at)  # keeps everything and draws nothing
    keep = sp.keep_bits(task, i, n, density)
    rescale = str(task.params["rescale_mode"]) if task.params["rescale"] else None
    divisor = density if rescale == "inverse" and density > 0.0 else None
    return Drop(keep, n, delta_at, l1=rescale == "l1", divisor=divisor)


MakeDrop = Callable[[TensorTask, int, int, Chunk], Drop]


def _dare(task: TensorTask, consensus: str | None) -> torch.Tensor:
    """DARE drop and rescale of every task vector, then :func:`._sparsify.combine`, by chunks.

    Bit-identical to dropping whole task vectors and combining them, without ever holding a
    whole task vector: each chunk's deltas ``x_i - base`` are formed, dropped, rescaled and
    combined (every operation is elementwise, so the chunking cannot change a bit).
    """
    if task.base is None:
        raise InvalidRecipe(f"tensor {task.name!r}: this strategy needs a base model")
    base = task.base.reshape(-1)
    xs = [x.reshape(-1) for x in task.inputs]
    out = torch.empty(task.base.shape, dtype=torch.result_type(xs[0], base))

    def base_at(a: int, b: int) -> torch.Tensor:
        return base[a:b]

    def input_at(i: int, a: int, b: int) -> torch.Tensor:
        return xs[i][a:b]

    prune = drop_pruner(task, base.numel(), base_at, input_at, _dare_drop)
    sp.combine_task_vectors(task, consensus, out.view(-1), base, base_at, input_at, prune)
    return out


def stored_drop_merge(task: TensorTask, consensus: str | None, make_drop: MakeDrop) -> torch.Tensor:
    """Drop each task vector, then combine, from ``task.stored`` (chunks upcast on the way),
    written in the output dtype. Shared by DARE and DELLA."""
    st = task.stored
    assert st is not None
    if st.base is None:
        raise InvalidRecipe(f"tensor {task.name!r}: this strategy needs a base model")
    prune = drop_pruner(task, st.base.numel(), st.base_at, st.input_at, make_drop)
    return sp.stored_task_vectors(task, consensus, prune)


def drop_pruner(
    task: TensorTask,
    n: int,
    base_at: Chunk,
    input_at: Callable[[int, int, int], torch.Tensor],
    make_drop: MakeDrop,
) -> sp.Prune:
    """Every contribution's :class:`Drop` (``make_drop(task, i, n, delta_at)``, decided up
    front over chunks of ``x_i - b``), as the ``prune`` of
    :func:`._sparsify.combine_task_vectors`."""
    drops = []
    for i in range(len(task.model_params)):

        def delta_at(a: int, b: int, i: int = i) -> torch.Tensor:
            return input_at(i, a, b) - base_at(a, b)

        drops.append(make_drop(task, i, n, delta_at))
    return lambda i, d, start: drops[i].apply(d, start)


def dare_linear(task: TensorTask) -> torch.Tensor:
    return _dare(task, None)


def dare_ties(task: TensorTask) -> torch.Tensor:
    return _dare(task, str(task.params["sign_method"]))


def dare_linear_stored(task: TensorTask) -> torch.Tensor:
    return stored_drop_merge(task, None, _dare_drop)


def dare_ties_stored(task: TensorTask) -> torch.Tensor:
    return stored_drop_merge(task, str(task.params["sign_method"]), _dare_drop)


RESCALE_TRUE = ParamSpec(
    "rescale", bool, True, doc="rescale the survivors after the drop", varying=False
)
RESCALE_MODE = ParamSpec(
    "rescale_mode",
    str,
    "l1",
    doc="l1: match the L1 norm (mergekit); inverse: divide by density (paper)",
    choices=("l1", "inverse"),
    varying=False,
)

DARE_LINEAR = StrategySpec(
    name="dare_linear",
    version=1,
    summary="DARE random drop + rescale, then weighted task arithmetic",
    merge=dare_linear,
    params=(DENSITY, LAMBDA, normalize_param(False), RESCALE_TRUE, RESCALE_MODE),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2311.03099",),
    merge_stored=dare_linear_stored,
)

DARE_TIES = StrategySpec(
    name="dare_ties",
    version=1,
    summary="DARE random drop + rescale, then TIES sign election and disjoint merge",
    merge=dare_ties,
    params=(DENSITY, LAMBDA, normalize_param(False), RESCALE_TRUE, RESCALE_MODE, SIGN_METHOD),
    needs_base=True,
    min_models=1,
    references=("https://arxiv.org/abs/2311.03099", "https://arxiv.org/abs/2306.01708"),
    merge_stored=dare_ties_stored,
)

SPECS: tuple[StrategySpec, ...] = (DARE_LINEAR, DARE_TIES)
