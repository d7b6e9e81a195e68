"""Liveness, readiness and Prometheus metrics (not versioned: operators' endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The node has opened its database and store and accepts requests."""
    rt = getattr(request.app.state, "runtime", None)
    if rt is None or not rt.ready:
        return JSONResponse(
            {"error": "not_ready", "detail": "the node is starting or stopping"}, status_code=503
        )
    return JSONResponse(
        {
            "status": "ready",
            "replica": rt.replica_id,
            "epoch": rt.epoch,
            "merges": len(rt.merge_names()),
        }
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    rt = request.app.state.runtime
    return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
