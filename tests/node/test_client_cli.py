"""The Python client and the remote CLI verbs against an in-process node."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from crdtmerge.cli import main, remote_cmd
from crdtmerge.client import Client, NodeUnavailable
from crdtmerge.errors import IncompatibleInputs, NotFound, TooLarge, UnsupportedStrategy
from crdtmerge.identity import hash_tensors
from crdtmerge.recipe import Recipe
from crdtmerge.tensors import StreamingWriter, open_tensors

from .conftest import TOKEN, wait_state


@pytest.fixture
def client(node) -> Client:
    return Client(http=node)


def test_client_round_trip(client, node, model_files, tmp_path):
    base = client.put_object(model_files["base"])
    assert base.created and base.root == hash_tensors(model_files["base"]).root.hex()
    status = client.set_recipe("m", Recipe("task_arithmetic", 1, {}, bytes.fromhex(base.root)))
    assert status["state"] == "waiting"
    with open(model_files["ft0"], "rb") as f:  # a file object streams too
        r0 = client.push("m", f)
    seen: list[int] = []
    r1 = client.push("m", model_files["ft1"], progress=seen.append)
    assert r0.created and r1.created and sum(seen) == model_files["ft1"].stat().st_size
    assert not client.push("m", model_files["ft1"]).created
    assert [c["root"] for c in client.contributions("m")] == sorted([r0.root, r1.root])
    status = wait_state(node, "m", {"ready"})
    root = client.download_merged("m", tmp_path / "out" / "m.safetensors")
    assert (
        root == status["merged_hash"] == hash_tensors(tmp_path / "out" / "m.safetensors").root.hex()
    )
    client.remove("m", r1.root)
    assert client.status("m")["contributions"] == [r0.root]
    assert client.merges() == ["m"]


def test_client_raises_the_matching_error_classes(client, model_files, tmp_path):
    with pytest.raises(UnsupportedStrategy):
        client.set_recipe("m", {"strategy": "nope"})
    with pytest.raises(NotFound):
        client.status("nope")
    base = client.put_object(model_files["base"]).root
    client.set_recipe("m", Recipe("task_arithmetic", 1, {}, bytes.fromhex(base)))
    (tmp_path / "x").mkdir()
    import torch

    from crdtmerge.tensors import write_tensors

    write_tensors(tmp_path / "x" / "w.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(IncompatibleInputs):
        client.push("m", tmp_path / "x" / "w.safetensors")


def test_client_over_a_mock_transport():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer tok-12345"
        if request.url.path == "/v1/objects":
            return httpx.Response(413, json={"error": "too_large", "detail": "limit 10"})
        return httpx.Response(500, text="boom")

    c = Client("http://node", token="tok-12345", transport=httpx.MockTransport(handler))
    with pytest.raises(TooLarge, match="limit 10"):
        c.put_object(b"x" * 20)
    with pytest.raises(Exception) as info:
        c.status("m")
    assert "HTTP 500" in str(info.value)


def test_client_maps_connection_errors():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    c = Client("http://node", transport=httpx.MockTransport(handler))
    with pytest.raises(NodeUnavailable):
        c.status("m")


def sharded_dir(src: Path, out: Path) -> Path:
    """Write ``src`` again as a sharded Hugging Face directory (several files + index)."""
    with open_tensors(src) as s:
        w = StreamingWriter(out, s.infos(), s.metadata, max_shard_bytes=2000)
        for n in s.names():
            w.write(n, s.buffer(n))
        w.close()
    assert len(list(out.glob("*.safetensors"))) > 1
    return out


@pytest.fixture
def cli(node, monkeypatch, capsys):
    """Run ``crdtmerge`` verbs against the in-process node; returns the parsed JSON output."""
    monkeypatch.setattr(remote_cmd, "_client", lambda args: Client(http=node))

    def run(*argv: str) -> dict:
        code = main(list(argv))
        out = capsys.readouterr().out
        assert code == 0, out
        return json.loads(out)

    return run


def test_cli_verbs(cli, node, model_files, tmp_path):
    url = "http://testserver"
    status = cli(
        "recipe", "set", url, "--merge", "m", "--strategy", "ties",
        "--param", "density=0.5", "--base", str(model_files["base"]), "--json",
    )  # fmt: skip
    base_root = hash_tensors(model_files["base"]).root.hex()
    assert status["recipe"]["base"] == base_root and status["merged_hash"] is None
    assert status["recipe"]["params"] == {"density": 0.5}

    pushed = cli("push", url, "--merge", "m", str(model_files["ft0"]), "--json")
    assert pushed["root"] == hash_tensors(model_files["ft0"]).root.hex()
    shards = sharded_dir(model_files["ft1"], tmp_path / "hf")
    pushed_dir = cli("push", url, "--merge", "m", str(shards), "--json")
    assert pushed_dir["root"] == hash_tensors(model_files["ft1"]).root.hex()
    assert pushed_dir["created"] is True

    wait_state(node, "m", {"ready"})
    status = cli("status", url, "--merge", "m", "--json")
    assert set(status) >= {"digest", "merged_hash", "contributions", "missing", "recipe"}
    assert status["contributions"] == sorted([pushed["root"], pushed_dir["root"]])
    assert status["missing"] == [] and len(status["merged_hash"]) == 64

    pulled = cli("pull", url, "--merge", "m", "--out", str(tmp_path / "pulled"), "--json")
    assert pulled["root"] == status["merged_hash"]
    assert hash_tensors(tmp_path / "pulled" / "model.safetensors").root.hex() == pulled["root"]

    removed = cli("rm", url, "--merge", "m", pushed["root"], "--json")
    assert removed["contributions"] == [pushed_dir["root"]]


def test_cli_reports_errors_as_json(cli, node, monkeypatch, capsys):
    code = main(["status", "http://testserver", "--merge", "nope", "--json"])
    assert code == 1
    assert json.loads(capsys.readouterr().out)["error"] == "not_found"


def test_cli_reads_the_token_from_the_environment(monkeypatch):
    import argparse

    monkeypatch.setenv("CRDTMERGE_TOKEN", TOKEN)
    args = argparse.Namespace(url="http://x", token=None, timeout=5.0)
    c = remote_cmd._client(args)
    assert c._headers["authorization"] == f"Bearer {TOKEN}"
    args.token = "flag-wins-1"
    assert remote_cmd._client(args)._headers["authorization"] == "Bearer flag-wins-1"


def test_client_over_an_asgi_transport(tmp_path, model_files):
    """``transport=httpx.ASGITransport(app)``: the sync client drives the app in process."""
    import asyncio

    from node.app import create_app
    from node.settings import Settings

    app = create_app(Settings(data_dir=tmp_path / "asgi", merge_debounce_s=0.0))
    loop = asyncio.new_event_loop()
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    try:
        with Client("http://asgi", transport=httpx.ASGITransport(app=app)) as c:
            pushed = c.put_object(model_files["ft0"])
            assert pushed.created and pushed.root == hash_tensors(model_files["ft0"]).root.hex()
            c.set_recipe("m", {"strategy": "linear"})
            assert c.status("m")["recipe"]["strategy"] == "linear"
            with pytest.raises(NotFound):
                c.status("nope")
    finally:
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.close()
