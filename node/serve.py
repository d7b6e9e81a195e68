"""Run a node under uvicorn with structured logs and graceful shutdown.

uvicorn handles SIGINT/SIGTERM: it stops accepting connections, lets in-flight requests finish
(bounded by ``timeout_graceful_shutdown``), then runs the app's lifespan shutdown, which stops
the merge worker and closes SQLite. A merge still computing is abandoned (its temporary output
is removed at the next start and the merge recomputed).
"""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .logging import configure_logging
from .settings import Settings

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_json)
    if settings.token is None:
        log.warning("no write token configured: write endpoints are open (use --token)")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        server_header=False,  # idle gossip is mostly headers (node.gossip)
        lifespan="on",
    )
    log.info("listening on http://%s:%d", settings.host, settings.port)
    uvicorn.Server(config).run()
