"""crdtmerge: replicated, deterministic model merging.

Layer 1 is a CRDT (an add-wins OR-Set of contributions keyed by Merkle roots, plus a
last-writer-wins recipe); layer 2 is a pure, deterministic, streaming merge of the live set.
This module only re-exports the public API.
"""

from .errors import (
    CrdtMergeError,
    Forbidden,
    IncompatibleInputs,
    IntegrityError,
    InvalidInput,
    InvalidRecipe,
    InvalidTensorFile,
    NotFound,
    ProtocolError,
    StorageError,
    TooLarge,
    Unauthorized,
    UnsupportedStrategy,
    UnsupportedVersion,
)
from .recipe import Recipe
from .strategies import get_strategy, list_strategies

__version__ = "0.1.0"

__all__ = [
    "CrdtMergeError",
    "Forbidden",
    "IncompatibleInputs",
    "IntegrityError",
    "InvalidInput",
    "InvalidRecipe",
    "InvalidTensorFile",
    "NotFound",
    "ProtocolError",
    "Recipe",
    "StorageError",
    "TooLarge",
    "Unauthorized",
    "UnsupportedStrategy",
    "UnsupportedVersion",
    "__version__",
    "get_strategy",
    "list_strategies",
]
