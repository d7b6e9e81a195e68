"""In-process node fixtures: the ASGI app under Starlette's TestClient (lifespan included).

Models are tiny (``tests.models``), written as safetensors files once per test.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from crdtmerge.tensors import write_tensors
from node.app import create_app
from node.settings import Settings
from tests.models import make_finetune, make_model

TOKEN = "test-token-123"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def model_files(tmp_path: Path) -> dict[str, Path]:
    """``base`` and three fine-tunes ``ft0..ft2`` of the tiny layout, as safetensors files."""
    d = tmp_path / "models"
    base = make_model(1)
    out = {"base": d / "base.safetensors"}
    write_tensors(out["base"], base)
    for i in range(3):
        out[f"ft{i}"] = d / f"ft{i}.safetensors"
        write_tensors(out[f"ft{i}"], make_finetune(base, i + 1))
    return out


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Start nodes (each a TestClient with its lifespan running); all stopped at teardown."""
    started: list[TestClient] = []

    def start(data_dir: Path | None = None, **overrides: Any) -> TestClient:
        opts: dict[str, Any] = {"merge_debounce_s": 0.0, "token": TOKEN}
        opts.update(overrides)
        settings = Settings(data_dir=data_dir or tmp_path / "node", **opts).validated()
        client = TestClient(create_app(settings), headers=AUTH)
        client.__enter__()
        started.append(client)
        return client

    yield start
    for c in reversed(started):
        c.__exit__(None, None, None)


@pytest.fixture
def node(node_factory: Callable[..., TestClient]) -> TestClient:
    return node_factory()


def runtime(client: TestClient) -> Any:
    return client.app.state.runtime  # type: ignore[attr-defined]


def wait_state(client: TestClient, merge: str, states: set[str], timeout: float = 30.0) -> dict:
    """Poll the merge status until its state is one of ``states`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/merges/{merge}").json()
        if status["state"] in states:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"merge {merge} stayed {status['state']}: {status}")
        time.sleep(0.02)
