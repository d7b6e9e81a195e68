"""Hand-checked cases for the spectral (tsv_m, iso_c, iso_cts) and data-driven (fisher, regmean)
strategies and arcee_fusion."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from crdtmerge.errors import IncompatibleInputs, InvalidInput, InvalidRecipe
from crdtmerge.rng import CounterRNG
from crdtmerge.strategies import get_strategy
from crdtmerge.strategies.arcee_fusion import fusion_importance
from crdtmerge.strategies.base import TensorTask
from crdtmerge.strategies.svd import svd_fixed
from tests.models import make_model, randn


def make_task(
    inputs: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    side: Sequence[Mapping[str, torch.Tensor]] = (),
    stats: Any = None,
    strategy: str | None = None,
    **params: Any,
) -> TensorTask:
    full: dict[str, Any] = {}
    if strategy is not None:
        full = {p.name: p.default for p in get_strategy(strategy).params}
    full.update(params)
    n = len(inputs)
    ws = list(weights) if weights is not None else [1.0] * n
    return TensorTask(
        name="model.layers.0.self_attn.q_proj.weight",
        base=base,
        inputs=list(inputs),
        params=full,
        model_params=[{"weight": w} for w in ws],
        rng=CounterRNG(b"\x03" * 32),
        streams=[bytes([i]) * 32 for i in range(n)],
        side=list(side),
        stats=stats,
    )


def run(strategy: str, inputs: Sequence[torch.Tensor], **kw: Any) -> torch.Tensor:
    return get_strategy(strategy).merge(make_task(inputs, strategy=strategy, **kw))


def run_global(strategy: str, inputs: Sequence[torch.Tensor], **kw: Any) -> torch.Tensor:
    """Run the observe/reduce pre-pass over this one tensor, then merge (like the engine)."""
    spec = get_strategy(strategy)
    task = make_task(inputs, strategy=strategy, **kw)
    assert spec.observe is not None and spec.reduce is not None
    task.stats = spec.reduce([spec.observe(task)], dict(task.params))
    return spec.merge(task)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


# --- SVD family ----------------------------------------------------------------------------


def test_svd_fixed_sign_convention_and_reconstruction() -> None:
    a = randn((9, 6), 1)
    u, s, vh = svd_fixed(a)
    torch.testing.assert_close((u * s) @ vh, a, rtol=0, atol=1e-5)
    pivots = u.gather(0, u.abs().argmax(dim=0, keepdim=True))
    assert bool((pivots > 0).all())
    u2, _, vh2 = svd_fixed(-a)  # flipping the input cannot flip the convention
    assert bool((u2.gather(0, u2.abs().argmax(dim=0, keepdim=True)) > 0).all())
    torch.testing.assert_close((u2 * s) @ vh2, -a, rtol=0, atol=1e-5)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vectors() -> None:
    base = randn((12, 8), 2)
    xs = [base + randn((12, 8), 3 + i) for i in range(3)]
    out = run("iso_c", xs, base=base, scaling_factor=0.5)
    summed = sum(x - base for x in xs)
    sv = torch.linalg.svdvals(out - base)
    target = 0.5 * float(torch.linalg.svdvals(summed).mean())
    torch.testing.assert_close(sv, torch.full_like(sv, target), rtol=1e-5, atol=1e-5)


def test_tsv_m_of_orthogonal_tasks_is_the_sum_of_their_truncations() -> None:
    base = torch.zeros(4, 4)
    d1 = torch.diag(torch.tensor([3.0, 2.0, 0.5, 0.0]))  # keeps 3, 2 (k = 4 // 2)
    d2 = torch.zeros(4, 4)
    d2[2, 3] = 5.0
    d2[3, 2] = 1.0
    out = run("tsv_m", [d1, d2], base=base)
    expected = torch.diag(torch.tensor([3.0, 2.0, 0.0, 0.0])) + d2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_tsv_m_shapes_rank_and_fallbacks() -> None:
    base = randn((10, 7), 4)
    xs = [base + randn((10, 7), 5 + i) for i in range(3)]
    out = run("tsv_m", xs, base=base)
    assert out.shape == (10, 7) and out.dtype == torch.float32
    sv = torch.linalg.svdvals(out - base)
    assert int((sv > 1e-4).sum()) == 3 * (7 // 3)  # T blocks of k = r // T triplets
    # non-matrix tensors: mean of the task vectors, scaled by alpha
    b1 = torch.tensor([1.0, 1.0])
    v = run("tsv_m", [b1 + 1, b1 + 3], base=b1, alpha=0.5)
    assert torch.equal(v, b1 + 0.5 * 2)
    # more tasks than the rank (k = 0): the mean of the task vectors
    b2 = torch.zeros(2, 2)
    ms = [randn((2, 2), 30 + i) for i in range(3)]
    torch.testing.assert_close(run("tsv_m", ms, base=b2), sum(ms) / 3, rtol=0, atol=1e-6)


def test_iso_cts_full_common_space_equals_iso_c_and_is_flat() -> None:
    base = randn((12, 9), 6)
    xs = [base + randn((12, 9), 7 + i) for i in range(2)]
    iso_c = run("iso_c", xs, base=base)
    full = run("iso_cts", xs, base=base, common_space_fraction=1.0)
    torch.testing.assert_close(full, iso_c, rtol=1e-5, atol=1e-5)
    part = run("iso_cts", xs, base=base, common_space_fraction=0.5)
    sv = torch.linalg.svdvals(part - base)
    torch.testing.assert_close(sv, torch.full_like(sv, float(sv.mean())), rtol=1e-4, atol=1e-4)


def test_svd_strategies_schema() -> None:
    for name in ("tsv_m", "iso_c", "iso_cts"):
        spec = get_strategy(name)
        assert spec.needs_base and spec.determinism == "platform"
    with pytest.raises(InvalidRecipe):
        get_strategy("iso_cts").param("common_space_fraction").check(1.5)
    with pytest.raises(InvalidRecipe, match="needs a base"):
        run("iso_c", [torch.ones(2, 2)])


def test_svd_strategies_repeat_bit_identically() -> None:
    base = randn((20, 16), 8)
    xs = [base + randn((20, 16), 9 + i) for i in range(3)]
    for name in ("tsv_m", "iso_c", "iso_cts"):
        assert bits(run(name, xs, base=base)) == bits(run(name, xs, base=base))


def test_linalg_strategies_run_on_one_thread_and_restore_the_callers_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The thread count torch reports from inside the SVD is the one MKL uses for it (both are
    # per thread); the caller's own setting must come back afterwards.
    seen: list[int] = []
    real = torch.linalg.svd

    def spy(a: torch.Tensor, full_matrices: bool = True) -> Any:
        seen.append(torch.get_num_threads())
        return real(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    base = randn((20, 16), 8)
    xs = [base + randn((20, 16), 9 + i) for i in range(2)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run("iso_c", xs, base=base)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
    assert after == 2


# --- fisher --------------------------------------------------------------------------------


def _side(kind: str, ts: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{kind: t} for t in ts]


def test_fisher_with_equal_fishers_is_the_average() -> None:
    x1, x2 = randn((5, 4), 10), randn((5, 4), 11)
    ones = [torch.ones(5, 4), torch.ones(5, 4)]
    exact = run(
        "fisher",
        [x1, x2],
        side=_side("fisher", ones),
        normalize_fisher_weight=False,
        minimal_fisher_weight=0.0,
    )
    assert torch.equal(exact, (x1 + x2) / 2)
    dflt = run_global("fisher", [x1, x2], side=_side("fisher", ones))
    torch.testing.assert_close(dflt, (x1 + x2) / 2, rtol=0, atol=1e-6)


def test_fisher_dominant_fisher_wins() -> None:
    x1 = torch.tensor([1.0, 1.0, 1.0])
    x2 = torch.tensor([-1.0, -1.0, -1.0])
    f1 = torch.tensor([1e6, 1.0, 0.0])
    f2 = torch.tensor([1e-6, 1.0, 3.0])
    out = run(
        "fisher",
        [x1, x2],
        side=_side("fisher", [f1, f2]),
        normalize_fisher_weight=False,
        minimal_fisher_weight=0.0,
    )
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, -1.0]), rtol=0, atol=1e-6)


def test_fisher_normalization_cancels_a_global_fisher_scale() -> None:
    x1, x2 = randn((6, 3), 12), randn((6, 3), 13)
    f1, f2 = randn((6, 3), 14).abs(), randn((6, 3), 15).abs()
    kw = {"minimal_fisher_weight": 0.0}
    ref = run_global("fisher", [x1, x2], side=_side("fisher", [f1, f2]), **kw)
    scaled = run_global("fisher", [x1, x2], side=_side("fisher", [100 * f1, f2]), **kw)
    torch.testing.assert_close(scaled, ref, rtol=1e-5, atol=1e-6)
    unnormalized = run(
        "fisher",
        [x1, x2],
        side=_side("fisher", [100 * f1, f2]),
        normalize_fisher_weight=False,
        **kw,
    )
    assert not torch.allclose(unnormalized, ref, atol=1e-3)


def test_fisher_reduce_takes_global_norms_over_tensors() -> None:
    spec = get_strategy("fisher")
    params = {"normalize_fisher_weight": True}
    norms = spec.reduce([(9.0, 1.0), None, (16.0, 3.0)], params)
    assert norms == (5.0, 2.0)
    assert spec.reduce([(1.0,)], {"normalize_fisher_weight": False}) is None


def test_fisher_side_inputs_required_consistently() -> None:
    x1, x2 = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])
    # no Fisher anywhere: the weighted average
    assert torch.equal(run("fisher", [x1, x2], weights=[1.0, 3.0]), torch.tensor([2.5, 4.5]))
    with pytest.raises(IncompatibleInputs, match="ship no Fisher"):
        run("fisher", [x1, x2], side=[{"fisher": torch.ones(2)}, {}])
    with pytest.raises(IncompatibleInputs, match="shape"):
        run("fisher", [x1, x2], side=_side("fisher", [torch.ones(3), torch.ones(3)]))
    with pytest.raises(InvalidInput, match="pre-pass"):
        run("fisher", [x1, x2], side=_side("fisher", [torch.ones(2), torch.ones(2)]))
    spec = get_strategy("fisher")
    assert spec.side_inputs == ("fisher",) and spec.determinism == "exact"


# --- regmean -------------------------------------------------------------------------------


def test_regmean_identity_grams_is_the_average() -> None:
    w1, w2 = randn((5, 3), 16), randn((5, 3), 17)
    out = run("regmean", [w1, w2], side=_side("gram", [torch.eye(3), torch.eye(3)]))
    torch.testing.assert_close(out, (w1 + w2) / 2, rtol=0, atol=1e-6)


def test_regmean_2x2_hand_solved() -> None:
    w1, w2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    g1 = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    g2 = torch.eye(2)
    # (G1 + G2) w = G1 w1 + G2 w2: [[3, 1], [1, 2]] w = [7, 2] -> w = [2.4, -0.2]
    out = run("regmean", [w1, w2], side=_side("gram", [g1, g2]))
    torch.testing.assert_close(out, torch.tensor([[2.4, -0.2]]), rtol=0, atol=1e-6)
    # off-diagonals halved: [[3, .5], [.5, 2]] w = [6, 1.5] -> w = [11.25, 1.5] / 5.75
    half = run("regmean", [w1, w2], side=_side("gram", [g1, g2]), reduce_non_diagonal_ratio=0.5)
    torch.testing.assert_close(half, torch.tensor([[11.25 / 5.75, 1.5 / 5.75]]), rtol=0, atol=1e-6)


def test_regmean_non_matrices_and_errors() -> None:
    b1, b2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert torch.equal(run("regmean", [b1, b2]), torch.tensor([2.0, 3.0]))
    w = randn((4, 3), 18)
    with pytest.raises(IncompatibleInputs, match="expected \\(3, 3\\)"):
        run("regmean", [w, w], side=_side("gram", [torch.eye(4), torch.eye(4)]))
    with pytest.raises(IncompatibleInputs, match="ship no Gram"):
        run("regmean", [w, w], side=[{"gram": torch.eye(3)}, {}])
    with pytest.raises(IncompatibleInputs, match="not a 2-D"):
        run("regmean", [b1, b2], side=_side("gram", [torch.eye(2), torch.eye(2)]))
    spec = get_strategy("regmean")
    assert spec.determinism == "platform" and spec.side_inputs == ("gram",)


def test_regmean_singular_sum_uses_the_pseudo_inverse() -> None:
    w1, w2 = torch.tensor([[1.0, 5.0]]), torch.tensor([[3.0, 7.0]])
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # the second input feature is never seen
    out = run("regmean", [w1, w2], side=_side("gram", [g, g]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0]]), rtol=0, atol=1e-6)


# --- arcee_fusion --------------------------------------------------------------------------


def _reference_importance(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x64, b64 = x.double(), b.double()
    p = torch.softmax(x64, dim=-1) + 1e-8
    q = torch.softmax(b64, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (x64 - b64).abs() * kl


def test_arcee_fusion_importance_matches_a_float64_reference() -> None:
    b = randn((16, 32), 19)
    x = b + 0.3 * randn((16, 32), 20)
    ours = fusion_importance(x, b)
    torch.testing.assert_close(ours.double(), _reference_importance(x, b), rtol=1e-5, atol=1e-9)


def test_arcee_fusion_takes_only_the_outliers() -> None:
    # one row: KL is one positive scalar, so the mask is |delta| >= median + 1.5 IQR of |delta|
    base = torch.zeros(8)
    x = torch.tensor([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, 100.0])
    # sorted |delta|: Q1 = s[int(.25*7)] = 2, median = s[3] = 4, Q3 = s[5] = 6 -> 4 + 1.5*4 = 10
    out = run("arcee_fusion", [x], base=base)
    assert torch.equal(out, torch.tensor([0.0] * 7 + [100.0]))
    # rows whose softmax does not move (a uniform shift) have KL = 0 and importance 0
    b2 = torch.zeros(3, 4)
    x2 = torch.full((3, 4), 0.5)
    x2[1] = torch.tensor([0.0, 0.0, 9.0, 0.0])
    imp = fusion_importance(x2, b2)
    assert torch.equal(imp[0], torch.zeros(4)) and torch.equal(imp[2], torch.zeros(4))
    assert float(imp[1, 2]) > 0


def test_arcee_fusion_mask_matches_the_reference_on_random_data() -> None:
    base = randn((24, 40), 22)
    x = base + 0.2 * randn((24, 40), 23)
    out = run("arcee_fusion", [x], base=base)
    imp = _reference_importance(x, base).float().reshape(-1)
    srt = torch.sort(imp).values
    n = imp.numel()
    q1, med, q3 = (srt[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    mask = (imp >= med + 1.5 * (q3 - q1)).reshape(x.shape)
    assert 0 < int(mask.sum()) < n
    assert torch.equal(out != base, mask & (x != base))


def test_arcee_fusion_schema() -> None:
    spec = get_strategy("arcee_fusion")
    assert (spec.min_models, spec.max_models, spec.needs_base) == (1, 1, True)
    assert spec.determinism == "exact"


# --- determinism of the exact ones ---------------------------------------------------------

SHAPE = (300, 260)


def _digests() -> dict[str, str]:
    base = randn(SHAPE, 200)
    xs = [base + 0.05 * randn(SHAPE, 201 + i) for i in range(3)]
    fs = [randn(SHAPE, 210 + i).abs() for i in range(3)]
    outs = {
        "fisher": run_global("fisher", xs, side=_side("fisher", fs), weights=[1, 2, 3]),
        "fisher-plain": run("fisher", xs, side=_side("fisher", fs), normalize_fisher_weight=False),
        "arcee_fusion": run("arcee_fusion", xs[:1], base=base),
    }
    return {k: hashlib.sha256(bits(v)).hexdigest() for k, v in outs.items()}


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


def test_fisher_observe_is_a_float64_sum_of_squares() -> None:
    spec = get_strategy("fisher")
    f = torch.tensor([3.0, 4.0])
    task = make_task([f, f], strategy="fisher", side=_side("fisher", [f, 2 * f]))
    assert spec.observe is not None
    assert spec.observe(task) == (25.0, 100.0)
    assert math.isclose(spec.reduce([spec.observe(task)], task.params)[1], 10.0)


# --- through the engine: side tensors and the whole-model pre-pass -------------------------


def test_fisher_and_regmean_side_tensors_through_the_engine(tmp_path: Path) -> None:
    from crdtmerge.engine import Contribution, merge
    from crdtmerge.identity import hash_tensors
    from crdtmerge.recipe import Recipe
    from crdtmerge.tensors import open_tensors

    layout = {"a.weight": (4, 3), "a.bias": (4,)}
    models = [make_model(s, layout) for s in (1, 2)]
    scales = (1.0, 50.0)  # contribution 2's Fisher is globally larger

    def contribution(tensors: dict[str, torch.Tensor]) -> Contribution:
        src = open_tensors(tensors)
        return Contribution(root=hash_tensors(src).root, source=src)

    fisher_models = []
    for m, scale in zip(models, scales, strict=True):
        side = {f"fisher:{n}": scale * (t.abs() + 0.1) for n, t in m.items()}
        fisher_models.append(contribution({**m, **side}))
    res = merge(Recipe("fisher", 1, {}), fisher_models, out=tmp_path / "fisher.safetensors")
    again = merge(
        Recipe("fisher", 1, {}), fisher_models[::-1], out=tmp_path / "fisher2.safetensors"
    )
    assert res.root == again.root
    out = open_tensors(tmp_path / "fisher.safetensors")
    norms = [
        math.sqrt(sum(float(((s * (t.abs() + 0.1)).double() ** 2).sum()) for t in m.values()))
        for m, s in zip(models, scales, strict=True)
    ]
    inv = [1 / (n + 1e-6) for n in norms]
    c = [v / sum(inv) for v in inv]
    for name in layout:
        fs = [s * (m[name].abs() + 0.1) + 1e-6 for m, s in zip(models, scales, strict=True)]
        num = sum(ci * f * m[name] for ci, f, m in zip(c, fs, models, strict=True))
        den = sum(ci * f for ci, f in zip(c, fs, strict=True))
        torch.testing.assert_close(out.tensor(name), num / den, rtol=1e-5, atol=1e-6)
    assert not any(n.startswith("fisher:") for n in out.names())

    gram_models = [contribution({**m, "gram:a.weight": torch.eye(3)}) for m in models]
    merge(Recipe("regmean", 1, {}), gram_models, out=tmp_path / "regmean.safetensors")
    rm = open_tensors(tmp_path / "regmean.safetensors")
    for name in layout:
        torch.testing.assert_close(
            rm.tensor(name), (models[0][name] + models[1][name]) / 2, rtol=0, atol=1e-6
        )
