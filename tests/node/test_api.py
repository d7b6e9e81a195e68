"""The REST API in process: recipes, contributions, status, the merged model, objects, auth."""

from __future__ import annotations

from pathlib import Path

from crdtmerge.engine import Contribution, merge
from crdtmerge.identity import hash_tensors
from crdtmerge.recipe import Recipe
from crdtmerge.tensors import open_tensors

from .conftest import runtime, wait_state


def offline_root(recipe: Recipe, base: Path | None, inputs: list[Path], tmp: Path) -> str:
    """The offline engine's merged root for the same inputs (the contract the node must meet)."""
    contributions = []
    for p in inputs:
        src = open_tensors(p)
        contributions.append(Contribution(hash_tensors(src).root, src, {}))
    result = merge(
        recipe,
        contributions,
        base=open_tensors(base) if base else None,
        out=tmp / "offline.safetensors",
    )
    return result.root.hex()


def test_push_list_remove_and_merged_hash_equals_offline_engine(node, model_files, tmp_path):
    base = node.post("/v1/objects", content=model_files["base"].read_bytes())
    assert base.status_code == 201, base.text
    base_root = base.json()["root"]
    assert base_root == hash_tensors(model_files["base"]).root.hex()

    r = node.put(
        "/v1/merges/m/recipe",
        json={"strategy": "ties", "params": {"density": 0.5}, "base": base_root},
    )
    assert r.status_code == 200, r.text
    assert r.json()["contributions"] == [] and r.json()["recipe"]["strategy"] == "ties"

    roots = []
    for name in ("ft0", "ft1", "ft2"):
        r = node.post("/v1/merges/m/contributions", content=model_files[name].read_bytes())
        assert r.status_code == 201, r.text
        assert r.json()["created"] is True
        roots.append(r.json()["root"])
    assert roots[0] == hash_tensors(model_files["ft0"]).root.hex()

    again = node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    assert again.status_code == 200 and again.json() == {
        "root": roots[0],
        "created": False,
        "size": model_files["ft0"].stat().st_size,
    }

    listed = node.get("/v1/merges/m/contributions").json()["contributions"]
    assert [c["root"] for c in listed] == sorted(roots)
    assert all(c["present"] for c in listed)

    removed = node.delete(f"/v1/merges/m/contributions/{roots[2]}")
    assert removed.status_code == 200, removed.text
    assert removed.json()["contributions"] == sorted(roots[:2])
    assert node.delete(f"/v1/merges/m/contributions/{roots[2]}").status_code == 404

    status = wait_state(node, "m", {"ready", "failed", "unsupported"})
    assert status["state"] == "ready", status
    recipe = Recipe("ties", 1, {"density": 0.5}, bytes.fromhex(base_root)).validated()
    expected = offline_root(
        recipe, model_files["base"], [model_files["ft0"], model_files["ft1"]], tmp_path
    )
    assert status["merged_hash"] == expected
    assert status["missing"] == [] and status["complete"] is True

    model = node.get("/v1/merges/m/model")
    assert model.status_code == 200
    assert model.headers["x-crdtmerge-root"] == expected
    out = tmp_path / "pulled.safetensors"
    out.write_bytes(model.content)
    assert hash_tensors(out).root.hex() == expected


def test_re_add_after_remove_changes_the_digest_back(node, model_files):
    node.put("/v1/merges/m/recipe", json={"strategy": "linear"})
    r = node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    root = r.json()["root"]
    d1 = node.get("/v1/merges/m").json()["digest"]
    node.delete(f"/v1/merges/m/contributions/{root}")
    d0 = node.get("/v1/merges/m").json()["digest"]
    r = node.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes())
    assert r.status_code == 201
    assert node.get("/v1/merges/m").json()["digest"] == d1 != d0


def test_status_reports_missing_base_and_waits(node, model_files):
    missing = "ab" * 32
    r = node.put("/v1/merges/m/recipe", json={"strategy": "task_arithmetic", "base": missing})
    assert r.status_code == 200
    status = node.get("/v1/merges/m").json()
    assert status["missing"] == [missing]
    assert status["state"] == "incomplete" and status["merged_hash"] is None
    assert node.get("/v1/merges/m/model").json()["error"] == "not_ready"


def test_merge_status_and_objects_404(node):
    r = node.get("/v1/merges/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = node.get("/v1/objects/" + "00" * 32)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = node.get("/v1/objects/xyz")
    assert r.status_code == 400 and r.json()["error"] == "invalid_input"
    r = node.put("/v1/merges/bad name!/recipe", json={"strategy": "linear"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_input"


def test_object_download_supports_ranges_and_etag(node, model_files):
    r = node.post("/v1/objects", content=model_files["ft1"].read_bytes())
    root = r.json()["root"]
    full = node.get(f"/v1/objects/{root}")
    assert full.status_code == 200 and full.headers["etag"] == f'"{root}"'
    part = node.get(f"/v1/objects/{root}", headers={"range": "bytes=8-99"})
    assert part.status_code == 206
    assert part.content == full.content[8:100]
    info = node.get(f"/v1/objects/{root}/info").json()
    assert info["size"] == len(full.content)
    assert info["tensors"]["model.norm.weight"] == {"dtype": "F32", "shape": [16], "nbytes": 64}
    assert root in node.get("/v1/objects").json()["objects"]
    manifest = node.get(f"/v1/objects/{root}/manifest")
    from crdtmerge.identity import Manifest

    assert Manifest.from_bytes(manifest.content).root.hex() == root


def test_writes_need_the_token_reads_do_not(node, model_files):
    anon = {"authorization": ""}
    r = node.put("/v1/merges/m/recipe", json={"strategy": "linear"}, headers=anon)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = node.put(
        "/v1/merges/m/recipe", json={"strategy": "linear"}, headers={"authorization": "Bearer x"}
    )
    assert r.status_code == 401
    r = node.post("/v1/objects", content=model_files["ft0"].read_bytes(), headers=anon)
    assert r.status_code == 401
    assert runtime(node).store.list() == []
    assert node.put("/v1/merges/m/recipe", json={"strategy": "linear"}).status_code == 200
    assert node.get("/v1/merges/m", headers=anon).status_code == 200


def test_health_ready_metrics_and_openapi(node):
    assert node.get("/healthz").json() == {"status": "ok"}
    ready = node.get("/readyz").json()
    assert ready["status"] == "ready" and ready["epoch"] > 0
    node.put("/v1/merges/m/recipe", json={"strategy": "linear"})
    text = node.get("/metrics").text
    assert "crdtmerge_state_writes_total 1.0" in text
    spec = node.get("/openapi.json").json()
    assert "/v1/merges/{name}/contributions" in spec["paths"]
    assert node.get("/docs").status_code == 200


def test_state_survives_restart_with_a_new_epoch(node_factory, model_files, tmp_path):
    a = node_factory(tmp_path / "n")
    a.put("/v1/merges/m/recipe", json={"strategy": "linear"})
    root = a.post("/v1/merges/m/contributions", content=model_files["ft0"].read_bytes()).json()
    status = wait_state(a, "m", {"ready"})
    epoch = a.get("/readyz").json()["epoch"]
    a.__exit__(None, None, None)

    b = node_factory(tmp_path / "n")
    again = b.get("/v1/merges/m").json()
    assert again["contributions"] == [root["root"]]
    assert again["digest"] == status["digest"]
    assert again["state"] == "ready" and again["merged_hash"] == status["merged_hash"]
    assert b.get("/readyz").json()["epoch"] > epoch
