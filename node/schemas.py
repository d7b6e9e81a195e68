"""Request and response bodies of the public REST API (JSON), separate input and output models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ContributionList",
    "ContributionOut",
    "ErrorOut",
    "MergeList",
    "MergeStatusOut",
    "ObjectInfoOut",
    "ObjectList",
    "RecipeIn",
    "UploadOut",
]


class RecipeIn(BaseModel):
    """A recipe as JSON (``base`` as a 64-hex root or null)."""

    model_config = ConfigDict(extra="forbid")

    format: int = 1
    strategy: str
    version: int = 1
    params: dict[str, Any] = Field(default_factory=dict)
    base: str | None = None
    out_dtype: str | None = None


class UploadOut(BaseModel):
    root: str = Field(description="the object's root, 64 hex characters")
    created: bool = Field(description="false when it was already present (answered with 200)")
    size: int = Field(description="bytes received")


class MergeStatusOut(BaseModel):
    name: str
    recipe: dict[str, Any] | None
    recipe_hash: str | None
    digest: str = Field(description="state digest: BLAKE3 of (recipe hash, sorted live roots)")
    contributions: list[str] = Field(description="live roots, sorted")
    missing: list[str] = Field(description="needed roots (contributions, base) not stored here")
    complete: bool
    state: str = Field(
        description="no_recipe | incomplete | waiting | computing | ready | unsupported | failed"
    )
    merged_hash: str | None = Field(description="the merged model's root once ready")
    error: str | None = None
    detail: str | None = None
    peers_agreeing: list[str] = Field(
        default_factory=list, description="peers whose last reported digest equals ours"
    )
    peers_differing: list[str] = Field(default_factory=list)
    converged: bool = Field(
        default=True,
        description="every peer heard from reported this digest (true when none was heard)",
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (hex) trusted to sign contributions; when non-empty "
        "only contributions signed by one of them are merged",
    )
    untrusted: list[str] = Field(
        default_factory=list,
        description="live contributions left out of the merge: not signed by a trusted key",
    )


class MergeList(BaseModel):
    merges: list[str]


class ContributionOut(BaseModel):
    root: str
    present: bool
    size: int | None


class ContributionList(BaseModel):
    merge: str
    contributions: list[ContributionOut]


class ObjectInfoOut(BaseModel):
    root: str
    size: int
    metadata: dict[str, Any]
    tensors: dict[str, dict[str, Any]]


class ObjectList(BaseModel):
    objects: list[str]


class ErrorOut(BaseModel):
    error: str
    detail: str
