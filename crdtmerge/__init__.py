"""crdtmerge: replicated, deterministic model merging.

Layer 1 is a CRDT (an add-wins OR-Set of contributions keyed by Merkle roots, plus a
last-writer-wins recipe); layer 2 is a pure, deterministic, streaming merge of the live set.
This module only re-exports the public API.
"""

from .crdt import LWWRegister, MergeDocument, NodeState, ORSet
from .engine import Contribution, MergeResult, merge
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
from .identity import Manifest, Root, hash_tensors
from .recipe import Recipe
from .replica import Replica
from .store import ObjectStore
from .strategies import get_strategy, list_strategies
from .tensors import open_tensors

__version__ = "0.1.0"

__all__ = [
    "Contribution",
    "CrdtMergeError",
    "Forbidden",
    "IncompatibleInputs",
    "IntegrityError",
    "InvalidInput",
    "InvalidRecipe",
    "InvalidTensorFile",
    "LWWRegister",
    "Manifest",
    "MergeDocument",
    "MergeResult",
    "NodeState",
    "NotFound",
    "ORSet",
    "ObjectStore",
    "ProtocolError",
    "Recipe",
    "Replica",
    "Root",
    "StorageError",
    "TooLarge",
    "Unauthorized",
    "UnsupportedStrategy",
    "UnsupportedVersion",
    "__version__",
    "get_strategy",
    "hash_tensors",
    "list_strategies",
    "merge",
    "open_tensors",
]
