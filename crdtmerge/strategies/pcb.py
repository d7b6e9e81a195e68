"""Strategy family `pcb` (placeholder: being implemented)."""

from __future__ import annotations

from .base import StrategySpec

SPECS: tuple[StrategySpec, ...] = ()
