"""The CLI's start-up hashing (crdtmerge._prehash) is a cache of the real identity: the same
leaves, never stale, never a second reader's verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from crdtmerge import _prehash, engine
from crdtmerge.engine import hash_source
from crdtmerge.errors import InvalidTensorFile
from crdtmerge.identity import TensorHasher, hash_tensors
from crdtmerge.tensors import TensorInfo, open_tensors


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_prehash, "_files", {})
    monkeypatch.setattr(_prehash, "CHUNK_SIZE", _prehash.CHUNK_SIZE)


def _model(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.mkdir()
    save_file({"a": torch.randn(3000, 700, generator=g)}, str(path / "m-1.safetensors"))
    save_file(
        {"b": torch.randn(5, generator=g).to(torch.bfloat16), "c": torch.zeros(0)},
        str(path / "m-2.safetensors"),
    )
    shards = {"a": "m-1.safetensors", "b": "m-2.safetensors", "c": "m-2.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    return path


def _wait(path: Path) -> None:
    for file in path.glob("*.safetensors"):
        _prehash._files[_prehash._key(os.stat(file))].result(timeout=60)


def test_prehashed_leaves_give_the_same_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tmp_path / "m", 1)
    with open_tensors(model) as src:
        expected = hash_source(src, {"k": 1})
    _prehash.start([model])
    _wait(model)
    hashed_here: list[str] = []
    real = engine.TensorHasher

    def spy(info: TensorInfo) -> TensorHasher:
        hashed_here.append(info.name)
        return real(info)

    monkeypatch.setattr(engine, "TensorHasher", spy)
    with open_tensors(model) as src:
        assert hash_source(src, {"k": 1}) == expected
    assert hashed_here == ["c"]  # only the empty tensor: the others came from the cache
    assert expected.root == hash_tensors(model, metadata={"k": 1}).root


def test_a_file_changed_after_hashing_gets_no_leaves(tmp_path: Path) -> None:
    model = _model(tmp_path / "m", 2)
    _prehash.start([model])
    _wait(model)
    file = model / "m-1.safetensors"
    before = os.stat(file)
    with open(file, "r+b") as fh:  # the same inode and size, other bytes
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x3f")
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert os.stat(file).st_ino == before.st_ino and os.stat(file).st_size == before.st_size
    with open_tensors(model) as src:
        where = src.location("a")
        assert where is not None
        assert _prehash.lookup(*where, src.info("a").nbytes) is None
        assert hash_source(src, {}) == hash_tensors(model)


def test_a_file_it_cannot_parse_is_left_to_the_real_reader(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    _prehash.start([bad])
    _prehash._files[_prehash._key(os.stat(bad))].result(timeout=60)
    assert _prehash.lookup(bad, 8 + len(header), 99) is None
    with pytest.raises(InvalidTensorFile):
        open_tensors(bad)


def test_merge_starts_hashing_before_torch_is_imported(tmp_path: Path) -> None:
    """``crdtmerge merge`` hands its inputs to the prehash before anything imports torch,
    and the package and the CLI parser import none of it."""
    a, b = _model(tmp_path / "a", 3), _model(tmp_path / "b", 4)
    code = (
        "import sys\n"
        "import crdtmerge, crdtmerge.cli, crdtmerge._prehash as P\n"
        "crdtmerge.cli.build_parser()\n"
        "assert 'torch' not in sys.modules, 'imported torch early'\n"
        "seen = []\n"
        "start = P.start\n"
        "P.start = lambda paths: (seen.append('torch' in sys.modules), start(paths))\n"
        f"rc = crdtmerge.cli.main(['merge', '--strategy', 'linear', '--out', {str(tmp_path / 'o')!r},"
        f" {str(a)!r}, {str(b)!r}])\n"
        "assert rc == 0 and seen == [False], (rc, seen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
