"""``/v1/replication``: node-to-node endpoints (msgpack, cluster-authenticated).

Every route depends on :func:`cluster_peer`, which verifies the request's HMAC signature made
with the cluster secret (:mod:`node.auth_cluster`): an unsigned, wrongly signed, stale or
replayed request gets 401 before any handler runs, and a node without a cluster secret refuses
all of them. Every successful answer except chunk bytes is signed back (:func:`signed`),
bound to the request's nonce, so the caller knows it came from a cluster member.

Anti-entropy (see :mod:`node.gossip`):

- ``POST /messages``: one :mod:`crdtmerge.wire` message (digest, changed notice or index). The
  replica core handles it (a join is persisted, fsynced, before the answer leaves) and the
  answer is a msgpack array of the encoded messages the core addressed back to the sender
  (its digest, or an index of the documents that differ, or nothing);
- ``POST /hello``: ``{"v": 1, "id", "url", "peers": [[id, url]...]}``, answered in kind:
  replica ids for configured URLs, and peer exchange;
- ``GET /info``: this node's replication view as JSON (peers, rounds, transfer counters).

Objects (see :mod:`node.transfer`):

- ``GET /objects/{root}/manifest``: the manifest of a complete object (404 otherwise);
- ``POST /objects/{root}/chunks``: body ``{"v": 1, "chunks": [[tensor, index], ...]}``; the
  answer is the chunks' bytes concatenated in the order asked (their lengths follow from the
  manifest), at most :data:`MAX_BATCH_BYTES` per request, streamed. It is the one successful
  answer that is not MAC-signed: every chunk is checked against the manifest's leaf instead.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Annotated, Any

import msgpack
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from crdtmerge.errors import (
    NotFound,
    RemoteProtocolError,
    StorageError,
    TooLarge,
    Unauthorized,
    UnsupportedVersion,
)
from crdtmerge.store import ObjectStore, canonical_layout

from ..auth_cluster import HEADER_SIGNATURE, request_target
from ..runtime import parse_root_hex
from ..transfer import CHUNKS_VERSION, MAX_BATCH_CHUNKS

__all__ = ["MAX_BATCH_BYTES", "cluster_peer", "router", "signed"]

MSGPACK = "application/msgpack"
#: largest chunk batch served in one answer
MAX_BATCH_BYTES = 64 << 20
#: bytes read from disk and handed to the server per step of a chunk answer
PIECE_BYTES = 1 << 20
#: largest replication request body accepted
MAX_REQUEST_BYTES = 256 << 20


def _replication(request: Request) -> Any:
    rep = getattr(request.app.state, "replication", None)
    if rep is None or rep.key is None:
        raise Unauthorized("replication is disabled: this node has no cluster secret")
    return rep


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise TooLarge(f"replication message of {declared} bytes exceeds {MAX_REQUEST_BYTES}")
    parts = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise TooLarge(f"replication message exceeds {MAX_REQUEST_BYTES} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def cluster_peer(request: Request) -> str:
    """Verify the request's cluster signature; return the sender's node id.

    The body is read here (bounded) and kept on ``request.state.body`` for the handler.
    """
    rep = _replication(request)
    body = await _read_body(request)
    node: str  # rep is untyped (Any): RequestVerifier.verify gives (node id, nonce)
    node, nonce = rep.verifier.verify(
        request.method, request_target(request.scope), body, request.headers
    )
    request.state.body = body
    request.state.cluster_nonce = nonce
    request.state.cluster_node = node
    return node


ClusterPeer = Annotated[str, Depends(cluster_peer)]

router = APIRouter(prefix="/replication", tags=["replication"], include_in_schema=True)


def signed(
    request: Request, content: bytes, *, status: int = 200, media_type: str = MSGPACK
) -> Response:
    """An answer carrying the response MAC bound to the request's nonce."""
    rep = _replication(request)
    mac = rep.key.response_mac(request.state.cluster_nonce, status, content)
    return Response(
        content, status_code=status, media_type=media_type, headers={HEADER_SIGNATURE: mac}
    )


# -- anti-entropy ------------------------------------------------------------------------------


@router.post("/messages")
async def messages(request: Request, peer: ClusterPeer) -> Response:
    """One replication message in; the answer is the messages our core addressed back."""
    rep = _replication(request)
    answer = await rep.handle_message(request.state.body, peer)
    return signed(request, answer)


@router.post("/hello")
async def hello(request: Request, peer: ClusterPeer) -> Response:
    """A peer introduces itself (replica id, URL, known peers); we answer in kind."""
    rep = _replication(request)
    answer = await rep.handle_hello(request.state.body, peer)
    return signed(request, answer)


@router.get("/info")
async def info(request: Request, peer: ClusterPeer) -> Response:
    """This node's replication view (peers, rounds, transfer counters), as JSON."""
    rep = _replication(request)
    return signed(request, json.dumps(rep.info()).encode(), media_type="application/json")


# -- objects -----------------------------------------------------------------------------------


@router.get("/objects/{root}/manifest")
async def manifest(root: str, request: Request, peer: ClusterPeer) -> Response:
    store: ObjectStore = request.app.state.runtime.store
    r = parse_root_hex(root)
    if not store.has(r):
        raise NotFound(f"object {root} is not complete on this node")
    data = await asyncio.to_thread(lambda: store.manifest(r).to_bytes())
    return signed(request, data, media_type="application/octet-stream")


def _parse_chunk_request(body: bytes) -> list[tuple[str, int]]:
    try:
        obj = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"chunk request is not msgpack: {exc}") from exc
    if not isinstance(obj, dict) or set(obj) != {"v", "chunks"}:
        raise RemoteProtocolError('chunk request must be {"v": 1, "chunks": [[name, index]...]}')
    if obj["v"] != CHUNKS_VERSION:
        raise UnsupportedVersion(
            f"chunk request version {obj['v']!r}; this node speaks {CHUNKS_VERSION}"
        )
    chunks = obj["chunks"]
    if not isinstance(chunks, list) or not 0 < len(chunks) <= MAX_BATCH_CHUNKS:
        raise RemoteProtocolError(f"chunk request must list 1..{MAX_BATCH_CHUNKS} chunks")
    out = []
    for item in chunks:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or type(item[1]) is not int
        ):
            raise RemoteProtocolError("each chunk must be [tensor name, chunk index]")
        out.append((item[0], item[1]))
    return out


class ChunkReader:
    """The bytes of chunks of a complete object, in the order asked, read in pieces.

    Opening checks the batch against the manifest and the size bound and opens the file, so
    errors become proper answers before any byte is sent; iterating ``pread``s at most
    :data:`PIECE_BYTES` at a time (the answer streams, nothing is assembled in memory).
    """

    def __init__(self, store: ObjectStore, root: bytes, refs: list[tuple[str, int]]) -> None:
        manifest = store.manifest(root)
        _, offsets = canonical_layout(manifest)
        self.spans = []
        for name, index in refs:
            start, n = manifest.chunk_span(name, index)
            self.spans.append((offsets[name] + start, n))
        self.total = sum(n for _, n in self.spans)
        if self.total > MAX_BATCH_BYTES:
            raise TooLarge(
                f"chunk batch of {self.total} bytes exceeds {MAX_BATCH_BYTES}; ask for fewer"
            )
        self.root = root
        self._fd: int | None = os.open(store.path(root), os.O_RDONLY)

    def __iter__(self) -> Iterator[bytes]:
        fd = self._fd
        if fd is None:  # read once: iterating closes the file
            raise StorageError(f"the chunk reader of object {self.root.hex()[:12]} is closed")
        try:
            for pos, n in self.spans:
                end = pos + n
                while pos < end:
                    piece = os.pread(fd, min(PIECE_BYTES, end - pos), pos)
                    if not piece:
                        raise StorageError(
                            f"object {self.root.hex()[:12]} is shorter than its manifest"
                        )
                    pos += len(piece)
                    yield piece
        finally:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # an abandoned answer (client gone) must not leak the fd
        self.close()


def read_chunks(store: ObjectStore, root: bytes, refs: list[tuple[str, int]]) -> bytes:
    """The bytes of ``refs`` of a complete object, concatenated (blocking)."""
    return b"".join(ChunkReader(store, root, refs))


@router.post("/objects/{root}/chunks")
async def chunks(root: str, request: Request, peer: ClusterPeer) -> Response:
    """Chunk bytes, streamed and not MAC-signed: the receiver checks every chunk against its
    leaf in the manifest of the root it asked for, which a MAC could only repeat (at the cost
    of hashing the whole answer twice more, before the first byte could leave)."""
    store: ObjectStore = request.app.state.runtime.store
    r = parse_root_hex(root)
    refs = _parse_chunk_request(request.state.body)
    if not store.has(r):
        raise NotFound(f"object {root} is not complete on this node")
    reader = await asyncio.to_thread(ChunkReader, store, r, refs)
    request.app.state.runtime.metrics.download_bytes_total.inc(reader.total)
    return StreamingResponse(
        reader,
        media_type="application/octet-stream",
        headers={"content-length": str(reader.total)},
    )
