"""Hand-checked cases for the geometric strategies: slerp, nuslerp, multislerp, karcher,
model_stock, nearswap, expo, and the basic-operation trigonometry they share."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from crdtmerge.errors import IncompatibleInputs, InvalidRecipe
from crdtmerge.rng import CounterRNG
from crdtmerge.strategies import _detmath as dm
from crdtmerge.strategies import get_strategy
from crdtmerge.strategies.base import TensorTask
from tests.models import randn

REPO = Path(__file__).resolve().parents[2]


def make_task(
    inputs: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    strategy: str | None = None,
    **params: Any,
) -> TensorTask:
    """A task with the strategy's defaults overridden by ``params``."""
    full: dict[str, Any] = {}
    if strategy is not None:
        full = {p.name: p.default for p in get_strategy(strategy).params}
    full.update(params)
    n = len(inputs)
    ws = list(weights) if weights is not None else [1.0] * n
    return TensorTask(
        name="model.layers.0.mlp.up_proj.weight",
        base=base,
        inputs=list(inputs),
        params=full,
        model_params=[{"weight": w} for w in ws],
        rng=CounterRNG(b"\x07" * 32),
        streams=[bytes([i]) * 32 for i in range(n)],
    )


def run(strategy: str, inputs: Sequence[torch.Tensor], **kw: Any) -> torch.Tensor:
    return get_strategy(strategy).merge(make_task(inputs, strategy=strategy, **kw))


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


E1 = torch.tensor([1.0, 0.0])
E2 = torch.tensor([0.0, 1.0])
H = math.sqrt(0.5)


# --- basic-operation trigonometry ----------------------------------------------------------


def test_detmath_matches_libm_closely() -> None:
    xs = [-7.0, -1.0, 0.0, 1e-9, 0.3, 1.0, math.pi / 2, 3.0, math.pi, 10.0]
    for x in xs:
        assert dm.scalar(dm.sin(x)) == pytest.approx(math.sin(x), abs=1e-15)
        assert dm.scalar(dm.cos(x)) == pytest.approx(math.cos(x), abs=1e-15)
    for c in [-1.0, -0.999999, -0.5, 0.0, 1e-12, 0.3, 0.9995, 1 - 1e-15, 1.0]:
        assert dm.scalar(dm.acos(c)) == pytest.approx(math.acos(c), abs=2e-15)
    for x in [-700.0, -20.0, -1.0, -1e-10, 0.0, 0.5, 30.0]:
        assert dm.scalar(dm.exp(torch.tensor(x, dtype=torch.float64))) == pytest.approx(
            math.exp(x), rel=1e-15
        )
    for y in [1e-8, 0.1, 0.5, 1.0, math.sqrt(2), 3.0, 1e10]:
        assert dm.scalar(dm.log(torch.tensor(y, dtype=torch.float64))) == pytest.approx(
            math.log(y), rel=1e-15, abs=1e-16
        )


def test_detmath_scalar_and_tensor_paths_agree_bitwise() -> None:
    cs = torch.linspace(-1, 1, 101, dtype=torch.float64)
    vec = dm.acos(cs)
    for i in (0, 17, 50, 99, 100):
        assert dm.scalar(dm.acos(float(cs[i]))) == float(vec[i])


# --- slerp ---------------------------------------------------------------------------------


def test_slerp_orthogonal_unit_vectors_at_half() -> None:
    out = run("slerp", [E1, E2], t=0.5)
    torch.testing.assert_close(out, torch.tensor([H, H]), rtol=0, atol=1e-7)


def test_slerp_base_and_one_contribution_is_mergekit_form() -> None:
    # v0 = base: t = 0 gives the base, t = 1 the contribution, bit for bit
    assert torch.equal(run("slerp", [E2], base=E1, t=0.0), E1)
    assert torch.equal(run("slerp", [E2], base=E1, t=1.0), E2)
    out = run("slerp", [E2], base=E1, t=1 / 3)  # 30 degrees from e1
    torch.testing.assert_close(
        out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), rtol=0, atol=1e-7
    )


def test_slerp_colinear_falls_back_to_lerp() -> None:
    a = torch.tensor([1.0, 2.0, -3.0])
    b = 2.5 * a  # cos = 1 > 0.9995
    out = run("slerp", [b], base=a, t=0.3)
    expected = torch.tensor(0.7) * a + torch.tensor(0.3) * b
    assert torch.equal(out, expected)
    # unnormalised tensors are interpolated: the norm is not preserved
    assert float(out.norm()) == pytest.approx(1.45 * float(a.norm()), rel=1e-6)


def test_slerp_two_contributions_is_order_independent_at_half() -> None:
    x, y = randn((7, 5), 1), randn((7, 5), 2)
    base = randn((7, 5), 3)
    assert bits(run("slerp", [x, y], t=0.5)) == bits(run("slerp", [y, x], t=0.5))
    assert bits(run("slerp", [x, y], base=base, t=0.5)) == bits(
        run("slerp", [y, x], base=base, t=0.5)
    )


def test_slerp_with_base_and_two_contributions_slerps_task_vectors() -> None:
    base = torch.tensor([5.0, 5.0])
    out = run("slerp", [base + E1, base + E2], base=base, t=0.5)
    torch.testing.assert_close(out, base + torch.tensor([H, H]), rtol=0, atol=1e-6)


def test_slerp_identical_contributions_returned_unchanged() -> None:
    x = randn((4, 3), 5)
    assert torch.equal(run("slerp", [x, x.clone()], t=0.3), x)
    assert torch.equal(run("slerp", [x.clone()], base=x, t=0.7), x)


def test_slerp_lone_contribution_without_base_is_returned() -> None:
    x = randn((3, 2), 6)
    assert torch.equal(run("slerp", [x], t=0.3), x)


def test_slerp_param_schema() -> None:
    spec = get_strategy("slerp")
    assert (spec.min_models, spec.max_models, spec.needs_base) == (1, 2, False)
    assert spec.determinism == "exact"
    t = spec.param("t")
    assert t.check(0.25) == 0.25
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(InvalidRecipe):
            t.check(bad)


# --- nuslerp -------------------------------------------------------------------------------


def test_nuslerp_t_comes_from_the_weights() -> None:
    # t = w1 / (w0 + w1) = 0.75: angle 0.75 * 90 degrees from e1
    out = run("nuslerp", [E1, E2], weights=[1.0, 3.0])
    expected = torch.tensor([math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    # a zero weight sum falls back to t = 0.5
    torch.testing.assert_close(
        run("nuslerp", [E1, E2], weights=[1.0, -1.0]), torch.tensor([H, H]), rtol=0, atol=1e-7
    )


def test_nuslerp_rows_and_columns() -> None:
    m0 = torch.stack([E1, 2 * E2])  # rows e1, 2 e2
    m1 = torch.stack([E2, 2 * E1])
    rows = run("nuslerp", [m0, m1], nuslerp_flatten=False)
    torch.testing.assert_close(rows, torch.tensor([[H, H], [2 * H, 2 * H]]), rtol=0, atol=1e-6)
    # row_wise (mergekit's naming) slerps vectors along dim 0, i.e. the columns
    a, b = randn((6, 4), 8), randn((6, 4), 9)
    cols = run("nuslerp", [a, b], nuslerp_flatten=False, nuslerp_row_wise=True)
    via_t = run("nuslerp", [a.T.contiguous(), b.T.contiguous()], nuslerp_flatten=False)
    assert torch.equal(cols, via_t.T)


def test_nuslerp_colinear_rows_lerp() -> None:
    m0 = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    m1 = torch.tensor([[3.0, 3.0], [0.0, 1.0]])
    out = run("nuslerp", [m0, m1], nuslerp_flatten=False)
    assert torch.equal(out[0], torch.tensor([2.0, 2.0]))  # lerp at t = 0.5
    torch.testing.assert_close(out[1], torch.tensor([H, H]), rtol=0, atol=1e-7)


def test_nuslerp_with_base_uses_task_vectors() -> None:
    base = torch.tensor([1.0, -2.0])
    out = run("nuslerp", [base + E1, base + E2], base=base)
    torch.testing.assert_close(out, base + torch.tensor([H, H]), rtol=0, atol=1e-6)


# --- multislerp ----------------------------------------------------------------------------


def test_multislerp_direction_and_mean_norm() -> None:
    out = run("multislerp", [E1, 3 * E2])
    # direction of e1 + e2, length = mean of the norms (2)
    torch.testing.assert_close(out, torch.tensor([2 * H, 2 * H]), rtol=0, atol=1e-6)


def test_multislerp_with_base_and_weights() -> None:
    base = torch.tensor([10.0, 10.0])
    out = run("multislerp", [base + E1, base + E2], base=base, weights=[1.0, 1.0])
    torch.testing.assert_close(out, base + torch.tensor([H, H]), rtol=0, atol=1e-5)


def test_multislerp_antipodal_inputs() -> None:
    # two inputs: lerp fallback (here 0); three balancing inputs: an error
    assert torch.equal(run("multislerp", [E1, -E1]), torch.zeros(2))
    with pytest.raises(IncompatibleInputs, match="antipodal"):
        run("multislerp", [E1, -E1, E1, -E1])


def test_multislerp_identical_returned_unchanged() -> None:
    x = randn((5, 5), 11)
    assert torch.equal(run("multislerp", [x, x.clone(), x.clone()], weights=[1, 2, 3]), x)


# --- karcher -------------------------------------------------------------------------------


def test_karcher_of_orthogonal_unit_vectors() -> None:
    out = run("karcher", [E1, E2])
    torch.testing.assert_close(out, torch.tensor([H, H]), rtol=0, atol=1e-6)


def test_karcher_weighted_mean_on_a_circle_is_the_weighted_angle() -> None:
    # on a great circle the Karcher mean is the weighted mean of the angles: 3:1 -> 22.5 deg
    out = run("karcher", [E1, 2 * E2], weights=[3.0, 1.0])
    norm = 0.75 * 1 + 0.25 * 2
    expected = norm * torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_karcher_identical_and_zero_inputs() -> None:
    x = randn((3, 4), 12)
    assert torch.equal(run("karcher", [x, x.clone(), x.clone()]), x)
    assert torch.equal(run("karcher", [torch.zeros(4), torch.zeros(4)]), torch.zeros(4))


def test_karcher_param_validation() -> None:
    spec = get_strategy("karcher")
    with pytest.raises(InvalidRecipe):
        spec.param("max_iter").check(2.5)
    with pytest.raises(InvalidRecipe):
        spec.param("tol").check(-1.0)


# --- model_stock ---------------------------------------------------------------------------


def _stock_t(cos: float, n: int) -> float:
    return n * cos / (1 + (n - 1) * cos)


def test_model_stock_two_models_hand_checked() -> None:
    base = torch.zeros(2)
    x1 = torch.tensor([1.0, 0.0])
    x2 = torch.tensor([0.5, math.sqrt(3) / 2])  # 60 degrees: cos = 0.5, t = 2/3
    out = run("model_stock", [x1, x2], base=base)
    expected = (2 / 3) * (x1 + x2) / 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_model_stock_cosine_vs_angle_aggregation() -> None:
    base = torch.tensor([1.0, 1.0])
    angles = [0.0, math.pi / 6, math.pi / 3]  # pairwise 30, 30, 60 degrees
    xs = [base + torch.tensor([math.cos(a), math.sin(a)]) for a in angles]
    mean = sum(x - base for x in xs) / 3
    cos_mean = (2 * math.cos(math.pi / 6) + 0.5) / 3
    angle_mean = math.cos(math.radians(40))
    for agg, cos in (("cosine", cos_mean), ("angle", angle_mean)):
        out = run("model_stock", xs, base=base, aggregation=agg)
        t = _stock_t(cos, 3)
        torch.testing.assert_close(out, base + t * mean, rtol=0, atol=1e-6)


def test_model_stock_filter_wise_gives_one_t_per_row() -> None:
    base = torch.zeros(2, 2)
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x2 = torch.tensor([[0.0, 1.0], [0.5, math.sqrt(3) / 2]])  # rows: 90 and 60 degrees
    out = run("model_stock", [x1, x2], base=base, filter_wise=True)
    torch.testing.assert_close(out[0], torch.zeros(2), rtol=0, atol=1e-7)  # cos 0 -> t = 0
    torch.testing.assert_close(out[1], (2 / 3) * (x1[1] + x2[1]) / 2, rtol=0, atol=1e-7)


def test_model_stock_undefined_t_returns_base() -> None:
    base = torch.zeros(2)
    out = run("model_stock", [E1, -E1], base=base)  # cos = -1: 1 + (N-1) cos = 0
    assert torch.equal(out, base)


def test_model_stock_identical_contributions_returned_unchanged() -> None:
    base = randn((4, 4), 20)
    x = randn((4, 4), 21)
    assert torch.equal(run("model_stock", [x, x.clone(), x.clone()], base=base), x)


def test_model_stock_schema() -> None:
    spec = get_strategy("model_stock")
    assert spec.needs_base and spec.min_models == 2
    with pytest.raises(InvalidRecipe):
        spec.param("aggregation").check("median")


# --- nearswap, expo ------------------------------------------------------------------------


def test_nearswap_on_scalars() -> None:
    base = torch.zeros(4)
    x = torch.tensor([1.0, 0.5, 0.0, -2.0])
    out = run("nearswap", [x], base=base, t=0.25)
    # w = clamp(0.25 / |b - x|, 0, 1) = [0.25, 0.5, 1, 0.125]
    assert torch.equal(out, torch.tensor([0.25, 0.25, 0.0, -0.25]))
    with pytest.raises(InvalidRecipe, match="> 0"):
        run("nearswap", [x], base=base, t=0.0)
    spec = get_strategy("nearswap")
    assert (spec.min_models, spec.max_models, spec.needs_base) == (1, 1, True)


def test_expo_extrapolates_the_mean_away_from_the_base() -> None:
    base = torch.tensor([1.0, 1.0])
    out = run("expo", [torch.tensor([2.0, 1.0]), torch.tensor([2.0, 3.0])], base=base)
    # m = [2, 2]; m + 0.1 (m - b) = [2.1, 2.1]
    torch.testing.assert_close(out, torch.tensor([2.1, 2.1]), rtol=0, atol=1e-7)


# --- determinism ---------------------------------------------------------------------------

SHAPE = (256, 300)


def _cases() -> dict[str, tuple[str, dict[str, Any]]]:
    base = randn(SHAPE, 100)
    xs = [base + 0.05 * randn(SHAPE, 101 + i) for i in range(3)]
    return {
        "slerp-base": ("slerp", {"inputs": xs[:1], "base": base, "t": 0.3}),
        "slerp-two": ("slerp", {"inputs": xs[:2], "t": 0.3}),
        "nuslerp-flat": ("nuslerp", {"inputs": xs[:2], "base": base, "weights": [1, 2]}),
        "nuslerp-rows": ("nuslerp", {"inputs": xs[:2], "nuslerp_flatten": False}),
        "nuslerp-cols": (
            "nuslerp",
            {"inputs": xs[:2], "nuslerp_flatten": False, "nuslerp_row_wise": True},
        ),
        "multislerp": ("multislerp", {"inputs": xs, "base": base, "weights": [1, 2, 3]}),
        "karcher": ("karcher", {"inputs": xs, "weights": [1, 2, 3]}),
        "model_stock": ("model_stock", {"inputs": xs, "base": base}),
        "model_stock-rows": (
            "model_stock",
            {"inputs": xs, "base": base, "filter_wise": True, "aggregation": "angle"},
        ),
        "nearswap": ("nearswap", {"inputs": xs[:1], "base": base, "t": 0.01}),
        "expo": ("expo", {"inputs": xs, "base": base}),
    }


def _digests() -> dict[str, str]:
    out = {}
    for key, (strategy, kw) in _cases().items():
        kw = dict(kw)
        inputs = kw.pop("inputs")
        out[key] = hashlib.sha256(bits(run(strategy, inputs, **kw))).hexdigest()
    return out


def test_exact_strategies_are_bit_identical_for_1_and_2_threads() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _digests()
        torch.set_num_threads(2)
        two = _digests()
    finally:
        torch.set_num_threads(before)
    assert one == two
    for key, (strategy, _) in _cases().items():
        assert get_strategy(strategy).determinism == "exact", key


def _all_digests() -> dict[str, str]:
    """Digests of every exact strategy of both strategy test modules."""
    from tests.unit import test_strategies_spectral_data as spectral

    return {**_digests(), **{f"data:{k}": v for k, v in spectral._digests().items()}}


@pytest.mark.slow
def test_exact_strategies_are_bit_identical_under_the_default_isa() -> None:
    """The same digests in a process forced to ``ATEN_CPU_CAPABILITY=default`` (no SIMD)."""
    code = (
        "import json, torch; torch.set_num_threads(2);"
        "from tests.unit.test_strategies_geometric import _all_digests;"
        "print(json.dumps(_all_digests()))"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == _all_digests()


def test_inputs_are_not_mutated() -> None:
    for strategy, kw in _cases().values():
        kw = dict(kw)
        inputs = kw.pop("inputs")
        copies = [x.clone() for x in inputs]
        base_copy = kw["base"].clone() if "base" in kw else None
        run(strategy, inputs, **kw)
        assert all(torch.equal(a, b) for a, b in zip(inputs, copies, strict=True))
        if base_copy is not None:
            assert torch.equal(kw["base"], base_copy)
