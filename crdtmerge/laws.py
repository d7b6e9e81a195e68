"""The CRDT laws, raw strategy vs two-layer form (DESIGN section 4).

A raw merge strategy used as a pairwise merge ``m(a, b)`` is not a CRDT join: averaging is not
associative (``m(m(a,b),c)`` weighs ``c`` twice), TIES trimming is not idempotent
(``m(a,a) != a``), SLERP toward the second argument is not commutative, and even plain float
sums depend on the order of the terms. crdtmerge never uses a strategy as a join. Layer 1 is an
OR-Set of contributions (union: commutative, associative, idempotent); layer 2 merges the whole
live set once, deterministically, after sorting it by root. :func:`check_laws` shows both on
small random models:

- *raw*: ``m(a,b)`` vs ``m(b,a)``; ``m(m(a,b),c)`` vs ``m(a,m(b,c))``; ``m(a,a)`` vs ``a``;
- *two-layer*: the engine's merged root of ``A ∪ B`` vs ``B ∪ A``, of ``(A ∪ B) ∪ C`` vs
  ``A ∪ (B ∪ C)``, and of ``S ∪ S`` vs ``S`` (inputs handed over in different orders), which
  must be bit-identical.

For the raw form each model's random stream is keyed by a hash of its bytes, so masks do not
depend on argument order; strategies that take the base plus one model (``max_models == 1``)
are used as ``m(a, b) = merge(base=a, [b])``; an intermediate result's side tensors (Fisher,
Gram) are the sums of its inputs'.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .params import layer_index, resolve_param
from .rng import CounterRNG, tensor_key
from .strategies import get_strategy
from .strategies.base import REQUIRED, StrategySpec, TensorTask

__all__ = ["LAWS", "LawResult", "check_laws", "demo_params"]

LAWS = ("commutativity", "associativity", "idempotency")

_LAYOUT: dict[str, tuple[int, ...]] = {
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
}
_NUM_LAYERS = 2
# values that make the demonstration meaningful (trimming / dropping actually happens)
_DEMO = {"density": 0.5, "epsilon": 0.1, "t": 0.3, "gamma": 0.05, "select_topk": 0.5, "k": 2}

Model = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LawResult:
    """One law for one strategy.

    Attributes:
        law: ``commutativity``, ``associativity`` or ``idempotency``.
        raw_holds: whether the raw pairwise form was bit-identical in every trial (None: the
            strategy cannot be used pairwise).
        raw_max_diff: the largest absolute difference seen in the raw form.
        two_layer_holds: whether the two-layer form gave identical merged roots in every trial.
        note: what was compared.
    """

    law: str
    raw_holds: bool | None
    raw_max_diff: float
    two_layer_holds: bool
    note: str

    def to_json(self) -> dict[str, Any]:
        return {
            "law": self.law,
            "raw_holds": self.raw_holds,
            "raw_max_diff": self.raw_max_diff,
            "two_layer_holds": self.two_layer_holds,
            "note": self.note,
        }


def demo_params(spec: StrategySpec) -> dict[str, Any]:
    """Recipe parameters for the demonstration: defaults, a few made interesting, required
    ones filled in with a valid value."""
    out: dict[str, Any] = {}
    for p in spec.all_params:
        if p.name == "weight":
            continue
        value = _DEMO.get(p.name, p.default)
        if value is REQUIRED:
            if p.kind is bool:
                value = False
            elif p.kind is str:
                value = p.choices[0] if p.choices else ""
            else:
                value = p.minimum if p.minimum is not None and p.minimum > 0 else 0.5
                value = p.kind(value)
        try:
            out[p.name] = p.check(value)
        except Exception:  # a demo value out of this strategy's range: keep its default
            if p.default is not REQUIRED:
                out[p.name] = p.default
    return out


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(g.standard_normal(size=shape, dtype=np.float32))


def _model(seed: int, base: Model | None, spec: StrategySpec) -> Model:
    out: Model = {}
    for i, (name, shape) in enumerate(sorted(_LAYOUT.items())):
        noise = _randn(shape, seed * 1000 + i)
        out[name] = noise if base is None else base[name] + 0.1 * noise
        if "fisher" in spec.side_inputs:
            out[f"fisher:{name}"] = _randn(shape, seed * 1000 + 500 + i).abs() + 0.1
        if "gram" in spec.side_inputs and len(shape) == 2:
            x = _randn((4 * shape[1], shape[1]), seed * 1000 + 700 + i)
            out[f"gram:{name}"] = (x.T * 1.0) @ x / x.shape[0]
    return out


def _content_id(m: Model) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(m):
        h.update(name.encode())
        h.update(m[name].contiguous().numpy().tobytes())
    return h.digest()


def _raw_merge(
    spec: StrategySpec, params: Mapping[str, Any], base: Model | None, models: Sequence[Model]
) -> Model:
    """The strategy applied once to ``models`` in the given order (no sorting, no set)."""
    streams = [_content_id(m) for m in models]
    key = hashlib.blake2b(b"crdtmerge/laws", digest_size=32).digest()
    global_params = {
        p.name: params.get(p.name, p.default) for p in spec.all_params if p.scope == "global"
    }
    model_raw = {
        p.name: params.get(p.name, p.default) for p in spec.all_params if p.scope == "model"
    }
    names = sorted(_LAYOUT)

    def task(name: str, stats: Any) -> TensorTask:
        return TensorTask(
            name=name,
            base=None if base is None else base[name],
            inputs=[m[name] for m in models],
            params={
                k: resolve_param(spec.param(k), v, name, _NUM_LAYERS)
                for k, v in global_params.items()
            },
            model_params=[
                {
                    k: resolve_param(spec.param(k), v, name, _NUM_LAYERS)
                    for k, v in model_raw.items()
                }
                for _ in models
            ],
            rng=CounterRNG(tensor_key(key, name)),
            streams=streams,
            side=[
                {k: m[f"{k}:{name}"] for k in spec.side_inputs if f"{k}:{name}" in m}
                for m in models
            ],
            stats=stats,
            layer=layer_index(name),
            num_layers=_NUM_LAYERS,
        )

    stats = None
    if spec.observe is not None and spec.reduce is not None:
        stats = spec.reduce([spec.observe(task(n, None)) for n in names], global_params)
    out: Model = {}
    for name in names:
        out[name] = spec.merge(task(name, stats)).to(torch.float32)
    for name in list(out):
        for kind in spec.side_inputs:
            parts = [m[f"{kind}:{name}"] for m in models if f"{kind}:{name}" in m]
            if parts:
                acc = parts[0]
                for p in parts[1:]:
                    acc = acc + p
                out[f"{kind}:{name}"] = acc
    return out


def _pairwise(
    spec: StrategySpec, params: Mapping[str, Any], base: Model | None, a: Model, b: Model
) -> Model:
    if spec.max_models is not None and spec.max_models < 2:
        return _raw_merge(spec, params, a, [b])
    return _raw_merge(spec, params, base, [a, b])


def _diff(x: Model, y: Model) -> float:
    worst = 0.0
    for name in _LAYOUT:
        if not torch.equal(x[name], y[name]):
            d = (x[name] - y[name]).abs().max()
            worst = max(worst, float(d) if torch.isfinite(d) else float("inf"))
    return worst


def _two_layer_root(
    spec: StrategySpec,
    params: Mapping[str, Any],
    base: Model | None,
    models: Sequence[Model],
    tmp: Path,
) -> bytes:
    """The engine's merged root of the set of ``models`` (handed over in the given order)."""
    from .engine import Contribution, merge
    from .identity import hash_tensors
    from .recipe import Recipe
    from .tensors import open_tensors

    base_src = open_tensors(base) if base is not None else None
    base_root = hash_tensors(base_src).root if base_src is not None else None
    contribs = []
    for m in models:
        src = open_tensors(m)
        contribs.append(Contribution(root=hash_tensors(src).root, source=src, metadata={}))
    recipe = Recipe(spec.name, spec.version, dict(params), base_root, None)
    out = tmp / f"{len(list(tmp.iterdir()))}.safetensors"
    return merge(recipe, contribs, base=base_src, out=out, threads=1).root


def check_laws(
    name: str, version: int | None = None, *, trials: int = 3, seed: int = 0
) -> list[LawResult]:
    """Check the three laws for strategy ``name`` on ``trials`` random model triples."""
    spec = get_strategy(name, version)
    params = demo_params(spec)
    pairwise_ok = spec.min_models <= 2 or (spec.max_models is not None and spec.max_models < 2)
    raw_holds = dict.fromkeys(LAWS, True)
    raw_max_diff = dict.fromkeys(LAWS, 0.0)
    two = dict.fromkeys(LAWS, True)
    lo = max(1, spec.min_models)
    hi = spec.max_models if spec.max_models is not None else 3
    with tempfile.TemporaryDirectory(prefix="crdtmerge-laws-") as td:
        tmp = Path(td)
        for trial in range(trials):
            s = seed * 7919 + trial * 10
            base = _model(s + 1, None, spec) if spec.needs_base else None
            a, b, c = (_model(s + k, base, spec) for k in (2, 3, 4))
            extra = [_model(s + k, base, spec) for k in range(5, 5 + max(0, lo - 1))]
            if pairwise_ok:
                for law, (x, y) in {
                    "commutativity": (
                        _pairwise(spec, params, base, a, b),
                        _pairwise(spec, params, base, b, a),
                    ),
                    "associativity": (
                        _pairwise(spec, params, base, _pairwise(spec, params, base, a, b), c),
                        _pairwise(spec, params, base, a, _pairwise(spec, params, base, b, c)),
                    ),
                    "idempotency": (_pairwise(spec, params, base, a, a), a),
                }.items():
                    d = _diff(x, y)
                    if d != 0.0 or any(not torch.equal(x[n], y[n]) for n in _LAYOUT):
                        raw_holds[law] = False
                        raw_max_diff[law] = max(raw_max_diff[law], d)
            # two-layer: sets of contributions, merged once after sorting by root
            A = [a, *extra][: max(lo, 1)]
            B = [b] if hi >= lo + 1 else []
            C = [c] if hi >= lo + 2 else []
            two["commutativity"] &= _two_layer_root(
                spec, params, base, A + B, tmp
            ) == _two_layer_root(spec, params, base, B + A, tmp)
            # (A ∪ B) ∪ C and A ∪ (B ∪ C), each handed over in its own iteration order
            two["associativity"] &= _two_layer_root(
                spec, params, base, (A + B) + C, tmp
            ) == _two_layer_root(spec, params, base, (C + B) + A, tmp)
            two["idempotency"] &= _two_layer_root(
                spec, params, base, A + A, tmp
            ) == _two_layer_root(spec, params, base, A, tmp)
    notes = {
        "commutativity": "m(a,b) vs m(b,a); two-layer: merged(A ∪ B) vs merged(B ∪ A)",
        "associativity": "m(m(a,b),c) vs m(a,m(b,c)); two-layer: merged((A ∪ B) ∪ C) vs merged(A ∪ (B ∪ C))",
        "idempotency": "m(a,a) vs a; two-layer: merged(S ∪ S) vs merged(S)",
    }
    return [
        LawResult(
            law=law,
            raw_holds=raw_holds[law] if pairwise_ok else None,
            raw_max_diff=raw_max_diff[law] if pairwise_ok else 0.0,
            two_layer_holds=two[law],
            note=notes[law],
        )
        for law in LAWS
    ]
