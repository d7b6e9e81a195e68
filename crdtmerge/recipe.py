"""The merge recipe: strategy, version, parameters, base object and output dtype.

A recipe is an immutable value. Its canonical encoding (:func:`~crdtmerge.canonical.
canonical_pack` of :meth:`Recipe.to_dict`) is what replicas exchange and what :meth:`Recipe.hash`
covers; the hash is part of every state digest and of the merge seed.

Parameter values follow mergekit: a scalar; a list of numbers (a gradient interpolated over the
model's layers); or a list of ``{"filter": substring, "value": v}`` entries (the first entry
whose filter occurs in the tensor name wins; an entry without a filter is the default).
Per-model parameters given here are defaults for every contribution; a contribution's own
metadata overrides them.

:meth:`Recipe.validated` checks a recipe against the strategy registry (name, version,
parameter names, types, ranges, base presence) before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .canonical import canonical_pack, domain_hash
from .errors import InvalidInput, InvalidRecipe

__all__ = ["OUTPUT_DTYPES", "Recipe"]

#: output dtypes a recipe may ask for (safetensors names map to these in ``tensors``).
OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")

RECIPE_FORMAT = 1


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in value)
    ):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Recipe:
    """Strategy name + version + parameters + base root + output dtype.

    Attributes:
        strategy: registered strategy name.
        version: strategy version.
        params: parameter name -> value (scalar, gradient list, or filter list).
        base: the base object's 32-byte root, or None.
        out_dtype: one of :data:`OUTPUT_DTYPES`, or None for "the base's dtype (else the first
            contribution's)".

    Example:
        >>> r = Recipe("ties", 1, {"density": 0.5})
        >>> Recipe.from_dict(r.to_dict()) == r
        True
    """

    strategy: str
    version: int = 1
    params: Mapping[str, Any] = field(default_factory=dict)
    base: bytes | None = None
    out_dtype: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str) or not self.strategy:
            raise InvalidRecipe(
                f"recipe strategy must be a non-empty string, got {self.strategy!r}"
            )
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise InvalidRecipe(f"recipe version must be a positive integer, got {self.version!r}")
        if self.base is not None and (not isinstance(self.base, bytes) or len(self.base) != 32):
            raise InvalidRecipe("recipe base must be a 32-byte root (64 hex characters)")
        if self.out_dtype is not None and self.out_dtype not in OUTPUT_DTYPES:
            raise InvalidRecipe(
                f"out_dtype must be one of {list(OUTPUT_DTYPES)}, got {self.out_dtype!r}"
            )
        if not isinstance(self.params, Mapping):
            raise InvalidRecipe("recipe params must be a mapping of name to value")
        try:  # canonical check: NaN/Inf and unsupported types have no canonical form
            canonical_pack(dict(self.params))
        except InvalidInput as exc:
            raise InvalidRecipe(f"recipe params: {exc.detail}") from exc
        object.__setattr__(self, "params", _FrozenParams(_freeze(self.params)))

    # -- encoding ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON/msgpack-able form (``base`` as bytes; see :meth:`to_json`)."""
        return {
            "format": RECIPE_FORMAT,
            "strategy": self.strategy,
            "version": self.version,
            "params": dict(self.params),
            "base": self.base,
            "out_dtype": self.out_dtype,
        }

    def to_json(self) -> dict[str, Any]:
        d = self.to_dict()
        d["base"] = self.base.hex() if self.base is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Parse the form made by :meth:`to_dict` or :meth:`to_json` (base as bytes or hex)."""
        if not isinstance(d, Mapping):
            raise InvalidRecipe("a recipe must be an object")
        fmt = d.get("format", RECIPE_FORMAT)
        if fmt != RECIPE_FORMAT:
            raise InvalidRecipe(
                f"unsupported recipe format {fmt!r}; this build reads {RECIPE_FORMAT}"
            )
        unknown = set(d) - {"format", "strategy", "version", "params", "base", "out_dtype"}
        if unknown:
            raise InvalidRecipe(f"unknown recipe field(s): {sorted(unknown)}")
        if "strategy" not in d:
            raise InvalidRecipe("recipe is missing 'strategy'")
        base = d.get("base")
        if isinstance(base, str):
            try:
                base = bytes.fromhex(base)
            except ValueError as exc:
                raise InvalidRecipe(f"recipe base {base!r} is not a hex root") from exc
        return cls(
            strategy=d["strategy"],
            version=d.get("version", 1),
            params=d.get("params") or {},
            base=base,
            out_dtype=d.get("out_dtype"),
        )

    def canonical_bytes(self) -> bytes:
        return canonical_pack(self.to_dict())

    def hash(self) -> bytes:
        """32-byte domain-separated BLAKE3 of the canonical encoding."""
        return domain_hash("crdtmerge/v1/recipe", self.canonical_bytes())

    # -- validation -------------------------------------------------------------------------

    def validated(self) -> Recipe:
        """Check against the registry; return a recipe with parameter values coerced.

        Raises:
            UnsupportedStrategy: unknown name or version.
            InvalidRecipe: unknown parameter, wrong type, out of range, or a missing base.
        """
        from .params import check_param_value  # local: params imports strategies
        from .strategies import get_strategy

        spec = get_strategy(self.strategy, self.version)
        coerced = {}
        for name, value in self.params.items():
            coerced[name] = check_param_value(spec.param(name), value)
        for p in spec.all_params:
            from .strategies.base import REQUIRED

            if p.default is REQUIRED and p.scope == "global" and p.name not in coerced:
                raise InvalidRecipe(f"strategy {spec.name!r} requires parameter {p.name!r}")
        if spec.needs_base and self.base is None:
            raise InvalidRecipe(f"strategy {spec.name!r} needs a base model; set the recipe's base")
        return Recipe(self.strategy, self.version, coerced, self.base, self.out_dtype)


class _FrozenParams(Mapping[str, Any]):
    """A hashable, read-only view of recipe parameters."""

    __slots__ = ("_items",)

    def __init__(self, items: tuple[tuple[str, Any], ...]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return _thaw(v)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _FrozenParams):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(dict(self))
