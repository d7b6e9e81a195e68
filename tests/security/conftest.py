"""Fixtures for the security tests: in-process nodes (reused from ``tests/node``), signing keys
and signed contribution files."""

from __future__ import annotations

from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crdtmerge.identity import contribution_metadata_header
from crdtmerge.signing import sign_tensors
from crdtmerge.tensors import write_tensors
from tests.node.conftest import (  # noqa: F401  (fixtures)
    AUTH,
    TOKEN,
    model_files,
    node,
    node_factory,
    runtime,
    wait_state,
)

ADMIN_TOKEN = "admin-token-456"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def write_signed(
    path: Path,
    tensors: dict[str, torch.Tensor],
    key: Ed25519PrivateKey,
    metadata: dict | None = None,
) -> bytes:
    """Write ``tensors`` signed with ``key``; return the object's root."""
    manifest = sign_tensors(tensors, key, metadata or {})
    write_tensors(path, tensors, contribution_metadata_header(manifest.metadata))
    return manifest.root
