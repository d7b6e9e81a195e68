"""Strategies computed from the inputs as stored (``merge_stored``: bfloat16/float16 read and
upcast chunk by chunk or tile by tile) give the bits of the whole-tensor float32 path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from crdtmerge.errors import InvalidInput, InvalidRecipe
from crdtmerge.strategies import _detmath as dm
from crdtmerge.strategies import _topk
from crdtmerge.strategies.base import Stored
from tests.unit.test_strategies_sparsify import exact, make

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks, tiles and reduction rows of a few elements, so every loop runs many times and
    the multi-row tiles that are not one flat range occur."""
    monkeypatch.setattr(_topk, "CHUNK", 24)
    monkeypatch.setattr("crdtmerge.strategies._sparsify.CHUNK", 24)
    monkeypatch.setattr(dm, "TILE", 64)
    monkeypatch.setattr(dm, "_ROW", 8)
    monkeypatch.setattr(_topk, "_SAMPLE", 8)  # the sampled top-k brackets run too


def _inputs(rng: np.random.Generator, shape: tuple[int, ...], trial: int, n: int):
    base = np.asarray(rng.standard_normal(shape))
    stored = [torch.from_numpy(base.astype(np.float32)).to(DTYPES[trial % 3])]
    for i in range(n):
        x = np.asarray(base + rng.standard_normal(shape) * rng.choice([0.01, 0.3]))
        stored.append(torch.from_numpy(x.astype(np.float32)).to(DTYPES[(trial + i + 1) % 3]))
    return stored


def _both(
    name: str,
    stored: list[torch.Tensor],
    params: dict[str, Any],
    weights: list[float] | None,
    out_dtype: torch.dtype,
    *,
    with_base: bool = True,
    model: list[dict[str, Any]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    up = [s.float() for s in stored]
    base, inputs = (up[0], up[1:]) if with_base else (None, up[1:])
    spec, task = make(name, base, inputs, params, model, weights)
    expected = spec.merge(task).to(out_dtype)
    task.base, task.inputs = None, ()
    flat = [s.reshape(-1) for s in stored]
    task.stored = Stored(
        flat[0] if with_base else None, flat[1:], tuple(stored[0].shape), torch.float32, out_dtype
    )
    assert spec.merge_stored is not None
    assert spec.uses_stored is None or spec.uses_stored(task.params)
    return spec.merge_stored(task).to(out_dtype), expected


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["linear", "task_arithmetic"])
def test_stored_elementwise_equals_the_upcast_path(name: str, out_dtype: torch.dtype) -> None:
    rng = np.random.Generator(np.random.PCG64(21))
    for trial in range(12):
        shape = [(), (1,), (7,), (13, 11), (3, 4, 5)][trial % 5]
        stored = _inputs(rng, shape, trial, int(rng.integers(1, 4)))
        n = len(stored) - 1
        weights = None if trial % 2 else [float(w) for w in rng.random(n) * 2 - 0.4]
        params = {"normalize": trial % 3 != 0}
        if name == "task_arithmetic":
            params["lambda"] = [1.0, 0.6][trial % 2]
        got, expected = _both(
            name, stored, params, weights, out_dtype, with_base=name == "task_arithmetic"
        )
        exact(got, expected)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_stored_model_stock_equals_the_upcast_path(out_dtype: torch.dtype) -> None:
    rng = np.random.Generator(np.random.PCG64(22))
    for trial in range(16):
        # width 20 with rows of 8: a multi-row tile that is not one flat range
        shape = [(), (5,), (9, 20), (130,), (3, 7, 20), (40, 3)][trial % 6]
        stored = _inputs(rng, shape, trial, 2 + trial % 2)
        params = {"filter_wise": trial % 2 == 0, "aggregation": ["cosine", "angle"][trial % 4 > 1]}
        got, expected = _both("model_stock", stored, params, None, out_dtype)
        exact(got, expected)
    same = _inputs(rng, (6, 5), 0, 1)
    same.append(same[1].clone())
    got, expected = _both("model_stock", same, {}, None, out_dtype)
    exact(got, expected)


def test_stored_linear_refuses_a_zero_weight_sum() -> None:
    x = torch.ones(4, dtype=torch.bfloat16)
    spec, task = make("linear", None, [x.float(), x.float()], {"normalize": True}, None, [1, -1])
    task.inputs = ()
    task.stored = Stored(None, [x, x], (4,), torch.float32, torch.float32)
    assert spec.merge_stored is not None
    with pytest.raises(InvalidRecipe, match="sum to zero"):
        spec.merge_stored(task)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_stored_dare_equals_the_upcast_path(name: str) -> None:
    rng = np.random.Generator(np.random.PCG64(23))
    for trial in range(12):
        shape = [(1,), (50,), (13, 11), (3, 4, 5)][trial % 4]
        stored = _inputs(rng, shape, trial, 1 + trial % 3)
        n = len(stored) - 1
        model = [{"density": float(d)} for d in rng.choice([0.0, 0.3, 0.7, 1.0], n)]
        weights = None if trial % 2 else [float(w) for w in rng.random(n) * 2 - 0.4]
        params = {
            "rescale": trial % 3 != 2,
            "rescale_mode": ["l1", "inverse"][trial % 2],
            "normalize": trial % 4 == 1,
            "lambda": [1.0, 0.8][trial % 2],
        }
        out_dtype = [torch.float32, torch.bfloat16][trial % 2]
        got, expected = _both(name, stored, params, weights, out_dtype, model=model)
        exact(got, expected)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_stored_breadcrumbs_equals_the_upcast_path(name: str) -> None:
    rng = np.random.Generator(np.random.PCG64(24))
    for trial in range(16):
        shape = [(1,), (50,), (13, 11), (3, 4, 5)][trial % 4]
        stored = _inputs(rng, shape, trial, 1 + trial % 3)
        n = len(stored) - 1
        model = [
            {"density": float(d), "gamma": float(g)}
            for d, g in zip(
                rng.choice([0.0, 0.3, 0.9, 1.0], n),
                rng.choice([0.0, 0.05, 0.5, 1.0], n),
                strict=True,
            )
        ]
        weights = None if trial % 2 else [float(w) for w in rng.random(n) * 2 - 0.4]
        params = {"normalize": trial % 4 == 1, "lambda": [1.0, 0.8][trial % 2]}
        if name == "breadcrumbs_ties":
            params["sign_method"] = ["sum", "count"][trial % 3 == 0]
        out_dtype = [torch.float32, torch.bfloat16][trial % 2]
        got, expected = _both(name, stored, params, weights, out_dtype, model=model)
        exact(got, expected)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_stored_della_equals_the_upcast_path(name: str) -> None:
    rng = np.random.Generator(np.random.PCG64(25))
    for trial in range(12):
        shape = [(1,), (50,), (13, 11), (3, 4, 5), (7, 1)][trial % 5]
        stored = _inputs(rng, shape, trial, 1 + trial % 3)
        n = len(stored) - 1
        model = [
            {"density": float(d), "epsilon": 0.1} for d in rng.choice([0.2, 0.5, 0.85, 1.0], n)
        ]
        weights = None if trial % 2 else [float(w) for w in rng.random(n) * 2 - 0.4]
        params = {"rescale": trial % 3 != 2, "lambda": [1.0, 0.8][trial % 2]}
        out_dtype = [torch.float32, torch.bfloat16][trial % 2]
        got, expected = _both(name, stored, params, weights, out_dtype, model=model)
        exact(got, expected)


def test_della_with_inverse_rescale_takes_the_whole_tensor_path() -> None:
    from crdtmerge.strategies import get_strategy

    spec = get_strategy("della")
    assert spec.uses_stored is not None
    assert not spec.uses_stored({"rescale": True, "rescale_mode": "inverse"})
    assert spec.uses_stored({"rescale": False, "rescale_mode": "inverse"})


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_stored_slerp_equals_the_upcast_path(out_dtype: torch.dtype) -> None:
    rng = np.random.Generator(np.random.PCG64(26))
    for trial in range(15):
        shape = [(), (5,), (9, 20), (300,), (3, 7, 20)][trial % 5]
        case = trial % 3  # base + 1, two without a base, base + 2 (the whole-tensor fallback)
        stored = _inputs(rng, shape, trial, [1, 2, 2][case])
        if trial in (3, 4):  # equal endpoints (stored in other dtypes): returned unchanged
            stored[trial - 2] = stored[trial - 3].to(torch.float32)
        params = {"t": [0.5, 0.3, 0.9][trial % 3]}
        got, expected = _both("slerp", stored, params, None, out_dtype, with_base=case != 1)
        exact(got, expected)
    near = _inputs(rng, (40,), 0, 1)
    near[1] = (near[0].float() * 1.0001).to(near[1].dtype)  # |cos| > 0.9995: the lerp branch
    exact(*_both("slerp", near, {"t": 0.25}, None, out_dtype))


def test_the_base_sample_is_read_once_and_shared() -> None:
    """Every task vector's sample subtracts the base's: the strided read of the base (which
    touches all its pages) is taken once per step, and a bad value in it is still refused."""
    base = torch.arange(40, dtype=torch.float32).to(torch.bfloat16)
    x = base + 1
    st = Stored(base, [x, x], (40,), torch.float32, torch.float32)
    first = st.sample(None, 7)
    assert torch.equal(first, base[::7].float())
    assert st.sample(None, 7) is first  # shared, not read again
    assert st.sample(None, 3) is not first and torch.equal(st.sample(None, 3), base[::3].float())
    assert st.sample(0, 7) is not st.sample(0, 7)  # inputs' samples are not kept
    bad = base.clone()
    bad[14] = float("nan")
    with pytest.raises(InvalidInput, match="in the base contains NaN or Inf"):
        Stored(bad, [x], (40,), torch.float32, torch.float32).sample(None, 7)
