"""The determinism contract of layer 2 (DESIGN section 4), for every ``exact`` strategy.

The merged root must be identical for every permutation of the inputs, for
``torch.set_num_threads(1)`` vs 2, in separate processes running the CLI, and under
``ATEN_CPU_CAPABILITY=default|avx2|avx512``. torch 2.13 does not fall back when the CPU lacks the
requested capability (the child dies of SIGILL), so a capability missing from
``/proc/cpuinfo`` is left out, and the test says so. All strategies are batched into one
subprocess per capability to keep the test quick.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crdtmerge.cli import main
from crdtmerge.laws import demo_params
from crdtmerge.strategies import list_strategies
from crdtmerge.tensors import write_tensors
from tests.models import make_finetune, make_model, randn

ROOT = Path(__file__).resolve().parents[2]
EXACT = [s for s in list_strategies() if s.determinism == "exact"]

# runs the CLI once per job in one interpreter and prints the roots as JSON
_CHILD = """
import contextlib, io, json, sys
from crdtmerge.cli import main
roots = []
for argv in json.load(open(sys.argv[1])):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"{argv}: exit {code}: {buf.getvalue()}")
    roots.append(json.loads(buf.getvalue())["root"])
print(json.dumps(roots))
"""


def _with_side(model: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    out = dict(model)
    for i, (name, t) in enumerate(sorted(model.items())):
        out[f"fisher:{name}"] = randn(tuple(t.shape), seed * 31 + i).abs() + 0.1
        if t.dim() == 2:
            x = randn((2 * t.shape[1], t.shape[1]), seed * 37 + i)
            out[f"gram:{name}"] = (x * x).sum(0).diag() / x.shape[0] + torch.eye(t.shape[1])
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("det")
    base = make_model(3)
    paths = {"base": tmp / "base.safetensors"}
    write_tensors(paths["base"], base)
    for i in range(1, 4):
        paths[f"ft{i}"] = tmp / f"ft{i}.safetensors"
        write_tensors(paths[f"ft{i}"], _with_side(make_finetune(base, seed=40 + i, scale=0.05), i))
    return paths


def _argv(spec, inputs: dict[str, Path], order: list[int], out: Path) -> list[str]:
    n = min(3, spec.max_models or 3)
    n = max(n, spec.min_models)
    fts = [str(inputs[f"ft{i}"]) for i in (1, 2, 3)][:n]
    argv = ["merge", "--strategy", spec.name, "--version", str(spec.version), "--json"]
    if spec.needs_base:
        argv += ["--base", str(inputs["base"])]
    for k, v in demo_params(spec).items():
        argv += ["--param", f"{k}={json.dumps(v)}"]
    argv += [fts[i] for i in order if i < n]
    return [*argv, "--out", str(out)]


def _capabilities() -> list[str]:
    """The ``ATEN_CPU_CAPABILITY`` values this CPU can run (default always)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ["default"]
    caps = ["default"]
    if "avx2" in flags:
        caps.append("avx2")
    if "avx512f" in flags:
        caps.append("avx512")
    else:
        print("ATEN_CPU_CAPABILITY=avx512 skipped: this CPU has no AVX-512")
    return caps


def _in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)["root"]


@pytest.mark.slow
def test_exact_strategies_are_bit_identical_everywhere(
    tmp_path: Path, inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert EXACT, "no exact strategies registered"
    reference: dict[str, str] = {}
    saved = torch.get_num_threads()
    try:
        for spec in EXACT:
            roots = set()
            # three of the six orders (each input in each position once), 1 vs 2 threads
            for k, order in enumerate(([0, 1, 2], [1, 2, 0], [2, 0, 1])):
                torch.set_num_threads(1 if k % 2 else 2)
                out = tmp_path / f"{spec.name}-p{k}.safetensors"
                roots.add(_in_process(_argv(spec, inputs, list(order), out), capsys))
            assert len(roots) == 1, f"{spec.name}: input order or thread count changed the root"
            reference[spec.name] = roots.pop()
    finally:
        torch.set_num_threads(saved)

    # separate processes running the CLI, one per CPU capability, all strategies batched
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = {}
    for cap in _capabilities():
        jobs = [
            _argv(spec, inputs, [2, 0, 1], tmp_path / f"{spec.name}-{cap}.safetensors")
            for spec in EXACT
        ]
        job_file = tmp_path / f"jobs-{cap}.json"
        job_file.write_text(json.dumps(jobs))
        procs[cap] = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(job_file)],
            env={**env, "ATEN_CPU_CAPABILITY": cap},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for cap, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={cap}: {err[-2000:]}"
        roots = json.loads(out.strip().splitlines()[-1])
        for spec, root in zip(EXACT, roots, strict=True):
            assert root == reference[spec.name], (
                f"{spec.name}: ATEN_CPU_CAPABILITY={cap} gave a different merged root"
            )
