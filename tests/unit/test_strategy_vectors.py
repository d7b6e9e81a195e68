"""Golden merged roots: every ``exact`` strategy version on fixed inputs, through the engine.

A recipe names a strategy *and its version*, and replicas on different builds must compute the
same bytes for it: an optimisation or a refactor that moves one output bit of an existing
version is a bug (a changed definition is a new version). The other determinism tests compare
runs of one build with each other; this one compares the build with the recorded roots.

Inputs come from the project's own generator (no numpy stream whose definition could change),
in float32 and in bfloat16 (the stored-input paths), with one tensor larger than the engine's
chunk so chunked code splits it, per-model weights that differ, and Fisher side tensors where
the strategy takes them. ``platform`` strategies are left out: their bits may differ on another
CPU kind.

Regenerate only for a new strategy or a new version, never to absorb a change of an existing
one: ``CRDTMERGE_REGEN_VECTORS=1 .venv/bin/python -m pytest tests/unit/test_strategy_vectors.py``
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from crdtmerge.engine import Contribution, merge
from crdtmerge.identity import hash_tensors
from crdtmerge.laws import demo_params
from crdtmerge.recipe import Recipe
from crdtmerge.rng import CounterRNG
from crdtmerge.strategies import StrategySpec, list_strategies
from crdtmerge.tensors import open_tensors, write_tensors

VECTORS = Path(__file__).parents[1] / "vectors" / "strategies.jsonl"

LAYOUT: dict[str, tuple[int, ...]] = {
    "lm_head.weight": (260, 1024),  # 266,240 elements: more than one 2**18 chunk
    "model.layers.0.mlp.up_proj.weight": (48, 64),
    "model.layers.1.input_layernorm.weight": (64,),
    "model.layers.1.self_attn.q_proj.weight": (64, 64),
}
WEIGHTS = (1.0, 0.5, 2.0)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
EXACT = [s for s in list_strategies() if s.determinism == "exact"]

_GEN = CounterRNG(b"crdtmerge/tests/strategy-vectors".ljust(32, b"\0"))


def _noise(shape: tuple[int, ...], stream: str) -> torch.Tensor:
    u = _GEN.uniform(math.prod(shape), stream.encode().ljust(32, b"\0")[:32])
    return ((u - 0.5) * 2.0).reshape(shape)


def _model(tag: str, base: dict[str, torch.Tensor] | None, spec: StrategySpec) -> dict:
    out = {}
    for name, shape in LAYOUT.items():
        noise = _noise(shape, f"{tag}/{name}")
        out[name] = noise if base is None else base[name] + 0.1 * noise
        if "fisher" in spec.side_inputs:
            out[f"fisher:{name}"] = _noise(shape, f"{tag}/fisher/{name}").abs() + 0.1
    return out


def _root(spec: StrategySpec, dtype: str, tmp: Path) -> str:
    cast = DTYPES[dtype]
    base = _model("base", None, spec)
    n = min(3, spec.max_models or 3)
    models = [_model(f"m{i}", base, spec) for i in range(max(n, spec.min_models))]
    base_src = None
    base_root = None
    if spec.needs_base:
        write_tensors(tmp / "base.safetensors", {k: v.to(cast) for k, v in base.items()})
        base_src = open_tensors(tmp / "base.safetensors")
        base_root = hash_tensors(base_src).root
    contribs = []
    for i, m in enumerate(models):
        path = tmp / f"m{i}.safetensors"
        write_tensors(path, {k: v.to(cast) for k, v in m.items()})
        src = open_tensors(path)
        contribs.append(
            Contribution(
                root=hash_tensors(src).root,
                source=src,
                metadata={"params": {"weight": WEIGHTS[i]}},
            )
        )
    recipe = Recipe(spec.name, spec.version, demo_params(spec), base_root, None)
    result = merge(recipe, contribs, base=base_src, out=tmp / "out.safetensors", threads=2)
    for c in contribs:
        c.source.close()
    if base_src is not None:
        base_src.close()
    return result.root.hex()


def _recorded() -> dict[tuple[str, int, str], str]:
    rows = [json.loads(line) for line in VECTORS.read_text().splitlines() if line]
    return {(r["strategy"], r["version"], r["inputs"]): r["root"] for r in rows}


def test_every_exact_strategy_version_has_vectors(tmp_path: Path) -> None:
    if os.environ.get("CRDTMERGE_REGEN_VECTORS") == "1":
        lines = []
        for spec in EXACT:
            for dtype in DTYPES:
                case = tmp_path / f"{spec.name}-{spec.version}-{dtype}"
                case.mkdir()
                row = {"strategy": spec.name, "version": spec.version, "inputs": dtype}
                lines.append(json.dumps({**row, "root": _root(spec, dtype, case)}))
        VECTORS.write_text("\n".join(lines) + "\n")
    expected = {(s.name, s.version, d) for s in EXACT for d in DTYPES}
    assert set(_recorded()) == expected


@pytest.mark.parametrize(
    ("spec", "dtype"),
    [pytest.param(s, d, id=f"{s.name}-v{s.version}-{d}") for s in EXACT for d in DTYPES],
)
def test_merged_root_matches_the_recorded_one(spec: StrategySpec, dtype: str, tmp_path: Path):
    recorded = _recorded().get((spec.name, spec.version, dtype))
    assert recorded is not None, f"no vector for {spec.name} v{spec.version} ({dtype})"
    assert _root(spec, dtype, tmp_path) == recorded
