"""Strategy family `dare` (placeholder: being implemented)."""

from __future__ import annotations

from .base import StrategySpec

SPECS: tuple[StrategySpec, ...] = ()
