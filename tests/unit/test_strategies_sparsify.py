"""Hand-checked cases for the sparsify-and-combine strategies and their shared helpers.

Expected values are worked out by hand in the comments; values that are exact in binary floating
point are compared exactly, the rest with a tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from crdtmerge.errors import InvalidRecipe
from crdtmerge.rng import CounterRNG
from crdtmerge.strategies import REQUIRED, TensorTask, _topk, get_strategy, list_strategies
from crdtmerge.strategies import _sparsify as sp

KEY = bytes(range(32))


def f32(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def make(
    name: str,
    base: torch.Tensor | None,
    inputs: list[torch.Tensor],
    params: dict[str, Any] | None = None,
    model: dict[str, Any] | list[dict[str, Any]] | None = None,
    weights: list[float] | None = None,
) -> tuple[Any, TensorTask]:
    spec = get_strategy(name)
    gp = {p.name: p.default for p in spec.params if p.scope == "global"}
    gp.update(params or {})
    n = len(inputs)
    per = model if isinstance(model, list) else [dict(model or {}) for _ in range(n)]
    mps = []
    for i in range(n):
        mp = {p.name: p.default for p in spec.all_params if p.scope == "model"}
        mp.update(per[i])
        if weights is not None:
            mp["weight"] = weights[i]
        mps.append(mp)
    assert all(v is not REQUIRED for v in gp.values())
    task = TensorTask(
        name="w",
        base=base,
        inputs=inputs,
        params=gp,
        model_params=mps,
        rng=CounterRNG(KEY),
        streams=[bytes([i + 1]) * 32 for i in range(n)],
    )
    return spec, task


def merge(name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    spec, task = make(name, *args, **kwargs)
    if spec.needs_prepass(task.params):
        task.stats = spec.reduce([spec.observe(task)], task.params)
    return spec.merge(task)


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.view(bits), b.view(bits)), f"{a} != {b}"


# ----------------------------------------------------------------------------- helpers


def test_fixed_sum_is_thread_count_invariant_and_accurate() -> None:
    rng = np.random.Generator(np.random.PCG64(5))
    x = torch.from_numpy(np.abs(rng.standard_normal(300_001, dtype=np.float32)))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sp.fixed_sum(x).item(), sp.fixed_sum(x, torch.float32).item()
        torch.set_num_threads(2)
        two = sp.fixed_sum(x).item(), sp.fixed_sum(x, torch.float32).item()
    finally:
        torch.set_num_threads(old)
    assert one == two
    assert one[0] == pytest.approx(float(np.sum(x.numpy(), dtype=np.float64)), rel=1e-12)
    assert sp.l1_norm(f32(1, -2, 3.5)) == 6.5
    assert sp.fixed_sum(torch.zeros(0)).item() == 0.0


def test_topk_keeps_exactly_k_ties_by_lowest_index() -> None:
    x = f32(0.5, -2, 1, -1, 0, 3)
    # |x| = .5 2 1 1 0 3: top 3 = 3 (idx 5), 2 (idx 1), then the tie |1| at idx 2 before idx 3
    expected = torch.tensor([False, True, True, False, False, True])
    assert torch.equal(sp.magnitude_topk(x, 3), expected)
    assert torch.equal(sp.topk_mask(x.abs(), 3), expected)
    assert torch.equal(sp.magnitude_topk(x.double(), 3), expected)
    assert not sp.magnitude_topk(x, 0).any()
    assert sp.magnitude_topk(x, 6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_matches_a_stable_sort_reference(dtype: torch.dtype) -> None:
    rng = np.random.Generator(np.random.PCG64(11))
    for trial in range(120):
        n = int(rng.integers(1, 2000))
        x = rng.standard_normal(n)
        if trial % 3 == 1:
            x = np.round(x * 2) / 2  # many ties and zeros
        if trial % 3 == 2:
            x[rng.random(n) < 0.3] = -0.0
        t = torch.from_numpy(x).to(dtype)
        k = int(rng.integers(0, n + 1))
        a = np.abs(t.numpy())
        order = np.lexsort((np.arange(n), -a))
        ref = np.zeros(n, dtype=bool)
        ref[order[:k]] = True
        got = sp.magnitude_topk(t, k).numpy()
        assert got.sum() == k
        assert (got == ref).all(), (trial, n, k)


def mask(keep: sp.Keep, x: torch.Tensor) -> torch.Tensor:
    return sp.materialize(keep, x)


def test_magnitude_mask_uses_mergekits_k() -> None:
    x = torch.arange(1.0, 11.0)
    assert sp.magnitude_mask(x, 1.0) is None
    assert not mask(sp.magnitude_mask(x, 0.0), x).any()
    assert int(mask(sp.magnitude_mask(x, 0.01), x).sum()) == 1  # int(0.1) = 0, at least one
    assert int(mask(sp.magnitude_mask(x, 0.35), x).sum()) == 3  # int(3.5)
    assert isinstance(sp.magnitude_mask(x, 0.35), sp.Band)
    # a tie at the k-th value is broken by index: 3 and the first |1|
    ties = torch.tensor([3.0, 1.0, -1.0, 1.0])
    assert mask(sp.magnitude_mask(ties, 0.5), ties).tolist() == [True, True, False, False]


def test_outlier_mask_drops_top_gamma_and_the_bottom() -> None:
    x = torch.arange(1.0, 11.0)
    # n=10, density .5 -> 5 kept, gamma .1 -> drop the top 1, so n_bot = 10 - 5 - 1 = 4
    keep = mask(sp.outlier_mask(x, 0.5, 0.1), x)
    assert x[keep].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]
    # density .8, gamma .3: n_bot = 10 - 8 - 3 = -1 -> only 2 top dropped, nothing at the bottom
    keep = mask(sp.outlier_mask(x, 0.8, 0.3), x)
    assert x[keep].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    # gamma 0 keeps the top (mergekit's old off-by-slice bug dropped everything)
    assert x[mask(sp.outlier_mask(x, 0.3, 0.0), x)].tolist() == [8.0, 9.0, 10.0]
    assert sp.outlier_mask(x, 1.0, 0.0) is None
    # a tie at the top cut falls back to an index tie-break. y = 1 1 2 2 3 3, n=6: target 3,
    # n_top = int(1.2) = 1, n_bot = 2; order (desc, index asc): idx 4 5 2 3 0 1; keep the
    # top 4 minus the top 1 = idx 5 2 3
    y = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    keep = mask(sp.outlier_mask(y, 0.5, 0.2), y)
    assert keep.tolist() == [False, False, True, True, False, True]


@pytest.fixture(params=[16, 1 << 18], ids=["chunk16", "chunk256k"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the chunked kernels with tiny chunks (many boundaries) and with the default size."""
    monkeypatch.setattr(sp, "CHUNK", request.param)
    monkeypatch.setattr(_topk, "CHUNK", request.param)
    return request.param


@pytest.mark.usefixtures("chunk")
def test_chunked_keep_rules_match_the_materialised_masks() -> None:
    rng = np.random.Generator(np.random.PCG64(21))
    for trial in range(30):
        n = int(rng.integers(2, 250))
        x = np.round(rng.standard_normal(n) * 3) / 2 if trial % 2 else rng.standard_normal(n)
        t = torch.from_numpy(x.astype(np.float32))
        density, gamma = float(rng.random()), float(rng.random()) * 0.3
        k = sp.topk_count(n, density)
        expected = sp.topk_mask(t.abs(), k)
        assert torch.equal(mask(sp.magnitude_mask(t, density), t), expected), trial
        # breadcrumbs against its definition with two materialised top-k masks
        target, n_top = int(density * n), int(gamma * n)
        n_bot = n - target - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        ref = sp.topk_mask(t.abs(), n - n_bot) & ~sp.topk_mask(t.abs(), n_top)
        assert torch.equal(mask(sp.outlier_mask(t, density, gamma), t), ref), trial
        pruned = sp.apply_mask(t.clone(), sp.magnitude_mask(t, density))
        exact(pruned, torch.where(expected, t, torch.zeros(())))


def test_sign_election_sum_and_count() -> None:
    a, b, c = f32(1, -2, 0, 1), f32(-3, 1, 0, 1), f32(1, 0.5, 0, -5)
    # sum: -1, -0.5, 0, -3 -> - - + -
    exact(sp.elect_sign([a, b, c], "sum"), f32(-1, -1, 1, -1))
    # count: signs sum to 1, 0, 0, 1 -> + + + +
    exact(sp.elect_sign([a, b, c], "count"), f32(1, 1, 1, 1))
    with pytest.raises(InvalidRecipe):
        sp.elect_sign([a], "mass")


def test_rank_keep_probabilities() -> None:
    # |row| = .1 .5 .3 -> ranks 0 2 1 -> r = 0 1 .5 -> p = .4 .6 .5 (density .5, eps .1)
    p = sp.rank_keep_prob(f32(0.1, -0.5, 0.3), 0.5, 0.1)
    torch.testing.assert_close(p, f32(0.4, 0.6, 0.5))
    # ties by index: two equal magnitudes get ranks 0 and 1
    p = sp.rank_keep_prob(f32(1, -1), 0.5, 0.2)
    torch.testing.assert_close(p, f32(0.3, 0.7))
    assert sp.rank_keep_prob(f32(7), 0.5, 0.2).tolist() == pytest.approx([0.5])


def test_rank_keep_probabilities_match_a_stable_sort() -> None:
    rng = np.random.Generator(np.random.PCG64(8))
    x = torch.from_numpy((np.round(rng.standard_normal((37, 53)) * 4) / 4).astype(np.float32))
    x[0, :5] = -0.0
    order = torch.sort(x.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(53).expand_as(order))
    r = ranks.to(torch.float32) / torch.tensor(52.0)
    expected = torch.tensor(0.5 - 0.1) + r * torch.tensor(0.2)
    exact(sp.rank_keep_prob(x, 0.5, 0.1), expected)
    exact(sp.rank_keep_prob(x.double(), 0.5, 0.1), expected)


def test_row_order_resorts_rows_whose_packed_keys_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 32-bit keys drop low value bits; a row where two values differ only there (and the
    larger has the smaller column) is sorted again exactly, and only such rows are. Only rows
    with a nonzero dropped bit are checked at all."""
    rng = np.random.Generator(np.random.PCG64(9))
    x = torch.from_numpy(np.abs(rng.standard_normal((6, 1024))).astype(np.float32))
    x = x.to(torch.bfloat16).float()  # few value bits, as bf16 deltas mostly have
    bits = x.view(torch.int32)
    bits[2, 10] = bits[2, 900] + 3  # same top bits, larger value at the smaller column
    bits[4, 5] = bits[4, 6]  # an exact tie: ordered by column, no re-sort needed
    redone: list[int] = []
    exact_sort = sp._row_order_exact

    def spy(rows: torch.Tensor) -> torch.Tensor:
        redone.append(rows.shape[0])
        return exact_sort(rows)

    checked: list[int] = []
    misordered = sp._misordered

    def check_spy(m: np.ndarray, order: np.ndarray, rows: np.ndarray) -> np.ndarray:
        checked.append(rows.size)
        return misordered(m, order, rows)

    monkeypatch.setattr(sp, "_row_order_exact", spy)
    monkeypatch.setattr(sp, "_misordered", check_spy)
    got = sp._row_order(x)
    assert torch.equal(got, torch.sort(x, dim=1, stable=True).indices)
    assert redone == [1]
    assert checked == [1]  # only row 2 has a nonzero dropped bit, so only it is checked
    # values small enough to need no dropped bits: no check, no re-sort
    small = x.view(-1)[:2048].clone().view(2, 1024) * 2.0**-120
    redone.clear()
    assert torch.equal(sp._row_order(small), torch.sort(small, dim=1, stable=True).indices)
    assert redone == []


def test_keep_word_limits_decide_as_the_uniforms_do() -> None:
    """``w < limit`` is ``(w >> 8) * 2**-24 < p`` at both sides of every limit."""
    table = sp._keep_word_table(257, 0.5, 0.3)
    probs = sp._keep_prob_table(257, 0.5, 0.3)
    limits = table.numpy().view(np.uint32).astype(np.int64)
    for w_off in (-257, -256, -1, 0, 255):
        words = np.clip(limits + w_off, 0, 2**32 - 1).astype(np.uint32)
        u = torch.from_numpy((words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24))
        assert torch.equal(torch.from_numpy(words < limits), u < probs)
    assert sp._keep_word_table(1, 0.25, 0.2).numpy().view(np.uint32).tolist() == [2**30]


def test_rank_keep_bits_take_the_l1_norms_on_the_same_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Row blocks of whole L1 rows (small chunks: many blocks): the bits are
    ``u < rank_keep_prob`` and the two norms are those of the delta before and after the drop."""
    monkeypatch.setattr(sp, "CHUNK", 8192)
    rng = np.random.Generator(np.random.PCG64(10))
    for shape in [(70, 1024), (2000, 8), (300, 96), (5000,), (3, 7), (70, 1001)]:
        x = torch.from_numpy((rng.standard_normal(shape) / 8).astype(np.float32))
        _, task = make("della", torch.zeros_like(x), [x], {}, {"density": 0.5})
        n, cols = x.numel(), shape[-1]
        flat = x.reshape(-1)

        def delta_at(a: int, b: int, flat: torch.Tensor = flat) -> torch.Tensor:
            return flat[a:b].clone()

        keep, norms = sp.rank_keep_bits(task, 0, n, cols, delta_at, 0.5, 0.2, l1=True)
        u = sp.Uniforms(task, 0, n)(0, n).view_as(x)
        assert torch.equal((keep != 0).view_as(x), u < sp.rank_keep_prob(x, 0.5, 0.2))
        kept = x.masked_fill(keep.view_as(x) == 0, 0.0)
        if shape == (70, 1001):  # aligned blocks would be 4096 rows: the caller's own pass
            assert norms is None
            continue
        assert norms == (sp.l1_norm(x), sp.l1_norm(kept))
        assert sp.rank_keep_bits(task, 0, n, cols, delta_at, 0.5, 0.2)[1] is None


# ----------------------------------------------------------------------------- linear / TA

BASE = f32(0, 0, 0, 0)


def test_linear_weighted_average_and_sum() -> None:
    x, y = f32(1, 2), f32(3, 4)
    exact(merge("linear", None, [x, y], weights=[1, 3]), f32(2.5, 3.5))  # (1+9)/4, (2+12)/4
    exact(merge("linear", None, [x, y], {"normalize": False}, weights=[1, 3]), f32(10, 14))
    exact(merge("linear", None, [x, x, x]), x)
    with pytest.raises(InvalidRecipe, match="sum to zero"):
        merge("linear", None, [x, y], weights=[1, -1])


def test_task_arithmetic_sum_scale_and_negation() -> None:
    base = f32(1, 1, 1)
    a, b = f32(2, 1, 0), f32(1, 3, 1)  # deltas (1,0,-1) and (0,2,0)
    exact(merge("task_arithmetic", base, [a, b]), f32(2, 3, 0))
    exact(merge("task_arithmetic", base, [a, b], {"lambda": 0.5}), f32(1.5, 2, 0.5))
    exact(merge("task_arithmetic", base, [a, b], {"normalize": True}), f32(1.5, 2, 0.5))
    # negation: a negative weight subtracts a task
    exact(merge("task_arithmetic", base, [a, b], weights=[1, -1]), f32(2, -1, 0))
    exact(merge("task_arithmetic", base, [a], weights=[-1]), f32(0, 1, 2))
    exact(merge("task_arithmetic", base, [a, a], weights=[1, -1]), base)


def test_task_arithmetic_needs_a_base() -> None:
    with pytest.raises(InvalidRecipe, match="needs a base"):
        merge("task_arithmetic", None, [f32(1)])


# ----------------------------------------------------------------------------- TIES

D1, D2 = f32(1, -2, 3, 0.5), f32(-3, 1, 1, 0.25)


def test_ties_hand_example() -> None:
    # vote = -2 -1 4 .75 -> - - + + ; D1 agrees at 1,2,3 ; D2 at 0,2,3
    # sums -3 -2 4 .75 over counts 1 1 2 2
    exact(merge("ties", BASE, [D1, D2]), f32(-3, -2, 2, 0.375))
    exact(merge("ties", BASE, [D1, D2], {"lambda": 2.0}), f32(-6, -4, 4, 0.75))
    exact(merge("ties", BASE, [D1, D2], {"normalize": False}), f32(-3, -2, 4, 0.75))


def test_ties_weights_act_before_the_election() -> None:
    # weighted D2 = -6 2 2 .5 ; vote = -5 0 5 1 -> - + + + (a zero vote elects +)
    # D1 agrees at 2,3 ; wD2 everywhere: sums -6 2 5 1 over weights 2 2 3 3
    out = merge("ties", BASE, [D1, D2], weights=[1, 2])
    torch.testing.assert_close(out, f32(-3, 1, 5 / 3, 1 / 3), rtol=0, atol=1e-7)


def test_ties_trim_then_elect() -> None:
    # density .5: D1 keeps 3 and -2 ; D2 keeps -3 and the first of its tied 1s (index 1)
    # trimmed: (0 -2 3 0), (-3 1 0 0); vote -3 -1 3 0 -> - - + +
    out = merge("ties", BASE, [D1, D2], model={"density": 0.5})
    exact(out, f32(-3, -2, 3, 0))


def test_ties_sign_count() -> None:
    # signs: (+ - + +), (- + + +), (+ + - +): counts 1 1 1 3 -> all +
    d3 = f32(2, 4, -1, 1)
    out = merge("ties", BASE, [D1, D2, d3], {"sign_method": "count", "normalize": False})
    exact(out, f32(3, 5, 4, 1.75))


def test_ties_of_one_task_vector_at_density_one_is_base_plus_lambda_tau() -> None:
    rng = np.random.Generator(np.random.PCG64(2))
    base = torch.from_numpy(rng.standard_normal(1000, dtype=np.float32))
    x = torch.from_numpy(rng.standard_normal(1000, dtype=np.float32))
    for lam in (1.0, 0.7):
        out = merge("ties", base, [x], {"lambda": lam})
        exact(out, base + (x - base) * lam if lam != 1.0 else base + (x - base))


def test_ties_rescale_matches_l1() -> None:
    out = merge("ties", BASE, [f32(4, -1, 1, 2)], {"rescale": True}, model={"density": 0.5})
    # keeps 4 and 2 (L1 6), original L1 8 -> scaled by 4/3
    torch.testing.assert_close(out, f32(16 / 3, 0, 0, 8 / 3))


def test_ties_model_scope_is_a_whole_model_top_k() -> None:
    spec = get_strategy("ties")
    params = {"trim_scope": "model"}
    assert spec.needs_prepass({**params}) and not spec.needs_prepass({"trim_scope": "tensor"})
    big = [make("ties", torch.zeros(4), [f32(10, -20, 30, 40)], params, {"density": 0.5})[1]]
    small = [make("ties", torch.zeros(4), [f32(1, -2, 3, 4)], params, {"density": 0.5})[1]]
    summaries = [spec.observe(big[0]), spec.observe(small[0])]
    stats = spec.reduce(summaries, params)
    # 8 entries, k = 4: the four entries of the big tensor, none of the small one
    for task, expected in ((big[0], f32(10, -20, 30, 40)), (small[0], f32(0, 0, 0, 0))):
        task.stats = stats
        exact(spec.merge(task), expected)
    # per tensor, the same density keeps two entries of each
    exact(
        merge("ties", torch.zeros(4), [f32(1, -2, 3, 4)], model={"density": 0.5}), f32(0, 0, 3, 4)
    )
    with pytest.raises(InvalidRecipe, match="pre-pass"):
        spec.merge(make("ties", torch.zeros(4), [f32(1, 2, 3, 4)], params)[1])


@pytest.mark.usefixtures("chunk")
def test_streamed_ties_equals_the_materialised_path() -> None:
    from crdtmerge.strategies import ties as ties_module

    rng = np.random.Generator(np.random.PCG64(13))
    for trial in range(24):
        n = int(rng.integers(1, 300))
        base = rng.standard_normal(n)
        xs = [base + np.round(rng.standard_normal(n) * 2) / 4 for _ in range(3)]
        t = [torch.from_numpy(a.astype(np.float32)) for a in (base, *xs)]
        params = {
            "sign_method": ["sum", "count"][trial % 2],
            "lambda": [1.0, 0.6][trial % 3 == 0],
            "normalize": trial % 4 != 1,
        }
        model = [{"density": float(d)} for d in rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], 3)]
        weights = [1.0, 1.0, 1.0] if trial % 2 else [float(w) for w in rng.random(3) * 2 - 0.5]
        spec, task = make("ties", t[0], t[1:], params, model, weights)
        assert ties_module._fusable(task)
        streamed = spec.merge(task)
        reference = ties_module.gta_merge(task, ties_module._prune_magnitude, params["sign_method"])
        exact(streamed, reference)


def test_identical_contributions_return_them() -> None:
    x = f32(1.5, -2, 0, 7)
    for name in ("linear", "ties"):
        exact(merge(name, BASE if name == "ties" else None, [x, x, x, x]), x)


# ----------------------------------------------------------------------------- DARE / DELLA


def _big(seed: int, n: int = 4096) -> torch.Tensor:
    return torch.from_numpy(
        np.random.Generator(np.random.PCG64(seed)).standard_normal(n, dtype=np.float32)
    )


def test_dare_at_density_one_equals_its_linear_counterparts() -> None:
    base, a, b = _big(1), _big(2), _big(3)
    exact(merge("dare_linear", base, [a, b]), merge("task_arithmetic", base, [a, b]))
    exact(
        merge("dare_ties", base, [a, b], weights=[1, 0.5]),
        merge("ties", base, [a, b], {"normalize": False}, weights=[1, 0.5]),
    )


def test_dare_mask_comes_from_the_contributions_stream() -> None:
    base, a, b = torch.zeros(4096), _big(2), _big(3)
    spec, task = make("dare_linear", base, [a, b], {"rescale": False}, {"density": 0.3})
    out = spec.merge(task)
    rng = CounterRNG(KEY)
    keep_a = rng.uniform(4096, stream=task.streams[0]) < torch.tensor(0.3)
    keep_b = rng.uniform(4096, stream=task.streams[1]) < torch.tensor(0.3)
    exact(out, torch.where(keep_a, a, 0.0) + torch.where(keep_b, b, 0.0))
    assert 0.25 < float(keep_a.float().mean()) < 0.35
    assert not torch.equal(keep_a, keep_b)


def test_chunked_uniforms_equal_the_generators_uniforms() -> None:
    _, task = make("dare_linear", torch.zeros(3), [f32(1, 2, 3)])
    whole = task.rng.uniform(1000, stream=task.streams[0])
    u = sp.Uniforms(task, 0, 1000)
    exact(torch.cat([u(0, 333), u(333, 1000)]), whole)


def test_dare_rescale_modes() -> None:
    base, a = torch.zeros(4096), _big(4)
    l1 = merge("dare_linear", base, [a], model={"density": 0.5})
    assert sp.l1_norm(l1) == pytest.approx(sp.l1_norm(a), rel=1e-5)
    inv = merge("dare_linear", base, [a], {"rescale_mode": "inverse"}, {"density": 0.5})
    kept = inv != 0
    exact(inv[kept], a[kept] / 0.5)
    assert torch.equal(kept, l1 != 0)


def test_della_keeps_big_entries_more_often_and_validates() -> None:
    base, a = torch.zeros(8192), _big(5, 8192)
    out = merge("della_linear", base, [a], {"rescale": False}, {"density": 0.5, "epsilon": 0.4})
    kept = out != 0
    big = a.abs() > a.abs().median()
    assert float(kept[big].float().mean()) > 0.6 > 0.4 > float(kept[~big].float().mean())
    exact(out[kept], a[kept])
    inv = merge(
        "della_linear", base, [a], {"rescale_mode": "inverse"}, {"density": 0.5, "epsilon": 0.4}
    )
    p = sp.rank_keep_prob(a, 0.5, 0.4)
    exact(inv[kept], a[kept] / p[kept])
    with pytest.raises(InvalidRecipe, match="epsilon"):
        merge("della", base, [a], model={"density": 0.9, "epsilon": 0.15})
    exact(merge("della", base, [a], model={"density": 1.0, "epsilon": 0.15}), a)


# ----------------------------------------------------------------------------- others


def test_breadcrumbs_drop_outliers_and_small_entries() -> None:
    d = torch.arange(1.0, 11.0)
    out = merge("breadcrumbs", torch.zeros(10), [d], model={"density": 0.5, "gamma": 0.1})
    exact(out, f32(0, 0, 0, 0, 5, 6, 7, 8, 9, 0))
    # breadcrumbs_ties elects after the masks: (5..9) vs -(1..10)*2 -> the second wins
    out = merge(
        "breadcrumbs_ties",
        torch.zeros(10),
        [d, -2 * d],
        model={"density": 0.5, "gamma": 0.1},
    )
    exact(out, f32(0, 0, 0, 0, -10, -12, -14, -16, -18, 0))


def test_magmax_takes_the_largest_magnitude_later_wins_ties() -> None:
    d1, d2 = f32(1, -3, 2), f32(-2, 3, -2)
    exact(merge("magmax", f32(0, 0, 0), [d1, d2]), f32(-1, 1.5, -1))
    exact(merge("magmax", f32(1, 1, 1), [d1 + 1, d2 + 1], {"scaling_factor": 1.0}), f32(-1, 4, -1))


def test_sce_select_calculate_erase() -> None:
    d1, d2 = f32(1, 5, 2, 0), f32(3, 0, 2, 1)
    # variance 1 6.25 0 .25 -> 3 non-zero, k = int(3 * .67) = 2: positions 1 and 0
    # selected (1 5 0 0), (3 0 0 0); weights mean squares 6.5, 2.25
    out = merge("sce", torch.zeros(4), [d1, d2], {"select_topk": 0.67})
    torch.testing.assert_close(out, f32(13.25 / 8.75, 5, 0, 0))
    # no selection: weights .5*(1+25+4)/4... vote all + ; a zero entry never agrees
    out = merge("sce", torch.zeros(2), [f32(1, 0), f32(3, 0)])
    torch.testing.assert_close(out, f32(0.1 * 1 + 0.9 * 3, 0))


def test_ram_and_ramplus() -> None:
    d1, d2 = f32(1, 0.05, 2, 0), f32(3, 0, 0, 0.02)
    # active (|d| > .1): d1 at 0, 2 ; d2 at 0 -> mean at 0, d1 alone at 2
    exact(merge("ram", torch.zeros(4), [d1, d2], {"epsilon": 0.1}), f32(2, 0, 2, 0))
    # RAM+: d1 has 1 shared and 1 unique entry -> rho 1 -> clip .2 -> factor 1.02
    out = merge("ramplus_tl", torch.zeros(4), [d1, d2], {"epsilon": 0.1})
    exact(out, f32(2, 0, 2 * 1.02, 0))


def test_pcb_single_model_keeps_the_top_ratio() -> None:
    a = _big(9, 100)
    out = merge("pcb", torch.zeros(100), [a], {"clamp_ratio": 0.0, "pcb_ratio": 0.1})
    # the score grows with |tau|; the 90th order statistic is the floor (weight 0), so the 9
    # largest magnitudes survive, unchanged (weight / weight = 1)
    top = torch.zeros(100, dtype=torch.bool)
    top[a.abs().argsort(descending=True)[:9]] = True
    assert torch.equal(out != 0, top)
    torch.testing.assert_close(out[top], a[top])
    exact(merge("pcb", torch.zeros(100), [a], {"pcb_ratio": 0.0}), torch.zeros(100))


def test_consensus_ta_keeps_positions_at_least_k_tall_masks_agree_on() -> None:
    d1, d2, d3 = f32(1, 1, 0.1), f32(1, -1, 0), f32(1, 0, 0)
    # mtl = 3 0 .1 ; lambda .4: pos 0 all 3 masks, pos 1 d1 and d2, pos 2 only d1
    out = merge("consensus_ta", torch.zeros(3), [d1, d2, d3], model={"tall_mask_lambda": 0.4})
    exact(out, f32(3, 0, 0))
    out = merge("consensus_ta", torch.zeros(3), [d1, d2, d3], {"k": 3}, {"tall_mask_lambda": 0.4})
    exact(out, f32(3, 0, 0))
    out = merge("consensus_ties", torch.zeros(3), [d1, d2, d3], model={"tall_mask_lambda": 0.4})
    # TIES on (1 1 .1), (1 -1 0), (1 0 0): pos 0 mean 1, pos 1 vote 0 -> + -> 1 ; masked
    exact(out, f32(1, 1, 0))


# ----------------------------------------------------------------------------- schemas

MINE = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear",
    "breadcrumbs", "breadcrumbs_ties", "magmax", "sce", "ram", "ramplus_tl", "pcb",
    "consensus_ta", "consensus_ties",
}  # fmt: skip


def test_specs_are_registered_exact_version_one() -> None:
    specs = {s.name: s for s in list_strategies()}
    assert set(specs) >= MINE
    for name in MINE:
        assert specs[name].version == 1
        assert specs[name].determinism == "exact"
        assert specs[name].needs_base == (name != "linear")


@pytest.mark.parametrize(
    ("name", "param", "value", "message"),
    [
        ("ties", "density", 1.5, "<= 1.0"),
        ("ties", "density", -0.1, ">= 0.0"),
        ("ties", "sign_method", "mass", "must be one of"),
        ("ties", "trim_scope", "layer", "must be one of"),
        ("dare_ties", "rescale_mode", "sqrt", "must be one of"),
        ("della", "epsilon", 2.0, "<= 1.0"),
        ("breadcrumbs", "gamma", -1.0, ">= 0.0"),
        ("sce", "select_topk", 1.1, "<= 1.0"),
        ("consensus_ta", "k", 1.5, "integer"),
        ("linear", "normalize", 1, "true or false"),
    ],
)
def test_parameter_validation(name: str, param: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidRecipe, match=message):
        get_strategy(name).param(param).check(value)


def test_ties_model_scope_through_the_engine(tmp_path: Any) -> None:
    """The engine's pre-pass feeds every tensor the model-wide thresholds: the merged model
    keeps exactly the entries at or above each contribution's global bucket."""
    from crdtmerge.engine import Contribution
    from crdtmerge.engine import merge as engine_merge
    from crdtmerge.identity import hash_tensors
    from crdtmerge.recipe import Recipe
    from crdtmerge.tensors import open_tensors
    from tests.models import make_finetune, make_model

    base = make_model(3)
    fts = [make_finetune(base, seed=s, shared=0.0) for s in (41, 42)]
    src_b = open_tensors(base)
    contribs = []
    for ft in fts:
        src = open_tensors(ft)
        contribs.append(Contribution(root=hash_tensors(src).root, source=src, metadata={}))
    recipe = Recipe("ties", 1, {"density": 0.3, "trim_scope": "model"}, hash_tensors(src_b).root)
    out = engine_merge(recipe, contribs, base=src_b, out=tmp_path / "m.safetensors")
    merged = open_tensors(tmp_path / "m.safetensors")
    # by hand: thresholds from all tensors, then each tensor with those stats
    spec = get_strategy("ties")
    order = sorted(contribs, key=lambda c: c.root)
    ordered = [fts[[c.root for c in contribs].index(o.root)] for o in order]
    names = sorted(base)
    tasks = {
        n: make(
            "ties", base[n], [f[n] for f in ordered], {"trim_scope": "model"}, {"density": 0.3}
        )[1]
        for n in names
    }
    stats = spec.reduce([spec.observe(tasks[n]) for n in names], {"trim_scope": "model"})
    kept = 0
    for n in names:
        tasks[n].stats = stats
        exact(merged.tensor(n), spec.merge(tasks[n]))
        for d, t in zip(tasks[n].deltas(), stats, strict=True):
            kept += int((sp.magnitude_key(d) >= t).sum())
    # k = int(0.3 * entries of the model) per contribution; the boundary bucket may add a few
    k = int(0.3 * sum(base[n].numel() for n in names))
    assert 2 * k <= kept <= 2 * k * 1.01 + 2
    assert out.root == hash_tensors(merged).root


# ------------------------------------------------------ chunked kernels against plain references


def _old_disjoint(deltas: list[torch.Tensor], weights: list[float], method: str, normalize: bool):
    """TIES election + disjoint merge written plainly (float sign, bool agreement masks)."""
    weighted = [d * w if w != 1.0 else d.clone() for d, w in zip(deltas, weights, strict=True)]
    if method == "sum":
        vote = weighted[0].clone()
        for x in weighted[1:]:
            vote += x
    else:
        vote = torch.sign(weighted[0])
        for x in weighted[1:]:
            vote += torch.sign(x)
    majority = torch.sign(vote)
    majority[majority == 0] = 1.0
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for i, (x, w) in enumerate(zip(weighted, weights, strict=True)):
        agree_part = (x * majority).clamp(min=0.0)
        mixed = agree_part.clone() if i == 0 else mixed + agree_part
        divisor += (agree_part > 0).to(x.dtype) * w
    mixed = mixed * majority
    if normalize:
        divisor[divisor == 0] = 1.0
        mixed = mixed / divisor
    return mixed


@pytest.mark.usefixtures("chunk")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combine_equals_a_plain_election_and_disjoint_merge(dtype: torch.dtype) -> None:
    rng = np.random.Generator(np.random.PCG64(5))
    for trial in range(40):
        n = int(rng.integers(1, 400))
        deltas = []
        for _ in range(int(rng.integers(1, 5))):
            x = np.round(rng.standard_normal(n) * 2) / 2  # many zeros and exact cancellations
            x[rng.random(n) < 0.1] = -0.0
            deltas.append(torch.from_numpy(x).to(dtype))
        unit = trial % 2 == 0
        weights = (
            [1.0] * len(deltas)
            if unit
            else [float(w) for w in rng.choice([-1, 0, 0.5, 2], len(deltas))]
        )
        method = ["sum", "count"][trial % 3 == 0]
        normalize = trial % 5 != 1
        expected = _old_disjoint(deltas, weights, method, normalize)
        got = sp.combine(
            None,
            [d.clone() for d in deltas],
            weights,
            consensus=method,
            normalize=normalize,
            lambda_=1.0,
        )
        exact(got, expected)


@pytest.mark.usefixtures("chunk")
def test_bracketed_cut_equals_the_radix_select(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampled bracket is exact whatever the sample: a wrong sample only costs the
    fallback."""
    monkeypatch.setattr(_topk, "_SAMPLE", 16)
    rng = np.random.Generator(np.random.PCG64(8))
    for trial in range(40):
        n = int(rng.integers(64, 3000))
        if trial % 3 == 0:
            x = np.round(rng.standard_normal(n) * 4) / 8  # heavy ties at the threshold
        elif trial % 3 == 1:
            x = rng.standard_normal(n) * np.exp(rng.standard_normal(n) * 3)
        else:
            x = np.zeros(n)
            x[rng.integers(0, n, 5)] = 1.0  # almost all zero
        t = torch.from_numpy(x.astype(np.float32))
        k = int(rng.integers(1, n))
        expected = sp.topk_mask(t.abs(), k)

        samples = [
            lambda step, t=t: t[::step],
            lambda step, n=n: torch.zeros(max(1, n // step)),  # says nothing true about t
            lambda step, t=t: t[::step] * 100.0,
        ]
        for sample in samples:
            cut = sp.chunked_cut(lambda a, b, t=t: t[a:b], n, k, sample=sample)
            assert torch.equal(cut.top(t, 0), expected), trial
            bits = sp.mag_bits(t)
            assert np.array_equal(cut.keep_np(bits, 0), expected.numpy()), trial


@pytest.mark.usefixtures("chunk")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_stored_ties_equals_the_upcast_path(
    out_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TIES from bfloat16/float16 inputs as stored, upcast chunk by chunk, gives the bits of
    the whole-tensor path (bracketed cuts forced on by a small sample size)."""
    from crdtmerge.strategies import ties as ties_module
    from crdtmerge.strategies.base import Stored

    monkeypatch.setattr(_topk, "_SAMPLE", 8)
    rng = np.random.Generator(np.random.PCG64(17))
    for trial in range(16):
        n = int(rng.integers(1, 500))
        base = rng.standard_normal(n)
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
        stored = [torch.from_numpy(base.astype(np.float32)).to(torch.bfloat16)]
        for i in range(3):
            x = base + np.round(rng.standard_normal(n) * 8) / 64
            stored.append(torch.from_numpy(x.astype(np.float32)).to(dtypes[(trial + i) % 3]))
        params = {"sign_method": ["sum", "count"][trial % 2], "lambda": [1.0, 0.7][trial % 3 == 0]}
        model = [{"density": float(d)} for d in rng.choice([0.0, 0.2, 0.5, 0.9, 1.0], 3)]
        weights = [1.0] * 3 if trial % 2 else [float(w) for w in rng.random(3) * 2 - 0.5]
        up = [s.float() for s in stored]
        spec, task = make("ties", up[0], up[1:], params, model, weights)
        expected = spec.merge(task).to(out_dtype)
        task.base, task.inputs = None, ()
        task.stored = Stored(stored[0], stored[1:], (n,), torch.float32, out_dtype)
        assert spec.uses_stored is not None and spec.uses_stored(task.params)
        got = ties_module.ties_stored(task).to(out_dtype)
        exact(got, expected)


def test_della_drop_equals_the_masked_fill_definition() -> None:
    """rank_drop's float32 path (numpy test, AND of bits) drops what ``u >= p`` says."""
    rng = np.random.Generator(np.random.PCG64(4))
    x = torch.from_numpy((np.round(rng.standard_normal((300, 64)) * 8) / 8).astype(np.float32))
    spec, task = make("della", torch.zeros_like(x), [x], {"rescale": False}, {"density": 0.5})
    u = sp.Uniforms(task, 0, x.numel())(0, x.numel()).view_as(x)
    expected = x.clone().masked_fill_(u >= sp.rank_keep_prob(x, 0.5, 0.1), 0.0)
    exact(sp.rank_drop(task, 0, x.clone(), 0.5, 0.1, None), expected)
    exact(sp.rank_drop(task, 0, x.double(), 0.5, 0.1, None), expected.double())


def test_bracketed_cut_breaks_ties_by_index_rereading_one_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A threshold value shared by many entries across many chunks: the cut keeps the first
    ``need`` of them by flat index (as topk_mask does), and finds them from the bracket's
    in-band magnitudes, reading one chunk again instead of the whole vector."""
    monkeypatch.setattr(_topk, "_SAMPLE", 4096)
    monkeypatch.setattr(_topk, "CHUNK", 2048)
    rng = np.random.Generator(np.random.PCG64(9))
    n = 200_000
    x = rng.uniform(-1.0, 1.0, n)
    spike = rng.random(n) < 0.02
    x[spike] = np.where(rng.random(int(spike.sum())) < 0.5, 0.5, -0.5)  # |x| = 0.5, ~2%
    t = torch.from_numpy(x.astype(np.float32))
    above = int((t.abs() > 0.5).sum())
    equal = int((t.abs() == 0.5).sum())
    reads: list[int] = []

    def chunks(a: int, b: int) -> torch.Tensor:
        reads.append(a)
        return t[a:b]

    for k in (above + 1, above + equal // 3, above + equal - 1):
        reads.clear()
        cut = sp.chunked_cut(chunks, n, k, sample=lambda step: t[::step])
        assert float(cut.t) == 0.5 and cut.until < n  # the bracket found it; ties split
        assert torch.equal(cut.top(t, 0), sp.topk_mask(t.abs(), k))
        assert len(reads) == -(-n // 2048) + 1  # the counting pass and one chunk again


def test_chunked_cuts_count_every_bracket_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several vectors read together, two cuts on one of them, one vector without a sample
    and one whose sample misleads: every cut equals ``topk_mask``, and the bracketed cuts
    share one pass over the chunks (the radix select reads its own vector on its own)."""
    monkeypatch.setattr(_topk, "_SAMPLE", 1024)
    monkeypatch.setattr(_topk, "CHUNK", 4096)
    rng = np.random.Generator(np.random.PCG64(11))
    n = 50_000
    vecs = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for _ in range(4)]
    vecs[1][::11] = 0.25  # many ties at one magnitude
    reads: list[int] = []

    def chunks(a: int, b: int) -> list[torch.Tensor]:
        reads.append(a)
        return [v[a:b] for v in vecs]

    def sample(v: torch.Tensor) -> Callable[[int], torch.Tensor]:
        return lambda step: v[::step]

    k_tie = int((vecs[1].abs() > 0.25).sum()) + 5
    wanted = [(0, n // 2), (1, k_tie), (1, n // 10), (2, 123), (3, n // 3)]
    samples = [sample(vecs[0]), sample(vecs[1]), None, lambda step: vecs[3][::step] * 0.0]
    cuts = sp.chunked_cuts(chunks, n, wanted, samples)
    for (j, k), cut in zip(wanted, cuts, strict=True):
        assert torch.equal(cut.top(vecs[j], 0), sp.topk_mask(vecs[j].abs(), k)), (j, k)
    assert float(cuts[1].t) == 0.25 and cuts[1].until < n  # the ties were split by index
    passes = -(-n // 4096)
    # one shared counting pass, one chunk again for vector 1's tie-break, and two radix-select
    # passes each for vector 2 (no sample) and vector 3 (its bracket misses)
    assert len(reads) == passes + 1 + 2 * passes + 2 * passes
