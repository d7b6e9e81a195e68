"""Bad input gets a 4xx JSON error and stores nothing (DESIGN §8)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from crdtmerge.errors import StorageError
from crdtmerge.tensors import write_tensors
from tests.models import TINY_LAYOUT, make_model

from .conftest import runtime, wait_state


def stored(client) -> tuple[list[bytes], list[str]]:
    """What the node holds: store objects, and leftovers in its temporary directory."""
    rt = runtime(client)
    return rt.store.list(), sorted(p.name for p in rt.store.tmp_dir.iterdir())


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


BAD_BODIES = {
    "not_safetensors": b"this is not a safetensors file at all",
    "empty": b"",
    "truncated": None,  # filled from a real file
    "header_runs_past_end": struct.pack("<Q", 1000) + b"{}",
    "bad_json": struct.pack("<Q", 4) + b"{{{{",
    "overlapping_offsets": safetensors_bytes(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "unknown_dtype": safetensors_bytes(
        {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "trailing_bytes": safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
@pytest.mark.parametrize("endpoint", ["/v1/merges/m/contributions", "/v1/objects"])
def test_malformed_safetensors_is_400_and_stores_nothing(node, model_files, case, endpoint):
    body = BAD_BODIES[case]
    if body is None:
        full = model_files["ft0"].read_bytes()
        body = full[: len(full) - 100]
    r = node.post(endpoint, content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_safetensors"
    assert "/tmp" not in r.json()["detail"]  # names the upload, not our temp file
    assert stored(node) == ([], [])
    assert node.get("/v1/merges").json()["merges"] == []


def test_header_over_the_configured_limit_is_400(node_factory, model_files, tmp_path):
    node = node_factory(max_header_bytes=256)
    r = node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    assert r.status_code == 400 and "header" in r.json()["detail"]
    assert stored(node) == ([], [])


def test_too_many_tensors_is_400(node_factory, model_files):
    node = node_factory(max_tensors=3)
    r = node.post("/v1/objects", content=model_files["ft0"].read_bytes())
    assert r.status_code == 400 and "tensors" in r.json()["detail"]
    assert stored(node) == ([], [])


def test_body_over_the_size_limit_is_413(node_factory, model_files):
    data = model_files["ft0"].read_bytes()
    node = node_factory(max_body_bytes=len(data) - 1)
    r = node.post("/v1/merges/m/contributions", content=data)  # Content-Length known
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    def chunks():  # no Content-Length: counted while streaming
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    r = node.post("/v1/merges/m/contributions", content=chunks())
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert stored(node) == ([], [])
    assert node.get("/v1/merges").json()["merges"] == []


def test_wrong_shapes_against_the_base_is_422(node, model_files, tmp_path):
    base = node.post("/v1/objects", content=model_files["base"].read_bytes()).json()["root"]
    node.put("/v1/merges/m/recipe", json={"strategy": "task_arithmetic", "base": base})
    layout = dict(TINY_LAYOUT)
    layout["model.norm.weight"] = (17,)
    write_tensors(tmp_path / "bad.safetensors", make_model(5, layout))
    before = stored(node)
    r = node.post("/v1/merges/m/contributions", content=(tmp_path / "bad.safetensors").read_bytes())
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "incompatible_inputs"
    assert "model.norm.weight" in r.json()["detail"]
    assert stored(node) == before
    assert node.get("/v1/merges/m").json()["contributions"] == []

    missing = make_model(5)
    del missing["lm_head.weight"]
    write_tensors(tmp_path / "missing.safetensors", missing)
    r = node.post(
        "/v1/merges/m/contributions", content=(tmp_path / "missing.safetensors").read_bytes()
    )
    assert r.status_code == 422 and "lm_head.weight" in r.json()["detail"]
    assert stored(node) == before


def test_incompatible_contribution_then_recipe_reports_instead_of_crashing(
    node, model_files, tmp_path
):
    write_tensors(tmp_path / "odd.safetensors", {"w": torch.zeros(3)})
    node.post("/v1/merges/m/contributions", content=(tmp_path / "odd.safetensors").read_bytes())
    base = node.post("/v1/objects", content=model_files["base"].read_bytes()).json()["root"]
    node.put("/v1/merges/m/recipe", json={"strategy": "task_arithmetic", "base": base})
    status = wait_state(node, "m", {"failed", "ready"})
    assert status["state"] == "failed"
    assert status["error"] == "incompatible_inputs" and status["merged_hash"] is None
    assert node.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("recipe", "status", "code"),
    [
        ({"strategy": "no_such_strategy"}, 422, "unsupported_strategy"),
        ({"strategy": "linear", "version": 99}, 422, "unsupported_strategy"),
        ({"strategy": "ties", "params": {"density": "lots"}, "base": "ab" * 32}, 400, "density"),
        ({"strategy": "ties", "params": {"no_such_param": 1}, "base": "ab" * 32}, 400, "no_such"),
        ({"strategy": "ties", "params": {"density": 0.5}}, 400, "base"),
        ({"strategy": "linear", "base": "zz"}, 400, "invalid_recipe"),
        ({"strategy": "linear", "out_dtype": "int7"}, 400, "invalid_recipe"),
        ({"strategy": "linear", "surprise": 1}, 422, "invalid_request"),
        ({"params": {}}, 422, "invalid_request"),
    ],
)
def test_bad_recipe_is_4xx_and_changes_nothing(node, recipe, status, code):
    r = node.put("/v1/merges/m/recipe", json=recipe)
    if code in ("density", "no_such", "base"):  # invalid_recipe naming the culprit
        assert r.json()["error"] == "invalid_recipe" and code in r.json()["detail"], r.text
        code = "invalid_recipe"
    assert (r.status_code, r.json()["error"]) == (status, code), r.text
    assert node.get("/v1/merges").json()["merges"] == []


def test_a_write_that_cannot_be_persisted_is_507_and_leaves_no_trace(node, model_files):
    rt = runtime(node)
    first = node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    assert first.status_code == 201, first.text
    before = node.get("/v1/merges/m").json()
    state_before = rt.replica.state
    real = rt.db.save_documents

    def disk_gone(docs):
        raise StorageError("node database write failed: disk I/O error")

    rt.db.save_documents = disk_gone
    try:
        r = node.post("/v1/merges/m/contributions", content=model_files["ft1"].read_bytes())
    finally:
        rt.db.save_documents = real
    assert r.status_code == 507 and r.json()["error"] == "storage_error", r.text
    # nothing of the failed add is visible (so nothing of it can be gossiped)
    assert rt.replica.state.get("m").to_bytes() == state_before.get("m").to_bytes()
    assert node.get("/v1/merges/m").json() == before
    # the disk is back: the same push succeeds, once
    again = node.post("/v1/merges/m/contributions", content=model_files["ft1"].read_bytes())
    assert again.status_code == 201, again.text
    listed = node.get("/v1/merges/m/contributions").json()["contributions"]
    assert len(listed) == 2
