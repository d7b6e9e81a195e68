"""The strategy registry: one literal table keyed by (name, version).

Nothing is discovered at import time: every family module is named here and exports ``SPECS``.
An unknown name or version raises :class:`~crdtmerge.errors.UnsupportedStrategy` listing what
exists.
"""

from __future__ import annotations

from ..errors import UnsupportedStrategy
from . import (
    arcee_fusion,
    breadcrumbs,
    consensus,
    dare,
    della,
    expo,
    fisher,
    karcher,
    linear,
    magmax,
    model_stock,
    nearswap,
    passthrough,
    pcb,
    ram,
    regmean,
    sce,
    slerp,
    svd,
    ties,
)
from .base import REQUIRED, ParamSpec, StrategySpec, TensorTask

__all__ = [
    "REGISTRY",
    "REQUIRED",
    "ParamSpec",
    "StrategySpec",
    "TensorTask",
    "get_strategy",
    "list_strategies",
]

_FAMILIES = (
    linear,
    ties,
    dare,
    della,
    breadcrumbs,
    magmax,
    sce,
    ram,
    pcb,
    consensus,
    slerp,
    karcher,
    model_stock,
    nearswap,
    arcee_fusion,
    svd,
    fisher,
    regmean,
    expo,
    passthrough,
)

REGISTRY: dict[tuple[str, int], StrategySpec] = {}
for _family in _FAMILIES:
    for _spec in _family.SPECS:
        _key = (_spec.name, _spec.version)
        if _key in REGISTRY:
            raise RuntimeError(f"strategy {_key} registered twice")
        REGISTRY[_key] = _spec


def list_strategies() -> list[StrategySpec]:
    """Every registered strategy, sorted by (name, version)."""
    return [REGISTRY[k] for k in sorted(REGISTRY)]


def get_strategy(name: str, version: int | None = None) -> StrategySpec:
    """The spec for ``name`` at ``version`` (the newest when None).

    Raises:
        UnsupportedStrategy: naming what exists.
    """
    versions = sorted(v for (n, v) in REGISTRY if n == name)
    if not versions:
        known = ", ".join(sorted({n for n, _ in REGISTRY}))
        raise UnsupportedStrategy(f"unknown strategy {name!r}; known strategies: {known}")
    if version is None:
        return REGISTRY[(name, versions[-1])]
    if version not in versions:
        raise UnsupportedStrategy(
            f"strategy {name!r} version {version} is not supported here; "
            f"supported versions: {versions}"
        )
    return REGISTRY[(name, version)]
