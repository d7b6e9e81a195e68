"""Hostile input against an in-process node.

- The public API fuzzed from its own OpenAPI schema (schemathesis, in process, a bounded
  number of examples per operation): never a 5xx, and every 4xx is ``{"error", "detail"}``.
- The upload path fed hypothesis-mutated safetensors (bad header lengths, huge lengths, bad
  JSON, bad dtypes and shapes, overlapping / out-of-range offsets, truncation, trailing bytes,
  random byte flips, NaN/Inf data): never a 5xx; a 4xx leaves the object store, the temporary
  directory and the replicated state exactly as they were; anything accepted re-hashes to its
  root.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdtmerge.store import hash_file
from node.app import create_app
from node.settings import Settings

from .conftest import AUTH, TOKEN

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

EXAMPLES = 25
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


@contextmanager
def _node(data_dir: Path, **kw: Any) -> Iterator[TestClient]:
    s = Settings(data_dir=data_dir, token=TOKEN, merge_debounce_s=0.0, rate_limit_per_s=0.0, **kw)
    with TestClient(create_app(s.validated()), headers=AUTH, raise_server_exceptions=False) as c:
        yield c


def _rt(client: TestClient) -> Any:
    return client.app.state.runtime  # type: ignore[attr-defined]


def _snapshot(client: TestClient) -> tuple[Any, ...]:
    rt = _rt(client)
    tmp = rt.settings.store_dir / "tmp"
    return (
        sorted(rt.store.list()),
        rt.replica.state.state_hash(),
        sorted(p.name for p in tmp.glob("*")) if tmp.exists() else [],
    )


def _assert_clear_error(resp: Any) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error", "detail"}, body
        assert isinstance(body["error"], str) and body["error"] and body["detail"], body


# -- the public API from its OpenAPI schema -------------------------------------------------


def _operations() -> list[Any]:
    s = Settings(data_dir=Path("/nonexistent"), token=TOKEN).validated()
    schema = schemathesis.openapi.from_dict(create_app(s).openapi())
    return [r.ok() for r in schema.get_all_operations()]


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with _node(tmp_path_factory.mktemp("fuzz")) as client:
        yield client


def _send(client: TestClient, case: Any) -> Any:
    kw = case.as_transport_kwargs(base_url="http://testserver")
    kw.pop("cookies", None)
    headers = {k: v for k, v in (kw.pop("headers", None) or {}).items() if k.lower() != "cookie"}
    data = kw.pop("data", None)
    if data is not None:
        kw["content"] = data.encode() if isinstance(data, str) else data
    return client.request(headers=headers, **kw)


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: f"{op.method.upper()} {op.path}")
def test_openapi_fuzz_never_5xx_and_errors_are_clear(fuzz_node, operation):
    @FUZZ
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        _assert_clear_error(_send(fuzz_node, case))

    run()
    _rt(fuzz_node).replica.check_invariants()


# -- hostile safetensors uploads ------------------------------------------------------------


def _safetensors(header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _valid() -> tuple[dict[str, Any], bytes]:
    a = np.arange(6, dtype=np.float32).tobytes()
    b = np.ones(4, dtype=np.float16).tobytes()
    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
    }
    return header, a + b


def _mutated_header() -> st.SearchStrategy[bytes]:
    header, data = _valid()
    names = st.sampled_from(["a", "b"])
    junk = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.just([])
    )

    def set_field(name: str, field: str, value: Any) -> bytes:
        h = json.loads(json.dumps(header))
        h[name][field] = value
        return _safetensors(h, data)

    return st.one_of(
        # bad dtypes
        st.builds(
            set_field,
            names,
            st.just("dtype"),
            st.one_of(st.sampled_from(["F128", "", "f32", "Q8"]), junk),
        ),
        # bad shapes: negative, huge, wrong product, not ints
        st.builds(
            set_field,
            names,
            st.just("shape"),
            st.one_of(
                st.lists(st.integers(-(2**70), 2**70), max_size=4),
                st.just([2**62, 2**62]),
                junk,
            ),
        ),
        # bad offsets: overlapping, reversed, out of range, huge, not ints
        st.builds(
            set_field,
            names,
            st.just("data_offsets"),
            st.one_of(
                st.lists(st.integers(-(2**65), 2**65), min_size=0, max_size=3),
                st.sampled_from([[0, 24], [8, 32], [24, 0], [0, 2**64], [16, 40]]),
                junk,
            ),
        ),
        # extra keys, a non-object entry, a non-string __metadata__
        st.builds(set_field, names, st.text(max_size=5), junk),
        st.builds(lambda v: _safetensors({**header, "c": v}, data), junk),
        st.builds(lambda v: _safetensors({**header, "__metadata__": {"k": v}}, data), junk),
        # bad crdtmerge metadata: not JSON, NaN, not an object, bad signature fields
        st.builds(
            lambda v: _safetensors({**header, "__metadata__": {"crdtmerge": v}}, data),
            st.sampled_from(
                ["{", "NaN", "[1]", '{"params": NaN}', '{"signer": "00"}', '{"signature": 1}']
            ),
        ),
        # header length field lies: huge, zero, past the end, inside the header
        st.builds(
            lambda n: _safetensors(header, data, length=n),
            st.one_of(
                st.sampled_from([0, 1, 7, 2**63, 2**64 - 1, 100 << 20]), st.integers(0, 2**64 - 1)
            ),
        ),
        # the header is not JSON / not UTF-8 / deeply nested
        st.builds(lambda b: _safetensors(b, data), st.binary(max_size=64)),
        st.just(_safetensors(b"[" * 10_000 + b"]" * 10_000, data)),
        st.just(_safetensors(b'{"a": 1, "a": 2}', data)),
        # truncated data, trailing bytes, short files
        st.builds(lambda n: _safetensors(header, data[:n]), st.integers(0, len(data) - 1)),
        st.builds(lambda t: _safetensors(header, data + t), st.binary(min_size=1, max_size=16)),
        st.binary(max_size=16),
    )


def _flipped() -> st.SearchStrategy[bytes]:
    header, data = _valid()
    good = _safetensors(header, data)

    def flip(positions: list[int], masks: list[int]) -> bytes:
        out = bytearray(good)
        for p, m in zip(positions, masks, strict=False):
            out[p % len(out)] ^= m
        return bytes(out)

    return st.builds(
        flip,
        st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=4),
        st.lists(st.integers(1, 255), min_size=4, max_size=4),
    )


@pytest.fixture(scope="module")
def upload_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    # no merge worker: its temporary outputs would blur the "nothing stored" comparison
    with _node(tmp_path_factory.mktemp("uploads"), merge_enabled=False) as client:
        client.put("/v1/merges/m/recipe", json={"strategy": "linear"})
        yield client


def _upload_checks(client: TestClient, blob: bytes) -> None:
    before = _snapshot(client)
    path = ["/v1/objects", "/v1/merges/m/contributions"][len(blob) % 2]
    resp = client.post(path, content=blob)
    _assert_clear_error(resp)
    if resp.status_code >= 400:
        assert _snapshot(client) == before
    else:
        root = bytes.fromhex(resp.json()["root"])
        assert hash_file(_rt(client).store.path(root)) == root


@FUZZ
@given(blob=_mutated_header())
def test_malformed_safetensors_are_refused_and_store_nothing(upload_node, blob):
    _upload_checks(upload_node, blob)


@settings(FUZZ, max_examples=60)
@given(blob=_flipped())
def test_random_byte_flips_never_crash_and_never_store_a_bad_object(upload_node, blob):
    _upload_checks(upload_node, blob)


@FUZZ
@given(
    values=st.lists(
        st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e38]),
        min_size=6,
        max_size=6,
    )
)
def test_nan_and_inf_values_are_handled_without_crashing(upload_node, values):
    header, data = _valid()
    blob = _safetensors(header, np.array(values, dtype=np.float32).tobytes() + data[24:])
    _upload_checks(upload_node, blob)


def test_the_fuzzed_nodes_stay_consistent(upload_node):
    rt = _rt(upload_node)
    rt.replica.check_invariants()
    for root in rt.store.list():
        assert hash_file(rt.store.path(root)) == root
