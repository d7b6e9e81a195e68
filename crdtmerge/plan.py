"""Layer 2 planning: validate a merge against its inputs before any tensor is computed.

:func:`make_plan` checks the whole merge up front, so a bad merge fails fast with a message
naming the problem and nothing is written:

- the recipe against the strategy registry (:meth:`~crdtmerge.recipe.Recipe.validated`);
- the base: present when the strategy needs one or the recipe names one, absent otherwise;
- the number of contributions against the strategy's ``min_models`` / ``max_models``;
- tensor names: every contribution has exactly the base's (else the first contribution's) names;
  side tensors (``fisher:<name>``, ``gram:<name>``) are set aside for ``task.side`` and must
  refer to an existing tensor;
- shapes equal; dtypes floating everywhere (any mix of float dtypes) or identical non-float
  dtypes, whose bytes must then be identical in every input (they are copied, never merged);
- per-model parameters: the contribution's ``metadata["params"]`` override the recipe's
  model-scope values, both validated against the strategy's :class:`ParamSpec` s; unknown and
  global-scope names are rejected; every value must resolve for every tensor.

The plan fixes everything the merge pass needs: contributions sorted by root (duplicates of a
root collapse, as in a set), the seed, per tensor the compute dtype (float32, float64 when an
input is float64), the output dtype (the recipe's, else the base's, else the first
contribution's), and the output metadata (the recipe and the sorted input roots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import IncompatibleInputs, InvalidInput, InvalidRecipe
from .identity import set_root
from .params import check_param_value, layer_index, resolve_param
from .recipe import Recipe
from .rng import derive_seed
from .strategies import get_strategy
from .strategies.base import REQUIRED, StrategySpec
from .tensors import DTYPES, torch_dtype

__all__ = ["SIDE_KINDS", "MergePlan", "TensorPlan", "make_plan", "merged_metadata", "split_side"]

#: side-tensor kinds: ``<kind>:<tensor name>`` rides with a contribution, never in the output.
SIDE_KINDS = ("fisher", "gram")

_FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_OUT_DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_MAX_LISTED = 5


@dataclass(frozen=True)
class TensorPlan:
    """What the merge pass does for one output tensor.

    Attributes:
        name: the tensor name.
        shape: its shape (equal in every input).
        merged: True when the strategy computes it; False when it is copied (non-float).
        compute_dtype: float32, or float64 when an input is float64.
        out_dtype: the dtype written.
        params: global parameters resolved for this tensor.
        model_params: per contribution (canonical order), model parameters resolved.
        side: per contribution, ``kind -> side tensor name`` for this tensor.
        layer: the parsed layer index, or None.
        numel: element count.
    """

    name: str
    shape: tuple[int, ...]
    merged: bool
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    params: Mapping[str, Any]
    model_params: tuple[Mapping[str, Any], ...]
    side: tuple[Mapping[str, str], ...]
    layer: int | None
    numel: int

    @property
    def side_any(self) -> bool:
        """Whether any contribution ships side tensors for this name."""
        return any(self.side)

    @property
    def out_nbytes(self) -> int:
        return self.numel * _itemsize(self.out_dtype)


@dataclass(frozen=True)
class MergePlan:
    """A validated merge: everything decided, nothing computed yet."""

    recipe: Recipe
    validated: Recipe
    spec: StrategySpec
    contributions: tuple[Any, ...]  # engine.Contribution, sorted by root, unique
    base: Any  # TensorSource or None
    seed: bytes
    set_root: bytes
    tensors: tuple[TensorPlan, ...]  # sorted by name
    global_params: Mapping[str, Any]  # validated, unresolved (may be gradients/filters)
    num_layers: int
    metadata: Mapping[str, Any]

    @property
    def roots(self) -> list[bytes]:
        return [c.root for c in self.contributions]

    @property
    def total_out_bytes(self) -> int:
        return sum(t.out_nbytes for t in self.tensors)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def split_side(names: Sequence[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Split names into main tensor names and ``{target: {kind: side name}}``."""
    main: list[str] = []
    side: dict[str, dict[str, str]] = {}
    for n in names:
        kind, sep, target = n.partition(":")
        if sep and kind in SIDE_KINDS:
            side.setdefault(target, {})[kind] = n
        else:
            main.append(n)
    return sorted(main), side


def merged_metadata(recipe: Recipe, roots: Sequence[bytes]) -> dict[str, Any]:
    """The merge-relevant metadata of a merged object: the recipe and the sorted input roots."""
    return {"merge": {"recipe": recipe.to_json(), "inputs": [r.hex() for r in sorted(roots)]}}


def _listed(items: Sequence[str]) -> str:
    items = sorted(items)
    head = ", ".join(repr(x) for x in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return head + (f" and {more} more" if more > 0 else "")


def _info(source: Any, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    info = source.info(name)
    dtype = info.dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise IncompatibleInputs(f"tensor {name!r}: unsupported dtype {dtype!r}")
        dtype = torch_dtype(dtype)
    return dtype, tuple(int(s) for s in info.shape)


def _contribution_params(
    spec: StrategySpec, recipe_model: Mapping[str, Any], contribution: Any
) -> dict[str, Any]:
    label = f" of contribution {contribution.root.hex()[:16]}"
    meta = contribution.metadata or {}
    if not isinstance(meta, Mapping):
        raise InvalidInput(f"metadata{label} must be a mapping")
    own = meta.get("params") or {}
    if not isinstance(own, Mapping):
        raise InvalidRecipe(f"metadata 'params'{label} must be a mapping of name to value")
    values = dict(recipe_model)
    for name, value in own.items():
        try:
            p = spec.param(name)
        except InvalidRecipe as exc:
            raise InvalidRecipe(f"{exc.detail}{label}") from exc
        if p.scope != "model":
            raise InvalidRecipe(
                f"parameter {name!r}{label} is global for strategy {spec.name!r}; "
                "set it in the recipe, not per contribution"
            )
        try:
            values[name] = check_param_value(p, value)
        except InvalidRecipe as exc:
            raise InvalidRecipe(f"{exc.detail}{label}") from exc
    for p in spec.all_params:
        if p.scope == "model" and p.name not in values:
            if p.default is REQUIRED:
                raise InvalidRecipe(
                    f"strategy {spec.name!r} requires per-model parameter {p.name!r}{label}; "
                    "set it in the recipe or in the contribution's metadata"
                )
            values[p.name] = p.default
    return values


def make_plan(recipe: Recipe, contributions: Sequence[Any], base: Any | None) -> MergePlan:
    """Validate the merge and fix every decision; raises before any heavy work.

    Raises:
        UnsupportedStrategy: unknown strategy or version.
        InvalidRecipe: bad parameters, base missing or unexpected, wrong number of models.
        IncompatibleInputs: names, shapes or dtypes that do not match, differing non-float
            tensors.
    """
    validated = recipe.validated()
    spec = get_strategy(validated.strategy, validated.version)

    # -- base and the contribution set --------------------------------------------------------
    if base is None and (spec.needs_base or recipe.base is not None):
        why = "strategy needs one" if spec.needs_base else "recipe names one"
        raise InvalidRecipe(
            f"strategy {spec.name!r}: no base model given but the {why}"
            + (f" (base {recipe.base.hex()})" if recipe.base is not None else "")
        )
    if base is not None and recipe.base is None:
        raise InvalidRecipe(
            f"a base model was given but the recipe names none; set the recipe's base "
            f"(strategy {spec.name!r})"
        )
    unique: dict[bytes, Any] = {}
    for c in contributions:
        if not isinstance(c.root, bytes) or len(c.root) != 32:
            raise InvalidInput(f"contribution root must be 32 bytes, got {c.root!r}")
        unique.setdefault(c.root, c)
    ordered = tuple(unique[r] for r in sorted(unique))
    n = len(ordered)
    if n < spec.min_models:
        raise InvalidRecipe(
            f"strategy {spec.name!r} needs at least {spec.min_models} contribution(s), got {n}"
        )
    if spec.max_models is not None and n > spec.max_models:
        raise InvalidRecipe(
            f"strategy {spec.name!r} accepts at most {spec.max_models} contribution(s), got {n}"
        )

    # -- parameters ---------------------------------------------------------------------------
    global_params: dict[str, Any] = {}
    recipe_model: dict[str, Any] = {}
    for p in spec.all_params:
        if p.name in validated.params:
            (recipe_model if p.scope == "model" else global_params)[p.name] = validated.params[
                p.name
            ]
        elif p.scope == "global":
            global_params[p.name] = p.default
    per_model = [_contribution_params(spec, recipe_model, c) for c in ordered]

    # -- names, shapes, dtypes ----------------------------------------------------------------
    sources = ([("base", base)] if base is not None else []) + [
        (f"contribution {c.root.hex()[:16]}", c.source) for c in ordered
    ]
    ref_label, ref = sources[0]
    ref_names, _ = split_side(ref.names())
    if not ref_names:
        raise IncompatibleInputs(f"{ref_label} has no tensors")
    ref_set = set(ref_names)
    sides: list[dict[str, dict[str, str]]] = []
    for label, src in sources:
        names, side = split_side(src.names())
        missing = ref_set - set(names)
        extra = set(names) - ref_set
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {_listed(list(missing))}")
            if extra:
                parts.append(f"unexpected {_listed(list(extra))}")
            raise IncompatibleInputs(
                f"{label} does not have the tensor names of the {ref_label}: " + "; ".join(parts)
            )
        orphans = set(side) - ref_set
        if orphans:
            raise IncompatibleInputs(
                f"{label} has side tensors for unknown tensor(s) {_listed(list(orphans))}"
            )
        if src is not base:
            sides.append(side)

    num_layers = 0
    for name in ref_names:
        li = layer_index(name)
        if li is not None:
            num_layers = max(num_layers, li + 1)

    out_override = _OUT_DTYPE_NAMES[recipe.out_dtype] if recipe.out_dtype else None
    plans: list[TensorPlan] = []
    for name in ref_names:
        infos = [(label, *_info(src, name)) for label, src in sources]
        _, ref_dtype, ref_shape = infos[0]
        floating = [d in _FLOAT_DTYPES for _, d, _ in infos]
        for label, _, shape in infos:
            if shape != ref_shape:
                raise IncompatibleInputs(
                    f"tensor {name!r}: shape {list(shape)} in {label} does not match "
                    f"{list(ref_shape)} in the {ref_label}"
                )
        if any(floating) and not all(floating):
            kinds = ", ".join(f"{lb}: {str(d).removeprefix('torch.')}" for lb, d, _ in infos)
            raise IncompatibleInputs(f"tensor {name!r} mixes float and non-float dtypes ({kinds})")
        numel = 1
        for s in ref_shape:
            numel *= s
        if not all(floating):
            _check_identical(name, infos, sources)
            plans.append(
                TensorPlan(name, ref_shape, False, ref_dtype, ref_dtype, {}, (), (), None, numel)
            )
            continue
        compute = torch.float64 if any(d == torch.float64 for _, d, _ in infos) else torch.float32
        # the base's dtype, else the first contribution's (the reference in both cases)
        out = out_override or ref_dtype
        params = {
            k: resolve_param(spec.param(k), v, name, num_layers) for k, v in global_params.items()
        }
        model_params = tuple(
            {k: resolve_param(spec.param(k), v, name, num_layers) for k, v in mp.items()}
            for mp in per_model
        )
        plans.append(
            TensorPlan(
                name=name,
                shape=ref_shape,
                merged=True,
                compute_dtype=compute,
                out_dtype=out,
                params=params,
                model_params=model_params,
                side=tuple(dict(s.get(name, {})) for s in sides),
                layer=layer_index(name),
                numel=numel,
            )
        )

    roots = [c.root for c in ordered]
    sroot = set_root(roots)
    return MergePlan(
        recipe=recipe,
        validated=validated,
        spec=spec,
        contributions=ordered,
        base=base,
        seed=derive_seed(sroot, recipe.hash()),
        set_root=sroot,
        tensors=tuple(plans),
        global_params=global_params,
        num_layers=num_layers,
        metadata=merged_metadata(recipe, roots),
    )


def _check_identical(
    name: str, infos: list[tuple[str, torch.dtype, tuple[int, ...]]], sources: list[tuple[str, Any]]
) -> None:
    """Non-float tensors are copied: they must have one dtype and identical bytes everywhere."""
    ref_label, ref_dtype, _ = infos[0]
    for label, dtype, _ in infos[1:]:
        if dtype != ref_dtype:
            raise IncompatibleInputs(
                f"tensor {name!r}: non-float dtype {dtype} in {label} differs from "
                f"{ref_dtype} in the {ref_label}; non-float tensors are copied, never merged"
            )
    ref_bytes = bytes(sources[0][1].buffer(name))
    for label, src in sources[1:]:
        if bytes(src.buffer(name)) != ref_bytes:
            raise IncompatibleInputs(
                f"tensor {name!r} ({str(ref_dtype).removeprefix('torch.')}) differs between "
                f"{label} and the {ref_label}; non-float tensors are copied, never merged, "
                "so they must be identical in every input"
            )
