"""A small synchronous client of a node's public REST API (``/v1``).

Uploads are streamed from disk (never read whole into memory); downloads stream to a temporary
file next to the destination and are renamed into place only after the byte count (and, for
the merged model, the root) checks out. Errors answered by the node as
``{"error": code, "detail": ...}`` are raised as the matching :mod:`crdtmerge.errors` class;
transport failures (refused, timeout, broken stream) become :class:`NodeUnavailable`.

The transport is pluggable, as in httpx: pass ``transport=httpx.MockTransport(handler)`` in unit
tests, an async transport such as ``httpx.ASGITransport(app)`` (driven on a private event-loop
thread; request and response bodies are then buffered, so keep it to tests), or ``http=`` any
configured ``httpx.Client`` (for example Starlette's ``TestClient``, which also runs the app's
lifespan).

Example:
    >>> with Client("http://127.0.0.1:8470", token="s3cret-token") as c:  # doctest: +SKIP
    ...     c.set_recipe("demo", Recipe("linear", 1, {"normalize": True}))
    ...     root = c.push("demo", "model.safetensors").root
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import httpx

from . import errors as _errors
from .errors import CrdtMergeError
from .recipe import Recipe

__all__ = ["Client", "NodeUnavailable", "PushResult"]

_CHUNK = 1 << 20

_T = TypeVar("_T")

#: error code -> exception class, for errors answered by a node
_ERROR_CLASSES: dict[str, type[CrdtMergeError]] = {}
for _name in _errors.__all__:
    _cls = getattr(_errors, _name)
    _ERROR_CLASSES.setdefault(_cls.code, _cls)


#: fallback by HTTP status for codes this build does not know (e.g. ``invalid_request``)
_BY_STATUS: dict[int, type[CrdtMergeError]] = {
    400: _errors.InvalidInput,
    401: _errors.Unauthorized,
    403: _errors.Forbidden,
    404: _errors.NotFound,
    413: _errors.TooLarge,
    422: _errors.InvalidInput,
    507: _errors.StorageError,
}


class NodeUnavailable(CrdtMergeError):
    """The node could not be reached (connection refused, timeout, broken stream)."""

    code = "node_unavailable"
    http_status = 503


@dataclass(frozen=True)
class PushResult:
    """What the node answered to an upload: the object's root and whether it was new."""

    root: str
    created: bool
    size: int


Progress = Callable[[int], None]


class Client:
    """Synchronous client of one node.

    Args:
        base_url: the node, e.g. ``http://127.0.0.1:8470``.
        token: Bearer token sent with every request (write endpoints need it).
        transport: an ``httpx.BaseTransport`` (e.g. ``MockTransport``) or an
            ``httpx.AsyncBaseTransport`` (e.g. ``ASGITransport``) instead of the network.
        http: a ready ``httpx.Client`` to use (e.g. ``TestClient(app)``); ``base_url``,
            ``token`` and ``transport`` are then applied per request only where possible.
        timeout: seconds for connect/read/write (uploads and downloads stream, so this bounds
            each network operation, not the whole transfer).
    """

    def __init__(
        self,
        base_url: str = "",
        *,
        token: str | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        http: httpx.Client | None = None,
        timeout: float = 60.0,
    ) -> None:
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._owns = http is None
        self._base = base_url.rstrip("/")
        if isinstance(transport, httpx.AsyncBaseTransport) and not isinstance(
            transport, httpx.BaseTransport
        ):
            transport = _BlockingTransport(transport)
        if http is None:
            http = httpx.Client(
                base_url=self._base,
                transport=transport,
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            )
        self._http = http

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self._base}{path}" if self._base and not self._owns else path

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {**self._headers, **kw.pop("headers", {})}
        try:
            resp = self._http.request(method, self._url(path), headers=headers, **kw)
        except httpx.HTTPError as exc:
            raise NodeUnavailable(f"{method} {path} failed: {exc}") from exc
        _raise_for_error(resp)
        return resp

    # -- merges -----------------------------------------------------------------------------

    def set_recipe(self, merge: str, recipe: Recipe | Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace ``merge``'s recipe; returns the merge status."""
        body = recipe.to_json() if isinstance(recipe, Recipe) else dict(recipe)
        return cast(
            "dict[str, Any]", self._request("PUT", f"/v1/merges/{merge}/recipe", json=body).json()
        )

    def status(self, merge: str) -> dict[str, Any]:
        """The merge status: recipe, digest, contributions, missing, merged_hash, state."""
        return cast("dict[str, Any]", self._request("GET", f"/v1/merges/{merge}").json())

    def merges(self) -> list[str]:
        return cast("list[str]", self._request("GET", "/v1/merges").json()["merges"])

    def contributions(self, merge: str) -> list[dict[str, Any]]:
        resp = self._request("GET", f"/v1/merges/{merge}/contributions")
        return cast("list[dict[str, Any]]", resp.json()["contributions"])

    def push(
        self,
        merge: str,
        data: bytes | str | os.PathLike[str] | Iterable[bytes] | IO[bytes],
        *,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> PushResult:
        """Upload one contribution (safetensors bytes, a file path, or an iterable of bytes).

        An HF directory must first be canonicalised into one stream (see
        :func:`crdtmerge.tensors` / the ``push`` CLI verb); this method sends bytes as given.
        """
        return self._upload(f"/v1/merges/{merge}/contributions", data, size, progress)

    def trust_key(self, merge: str, key: str) -> dict[str, Any]:
        """Trust an Ed25519 public key (64 hex) to sign contributions to ``merge`` (admin)."""
        return cast(
            "dict[str, Any]", self._request("PUT", f"/v1/merges/{merge}/trusted-keys/{key}").json()
        )

    def untrust_key(self, merge: str, key: str) -> dict[str, Any]:
        """Stop trusting a signing key (admin)."""
        return cast(
            "dict[str, Any]",
            self._request("DELETE", f"/v1/merges/{merge}/trusted-keys/{key}").json(),
        )

    def remove(self, merge: str, root: str) -> dict[str, Any]:
        """Remove a live contribution (observed-remove)."""
        return cast(
            "dict[str, Any]",
            self._request("DELETE", f"/v1/merges/{merge}/contributions/{root}").json(),
        )

    def download_merged(
        self, merge: str, out: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> str:
        """Write the merged model to ``out``; returns its root (hex) as the node reported it."""
        return self._download(f"/v1/merges/{merge}/model", Path(out), progress)

    # -- objects ----------------------------------------------------------------------------

    def put_object(
        self,
        data: bytes | str | os.PathLike[str] | Iterable[bytes] | IO[bytes],
        *,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> PushResult:
        """Upload an object that is not a contribution (e.g. a recipe's base)."""
        return self._upload("/v1/objects", data, size, progress)

    def object_info(self, root: str) -> dict[str, Any]:
        return cast("dict[str, Any]", self._request("GET", f"/v1/objects/{root}/info").json())

    def download_object(
        self, root: str, out: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> str:
        return self._download(f"/v1/objects/{root}", Path(out), progress)

    def health(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self._request("GET", "/readyz").json())

    # -- transfers --------------------------------------------------------------------------

    def _upload(
        self,
        path: str,
        data: bytes | str | os.PathLike[str] | Iterable[bytes] | IO[bytes],
        size: int | None,
        progress: Progress | None,
    ) -> PushResult:
        headers = {"content-type": "application/octet-stream"}
        content: bytes | Iterator[bytes]
        if isinstance(data, bytes):
            content = data
            size = len(data)
            if progress:
                progress(size)
        elif isinstance(data, str | os.PathLike):
            p = Path(data)
            size = p.stat().st_size
            content = _file_chunks(p, progress)
        elif hasattr(data, "read"):
            content = _stream_chunks(data, progress)  # type: ignore[arg-type]
        else:
            content = _iter_chunks(data, progress)
        if size is not None:
            headers["content-length"] = str(size)
        resp = self._request("POST", path, content=content, headers=headers)
        body = resp.json()
        return PushResult(root=body["root"], created=bool(body["created"]), size=int(body["size"]))

    def _download(self, path: str, out: Path, progress: Progress | None) -> str:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.part")
        headers = dict(self._headers)
        try:
            with self._http.stream("GET", self._url(path), headers=headers) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for_error(resp)
                root: str = resp.headers.get("x-crdtmerge-root", "")
                expected = resp.headers.get("content-length")
                n = 0
                # no content coding on object bytes: skip httpx's decoder/re-chunker (2x faster)
                coded = resp.headers.get("content-encoding", "identity") != "identity"
                chunks = resp.iter_bytes() if coded else resp.iter_raw()
                with open(tmp, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                        n += len(chunk)
                        if progress:
                            progress(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
        except httpx.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            raise NodeUnavailable(f"GET {path} failed: {exc}") from exc
        if expected is not None and int(expected) != n:
            tmp.unlink(missing_ok=True)
            raise NodeUnavailable(f"GET {path}: got {n} bytes, expected {expected}")
        os.replace(tmp, out)
        return root


class _BlockingTransport(httpx.BaseTransport):
    """Drive an async transport (``httpx.ASGITransport``) from this synchronous client.

    The async transport runs on a private event loop in a daemon thread; bodies are buffered
    (this is for in-process tests, not for large transfers).
    """

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        import asyncio
        import threading

        self._transport = transport
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="client-asgi", daemon=True).start()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def send() -> httpx.Response:
            req = httpx.Request(request.method, request.url, headers=request.headers, content=body)
            resp = await self._transport.handle_async_request(req)
            content = await resp.aread()
            await resp.aclose()
            return httpx.Response(resp.status_code, headers=resp.headers, content=content)

        return self._run(send())

    def close(self) -> None:
        self._run(self._transport.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)


def _file_chunks(path: Path, progress: Progress | None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from _stream_chunks(f, progress)


def _stream_chunks(f: IO[bytes], progress: Progress | None) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        if progress:
            progress(len(chunk))
        yield chunk


def _iter_chunks(it: Iterable[bytes], progress: Progress | None) -> Iterator[bytes]:
    for chunk in it:
        if progress:
            progress(len(chunk))
        yield bytes(chunk)


def _raise_for_error(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        code, detail = str(body["error"]), str(body.get("detail", ""))
    except (ValueError, KeyError, TypeError):
        code, detail = "http_error", f"HTTP {resp.status_code}: {resp.text[:200]}"
    cls = _ERROR_CLASSES.get(code) or _BY_STATUS.get(resp.status_code, CrdtMergeError)
    exc = cls(detail, code=code)
    exc.http_status = resp.status_code
    raise exc
