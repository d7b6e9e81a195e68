"""The FastAPI application factory. Nothing is built at import time.

``create_app(settings)`` returns an app whose ``lifespan`` builds one
:class:`~node.runtime.NodeRuntime` (SQLite, store, replica state, HTTP client, merge worker),
keeps it on ``app.state.runtime`` and stops it on shutdown. Every
:class:`~crdtmerge.errors.CrdtMergeError` is answered by one exception handler as
``{"error": code, "detail": message}`` with the error's ``http_status``; request validation
errors get the same shape (``invalid_request``, 422).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from crdtmerge import __version__
from crdtmerge.errors import CrdtMergeError

from .gossip import Replication
from .ratelimit import RequestLimits
from .routes import api_router, health
from .runtime import NodeRuntime
from .settings import Settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

RuntimeHook = Callable[[NodeRuntime], None]


def create_app(
    settings: Settings,
    *,
    http: httpx.AsyncClient | None = None,
    on_start: RuntimeHook | None = None,
) -> FastAPI:
    """Build the node's ASGI app.

    Args:
        settings: the node configuration.
        http: an outgoing HTTP client to inject (tests pass one over ``ASGITransport``); by
            default the runtime makes its own.
        on_start: called with the started runtime (e.g. to attach a gossip driver).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = NodeRuntime(settings, http=http)
        await runtime.start()
        app.state.runtime = runtime
        # replication (node.gossip): started after the runtime, stopped before it
        replication = Replication(runtime, settings)
        app.state.replication = replication
        await replication.start(loop=bool(settings.extra.get("gossip_loop", True)))
        if on_start is not None:
            on_start(runtime)
        try:
            yield
        finally:
            await replication.stop()
            await runtime.stop()

    app = FastAPI(
        title="crdtmerge node",
        version=__version__,
        summary="Replicated, deterministic model merging",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_exception_handler(CrdtMergeError, _crdtmerge_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_middleware(RequestLimits, settings=settings)  # 429 before any route runs
    app.include_router(health.router)
    app.include_router(api_router())
    return app


async def _crdtmerge_error(request: Request, exc: CrdtMergeError) -> JSONResponse:
    if exc.http_status >= 500:
        log.error("%s %s failed: %s [%s]", request.method, request.url.path, exc.detail, exc.code)
    return JSONResponse(exc.to_json(), status_code=exc.http_status)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (no such path, wrong method) in the same ``{error, detail}`` shape."""
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": code, "detail": f"{request.method} {request.url.path}: {exc.detail}"},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return JSONResponse(
        {"error": "invalid_request", "detail": "; ".join(parts) or "invalid request"},
        status_code=422,
    )
