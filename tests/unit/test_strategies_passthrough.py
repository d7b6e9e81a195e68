"""passthrough: one contribution copied bit for bit, or scaled per tensor (mergekit ``scale``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from crdtmerge.cli import main
from crdtmerge.rng import CounterRNG
from crdtmerge.strategies import get_strategy
from crdtmerge.strategies.base import TensorTask
from crdtmerge.tensors import open_tensors, write_tensors
from tests.models import make_model


def _task(x: torch.Tensor, scale: float) -> TensorTask:
    return TensorTask(
        name="model.layers.0.mlp.up_proj.weight",
        base=None,
        inputs=[x],
        params={},
        model_params=[{"weight": 1.0, "scale": scale}],
        rng=CounterRNG(b"\x01" * 32),
        streams=[b"\x00" * 32],
    )


def test_scale_one_copies_the_bits_and_other_scales_multiply() -> None:
    x = torch.tensor([1.5, -0.0, 3.0e-39, -2.25, float("inf")])  # a subnormal and -0.0 too
    spec = get_strategy("passthrough")
    out = spec.merge(_task(x, 1.0))
    assert out.view(torch.int32).tolist() == x.view(torch.int32).tolist()
    assert out.data_ptr() != x.data_ptr()  # a copy: the engine may reuse the input's pages
    half = spec.merge(_task(x, 0.5))
    assert torch.equal(half, torch.tensor([0.75, -0.0, 1.5e-39, -1.125, float("inf")]))
    assert (spec.min_models, spec.max_models, spec.needs_base) == (1, 1, False)
    assert spec.param("scale").scope == "model"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_filter_list_scales_chosen_tensors_and_copies_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model(3)
    src = tmp_path / "m.safetensors"
    write_tensors(src, model)
    cfg = {
        "merge_method": "passthrough",
        "models": [
            {
                "model": str(src),
                "parameters": {"scale": [{"filter": "up_proj", "value": 0.0}, {"value": 1.0}]},
            }
        ],
    }
    recipe = tmp_path / "p.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out.safetensors"
    code, text = _run(capsys, "merge", "--recipe", str(recipe), "--out", str(out), "--json")
    assert code == 0, text
    assert json.loads(text)["strategy"] == "passthrough"
    with open_tensors(out) as merged:
        assert sorted(merged.names()) == sorted(model)
        for name, t in model.items():
            got = merged.tensor(name)
            if "up_proj" in name:
                assert torch.equal(got, torch.zeros_like(t)), name
            else:
                assert torch.equal(got, t), name


def test_two_contributions_are_refused_naming_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"m{seed}.safetensors")
        write_tensors(paths[-1], make_model(seed))
    out = tmp_path / "out.safetensors"
    code, text = _run(
        capsys, "merge", "--strategy", "passthrough", "--json", "--out", str(out), *map(str, paths)
    )
    assert code == 1
    body = json.loads(text)
    assert body["error"] == "invalid_recipe"
    assert body["detail"] == "strategy 'passthrough' accepts at most 1 contribution(s), got 2"
    assert not out.exists()
