"""crdtmerge: replicated, deterministic model merging.

Layer 1 is a CRDT (an add-wins OR-Set of contributions keyed by Merkle roots, plus a
last-writer-wins recipe); layer 2 is a pure, deterministic, streaming merge of the live set.
This module only re-exports the public API, importing each module on first use.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from .crdt import (
        LWWRegister,
        MergeDocument,
        NodeState,
        ORSet,
    )
    from .engine import (
        Contribution,
        MergeResult,
        merge,
    )
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
    from .identity import (
        Manifest,
        Root,
        hash_tensors,
    )
    from .recipe import (
        Recipe,
    )
    from .replica import (
        Replica,
    )
    from .store import (
        ObjectStore,
    )
    from .strategies import (
        get_strategy,
        list_strategies,
    )
    from .tensors import (
        open_tensors,
    )

# where each public name lives; imported on first use (PEP 562), so that a command can start
# work (e.g. hash its inputs) while torch, which most of these modules import, is loading
_EXPORTS = {
    "LWWRegister": ".crdt",
    "MergeDocument": ".crdt",
    "NodeState": ".crdt",
    "ORSet": ".crdt",
    "Contribution": ".engine",
    "MergeResult": ".engine",
    "merge": ".engine",
    "CrdtMergeError": ".errors",
    "Forbidden": ".errors",
    "IncompatibleInputs": ".errors",
    "IntegrityError": ".errors",
    "InvalidInput": ".errors",
    "InvalidRecipe": ".errors",
    "InvalidTensorFile": ".errors",
    "NotFound": ".errors",
    "ProtocolError": ".errors",
    "StorageError": ".errors",
    "TooLarge": ".errors",
    "Unauthorized": ".errors",
    "UnsupportedStrategy": ".errors",
    "UnsupportedVersion": ".errors",
    "Manifest": ".identity",
    "Root": ".identity",
    "hash_tensors": ".identity",
    "Recipe": ".recipe",
    "Replica": ".replica",
    "ObjectStore": ".store",
    "get_strategy": ".strategies",
    "list_strategies": ".strategies",
    "open_tensors": ".tensors",
}

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


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
