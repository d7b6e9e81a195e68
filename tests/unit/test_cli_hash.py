"""``crdtmerge hash``: output formats and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crdtmerge.cli import main
from crdtmerge.identity import contribution_metadata_header, hash_tensors
from crdtmerge.tensors import write_tensors
from tests.models import make_model


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    meta = contribution_metadata_header({"params": {"weight": 0.5}})
    write_tensors(path, make_model(1), meta | {"name": "label, not identity"})
    return path


def test_prints_the_root(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", str(model_file)]) == 0
    out = capsys.readouterr().out
    expected = hash_tensors(make_model(1), {"params": {"weight": 0.5}}).root_hex
    assert out == expected + "\n"


def test_json_summary(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", "--json", str(model_file)]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = make_model(1)
    assert summary == {
        "root": hash_tensors(model, {"params": {"weight": 0.5}}).root_hex,
        "tensors": len(model),
        "bytes": sum(t.numel() * 4 for t in model.values()),
    }


def test_manifest_output(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", "--manifest", str(model_file)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest == hash_tensors(model_file).to_json()
    assert manifest["metadata"] == {"params": {"weight": 0.5}}


def test_hugging_face_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tensors(tmp_path / "model.safetensors", {"w": torch.ones(3)})
    assert main(["hash", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == hash_tensors({"w": torch.ones(3)}).root_hex


def test_bad_file_is_one_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x07\x00")
    assert main(["hash", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"crdtmerge: error: {bad}: file is 2 bytes, shorter than the 8-byte header length; "
        "not a safetensors file [invalid_safetensors]\n"
    )


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", str(tmp_path / "nope")]) == 1
    assert "no such file or directory [not_found]" in capsys.readouterr().err


def test_subprocess(model_file: Path) -> None:
    """The installed entry point end to end (one run: starting Python and torch is slow)."""
    ok = subprocess.run(
        [sys.executable, "-m", "crdtmerge", "hash", str(model_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout) == 65 and ok.stdout.endswith("\n")
    assert ok.stdout.strip() == hash_tensors(model_file).root_hex
    assert ok.stderr == ""
