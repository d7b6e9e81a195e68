"""``/v1/merges``: recipes, contributions, status and the merged model."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from crdtmerge.signing import parse_public_key

from ..deps import AdminAuth, NodeDep, ReadAuth, WriteAuth
from ..schemas import (
    ContributionList,
    ContributionOut,
    ErrorOut,
    MergeList,
    MergeStatusOut,
    RecipeIn,
    UploadOut,
)
from ._common import body_stream, content_length, object_response, status_out

router = APIRouter(
    prefix="/merges",
    tags=["merges"],
    responses={
        400: {"model": ErrorOut},
        401: {"model": ErrorOut},
        403: {"model": ErrorOut},
        404: {"model": ErrorOut},
        413: {"model": ErrorOut},
        422: {"model": ErrorOut},
        429: {"model": ErrorOut},
        507: {"model": ErrorOut},
    },
)

_RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "the raw safetensors bytes (streamed)",
    }
}


@router.get("", dependencies=[ReadAuth])
async def list_merges(node: NodeDep) -> MergeList:
    return MergeList(merges=node.merge_names())


@router.get("/{name}", dependencies=[ReadAuth])
async def get_merge(name: str, node: NodeDep) -> MergeStatusOut:
    """Recipe, live roots, state digest, missing objects and the merged hash (or state)."""
    return status_out(await node.status(name))


@router.put("/{name}/recipe", dependencies=[WriteAuth])
async def put_recipe(name: str, recipe: RecipeIn, node: NodeDep) -> MergeStatusOut:
    """Create the merge or replace its recipe (last writer wins across replicas)."""
    return status_out(await node.set_recipe(name, recipe.model_dump()))


@router.post(
    "/{name}/contributions",
    dependencies=[WriteAuth],
    status_code=201,
    responses={200: {"model": UploadOut, "description": "already a live contribution"}},
    openapi_extra=_RAW_BODY,
)
async def push_contribution(
    name: str, request: Request, response: Response, node: NodeDep
) -> UploadOut:
    """Upload one contribution as raw safetensors; 201 when added, 200 when already live."""
    result = await node.add_contribution(name, body_stream(request), content_length(request))
    if not result.created:
        response.status_code = 200
    return UploadOut(root=result.root.hex(), created=result.created, size=result.size)


@router.get("/{name}/contributions", dependencies=[ReadAuth])
async def list_contributions(name: str, node: NodeDep) -> ContributionList:
    items = [ContributionOut(**c) for c in node.contributions(name)]
    return ContributionList(merge=name, contributions=items)


@router.delete("/{name}/contributions/{root}", dependencies=[WriteAuth])
async def remove_contribution(name: str, root: str, node: NodeDep) -> MergeStatusOut:
    """Observed-remove: a concurrent re-add on another replica wins."""
    return status_out(await node.remove_contribution(name, root))


@router.put("/{name}/trusted-keys/{key}", dependencies=[AdminAuth])
async def trust_key(name: str, key: str, node: NodeDep) -> MergeStatusOut:
    """Trust an Ed25519 public key (64 hex) to sign contributions to this merge (admin).

    While a merge has trusted keys, uploads must be signed by one of them, and the merge uses
    only the live contributions signed by a live trusted key (decided from the replicated
    state, so every replica merges the same set)."""
    return status_out(await node.add_trusted_key(name, parse_public_key(key)))


@router.delete("/{name}/trusted-keys/{key}", dependencies=[AdminAuth])
async def untrust_key(name: str, key: str, node: NodeDep) -> MergeStatusOut:
    """Stop trusting a key (admin; observed-remove, a concurrent re-add elsewhere wins)."""
    return status_out(await node.remove_trusted_key(name, parse_public_key(key)))


@router.get(
    "/{name}/model",
    dependencies=[ReadAuth],
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_merged(name: str, node: NodeDep) -> FileResponse:
    """The merged model as one canonical safetensors file (supports HTTP Range)."""
    path, root = await node.merged_path(name)
    node.metrics.download_bytes_total.inc(path.stat().st_size)
    return object_response(path, root, f"{name}-{root.hex()[:16]}.safetensors")
