"""One conformance suite for every registered strategy (``list_strategies()``).

Every strategy, in its default configuration and in each non-default choice of its string and
boolean parameters (one at a time), must:

- return a tensor of the input shape, in the compute dtype (float32, or float64 for float64
  inputs), with finite values (finite inputs);
- never mutate its inputs (base, contributions, side tensors);
- return bit-identical results on a repeat, and with ``torch.set_num_threads(1)`` vs ``2`` on a
  tensor large enough for torch to split elementwise work and reductions across threads;
- where its documentation says so, give back ``n`` identical contributions unchanged
  (idempotence, within float rounding of ``n x / n``).

Tasks are built from the spec alone: a base when ``needs_base``, ``min_models`` to
``min(max_models, 3)`` contributions, side tensors for ``side_inputs`` (a positive diagonal
Fisher shaped like the tensor, a Gram matrix ``(in, in)`` for 2-D tensors), required parameters
filled from their bounds, and the whole-model pre-pass run on the one tensor when the spec asks
for it. Inputs come from numpy (the bytes do not depend on the CPU) and sometimes contain exact
zeros and repeated values, to reach the tie-handling paths.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtmerge.rng import CounterRNG
from crdtmerge.strategies import REQUIRED, ParamSpec, StrategySpec, TensorTask, list_strategies

STRATEGIES = list_strategies()

# Hypothesis examples per (strategy, variant): a twentieth of the profile's count (~80 cases).
_EXAMPLES = max(3, settings().max_examples // 20)


def _required_value(p: ParamSpec) -> Any:
    if p.kind is bool:
        return False
    if p.kind is str:
        return p.choices[0] if p.choices else "x"
    lo, hi = p.minimum, p.maximum
    if lo is not None and hi is not None:
        v = (lo + hi) / 2
    elif lo is not None:
        v = lo + 0.5
    elif hi is not None:
        v = hi - 0.5
    else:
        v = 0.5
    return int(round(v)) if p.kind is int else float(v)


def _defaults(spec: StrategySpec, scope: str) -> dict[str, Any]:
    return {
        p.name: (_required_value(p) if p.default is REQUIRED else p.default)
        for p in spec.all_params
        if p.scope == scope
    }


def _variants(spec: StrategySpec) -> list[dict[str, Any]]:
    """Default global parameters, then each other string choice / flipped bool, one at a time."""
    base = _defaults(spec, "global")
    out = [dict(base)]
    for p in spec.params:
        if p.scope != "global":
            continue
        if p.kind is str and p.choices:
            for c in p.choices:
                if c != base[p.name]:
                    out.append({**base, p.name: c})
        elif p.kind is bool:
            out.append({**base, p.name: not base[p.name]})
    return out


def _variant_id(spec: StrategySpec, params: Mapping[str, Any], default: Mapping[str, Any]) -> str:
    changed = [f"{k}={v}" for k, v in sorted(params.items()) if default.get(k) != v]
    return f"{spec.name}-v{spec.version}" + ("[" + ",".join(changed) + "]" if changed else "")


CASES: list[tuple[StrategySpec, dict[str, Any]]] = []
CASE_IDS: list[str] = []
for _spec in STRATEGIES:
    _default = _defaults(_spec, "global")
    for _params in _variants(_spec):
        CASES.append((_spec, _params))
        CASE_IDS.append(_variant_id(_spec, _params, _default))

# Thread-count invariance holds for every strategy: "exact" ones by construction, "platform" ones
# because their LAPACK/BLAS calls run on one thread (strategies/_linalg.py).
THREAD_CASES = [
    pytest.param(spec, params, id=case_id)
    for (spec, params), case_id in zip(CASES, CASE_IDS, strict=True)
]


def _array(rng: np.random.Generator, shape: tuple[int, ...], quantize: bool) -> np.ndarray:
    a = rng.standard_normal(size=shape)
    if quantize:  # exact zeros and many repeated magnitudes
        a = np.round(a * 2) / 2
    return a


def make_task(
    spec: StrategySpec,
    params: Mapping[str, Any],
    shape: tuple[int, ...],
    n: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    quantize: bool = False,
    identical: bool = False,
    model_params: Mapping[str, Any] | None = None,
) -> TensorTask:
    """A valid task for ``spec`` (see the module docstring)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    base_np = _array(rng, shape, quantize)
    first = base_np + 0.1 * _array(rng, shape, quantize)
    inputs_np = [
        first if identical or i == 0 else base_np + 0.1 * _array(rng, shape, quantize)
        for i in range(n)
    ]

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    sides: list[dict[str, torch.Tensor]] = []
    for i in range(n):
        side: dict[str, torch.Tensor] = {}
        r = np.random.Generator(np.random.PCG64(seed + 7919 * (0 if identical else i + 1)))
        if "fisher" in spec.side_inputs:
            side["fisher"] = t(np.abs(r.standard_normal(size=shape)) + 0.1)
        if "gram" in spec.side_inputs and len(shape) == 2:
            x = r.standard_normal(size=(shape[1] + 3, shape[1]))
            side["gram"] = t(x.T @ x / x.shape[0])
        sides.append(side)
    mp = _defaults(spec, "model")
    mp.update(model_params or {})
    task = TensorTask(
        name="model.layers.0.mlp.up_proj.weight",
        base=t(base_np) if spec.needs_base else None,
        inputs=[t(a) for a in inputs_np],
        params=dict(params),
        model_params=[dict(mp) for _ in range(n)],
        rng=CounterRNG(bytes(range(32))),
        streams=[bytes([i + 1]) * 32 for i in range(n)],
        side=sides,
        layer=0,
        num_layers=2,
    )
    if spec.needs_prepass(params):
        assert spec.observe is not None and spec.reduce is not None
        task.stats = spec.reduce([spec.observe(task)], dict(params))
    return task


def _snapshot(task: TensorTask) -> list[bytes]:
    ts = [task.base] if task.base is not None else []
    ts += list(task.inputs)
    for s in task.side:
        ts += [s[k] for k in sorted(s)]
    return [x.numpy().tobytes() for x in ts]


def _bits(x: torch.Tensor) -> bytes:
    return x.detach().contiguous().numpy().tobytes()


def _n_models(spec: StrategySpec, extra: int) -> int:
    hi = spec.max_models if spec.max_models is not None else spec.min_models + 2
    return min(spec.min_models + extra, max(hi, spec.min_models))


shapes = st.one_of(
    st.tuples(st.integers(1, 40)),
    st.tuples(st.integers(1, 8), st.integers(1, 8)),
)


@pytest.mark.parametrize(("spec", "params"), CASES, ids=CASE_IDS)
@settings(max_examples=_EXAMPLES)
@given(
    shape=shapes,
    extra=st.integers(0, 2),
    seed=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    quantize=st.booleans(),
)
def test_merge_is_shaped_finite_pure_and_repeatable(
    spec: StrategySpec,
    params: dict[str, Any],
    shape: tuple[int, ...],
    extra: int,
    seed: int,
    dtype: torch.dtype,
    quantize: bool,
) -> None:
    n = _n_models(spec, extra)
    task = make_task(spec, params, shape, n, seed, dtype, quantize)
    before = _snapshot(task)
    out = spec.merge(task)
    assert tuple(out.shape) == shape
    assert out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    assert _snapshot(task) == before, "the strategy mutated an input"
    again = spec.merge(make_task(spec, params, shape, n, seed, dtype, quantize))
    assert _bits(again) == _bits(out)


@pytest.mark.parametrize(("spec", "params"), THREAD_CASES)
def test_merge_is_thread_count_invariant(spec: StrategySpec, params: dict[str, Any]) -> None:
    # 256 x 160 = 40960 elements: above torch's GRAIN_SIZE (32768), so elementwise kernels and
    # reductions are split across threads when more than one is allowed.
    n = _n_models(spec, 2)
    shape = (256, 160)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = spec.merge(make_task(spec, params, shape, n, seed=3))
        torch.set_num_threads(2)
        two = spec.merge(make_task(spec, params, shape, n, seed=3))
    finally:
        torch.set_num_threads(old)
    assert _bits(one) == _bits(two)


# Strategies whose documentation promises that n identical contributions come back unchanged,
# with the (global, model) parameters that make the promise hold.
IDEMPOTENT: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({}, {}),
    "task_arithmetic": ({"normalize": True}, {}),
    "ties": ({}, {}),
    "dare_linear": ({"normalize": True}, {}),
    "dare_ties": ({"normalize": True}, {}),
    "della": ({}, {}),
    "della_linear": ({"normalize": True}, {}),
    "breadcrumbs": ({"normalize": True}, {}),
    "breadcrumbs_ties": ({"normalize": True}, {}),
    "magmax": ({"scaling_factor": 1.0}, {}),
    "sce": ({}, {}),
    "ram": ({"epsilon": 0.0}, {}),
    "ramplus_tl": ({"epsilon": 0.0}, {}),
    "consensus_ta": ({"normalize": True, "k": 1}, {"tall_mask_lambda": 0.2}),
    "consensus_ties": ({"k": 1}, {"tall_mask_lambda": 0.2}),
    "slerp": ({}, {}),
    "nuslerp": ({}, {}),
    "multislerp": ({}, {}),
    "karcher": ({}, {}),
    "model_stock": ({}, {}),
    "fisher": ({}, {}),
    "regmean": ({}, {}),
}

IDEMPOTENT_CASES = [s for s in STRATEGIES if s.name in IDEMPOTENT]


@pytest.mark.parametrize("spec", IDEMPOTENT_CASES, ids=[s.name for s in IDEMPOTENT_CASES])
@settings(max_examples=_EXAMPLES)
@given(shape=shapes, extra=st.integers(0, 2), seed=st.integers(0, 2**31))
def test_identical_contributions_come_back(
    spec: StrategySpec, shape: tuple[int, ...], extra: int, seed: int
) -> None:
    g, m = IDEMPOTENT[spec.name]
    params = {**_defaults(spec, "global"), **g}
    n = _n_models(spec, extra)
    task = make_task(spec, params, shape, n, seed, identical=True, model_params=m)
    out = spec.merge(task)
    torch.testing.assert_close(out, task.inputs[0], rtol=1e-5, atol=1e-6)


def exact_digest() -> str:
    """SHA-256 over the outputs of every ``exact`` strategy (defaults) on one fixed task."""
    h = hashlib.sha256()
    for spec in list_strategies():
        if spec.determinism != "exact":
            continue
        params = _defaults(spec, "global")
        out = spec.merge(make_task(spec, params, (48, 40), _n_models(spec, 2), seed=11))
        h.update(spec.name.encode() + out.contiguous().numpy().tobytes())
    return h.hexdigest()


_ISA_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
from tests.property.test_strategy_conformance import exact_digest
print(exact_digest())
"""


@pytest.mark.slow
def test_exact_strategies_do_not_depend_on_the_cpu_instruction_set() -> None:
    # this process runs torch's best kernels (AVX2/AVX-512 where available); the child runs
    # the scalar "default" ones, whose transcendental functions and reductions differ
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    res = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT, root],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    assert res.stdout.strip() == exact_digest()


def test_every_registered_strategy_is_covered() -> None:
    names = {s.name for s, _ in CASES}
    assert names == {s.name for s in list_strategies()}
    assert all(isinstance(s, StrategySpec) for s in STRATEGIES)
    # sanity of the helper: a changed copy of a spec is still a spec
    assert replace(STRATEGIES[0], summary="x").name == STRATEGIES[0].name
