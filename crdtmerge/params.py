"""Parameter values in mergekit's conventions, validated and resolved per tensor.

A value is one of:

- a scalar (number, bool or string);
- a *gradient*: a list of numbers, interpolated piecewise-linearly over the model's layers
  (``t = layer / (num_layers - 1)``); tensors outside any layer get the first value;
- a *filter list*: ``[{"filter": "self_attn", "value": 0.3}, {"value": 0.5}]``: the first entry
  whose filter is a substring of the tensor name wins; an entry without a filter matches
  everything. Its values may themselves be gradients. A tensor no entry matches gets the
  parameter's default.

:func:`layer_index` parses the layer number from a tensor name (the first ``.<int>.`` component,
as in ``model.layers.12.mlp.up_proj.weight`` or ``transformer.h.3.attn.c_attn.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRecipe
from .strategies.base import REQUIRED, ParamSpec

__all__ = ["check_param_value", "layer_index", "resolve_param"]

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The first integer path component of ``name``, or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _check_gradient(spec: ParamSpec, value: list[Any], where: str) -> list[Any]:
    if spec.kind not in (int, float):
        raise InvalidRecipe(f"parameter {spec.name!r}{where}: a gradient (list) needs a number")
    if not value:
        raise InvalidRecipe(f"parameter {spec.name!r}{where}: a gradient needs at least one value")
    return [spec.check(v, f"{where}[{i}]") for i, v in enumerate(value)]


def check_param_value(spec: ParamSpec, value: Any) -> Any:
    """Validate a scalar, gradient or filter-list value against ``spec``; return it coerced."""
    if isinstance(value, list | tuple):
        value = list(value)
        if value and all(isinstance(v, Mapping) for v in value):
            if not spec.varying:
                raise InvalidRecipe(f"parameter {spec.name!r} cannot vary by tensor")
            out = []
            for i, entry in enumerate(value):
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    raise InvalidRecipe(
                        f"parameter {spec.name!r}[{i}]: filter entries are "
                        f"{{'filter': str, 'value': v}}, got {dict(entry)!r}"
                    )
                filt = entry.get("filter")
                if filt is not None and not isinstance(filt, str):
                    raise InvalidRecipe(f"parameter {spec.name!r}[{i}]: filter must be a string")
                v = entry["value"]
                where = f"[{i}].value"
                v = (
                    _check_gradient(spec, list(v), where)
                    if isinstance(v, list | tuple)
                    else spec.check(v, where)
                )
                out.append({"filter": filt, "value": v} if filt is not None else {"value": v})
            return out
        if not spec.varying:
            raise InvalidRecipe(f"parameter {spec.name!r} cannot vary by tensor")
        return _check_gradient(spec, value, "")
    return spec.check(value)


def _interpolate(grad: list[Any], layer: int | None, num_layers: int) -> Any:
    if len(grad) == 1 or layer is None or num_layers <= 1:
        return grad[0]
    t = layer / (num_layers - 1)
    pos = t * (len(grad) - 1)
    lo = min(int(pos), len(grad) - 2)
    frac = pos - lo
    return grad[lo] * (1.0 - frac) + grad[lo + 1] * frac


def resolve_param(spec: ParamSpec, value: Any, name: str, num_layers: int) -> Any:
    """The scalar value of a (validated) parameter for tensor ``name``.

    Raises:
        InvalidRecipe: when a required parameter resolves to nothing for this tensor.
    """
    layer = layer_index(name)
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
        for entry in value:
            filt = entry.get("filter")
            if filt is None or filt in name:
                v = entry["value"]
                return _interpolate(v, layer, num_layers) if isinstance(v, list) else v
        if spec.default is REQUIRED:
            raise InvalidRecipe(f"parameter {spec.name!r}: no filter entry matches tensor {name!r}")
        return spec.default
    if isinstance(value, list):
        out = _interpolate(value, layer, num_layers)
        return int(round(out)) if spec.kind is int else out
    return value
