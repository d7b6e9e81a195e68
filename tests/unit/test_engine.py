"""Layer 2 engine: end-to-end merges of synthetic models, identity of the output, input-order
independence, validation before any output, per-model parameters and dtypes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from crdtmerge.engine import Contribution, merge, plan_merge
from crdtmerge.errors import (
    IncompatibleInputs,
    InvalidInput,
    InvalidRecipe,
    UnsupportedStrategy,
)
from crdtmerge.identity import hash_tensors
from crdtmerge.recipe import Recipe
from crdtmerge.strategies import REGISTRY
from crdtmerge.tensors import StreamingWriter, TensorInfo, open_tensors, write_tensors
from tests.models import make_finetune, make_model

HAVE = {name for name, _ in REGISTRY}


def _save(tmp: Path, name: str, tensors: dict[str, torch.Tensor], shard: int | None = None) -> Path:
    if shard is None:
        path = tmp / f"{name}.safetensors"
        write_tensors(path, tensors)
        return path
    path = tmp / name
    infos = [TensorInfo.of(n, t) for n, t in tensors.items()]
    with StreamingWriter(path, infos, max_shard_bytes=shard) as w:
        for n in sorted(tensors):
            w.write(n, tensors[n])
    return path


def _contrib(path: Path | dict, metadata: dict | None = None) -> Contribution:
    src = open_tensors(path)
    meta = metadata or {}
    return Contribution(root=hash_tensors(src, metadata=meta).root, source=src, metadata=meta)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("models")
    base = make_model(1)
    out = {"base": _save(tmp, "base", base)}
    for i in range(1, 4):
        out[f"ft{i}"] = _save(tmp, f"ft{i}", make_finetune(base, seed=10 + i))
    # the same fine-tunes as sharded Hugging Face directories
    out["base_dir"] = _save(tmp, "base_dir", base, shard=2048)
    for i in range(1, 4):
        out[f"ft{i}_dir"] = _save(tmp, f"ft{i}_dir", make_finetune(base, seed=10 + i), shard=2048)
    return out


def _base(models: dict[str, Path], key: str = "base"):  # -> (source, root)
    src = open_tensors(models[key])
    return src, hash_tensors(src).root


def _recipe(name: str, params: dict, base_root: bytes | None, **kw) -> Recipe:
    return Recipe(name, 1, params, base_root, **kw)


CASES = [
    ("linear", {}, False),
    ("task_arithmetic", {"weight": 0.5}, True),
    ("ties", {"density": 0.5}, True),
    ("dare_ties", {"density": 0.5}, True),
    ("dare_linear", {"density": 0.5}, True),
    ("model_stock", {}, True),
    ("multislerp", {}, False),
]


@pytest.mark.parametrize(("name", "params", "needs_base"), CASES, ids=[c[0] for c in CASES])
def test_merge_root_is_hash_of_output_and_order_free(
    tmp_path: Path, models: dict[str, Path], name: str, params: dict, needs_base: bool
) -> None:
    if name not in HAVE:
        pytest.skip(f"strategy {name} not registered yet")
    base, base_root = _base(models) if needs_base else (None, None)
    recipe = _recipe(name, params, base_root)
    fts = [_contrib(models[f"ft{i}"]) for i in range(1, 4)]
    roots = set()
    for k, perm in enumerate(itertools.permutations(fts)):
        if k % 2:  # three of the six orders keep the test quick
            continue
        res = merge(recipe, list(perm), base=base, out=tmp_path / f"{k}.safetensors")
        assert res.files == [tmp_path / f"{k}.safetensors"]
        with open_tensors(res.files[0]) as out:
            assert hash_tensors(out).root == res.root
        assert res.manifest.root == res.root
        roots.add(res.root)
    assert len(roots) == 1
    first = (tmp_path / "0.safetensors").read_bytes()
    assert (tmp_path / "2.safetensors").read_bytes() == first


def test_linear_values_and_dtype(tmp_path: Path, models: dict[str, Path]) -> None:
    fts = [_contrib(models[f"ft{i}"]) for i in range(1, 4)]
    res = merge(_recipe("linear", {}, None), fts, out=tmp_path / "m.safetensors")
    with open_tensors(res.files[0]) as out:
        srcs = [c.source for c in sorted(fts, key=lambda c: c.root)]
        for name in out.names():
            acc = srcs[0].tensor(name) * 1.0
            for s in srcs[1:]:
                acc = acc + s.tensor(name) * 1.0
            assert torch.equal(out.tensor(name), acc / 3.0)
            assert out.tensor(name).dtype == torch.float32


def test_per_model_params_from_metadata_override_recipe(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    a = _contrib(models["ft1"], {"params": {"weight": 3.0}})
    b = _contrib(models["ft2"])
    res = merge(_recipe("linear", {"weight": 1.0}, None), [a, b], out=tmp_path / "m.safetensors")
    with open_tensors(res.files[0]) as out:
        name = "model.norm.weight"
        x, y = a.source.tensor(name), b.source.tensor(name)
        terms = [(x, 3.0), (y, 1.0)] if a.root < b.root else [(y, 1.0), (x, 3.0)]
        expect = terms[0][0] * terms[0][1] + terms[1][0] * terms[1][1]
        assert torch.equal(out.tensor(name), expect / 4.0)


def test_sharded_inputs_and_outputs_have_the_same_identity(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    base, base_root = _base(models)
    recipe = _recipe("task_arithmetic", {"weight": 0.5}, base_root)
    files = [_contrib(models[f"ft{i}"]) for i in range(1, 4)]
    dirs = [_contrib(models[f"ft{i}_dir"]) for i in range(1, 4)]
    assert [c.root for c in files] == [c.root for c in dirs]
    single = merge(recipe, files, base=base, out=tmp_path / "one.safetensors")
    dbase, _ = _base(models, "base_dir")
    sharded = merge(recipe, dirs, base=dbase, out=tmp_path / "sharded", max_shard_bytes=2048)
    assert len([f for f in sharded.files if f.suffix == ".safetensors"]) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert sharded.root == single.root
    unsharded = merge(recipe, dirs, base=dbase, out=tmp_path / "dir")
    assert [f.name for f in unsharded.files] == ["model.safetensors"]
    assert unsharded.root == single.root


def test_threads_and_duplicates_do_not_change_the_output(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    base, base_root = _base(models)
    recipe = _recipe("task_arithmetic", {"weight": 0.5}, base_root)
    fts = [_contrib(models[f"ft{i}"]) for i in range(1, 4)]
    r1 = merge(recipe, fts, base=base, out=tmp_path / "a.safetensors", threads=1)
    r2 = merge(recipe, fts + fts[:2], base=base, out=tmp_path / "b.safetensors", threads=2)
    assert r1.root == r2.root


def test_progress_reports_bytes(tmp_path: Path, models: dict[str, Path]) -> None:
    seen: list[tuple[int, int]] = []
    fts = [_contrib(models[f"ft{i}"]) for i in range(1, 3)]
    merge(
        _recipe("linear", {}, None),
        fts,
        out=tmp_path / "m.safetensors",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen[-1][0] == seen[-1][1] > 0
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_out_dtype_and_metadata(tmp_path: Path, models: dict[str, Path]) -> None:
    base = make_model(1, dtype=torch.bfloat16)
    ft = make_finetune(base, seed=3)
    src_b = open_tensors(base)
    base_root = hash_tensors(src_b).root
    c = _contrib(ft)
    default = merge(_recipe("task_arithmetic", {}, base_root), [c], base=src_b, out=tmp_path / "a")
    with open_tensors(default.files[0]) as out:
        assert {out.info(n).dtype for n in out.names()} == {"BF16"}
    half = merge(
        _recipe("task_arithmetic", {}, base_root, out_dtype="float16"),
        [c],
        base=src_b,
        out=tmp_path / "b",
    )
    with open_tensors(half.files[0]) as out:
        assert {out.info(n).dtype for n in out.names()} == {"F16"}
    assert default.manifest.metadata != half.manifest.metadata
    meta = default.manifest.metadata["merge"]
    assert meta["inputs"] == [c.root.hex()]
    assert meta["recipe"]["strategy"] == "task_arithmetic"


def test_non_float_tensors_are_copied_when_identical(tmp_path: Path) -> None:
    ids = torch.arange(6, dtype=torch.int64)
    a = {"w": torch.ones(3), "ids": ids}
    b = {"w": torch.zeros(3), "ids": ids.clone()}
    res = merge(_recipe("linear", {}, None), [_contrib(a), _contrib(b)], out=tmp_path / "m")
    with open_tensors(res.files[0]) as out:
        assert torch.equal(out.tensor("ids"), ids)
        assert torch.equal(out.tensor("w"), torch.full((3,), 0.5))


def _nothing_written(tmp_path: Path) -> None:
    assert list(tmp_path.iterdir()) == []


def _fail(tmp_path: Path, exc: type[Exception], match: str, recipe, contribs, base=None) -> None:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    with pytest.raises(exc, match=match):
        merge(recipe, contribs, base=base, out=out / "merged")
    _nothing_written(out)
    with pytest.raises(exc, match=match):
        merge(recipe, contribs, base=base, out=out / "merged.safetensors")
    _nothing_written(out)


def test_validation_errors_leave_nothing_behind(tmp_path: Path, models: dict[str, Path]) -> None:
    fts = [_contrib(models[f"ft{i}"]) for i in range(1, 3)]
    base, base_root = _base(models)
    _fail(
        tmp_path / "1",
        UnsupportedStrategy,
        "unknown strategy 'nope'",
        _recipe("nope", {}, None),
        fts,
    )
    _fail(
        tmp_path / "2",
        InvalidRecipe,
        "no parameter 'density'",
        _recipe("linear", {"density": 0.5}, None),
        fts,
    )
    _fail(
        tmp_path / "3",
        InvalidRecipe,
        "needs a base",
        _recipe("task_arithmetic", {}, None),
        fts,
    )
    _fail(
        tmp_path / "4",
        InvalidRecipe,
        "no base model given",
        _recipe("task_arithmetic", {}, base_root),
        fts,
    )
    _fail(
        tmp_path / "5",
        InvalidRecipe,
        "must be a number",
        _recipe("linear", {"weight": "heavy"}, None),
        fts,
    )


def test_mismatched_inputs_are_rejected(tmp_path: Path) -> None:
    a = make_model(1)
    b = dict(a)
    b.pop("lm_head.weight")
    _fail(
        tmp_path / "1",
        IncompatibleInputs,
        "(missing|unexpected) 'lm_head.weight'",
        _recipe("linear", {}, None),
        [_contrib(a), _contrib(b)],
    )
    c = dict(a)
    c["model.norm.weight"] = torch.zeros(17)
    _fail(
        tmp_path / "2",
        IncompatibleInputs,
        "shape \\[17\\]",
        _recipe("linear", {}, None),
        [_contrib(a), _contrib(c)],
    )
    d = dict(a, ids=torch.arange(3))
    e = dict(a, ids=torch.arange(3) + 1)
    _fail(
        tmp_path / "3",
        IncompatibleInputs,
        "non-float",
        _recipe("linear", {}, None),
        [_contrib(d), _contrib(e)],
    )
    f = dict(a, ids=torch.arange(3).float())
    _fail(
        tmp_path / "4",
        IncompatibleInputs,
        "mixes float and non-float",
        _recipe("linear", {}, None),
        [_contrib(d), _contrib(f)],
    )


def test_nan_inputs_are_rejected_and_nothing_is_left(tmp_path: Path) -> None:
    a = make_model(1)
    b = dict(a)
    bad = a["model.norm.weight"].clone()
    bad[3] = float("nan")
    b["model.norm.weight"] = bad
    _fail(
        tmp_path / "1",
        InvalidInput,
        "NaN or Inf",
        _recipe("linear", {}, None),
        [_contrib(a), _contrib(b)],
    )


def test_bad_per_model_params_are_rejected(tmp_path: Path, models: dict[str, Path]) -> None:
    a = _contrib(models["ft1"], {"params": {"bogus": 1}})
    b = _contrib(models["ft2"])
    with pytest.raises(InvalidRecipe, match="no parameter 'bogus'.*of contribution"):
        plan_merge(_recipe("linear", {}, None), [a, b])
    c = _contrib(models["ft1"], {"params": {"normalize": False}})
    with pytest.raises(InvalidRecipe, match="is global"):
        plan_merge(_recipe("linear", {}, None), [c, b])


def test_existing_output_is_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    (tmp_path / "m.safetensors").write_bytes(b"x")
    with pytest.raises(InvalidInput, match="already exists"):
        merge(
            _recipe("linear", {}, None), [_contrib(models["ft1"])], out=tmp_path / "m.safetensors"
        )


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "model_stock"])
def test_stored_blockwise_and_whole_tensor_merges_are_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """bfloat16 inputs merged from their stored bytes (the default), as whole upcast tensors,
    and (elementwise strategies) block of rows by block of rows: one root."""
    import crdtmerge.engine as engine

    base = make_model(5, dtype=torch.bfloat16)
    src_b = open_tensors(base)
    base_root = hash_tensors(src_b).root
    fts = [_contrib(make_finetune(base, seed=60 + i)) for i in range(3)]
    with_base = name != "linear"
    params = {} if name == "model_stock" else {"weight": 0.7}
    recipe = _recipe(name, params, base_root if with_base else None)
    kw = {"base": src_b} if with_base else {}
    used = []
    original = engine._Runner._stored
    monkeypatch.setattr(
        engine._Runner, "_stored", lambda self, tp: used.append(original(self, tp)) or used[-1]
    )
    stored = merge(recipe, fts, out=tmp_path / "stored.safetensors", **kw)
    assert any(used)
    monkeypatch.setattr(engine._Runner, "_stored", lambda self, tp: False)
    whole = merge(recipe, fts, out=tmp_path / "whole.safetensors", **kw)
    monkeypatch.setattr(engine, "_BLOCK_ELEMENTS", 40)  # blocks of 2-3 rows of 16
    blocked = merge(recipe, fts, out=tmp_path / "blocked.safetensors", **kw)
    assert stored.root == whole.root == blocked.root


STORED = [
    ("linear", {}, False),
    ("task_arithmetic", {}, True),
    ("model_stock", {}, True),
    ("ties", {"density": 0.5}, True),
    ("dare_ties", {"density": 0.5}, True),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.1}, True),
    ("della", {"density": 0.5, "epsilon": 0.1}, True),
    ("slerp", {"t": 0.5}, True),
]


@pytest.mark.parametrize(
    ("name", "params", "with_base", "where"),
    [(*case, "contribution") for case in STORED] + [(*c, "base") for c in STORED if c[2]],
)
def test_nan_or_inf_in_a_stored_input_is_rejected(
    tmp_path: Path, name: str, params: dict, with_base: bool, where: str
) -> None:
    """Strategies reading bfloat16 inputs as stored (no upcast copy) find a NaN/Inf anywhere,
    in any input, as the whole-tensor path does; nothing is written."""
    base = {"w": torch.linspace(-1, 1, 4096).reshape(64, 64).bfloat16()}
    good = {"w": (base["w"].float() + 0.01).bfloat16()}
    bad_value = float("nan") if name in ("ties", "della") else float("inf")
    bad_base = {"w": base["w"].clone()}
    bad_base["w"][63, 60] = bad_value
    bad = {"w": good["w"].clone()}
    bad["w"][5, 7] = bad_value
    base_path = _save(tmp_path, "base", bad_base if where == "base" else base)
    root = hash_tensors(open_tensors(base_path)).root
    recipe = _recipe(name, params, root if with_base else None)
    inputs = [good] if name == "slerp" else [good, {"w": (good["w"].float() * 1.5).bfloat16()}]
    if where == "contribution":
        inputs[-1] = bad
    contribs = [_contrib(_save(tmp_path, f"in{i}", t)) for i, t in enumerate(inputs)]
    label = "the base" if where == "base" else "contribution .*"
    _fail(
        tmp_path / "1",
        InvalidInput,
        f"tensor 'w' in {label} contains NaN or Inf",
        recipe,
        contribs,
        base=open_tensors(base_path) if with_base else None,
    )


@pytest.mark.parametrize("name", ["model_stock", "slerp"])
def test_inf_is_rejected_when_a_stored_merge_takes_its_identical_inputs_shortcut(
    tmp_path: Path, name: str
) -> None:
    """Identical contributions are returned without a blend pass; an Inf in them (Inf equals
    Inf) or in the base they skip is still rejected."""
    base = {"w": torch.linspace(-1, 1, 4096).reshape(64, 64).bfloat16()}
    same = {"w": (base["w"].float() + 0.01).bfloat16()}
    same["w"][3, 3] = float("inf")
    base_path = _save(tmp_path, "base", base)
    root = hash_tensors(open_tensors(base_path)).root
    # identical tensors, distinct roots (by their metadata)
    contribs = [
        _contrib(_save(tmp_path, f"s{i}", same), {"params": {"weight": 1.0 + i}}) for i in range(2)
    ]
    with_base = name == "model_stock"  # slerp: equal endpoints, two contributions, no base
    recipe = _recipe(name, {} if with_base else {"t": 0.5}, root if with_base else None)
    base_src = open_tensors(base_path) if with_base else None
    _fail(
        tmp_path / "1",
        InvalidInput,
        "tensor 'w' in contribution .* contains NaN or Inf",
        recipe,
        contribs,
        base=base_src,
    )
    if with_base:  # finite identical contributions, Inf in the base they make no use of
        bad_base = {"w": base["w"].clone()}
        bad_base["w"][0, 1] = float("inf")
        finite = {"w": (base["w"].float() + 0.01).bfloat16()}
        contribs = [
            _contrib(_save(tmp_path, f"f{i}", finite), {"params": {"weight": 1.0 + i}})
            for i in range(2)
        ]
        bad_path = _save(tmp_path, "bad_base", bad_base)
        recipe = _recipe(name, {}, hash_tensors(open_tensors(bad_path)).root)
        _fail(
            tmp_path / "2",
            InvalidInput,
            "tensor 'w' in the base contains NaN or Inf",
            recipe,
            contribs,
            base=open_tensors(bad_path),
        )
