"""The offline CLI verbs: ``merge`` (flags and mergekit-style YAML), ``strategies``, ``laws``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from crdtmerge.cli import main
from crdtmerge.cli.merge_cmd import parse_param, parse_size
from crdtmerge.engine import hash_source
from crdtmerge.errors import InvalidInput, InvalidRecipe
from crdtmerge.identity import contribution_metadata_header, hash_tensors
from crdtmerge.tensors import open_tensors, write_tensors
from tests.models import make_finetune, make_model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    base = make_model(1)
    out = {"base": tmp / "base.safetensors"}
    write_tensors(out["base"], base)
    for i in range(1, 4):
        out[f"ft{i}"] = tmp / f"ft{i}.safetensors"
        write_tensors(out[f"ft{i}"], make_finetune(base, seed=20 + i))
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_parse_param_and_size() -> None:
    assert parse_param("density=0.5") == ("density", 0.5)
    assert parse_param("t=[0,0.5,1]") == ("t", [0, 0.5, 1])
    assert parse_param("sign_method=sum") == ("sign_method", "sum")
    assert parse_param("normalize=false") == ("normalize", False)
    with pytest.raises(InvalidRecipe):
        parse_param("density")
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("200MB") == 200 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("1000") == 1000
    with pytest.raises(InvalidInput):
        parse_size("lots")


def test_merge_input_order_never_changes_a_byte(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["merge", "--strategy", "ties", "--base", str(files["base"]), "--param", "density=0.5"]
    fts = [str(files[f"ft{i}"]) for i in range(1, 4)]
    code, out1, _ = _run(capsys, *common, *fts, "--out", str(tmp_path / "a.safetensors"))
    assert code == 0
    code, out2, _ = _run(
        capsys, *common, *reversed(fts), "--out", str(tmp_path / "b.safetensors"), "--json"
    )
    assert code == 0
    result = json.loads(out2)
    assert out1.strip() == result["root"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert hash_tensors(tmp_path / "a.safetensors").root.hex() == result["root"]


def test_yaml_recipe_per_model_params_become_metadata(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(files["base"]),
        "models": [
            {"model": str(files["base"])},  # mergekit lists the base too: skipped
            {"model": str(files["ft1"]), "parameters": {"weight": 0.7}},
            {"model": str(files["ft2"]), "parameters": {"weight": 0.3}},
        ],
        "parameters": {"lambda": 0.9},
        "dtype": "bfloat16",
    }
    path = tmp_path / "ta.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, _ = _run(
        capsys, "merge", "--recipe", str(path), "--out", str(tmp_path / "m"), "--json"
    )
    assert code == 0
    result = json.loads(out)
    with open_tensors(files["ft1"]) as src:
        ft1_root = hash_source(src, {"params": {"weight": 0.7}}).root.hex()
    assert ft1_root in result["inputs"]
    assert len(result["inputs"]) == 2
    with open_tensors(tmp_path / "m") as merged:
        assert {merged.info(n).dtype for n in merged.names()} == {"BF16"}
        assert hash_tensors(merged).root.hex() == result["root"]


def test_metadata_params_in_files_are_used(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with open_tensors(files["ft1"]) as src:
        tensors = {n: src.tensor(n).clone() for n in src.names()}
    weighted = tmp_path / "ft1w.safetensors"
    write_tensors(weighted, tensors, contribution_metadata_header({"params": {"weight": 3.0}}))
    args = ["merge", "--strategy", "linear", "--json", str(files["ft2"])]
    _, a, _ = _run(capsys, *args, str(weighted), "--out", str(tmp_path / "a.safetensors"))
    _, b, _ = _run(capsys, *args, str(files["ft1"]), "--out", str(tmp_path / "b.safetensors"))
    assert json.loads(a)["root"] != json.loads(b)["root"]


def test_merge_errors_are_one_line(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys, "merge", "--strategy", "nope", str(files["ft1"]), "--out", str(tmp_path / "x")
    )
    assert code == 1
    assert "unknown strategy 'nope'" in err
    code, out, _ = _run(
        capsys,
        "merge",
        "--strategy",
        "ties",
        str(files["ft1"]),
        "--out",
        str(tmp_path / "x"),
        "--json",
    )
    assert code == 1
    assert json.loads(out)["error"] == "invalid_recipe"
    assert not (tmp_path / "x").exists()


def test_sharded_output(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(
        capsys,
        "merge",
        "--strategy",
        "linear",
        str(files["ft1"]),
        str(files["ft2"]),
        "--max-shard-size",
        "2000",
        "--out",
        str(tmp_path / "sharded"),
    )
    assert code == 0
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert hash_tensors(tmp_path / "sharded").root.hex() == out.strip()


def test_strategies_verb(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "strategies", "--json")
    assert code == 0
    described = {d["name"]: d for d in json.loads(out)}
    assert described["ties"]["needs_base"] is True
    assert {"name", "version", "determinism", "params", "summary"} <= set(described["linear"])
    code, out, _ = _run(capsys, "strategies")
    assert code == 0
    assert "linear" in out and "determinism" in out


def test_laws_verb(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "laws", "--strategy", "linear", "--json", "--trials", "1")
    assert code == 0
    laws = {r["law"]: r for r in json.loads(out)["laws"]}
    assert laws["associativity"]["raw_holds"] is False
    assert all(r["two_layer_holds"] for r in laws.values())
    code, out, _ = _run(capsys, "laws", "--strategy", "ties", "--trials", "1")
    assert code == 0
    assert "VIOLATED" in out


def test_merge_shortens_the_gil_switch_interval_only_while_merging(
    tmp_path: Path,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    import crdtmerge.engine as engine
    from crdtmerge.cli import merge_cmd

    seen: list[float] = []
    real = engine.merge

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(sys.getswitchinterval())
        if len(seen) == 2:
            raise InvalidInput("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "merge", spy)
    before = sys.getswitchinterval()
    argv = ["merge", "--strategy", "linear", str(files["ft1"]), str(files["ft2"])]
    assert _run(capsys, *argv, "--out", str(tmp_path / "a.safetensors"))[0] == 0
    assert _run(capsys, *argv, "--out", str(tmp_path / "b.safetensors"))[0] == 1  # it raised
    assert seen == pytest.approx([merge_cmd._SWITCH_INTERVAL] * 2)
    assert sys.getswitchinterval() == before  # restored, also after an error
