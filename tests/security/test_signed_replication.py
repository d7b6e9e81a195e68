"""Signed contributions across real gossip: three full node apps in one process
(``tests/replication_sim.py``). Nodes accept different things at ingest (they learn of the
trusted keys at different times), then converge by anti-entropy to one digest, one set of
included contributions and one merged hash; concurrent key changes converge the same way."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import torch
from safetensors.numpy import load

from crdtmerge.identity import contribution_metadata_header
from crdtmerge.signing import generate_key, public_key_bytes, sign_tensors
from crdtmerge.tensors import canonical_header, open_tensors
from tests.replication_sim import Simulation, model_bytes

LINEAR = {"strategy": "linear", "version": 1, "params": {"weight": 1.0}}


def _signed_bytes(seed: int, key: Any) -> bytes:
    """The tiny model ``seed`` as a canonical safetensors file signed with ``key``."""
    tensors = {k: torch.from_numpy(v) for k, v in load(model_bytes(seed)).items()}
    manifest = sign_tensors(tensors, key, {})
    src = open_tensors(tensors)
    header = canonical_header(src.infos(), contribution_metadata_header(manifest.metadata))
    data = b"".join(bytes(src.buffer(i.name)) for i in src.infos())
    return struct.pack("<Q", len(header)) + header + data


async def _settle(sim: Simulation, limit: int = 30) -> list[dict[str, Any]]:
    """Gossip until all three agree on a digest with every object present and merged."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    for _ in range(limit):
        await sim.round()
        statuses = [await sim.status(i, "m") for i in range(3)]
        same = len({s["digest"] for s in statuses if s}) == 1 and all(statuses)
        if same and all(s["state"] in ("ready", "failed") and not s["missing"] for s in statuses):
            return statuses  # type: ignore[return-value]
        assert loop.time() < deadline, statuses
    raise AssertionError(f"not settled: {statuses}")


def test_replicas_agree_on_signed_contributions_whatever_they_accepted(tmp_path):
    k1, k2 = generate_key(), generate_key()
    k1_hex, k2_hex = public_key_bytes(k1).hex(), public_key_bytes(k2).hex()

    async def scenario() -> None:
        async with Simulation(tmp_path, 3, merges=True) as sim:
            # isolate the nodes so each decides at ingest from its own state
            names = [n.name for n in sim.nodes]
            sim.net.partition(*([n] for n in names))
            await sim.set_recipe(0, "m", LINEAR)
            async with sim.api(0) as c:
                assert (await c.put(f"/v1/merges/m/trusted-keys/{k1_hex}")).status_code == 200
            signed_k1 = await sim.push(0, "m", _signed_bytes(1, k1))
            unsigned = await sim.push(1, "m", model_bytes(2))  # n1 knows no key yet
            signed_k2 = await sim.push(2, "m", _signed_bytes(3, k2))  # nor does n2
            sim.net.cut.clear()
            sim.now += 100  # backoffs of the failed notices expire

            statuses = await _settle(sim)
            assert {s["merged_hash"] for s in statuses} != {None}
            assert len({s["merged_hash"] for s in statuses}) == 1
            for s in statuses:
                assert s["state"] == "ready" and s["trusted_keys"] == [k1_hex]
                assert s["contributions"] == sorted([signed_k1, unsigned, signed_k2])
                assert s["untrusted"] == sorted([unsigned, signed_k2])

            # concurrently: n1 stops trusting k1 while n2 trusts k2 (partitioned)
            sim.net.partition(*([n] for n in names))
            async with sim.api(1) as c:
                assert (await c.delete(f"/v1/merges/m/trusted-keys/{k1_hex}")).status_code == 200
            async with sim.api(2) as c:
                assert (await c.put(f"/v1/merges/m/trusted-keys/{k2_hex}")).status_code == 200
            sim.net.cut.clear()
            sim.now += 100
            statuses = await _settle(sim)
            assert len({s["merged_hash"] for s in statuses}) == 1
            for s in statuses:
                assert s["state"] == "ready" and s["trusted_keys"] == [k2_hex]
                assert s["untrusted"] == sorted([signed_k1, unsigned])

    asyncio.run(scenario())
