"""Node configuration: flags over CRDTMERGE_* variables over defaults; bad values fail early."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from crdtmerge.cli.node_cmd import add_arguments, settings_from_args
from crdtmerge.errors import InvalidInput
from node.settings import Settings


def test_environment_then_overrides(tmp_path):
    env = {
        "CRDTMERGE_DATA_DIR": str(tmp_path),
        "CRDTMERGE_TOKEN": "env-token-123",
        "CRDTMERGE_PEERS": "http://a:1, http://b:2",
        "CRDTMERGE_MAX_BODY_BYTES": "1000",
        "CRDTMERGE_MERGE_DEBOUNCE_S": "0.25",
        "CRDTMERGE_LOG_JSON": "false",
        "CRDTMERGE_FETCH_BATCH_BYTES": "4194304",
    }
    s = Settings.from_env(env)
    assert (s.fetch_batch_bytes, s.fetch_commit_bytes) == (4 << 20, 256 << 20)
    assert s.data_dir == Path(tmp_path) and s.token == "env-token-123"
    assert s.peers == ("http://a:1", "http://b:2")
    assert (s.max_body_bytes, s.merge_debounce_s, s.log_json) == (1000, 0.25, False)
    s = Settings.from_env(env, token="flag-token-456", port=9000, peers=None)
    assert (
        s.token == "flag-token-456" and s.port == 9000 and s.peers == ("http://a:1", "http://b:2")
    )


@pytest.mark.parametrize(
    "env",
    [
        {},  # no data dir
        {"CRDTMERGE_DATA_DIR": "/x", "CRDTMERGE_PORT": "eighty"},
        {"CRDTMERGE_DATA_DIR": "/x", "CRDTMERGE_MAX_BODY_BYTES": "0"},
        {"CRDTMERGE_DATA_DIR": "/x", "CRDTMERGE_FETCH_BATCH_BYTES": "0"},
        {"CRDTMERGE_DATA_DIR": "/x", "CRDTMERGE_FETCH_COMMIT_BYTES": "-1"},
        {"CRDTMERGE_DATA_DIR": "/x", "CRDTMERGE_PEERS": "ftp://nope"},
        {"CRDTMERGE_DATA_DIR": "/x", "CRDTMERGE_TOKEN": "short"},
        {"CRDTMERGE_DATA_DIR": "/x", "CRDTMERGE_LOG_JSON": "maybe"},
    ],
)
def test_bad_configuration_fails_at_startup(env):
    with pytest.raises(InvalidInput):
        Settings.from_env(env)


def test_cli_flags_map_to_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("CRDTMERGE_TOKEN", "env-token-123")
    monkeypatch.delenv("CRDTMERGE_DATA_DIR", raising=False)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        ["--data-dir", str(tmp_path), "--port", "0", "--peer", "http://p:1", "--peer", "http://q:2"]
    )
    s = settings_from_args(args)
    assert s.data_dir == tmp_path and s.port == 0  # type: ignore[attr-defined]
    assert s.peers == ("http://p:1", "http://q:2")  # type: ignore[attr-defined]
    assert s.token == "env-token-123"  # type: ignore[attr-defined]
