"""FastAPI dependencies: the runtime, and the auth guards each router declares.

``ReadAuth``, ``WriteAuth`` and ``AdminAuth`` check ``Authorization: Bearer <token>`` for one
scope. Scopes nest (admin ⊇ write ⊇ read): the admin token is accepted everywhere, the write
token on write and read endpoints. A scope with no token configured is open (the admin scope
falls back to the write token). An unknown token is 401; a known token of a narrower scope is
403 (``insufficient_scope``). ``ClusterAuth`` checks the cluster secret (header
``X-Crdtmerge-Cluster``) for node-to-node routes. Comparisons are constant-time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from crdtmerge.errors import Forbidden, Unauthorized

from .runtime import NodeRuntime
from .settings import Settings

__all__ = ["AdminAuth", "ClusterAuth", "NodeDep", "ReadAuth", "SettingsDep", "WriteAuth"]

CLUSTER_HEADER = "x-crdtmerge-cluster"


def get_runtime(request: Request) -> NodeRuntime:
    runtime: NodeRuntime = request.app.state.runtime
    return runtime


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


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


_SCOPES = ("read", "write", "admin")


def _authorize(request: Request, settings: Settings, scope: str) -> None:
    admin = settings.admin_token if settings.admin_token is not None else settings.token
    tokens = {"read": settings.read_token, "write": settings.token, "admin": admin}
    if tokens[scope] is None:
        return  # this scope is open
    presented = _bearer(request)
    if presented is None:
        raise Unauthorized(
            f"this endpoint needs the {scope} token: send 'Authorization: Bearer <token>'"
        )
    granted = -1
    for i, name in enumerate(_SCOPES):
        token = tokens[name]
        # every comparison runs, so timing does not tell which token matched
        if token is not None and hmac.compare_digest(token.encode(), presented.encode()):
            granted = max(granted, i)
    if granted < 0:
        raise Unauthorized(f"wrong token for this endpoint (it needs the {scope} token)")
    if granted < _SCOPES.index(scope):
        raise Forbidden(
            f"this token has the {_SCOPES[granted]} scope; the endpoint needs {scope}",
            code="insufficient_scope",
        )


def require_read(request: Request, settings: SettingsDep) -> None:
    _authorize(request, settings, "read")


def require_write(request: Request, settings: SettingsDep) -> None:
    _authorize(request, settings, "write")


def require_admin(request: Request, settings: SettingsDep) -> None:
    _authorize(request, settings, "admin")


def require_cluster(request: Request, settings: SettingsDep) -> None:
    if settings.cluster_secret is None:
        raise Unauthorized("replication is disabled: this node has no cluster secret")
    _check(settings.cluster_secret, request.headers.get(CLUSTER_HEADER), "the cluster secret")


WriteAuth = Depends(require_write)
ReadAuth = Depends(require_read)
AdminAuth = Depends(require_admin)
ClusterAuth = Depends(require_cluster)
