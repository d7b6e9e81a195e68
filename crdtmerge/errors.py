"""The crdtmerge exception tree.

Every error the library raises on purpose derives from :class:`CrdtMergeError`, which carries a
stable machine-readable ``code`` and an ``http_status`` hint, so the node needs exactly one
exception handler to answer ``{"error": code, "detail": message}``::

    CrdtMergeError (code, http_status)
    ├── InvalidInput (also ValueError)          400  bad file, bad parameter, bad request
    │   ├── InvalidTensorFile                   400  not safetensors, truncated, bad header ...
    │   ├── InvalidRecipe                       400  bad strategy parameter, wrong base ...
    │   └── IncompatibleInputs                  422  names/shapes/dtypes do not match
    ├── TooLarge                                413  over a configured size limit
    ├── IntegrityError                          422  bytes do not hash to the claimed root
    ├── UnsupportedStrategy                     422  unknown strategy name or version
    ├── UnsupportedVersion                      400  unknown encoding / protocol version
    ├── NotFound                                404  no such merge, object or contribution
    ├── Unauthorized                            401  missing or wrong token / cluster secret
    ├── Forbidden                               403  token lacks the scope; untrusted signer
    ├── StorageError                            507  disk full, I/O error
    └── ProtocolError                           400  a message that breaks the protocol
        ├── LocalProtocolError                       we misused the API (a bug)
        └── RemoteProtocolError                      a peer sent something invalid

Messages say what was expected, what arrived, and what to do.
"""

from __future__ import annotations

__all__ = [
    "CrdtMergeError",
    "Forbidden",
    "IncompatibleInputs",
    "IntegrityError",
    "InvalidInput",
    "InvalidRecipe",
    "InvalidTensorFile",
    "LocalProtocolError",
    "NotFound",
    "ProtocolError",
    "RemoteProtocolError",
    "StorageError",
    "TooLarge",
    "Unauthorized",
    "UnsupportedStrategy",
    "UnsupportedVersion",
]


class CrdtMergeError(Exception):
    """Base class: ``code`` is stable across releases, ``http_status`` is a hint for servers."""

    code: str = "error"
    http_status: int = 500

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


class InvalidInput(CrdtMergeError, ValueError):
    code = "invalid_input"
    http_status = 400


class InvalidTensorFile(InvalidInput):
    code = "invalid_safetensors"


class InvalidRecipe(InvalidInput):
    code = "invalid_recipe"


class IncompatibleInputs(InvalidInput):
    code = "incompatible_inputs"
    http_status = 422


class TooLarge(CrdtMergeError):
    code = "too_large"
    http_status = 413


class IntegrityError(CrdtMergeError):
    code = "integrity_error"
    http_status = 422


class UnsupportedStrategy(CrdtMergeError):
    code = "unsupported_strategy"
    http_status = 422


class UnsupportedVersion(CrdtMergeError):
    code = "unsupported_version"
    http_status = 400


class NotFound(CrdtMergeError):
    code = "not_found"
    http_status = 404


class Unauthorized(CrdtMergeError):
    code = "unauthorized"
    http_status = 401


class Forbidden(CrdtMergeError):
    code = "forbidden"
    http_status = 403


class StorageError(CrdtMergeError):
    code = "storage_error"
    http_status = 507


class ProtocolError(CrdtMergeError):
    code = "protocol_error"
    http_status = 400


class LocalProtocolError(ProtocolError):
    code = "local_protocol_error"
    http_status = 500


class RemoteProtocolError(ProtocolError):
    code = "remote_protocol_error"
