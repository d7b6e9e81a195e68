"""Helpers shared by the routers: streamed request bodies and object file responses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse
from starlette.requests import ClientDisconnect

from crdtmerge.errors import InvalidInput

from ..runtime import MergeStatus
from ..schemas import MergeStatusOut

SAFETENSORS = "application/octet-stream"


def content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        n = int(raw)
    except ValueError as exc:
        raise InvalidInput(f"bad Content-Length {raw!r}") from exc
    if n < 0:
        raise InvalidInput(f"bad Content-Length {raw!r}")
    return n


async def body_stream(request: Request) -> AsyncIterator[bytes]:
    """The request body chunk by chunk; a client that goes away mid-body is a 400."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect as exc:
        raise InvalidInput("the client disconnected before the upload was complete") from exc


class ObjectFileResponse(FileResponse):
    """Starlette's FileResponse (HTTP Range support) with 1 MiB reads instead of 64 KiB."""

    chunk_size = 1 << 20


def object_response(path: Path, root: bytes, filename: str) -> FileResponse:
    """A streamed file answer with HTTP Range support; the root is the strong ETag."""
    return ObjectFileResponse(
        path,
        media_type=SAFETENSORS,
        filename=filename,
        headers={"etag": f'"{root.hex()}"', "x-crdtmerge-root": root.hex()},
    )


def status_out(s: MergeStatus) -> MergeStatusOut:
    return MergeStatusOut(
        name=s.name,
        recipe=s.recipe.to_json() if s.recipe is not None else None,
        recipe_hash=s.recipe.hash().hex() if s.recipe is not None else None,
        digest=s.digest.hex(),
        contributions=[r.hex() for r in s.contributions],
        missing=[r.hex() for r in s.missing],
        complete=not s.missing and s.recipe is not None,
        state=s.state,
        merged_hash=s.merged_hash.hex() if s.merged_hash is not None else None,
        error=s.error,
        detail=s.detail,
        peers_agreeing=list(s.peers_agreeing),
        peers_differing=list(s.peers_differing),
        converged=not s.peers_differing,
        trusted_keys=[k.hex() for k in s.trusted_keys],
        untrusted=[r.hex() for r in s.untrusted],
    )
