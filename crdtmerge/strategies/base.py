"""The strategy contract: typed parameter schemas, per-tensor tasks, and specs.

A strategy is a pure function of one :class:`TensorTask` (one tensor name: the base tensor, the
contributions' tensors in canonical order, their parameters resolved for this tensor, a
counter-based generator keyed for this tensor) returning the merged tensor in the compute dtype.
It never reads files, never touches torch's global RNG and never mutates its inputs.

Whole-model ("global") variants add a pre-pass: ``observe(task)`` returns a small per-tensor
summary (e.g. a histogram), the engine hands all summaries, in sorted name order, to
``reduce(summaries, params)``, and the result is given to every ``merge`` call as
``task.stats``. Memory stays O(contributions x largest tensor).

Determinism rules every strategy keeps (checked by the conformance tests):
- accumulate in the compute dtype (float32, or float64 when an input is float64), summing
  contributions in the given (canonical) order with plain ``+``, ``*``, ``/``;
- no fused kernels whose rounding depends on the CPU's instruction set (``lerp``,
  ``add(alpha=)``, ``addcmul``, ``addcdiv``) and no ``dot``/``matmul`` reductions in ``exact``
  strategies (their result depends on the thread count); ``sum``, ``norm``, ``kthvalue``,
  ``sort``, ``topk`` values, ``sqrt``, comparisons are fine;
- strategies that need LAPACK/BLAS (SVD, solves, matmul) declare ``determinism="platform"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from ..errors import InvalidInput, InvalidRecipe
from ..rng import CounterRNG
from ..tensors import release_pages

__all__ = [
    "REQUIRED",
    "Determinism",
    "ParamSpec",
    "Stored",
    "StrategySpec",
    "TensorTask",
]

Determinism = Literal["exact", "platform"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a strategy.

    Attributes:
        name: the parameter name (mergekit's where mergekit has the method).
        kind: ``float``, ``int``, ``bool`` or ``str``.
        default: the default value, or ``REQUIRED``.
        scope: ``"global"`` (one value for the merge) or ``"model"`` (one value per
            contribution, taken from the contribution's metadata, else from the recipe as a
            default for every contribution).
        doc: one line for ``crdtmerge strategies``.
        minimum, maximum: inclusive bounds for numbers (None = unbounded).
        choices: allowed values for strings.
        varying: the value may vary by tensor (mergekit gradients and ``[{filter, value}]``).
    """

    name: str
    kind: type
    default: Any
    scope: Literal["global", "model"] = "global"
    doc: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    varying: bool = True

    def check(self, value: Any, where: str = "") -> Any:
        """Validate and coerce one *scalar* value; raise InvalidRecipe naming the problem."""
        label = f"parameter {self.name!r}{where}"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise InvalidRecipe(f"{label} must be true or false, got {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRecipe(f"{label} must be a number, got {value!r}")
            if self.kind is int:
                if float(value) != int(value):
                    raise InvalidRecipe(f"{label} must be an integer, got {value!r}")
                value = int(value)
            else:
                value = float(value)
                if value != value or value in (float("inf"), float("-inf")):
                    raise InvalidRecipe(f"{label} must be finite, got {value!r}")
            if self.minimum is not None and value < self.minimum:
                raise InvalidRecipe(f"{label} must be >= {self.minimum}, got {value!r}")
            if self.maximum is not None and value > self.maximum:
                raise InvalidRecipe(f"{label} must be <= {self.maximum}, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise InvalidRecipe(f"{label} must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise InvalidRecipe(f"{label} must be one of {list(self.choices)}, got {value!r}")
            return value
        raise InvalidRecipe(f"{label}: unsupported kind {self.kind!r}")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind.__name__,
            "default": None if self.default is REQUIRED else self.default,
            "required": self.default is REQUIRED,
            "scope": self.scope,
            "doc": self.doc,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "choices": list(self.choices) if self.choices else None,
        }


@dataclass(frozen=True)
class Stored:
    """One tensor name's inputs as stored (e.g. bfloat16), for a strategy that upcasts them
    chunk by chunk (:attr:`StrategySpec.merge_stored`) instead of receiving whole upcast copies.

    Attributes:
        base: the base tensor, flat, in its stored dtype (read-only: a view of the mapping);
            None when the recipe has no base.
        inputs: the contributions' tensors, flat, stored dtypes, canonical order.
        shape: the tensor's shape (the result must have it).
        dtype: the compute dtype (float32): every chunk is converted to it before any arithmetic,
            so the bits equal those of the whole-tensor path.
        out_dtype: the dtype the engine writes; the strategy may return its result already
            cast to it (chunk by chunk: the same bits as one cast of the whole result).

        name: the tensor name, and ``labels`` each input's, for error messages.

    NaN/Inf: every value read through the methods below is checked on its first read (the
    first pass over an input checks it, later passes cost nothing) and raises
    ``InvalidInput`` naming the tensor and the input, as the engine's whole-tensor path does
    before merging; a strategy that returns without reading some input (a shortcut) must
    :meth:`check` it. Reading through these methods also keeps little of a file-mapped input
    resident: a pass moving forward releases the pages it has left behind
    (:func:`~crdtmerge.tensors.release_pages`).
    """

    base: torch.Tensor | None
    inputs: Sequence[torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype = torch.float32
    name: str = ""
    labels: Sequence[str] = ()
    _marks: dict[int, int] = field(default_factory=dict, repr=False, compare=False)
    _checked: dict[int, int] = field(default_factory=dict, repr=False, compare=False)
    _scratch: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _base_samples: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def check(self, i: int | None) -> None:
        """Check all of input ``i`` (None: the base) for NaN/Inf, unless a pass already has."""
        if i is None and self.base is None:
            return
        key, t = self._source(i)
        n = t.numel()
        for start in range(self._checked.get(key, 0), n, _CHECK_CHUNK):
            self._read(key, t, start, min(n, start + _CHECK_CHUNK))

    def base_at(self, start: int, stop: int) -> torch.Tensor:
        """``base[start:stop]`` in the compute dtype (a view when it is stored so).

        Like every read below, the result is valid until the next read of the same input
        (it lives in a buffer reused per input): use it, or copy it, before reading on.
        """
        return self._read(*self._source(None), start, stop)

    def input_at(self, i: int, start: int, stop: int) -> torch.Tensor:
        """``inputs[i][start:stop]`` in the compute dtype (a view when it is stored so)."""
        return self._read(i, self.inputs[i], start, stop)

    def sample(self, i: int | None, step: int) -> torch.Tensor:
        """Elements ``0, step, 2 step, ...`` of input ``i`` (None: the base), compute dtype.

        The base's sample is taken once per ``step`` and shared by the callers (each task
        vector's sample subtracts it): use it without modifying it. A strided read touches
        every page of the input, so it is not repeated.
        """
        if i is None and step in self._base_samples:
            return self._base_samples[step]
        key, t = self._source(i)
        out = t[::step].to(self.dtype, copy=True)
        release_pages(t, 0, t.numel())
        self._check_values(key, out)
        if i is None:
            self._base_samples[step] = out
        return out

    def tile(
        self, i: int | None, rows: int, width: int
    ) -> Callable[[int, int, int, int], torch.Tensor]:
        """``tile(r0, r1, c0, c1)``: ``x[r0:r1, c0:c1]`` in the compute dtype, ``x`` input ``i``
        (None: the base) seen as ``rows x width``. A tile of whole rows or of one row is a flat
        range and is read through :meth:`input_at` (so a forward pass releases what it left)."""
        key, t = self._source(i)
        grid = t.view(rows, width)

        def read(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
            if r1 - r0 == 1 or (c0 == 0 and c1 == width):
                flat = self._read(key, t, r0 * width + c0, (r1 - 1) * width + c1)
                return flat.view(r1 - r0, c1 - c0)
            values = grid[r0:r1, c0:c1].to(self.dtype)
            self._check_values(key, values)
            return values

        return read

    def _source(self, i: int | None) -> tuple[int, torch.Tensor]:
        """``(key, tensor)`` of input ``i``, the base for None (key -1)."""
        if i is not None:
            return i, self.inputs[i]
        if self.base is None:
            raise InvalidRecipe("this strategy needs a base model")
        return -1, self.base

    def _read(self, key: int, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        mark = self._marks.get(key, 0)
        if start < mark:  # a new pass from the start
            mark = 0
        elif (start - mark) * t.element_size() >= _RELEASE_BYTES:
            release_pages(t, mark, start)
            mark = start
        self._marks[key] = mark
        values = self._upcast(key, t[start:stop])
        done = self._checked.get(key, 0)
        if stop > done:
            if start <= done:  # extends the checked prefix
                self._check_values(key, values[done - start :])
                self._checked[key] = stop
            else:
                self._check_values(key, values)
        return values

    def _upcast(self, key: int, piece: torch.Tensor) -> torch.Tensor:
        """``piece`` in the compute dtype, converted into this input's reused buffer (a fresh
        tensor per chunk costs more in allocation and page faults than the conversion, and
        ``copy_`` runs without the GIL, so the workers convert in parallel)."""
        if piece.dtype == self.dtype:
            return piece
        n = piece.numel()
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=self.dtype)
            self._scratch[key] = buf
        return buf[:n].copy_(piece)

    def _check_values(self, key: int, values: torch.Tensor) -> None:
        label = (
            "the base"
            if key < 0
            else (self.labels[key] if key < len(self.labels) else f"input {key}")
        )
        check_finite(values, self.name, label)


def check_finite(t: torch.Tensor, name: str, label: str) -> None:
    """NaN/Inf policy: reject (``InvalidInput`` naming the tensor and the input). A sum is one
    cheap pass and is non-finite whenever an element is; only then (or on an overflowing sum)
    is the exact element-wise test run."""
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise InvalidInput(f"tensor {name!r} in {label} contains NaN or Inf; inputs must be finite")


#: elements per read of :meth:`Stored.check`
_CHECK_CHUNK = 1 << 18

#: a forward pass over a file-mapped input releases what it has read in steps of this size
_RELEASE_BYTES = 8 << 20


@dataclass
class TensorTask:
    """Everything a strategy sees for one tensor name.

    Attributes:
        name: the tensor name.
        base: the base tensor in the compute dtype, or None when the recipe has no base.
        inputs: the contributions' tensors, in canonical order (sorted by root), compute dtype.
        params: global parameters resolved for this tensor (scalars).
        model_params: per contribution, its model-scope parameters resolved for this tensor
            (always contains ``"weight"``).
        rng: the counter-based generator keyed for this tensor.
        streams: per contribution, the stream id for ``rng`` (its root, 32 bytes).
        side: per contribution, its side tensors for this tensor name (e.g. ``{"fisher": t}``);
            an empty mapping where the contribution ships none.
        stats: the value ``reduce`` returned in the pre-pass (global strategies), else None.
        layer: the layer index parsed from the name (None for non-layer tensors).
        num_layers: the number of layers of the model (0 when unknown).
        stored: for :attr:`StrategySpec.merge_stored` only: the stored inputs (``base`` is then
            None and ``inputs`` empty).
    """

    name: str
    base: torch.Tensor | None
    inputs: Sequence[torch.Tensor]
    params: Mapping[str, Any]
    model_params: Sequence[Mapping[str, Any]]
    rng: CounterRNG
    streams: Sequence[bytes]
    side: Sequence[Mapping[str, torch.Tensor]] = ()
    stats: Any = None
    layer: int | None = None
    num_layers: int = 0
    stored: Stored | None = None

    @property
    def weights(self) -> list[float]:
        return [float(mp["weight"]) for mp in self.model_params]

    def deltas(self) -> list[torch.Tensor]:
        """Task vectors ``x_i - base`` (requires a base)."""
        if self.base is None:
            raise InvalidRecipe(f"tensor {self.name!r}: this strategy needs a base model")
        return [x - self.base for x in self.inputs]


def unstored(task: TensorTask) -> TensorTask:
    """``task`` with its stored inputs as whole compute-dtype tensors (``base``/``inputs``
    set, ``stored`` None): lets a ``merge_stored`` hand a case it does not stream to ``merge``
    (the engine's whole-tensor path reads them the same way)."""
    st = task.stored
    assert st is not None

    def whole(i: int | None) -> torch.Tensor:
        key, t = st._source(i)
        values = t.to(st.dtype).view(st.shape)
        st._check_values(key, values)  # the engine's check, on the copy the merge will use
        return values

    return replace(
        task,
        base=whole(None) if st.base is not None else None,
        inputs=[whole(i) for i in range(len(st.inputs))],
        stored=None,
    )


MergeFn = Callable[[TensorTask], torch.Tensor]
ObserveFn = Callable[[TensorTask], Any]
ReduceFn = Callable[[list[Any], Mapping[str, Any]], Any]

WEIGHT = ParamSpec("weight", float, 1.0, scope="model", doc="relative weight of the contribution")


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: name, version, parameter schema and the pure functions.

    Attributes:
        name, version: the identity recorded in recipes; a replica that lacks the exact
            (name, version) answers ``unsupported``.
        summary: one line; the module docstring holds the full semantics.
        params: the parameter schema (``weight`` is always accepted per model).
        needs_base: whether the recipe must name a base object.
        min_models, max_models: how many contributions the strategy accepts.
        determinism: ``"exact"`` or ``"platform"`` (see module docstring).
        side_inputs: side-tensor kinds a contribution may ship (``"fisher"``, ``"gram"``).
        merge: the per-tensor function.
        observe, reduce: the optional whole-model pre-pass.
        wants_prepass: given the recipe's global parameters, whether the pre-pass must run
            (None: whenever ``observe`` is set); lets a strategy with a per-tensor default
            (e.g. TIES ``trim_scope="tensor"``) skip the extra read. See :meth:`needs_prepass`.
        merge_stored: the same merge computed from :class:`Stored` inputs (``task.stored``),
            upcasting chunk by chunk: no whole upcast copy of any input exists. Must give the
            bits of ``merge``. Used when ``uses_stored(params)`` (this tensor's parameters) is
            true (or ``uses_stored`` is None) and the compute dtype is float32.
    """

    name: str
    version: int
    summary: str
    merge: MergeFn
    params: tuple[ParamSpec, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    determinism: Determinism = "exact"
    side_inputs: tuple[str, ...] = ()
    observe: ObserveFn | None = None
    reduce: ReduceFn | None = None
    wants_prepass: Callable[[Mapping[str, Any]], bool] | None = None
    references: tuple[str, ...] = field(default=())
    merge_stored: MergeFn | None = None
    uses_stored: Callable[[Mapping[str, Any]], bool] | None = None

    @property
    def all_params(self) -> tuple[ParamSpec, ...]:
        names = {p.name for p in self.params}
        return self.params if "weight" in names else (WEIGHT, *self.params)

    def needs_prepass(self, params: Mapping[str, Any]) -> bool:
        """Whether ``observe``/``reduce`` must run for a recipe with these global parameters."""
        if self.observe is None:
            return False
        return self.wants_prepass is None or bool(self.wants_prepass(params))

    def param(self, name: str) -> ParamSpec:
        for p in self.all_params:
            if p.name == name:
                return p
        known = ", ".join(sorted(p.name for p in self.all_params))
        raise InvalidRecipe(
            f"strategy {self.name!r} v{self.version} has no parameter {name!r}; known: {known}"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "summary": self.summary,
            "needs_base": self.needs_base,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "determinism": self.determinism,
            "global_pass": self.observe is not None,
            "side_inputs": list(self.side_inputs),
            "params": [p.describe() for p in self.all_params],
        }
