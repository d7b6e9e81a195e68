"""``/v1/objects``: content-addressed objects (contributions, bases, merged models)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from ..deps import NodeDep, ReadAuth, WriteAuth
from ..schemas import ErrorOut, ObjectInfoOut, ObjectList, UploadOut
from ._common import body_stream, content_length, object_response

router = APIRouter(
    prefix="/objects",
    tags=["objects"],
    responses={
        400: {"model": ErrorOut},
        401: {"model": ErrorOut},
        404: {"model": ErrorOut},
        413: {"model": ErrorOut},
    },
)

_RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "the raw safetensors bytes (streamed)",
    }
}


@router.post(
    "",
    dependencies=[WriteAuth],
    status_code=201,
    responses={200: {"model": UploadOut, "description": "already stored"}},
    openapi_extra=_RAW_BODY,
)
async def put_object(request: Request, response: Response, node: NodeDep) -> UploadOut:
    """Store an object (e.g. a recipe's base) without adding it to any merge."""
    result = await node.put_object(body_stream(request), content_length(request))
    if not result.created:
        response.status_code = 200
    return UploadOut(root=result.root.hex(), created=result.created, size=result.size)


@router.get("", dependencies=[ReadAuth])
async def list_objects(node: NodeDep) -> ObjectList:
    return ObjectList(objects=[r.hex() for r in node.store.list()])


@router.get(
    "/{root}",
    dependencies=[ReadAuth],
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def get_object(root: str, node: NodeDep) -> FileResponse:
    """The object's canonical safetensors bytes (supports HTTP Range; ETag = root)."""
    path, r = node.object_path(root)
    node.metrics.download_bytes_total.inc(path.stat().st_size)
    return object_response(path, r, f"{root}.safetensors")


@router.get("/{root}/info", dependencies=[ReadAuth])
async def object_info(root: str, node: NodeDep) -> ObjectInfoOut:
    return ObjectInfoOut(**node.object_info(root))


@router.get(
    "/{root}/manifest",
    dependencies=[ReadAuth],
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def object_manifest(root: str, node: NodeDep) -> Response:
    """The object's manifest (binary, see ``crdtmerge.identity.Manifest.from_bytes``)."""
    return Response(node.object_manifest(root), media_type="application/octet-stream")
