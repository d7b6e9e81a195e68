"""FastAPI dependencies: the runtime, and the auth guards each router declares.

``WriteAuth`` checks ``Authorization: Bearer <token>`` against the configured write token (open
when none is configured); ``ReadAuth`` does the same with the read token; ``ClusterAuth`` checks
the cluster secret (header ``X-Crdtmerge-Cluster``) for node-to-node routes. Comparisons are
constant-time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from crdtmerge.errors import Unauthorized

from .runtime import NodeRuntime
from .settings import Settings

__all__ = ["ClusterAuth", "NodeDep", "ReadAuth", "SettingsDep", "WriteAuth"]

CLUSTER_HEADER = "x-crdtmerge-cluster"


def get_runtime(request: Request) -> NodeRuntime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


NodeDep = Annotated[NodeRuntime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        return None
    return value.strip()


def _check(expected: str | None, presented: str | None, what: str) -> None:
    if expected is None:
        return
    if presented is None:
        raise Unauthorized(f"this endpoint needs {what}: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(expected.encode(), presented.encode()):
        raise Unauthorized(f"wrong {what}")


def require_write(request: Request, settings: SettingsDep) -> None:
    _check(settings.token, _bearer(request), "the write token")


def require_read(request: Request, settings: SettingsDep) -> None:
    _check(settings.read_token, _bearer(request) or None, "the read token")


def require_cluster(request: Request, settings: SettingsDep) -> None:
    if settings.cluster_secret is None:
        raise Unauthorized("replication is disabled: this node has no cluster secret")
    _check(settings.cluster_secret, request.headers.get(CLUSTER_HEADER), "the cluster secret")


WriteAuth = Depends(require_write)
ReadAuth = Depends(require_read)
ClusterAuth = Depends(require_cluster)
