"""One router per resource; :func:`api_router` mounts them under ``/v1``."""

from __future__ import annotations

from fastapi import APIRouter

from . import merges, objects, replication

__all__ = ["api_router"]


def api_router() -> APIRouter:
    router = APIRouter(prefix="/v1")
    router.include_router(merges.router)
    router.include_router(objects.router)
    router.include_router(replication.router)
    return router
