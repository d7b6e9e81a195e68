"""TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models").

Follows mergekit ``ties`` (generalized task arithmetic with the ``magnitude`` sparsifier and
``sum`` consensus):

1. **Trim**: per contribution keep the top ``k`` task-vector entries by ``|delta|``:
   - ``trim_scope="tensor"`` (mergekit, default): ``k = int(density * numel)`` per tensor
     (at least 1 when density > 0; density >= 1 keeps everything), **exactly** ``k`` entries,
     ties at the k-th value broken by flat index ascending (mergekit: whatever its argsort
     returns). Selection is a radix select on the float bit patterns, not a full argsort.
   - ``trim_scope="model"`` (the paper: one top-k over the whole flattened model): a pre-pass
     builds, per contribution, a histogram of ``|delta|`` over every tensor (bucket = float32
     exponent + top 11 mantissa bits); the threshold is the bucket holding the model-wide k-th
     largest value, ``k = int(sum over tensors of density * numel)``; entries whose bucket is
     at or above it are kept. Like the paper's ``>=`` threshold this keeps slightly more than
     ``k`` (here: the whole boundary bucket, values within a relative 2**-11 of each other).
   - ``rescale`` (default false): mergekit's L1-norm matching of the kept values.
2. **Elect**: the weighted deltas ``w_i * delta_i`` vote (weights act **before** the election, as
   in mergekit, unlike the paper which has no weights): ``sign_method="sum"`` (mergekit, the
   paper's "mass") takes the sign of their sum, ``"count"`` the sign of the sum of signs; a zero
   vote elects ``+`` (mergekit; the paper uses the model-wide majority sign).
3. **Disjoint merge**: sum of the weighted deltas whose sign equals the elected sign (zeros never
   agree); with ``normalize`` (default true) divided by the sum of the agreeing weights
   (element-wise, 0 replaced by 1) -- with unit weights that is the paper's disjoint mean.
4. ``base + lambda * merged`` (``lambda`` default 1; the paper tunes it, FusionBench uses 0.3
   with ``sum``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import InvalidRecipe
from . import _sparsify as sp
from .base import ParamSpec, StrategySpec, TensorTask

__all__ = ["SPECS", "TIES", "gta_merge", "ties"]

Prune = Callable[[TensorTask, int, torch.Tensor], torch.Tensor]


def gta_merge(task: TensorTask, prune: Prune, consensus: str | None) -> torch.Tensor:
    """Generalized task arithmetic: prune each delta (``prune(task, i, delta)``), then combine.

    Shared by ``ties``, ``dare_*``, ``della*`` and ``breadcrumbs*``.
    """
    base, deltas = sp.base_and_deltas(task)
    pruned = [prune(task, i, d) for i, d in enumerate(deltas)]
    return sp.combine(
        base,
        pruned,
        task.weights,
        consensus=consensus,
        normalize=bool(task.params["normalize"]),
        lambda_=float(task.params["lambda"]),
    )


def _rescale(task: TensorTask) -> str | None:
    return "l1" if task.params["rescale"] else None


def _prune_magnitude(task: TensorTask, i: int, delta: torch.Tensor) -> torch.Tensor:
    density = float(task.model_params[i]["density"])
    mask: sp.Keep
    if task.params.get("trim_scope", "tensor") == "model":
        if task.stats is None:
            raise InvalidRecipe(
                f"tensor {task.name!r}: trim_scope='model' needs the whole-model pre-pass"
            )
        threshold = int(task.stats[i])
        mask = (sp.magnitude_key(delta) >= threshold).reshape(delta.shape)
    else:
        mask = sp.magnitude_mask(delta, density)
    return sp.apply_mask(delta, mask, _rescale(task))


def ties(task: TensorTask) -> torch.Tensor:
    """TIES: magnitude trim, sign election, disjoint (weighted) mean, ``* lambda``, ``+ base``."""
    if _fusable(task):
        return _ties_streamed(task)
    return gta_merge(task, _prune_magnitude, str(task.params["sign_method"]))


def _fusable(task: TensorTask) -> bool:
    return (
        task.params.get("trim_scope", "tensor") == "tensor"
        and not task.params["rescale"]
        and task.base is not None
        and task.base.dtype == torch.float32
        and all(x.dtype == torch.float32 and x.shape == task.base.shape for x in task.inputs)
        and sys.byteorder == "little"
    )


def _ties_streamed(task: TensorTask) -> torch.Tensor:
    """The per-tensor float32 TIES from whole float32 inputs (see :func:`_ties_chunked`)."""
    assert task.base is not None
    base = task.base.contiguous().reshape(-1)
    xs = [x.contiguous().reshape(-1) for x in task.inputs]
    return _ties_chunked(
        task,
        task.base.shape,
        base,
        lambda a, b: base[a:b],
        lambda i, a, b: xs[i][a:b],
        lambda i, step: (base if i is None else xs[i])[::step],
    )


def ties_stored(task: TensorTask) -> torch.Tensor:
    """:func:`ties` from the stored inputs (e.g. bfloat16), each chunk upcast on the way."""
    st = task.stored
    assert st is not None
    # TIES needs a base: the engine takes this path only when the plan has one
    assert st.base is not None
    return _ties_chunked(
        task, st.shape, st.base, st.base_at, st.input_at, st.sample, out_dtype=st.out_dtype
    )


def uses_stored(params: Mapping[str, Any]) -> bool:
    """The engine may hand :func:`ties_stored` the stored inputs (per-tensor trim only)."""
    return (
        params.get("trim_scope", "tensor") == "tensor"
        and not params["rescale"]
        and sys.byteorder == "little"
    )


def _ties_chunked(
    task: TensorTask,
    shape: Sequence[int],
    base: torch.Tensor,
    base_at: Callable[[int, int], torch.Tensor],
    input_at: Callable[[int, int, int], torch.Tensor],
    sample_at: Callable[[int | None, int], torch.Tensor],
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The per-tensor float32 TIES without materialised task vectors, bit-identical to
    :func:`gta_merge` with :func:`_prune_magnitude`.

    ``base_at(a, b)`` / ``input_at(i, a, b)`` give float32 elements ``a .. b - 1`` of the flat
    base / input ``i``, ``sample_at(i, step)`` every ``step``-th element of input ``i`` (None:
    the base) for the cuts' brackets; ``base`` is the flat base in any float dtype (added
    last). The task
    vectors are recomputed chunk by chunk (``x_i - base`` is elementwise, so a chunk equals the
    same slice of the whole), once for all their cuts together (one read of the base) and
    once for the election and disjoint merge; every temporary stays in the CPU cache.
    """
    n = base.numel()
    cuts: list[sp.Cut | None] = []
    wanted: list[tuple[int, int]] = []
    for i in range(len(task.model_params)):
        k = sp.topk_count(n, float(task.model_params[i]["density"]))
        if k >= n:
            cuts.append(None)
        elif k <= 0:
            cuts.append(sp.Cut(torch.tensor(float("inf")), n))
        else:
            cuts.append(None)
            wanted.append((i, k))

    def deltas(a: int, b: int) -> list[torch.Tensor]:
        # every trimmed task vector's chunk, from one read of the base
        b_chunk = base_at(a, b)
        return [input_at(i, a, b) - b_chunk for i, _ in wanted]

    def sample(i: int) -> Callable[[int], torch.Tensor]:
        return lambda step: sample_at(i, step) - sample_at(None, step)

    found = sp.chunked_cuts(
        deltas, n, [(j, k) for j, (_, k) in enumerate(wanted)], [sample(i) for i, _ in wanted]
    )
    for (i, _), cut in zip(wanted, found, strict=True):
        cuts[i] = cut
    out = torch.empty(n, dtype=out_dtype)  # cast chunk by chunk when it is not float32

    def prune(i: int, d: torch.Tensor, start: int) -> torch.Tensor:
        cut = cuts[i]
        return d if cut is None else sp.zero_unkept(d, cut.keep_np(sp.mag_bits(d), start))

    sp.combine_task_vectors(
        task, str(task.params["sign_method"]), out, base, base_at, input_at, prune
    )
    return out.view(tuple(shape))


def observe_magnitudes(task: TensorTask) -> list[dict[str, Any]] | None:
    """Pre-pass: per contribution, a sparse histogram of ``|delta|`` of this tensor."""
    if task.params.get("trim_scope", "tensor") != "model":
        return None
    out = []
    for i, d in enumerate(task.deltas()):
        density = float(task.model_params[i]["density"])
        out.append(sp.histogram_summary(d, min(max(density, 0.0), 1.0) * d.numel()))
    return out


def reduce_thresholds(
    summaries: Sequence[list[dict[str, Any]] | None], params: Mapping[str, Any]
) -> tuple[int, ...] | None:
    """Per contribution, the bucket key of its model-wide k-th largest ``|delta|``."""
    present = [s for s in summaries if s is not None]
    if not present:
        return None
    n_models = len(present[0])
    return tuple(sp.threshold_from_histograms([s[i] for s in present]) for i in range(n_models))


def model_scope_requested(params: Mapping[str, Any]) -> bool:
    scope: str = params.get("trim_scope", "tensor")
    return scope == "model"


DENSITY = ParamSpec(
    "density",
    float,
    1.0,
    scope="model",
    doc="fraction of task-vector entries kept (1 = no trim)",
    minimum=0.0,
    maximum=1.0,
)
LAMBDA = ParamSpec("lambda", float, 1.0, doc="scale of the merged task vector")
RESCALE_FALSE = ParamSpec(
    "rescale", bool, False, doc="L1-norm matching of the kept entries", varying=False
)
SIGN_METHOD = ParamSpec(
    "sign_method",
    str,
    "sum",
    doc="sign election: sum of weighted deltas (mass) or count of signs",
    choices=("sum", "count"),
    varying=False,
)
TRIM_SCOPE = ParamSpec(
    "trim_scope",
    str,
    "tensor",
    doc="top-k per tensor (mergekit) or over the whole model (paper, extra pass)",
    choices=("tensor", "model"),
    varying=False,
)


def normalize_param(default: bool) -> ParamSpec:
    return ParamSpec(
        "normalize",
        bool,
        default,
        doc="divide by the sum of the weights of agreeing contributions",
        varying=False,
    )


TIES = StrategySpec(
    name="ties",
    version=1,
    summary="TIES: trim to top-k |delta|, elect signs, disjoint mean (mergekit semantics)",
    merge=ties,
    params=(DENSITY, LAMBDA, normalize_param(True), RESCALE_FALSE, SIGN_METHOD, TRIM_SCOPE),
    needs_base=True,
    min_models=1,
    observe=observe_magnitudes,
    reduce=reduce_thresholds,
    wants_prepass=model_scope_requested,
    references=("https://arxiv.org/abs/2306.01708",),
    merge_stored=ties_stored,
    uses_stored=uses_stored,
)

SPECS: tuple[StrategySpec, ...] = (TIES,)
