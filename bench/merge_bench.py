"""Merge engine vs mergekit on a synthetic ~200M-parameter Llama-style model (bf16).

Usage::

    bash bench/mergekit_setup.sh            # once: mergekit in bench/.venv-mergekit
    .venv/bin/python bench/merge_bench.py [--methods ties,linear] [--repeat 1] [--no-docs]

Makes (once, with numpy, so the bytes never depend on the CPU) a base and three fine-tunes in
Hugging Face layout (two ~200 MB shards + index + config.json) under ``bench/data``: vocab 32000,
hidden 1024, intermediate 4096, 8 layers, untied lm_head; fine-tune = base + 1e-3 x (0.5 x shared
noise + own noise). Then runs every method with mergekit (``mergekit-yaml``) and with
``crdtmerge merge`` from the same mergekit-style YAML, in the same run, one after the other,
inputs warm in the page cache, after an ``os.sync()`` (so no child pays for writing back the
previous one's output). Wall time, peak RSS (``ru_maxrss``) and CPU time are measured by a
small launcher process around the child (a child forked from this process would inherit its
peak RSS in ``ru_maxrss``). For deterministic methods the outputs are compared tensor
by tensor (max |difference| in float32 and the fraction of differing elements).

Writes ``bench/out/merge_bench.json`` and replaces the "## Merge engine vs mergekit" section of
``docs/benchmarks.md`` (unless ``--no-docs``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data" / "llama200m"
OUT = HERE / "out"
MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-yaml"
OURS = [str(ROOT / ".venv" / "bin" / "python"), "-m", "crdtmerge"]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Merge engine vs mergekit"

VOCAB, HIDDEN, INTER, LAYERS, HEADS = 32000, 1024, 4096, 8, 16
SHARD_BYTES = 200_000_000
MODELS = ("base", "ft1", "ft2", "ft3")


def layout() -> list[tuple[str, tuple[int, ...]]]:
    """Tensors in Hugging Face module order."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def config_json() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = x.astype(np.float32).view(np.uint32)
    return (
        (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    ).astype(np.uint16)


def _shards() -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layout():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    h: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        h[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def make_models() -> None:
    stamp = DATA / ".complete"
    if stamp.exists():
        return
    shutil.rmtree(DATA, ignore_errors=True)
    shards = _shards()
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {t: names[i] for i, s in enumerate(shards) for t, _ in s}
    total = sum(int(np.prod(s)) * 2 for _, s in layout())
    for m in MODELS:
        (DATA / m).mkdir(parents=True)
        (DATA / m / "config.json").write_text(json.dumps(config_json(), indent=2))
        (DATA / m / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    index = {name: i for i, (name, _) in enumerate(layout())}
    for si, shard in enumerate(shards):
        files = {m: open(DATA / m / names[si], "wb") for m in MODELS}  # noqa: SIM115
        try:
            for f in files.values():
                f.write(_header(shard))
            for name, shape in shard:
                i = index[name]
                g = np.random.Generator(np.random.PCG64(1000 + i))
                if len(shape) == 1:
                    base = np.ones(shape, dtype=np.float32)
                else:
                    base = g.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
                files["base"].write(to_bf16(base).tobytes())
                shared = np.random.Generator(np.random.PCG64(5000 + i)).standard_normal(
                    shape, dtype=np.float32
                )
                for j, m in enumerate(MODELS[1:], start=1):
                    own = np.random.Generator(np.random.PCG64(j * 100_000 + i)).standard_normal(
                        shape, dtype=np.float32
                    )
                    ft = base + np.float32(1e-3) * (np.float32(0.5) * shared + own)
                    files[m].write(to_bf16(ft).tobytes())
        finally:
            for f in files.values():
                f.close()
    stamp.write_text("ok\n")


# -- methods -----------------------------------------------------------------------------------


def methods() -> dict[str, dict]:
    """mergekit YAML per method; ``ours`` overrides keys for crdtmerge where names differ."""
    b, f1, f2, f3 = (str(DATA / m) for m in MODELS)

    def gta(method: str, **params: float) -> dict:
        return {
            "merge_method": method,
            "base_model": b,
            "models": [{"model": f, "parameters": {"weight": 1.0, **params}} for f in (f1, f2, f3)],
            "dtype": "bfloat16",
        }

    ta = gta("task_arithmetic")
    for m in ta["models"]:
        m["parameters"]["weight"] = 0.5
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": f, "parameters": {"weight": 1.0}} for f in (f1, f2, f3)],
            "dtype": "bfloat16",
        },
        "task_arithmetic": ta,
        "ties": gta("ties", density=0.5),
        "dare_ties": gta("dare_ties", density=0.5),
        "della": gta("della", density=0.5, epsilon=0.1),
        "breadcrumbs_ties": gta("breadcrumbs_ties", density=0.9, gamma=0.01),
        "slerp": {
            "merge_method": "slerp",
            "base_model": f1,
            "models": [{"model": f1}, {"model": f2}],
            "parameters": {"t": 0.5},
            "dtype": "bfloat16",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": b,
            "models": [{"model": f} for f in (f1, f2, f3)],
            "dtype": "bfloat16",
        },
    }


RANDOM = {"dare_ties", "della"}
#: default order: quick methods first
ORDER = (
    "linear",
    "task_arithmetic",
    "slerp",
    "model_stock",
    "ties",
    "dare_ties",
    "breadcrumbs_ties",
    "della",
)


#: Runs argv[2:] and writes its exit code, wall time, peak RSS and CPU time to argv[1]. A fresh
#: interpreter (~10 MB) spawns the measured process: Linux folds the hiwater RSS of the memory
#: a process had before ``exec`` into its ``ru_maxrss``, and a child forked straight from this
#: benchmark (torch imported, outputs compared) would report this process's peak as its own.
_LAUNCHER = """
import json, os, sys, time
t0 = time.monotonic()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.monotonic() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "wall": wall,
               "rss": usage.ru_maxrss * 1024, "cpu": usage.ru_utime + usage.ru_stime}, f)
"""


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS bytes, stdout, CPU seconds user+sys) of one child process,
    measured by a small launcher process (see ``_LAUNCHER``)."""
    import tempfile

    # the previous child's output (400 MB) must not be written back during this one's timing
    os.sync()
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as tmp,
    ):
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(report), *cmd],
            stdout=out,
            stderr=err,
            env=env,
            check=True,
        )
        r = json.loads(report.read_text())
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if r["code"] != 0:
            tail = err.read().decode()[-3000:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({r['code']}):\n{tail}")
    return r["wall"], r["rss"], text, r["cpu"]


def _yaml(doc: dict, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _out_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def compare(a: Path, b: Path) -> dict:
    """Max |a - b| over all tensors (float32), and the fraction of differing elements."""
    from safetensors import safe_open

    def tensors(path: Path) -> dict[str, tuple[Path, str]]:
        out = {}
        for f in _out_files(path):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118
                    out[k] = (f, k)
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return {"error": f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}"}
    max_abs = 0.0
    differing = 0
    total = 0
    for name in sorted(ta):
        with safe_open(str(ta[name][0]), framework="pt") as h:
            x = h.get_tensor(name).float()
        with safe_open(str(tb[name][0]), framework="pt") as h:
            y = h.get_tensor(name).float()
        d = (x - y).abs()
        max_abs = max(max_abs, float(d.max()))
        differing += int((d > 0).sum())
        total += d.numel()
    return {"max_abs_diff": max_abs, "differing_fraction": differing / total}


def bench(names: list[str], repeat: int, on_row=None) -> list[dict]:
    OUT.mkdir(parents=True, exist_ok=True)
    cfg_dir = OUT / "configs"
    cfg_dir.mkdir(exist_ok=True)
    table = methods()
    have_mergekit = MERGEKIT.exists()
    env = dict(os.environ)
    results = []
    for name in names:
        doc = table[name]
        cfg = cfg_dir / f"{name}.yml"
        _yaml(doc, cfg)
        row: dict = {"method": name}
        out_mk = OUT / f"mergekit-{name}"
        out_us = OUT / f"crdtmerge-{name}"
        # the tools alternate (mergekit, crdtmerge, mergekit, ...) so that a slow spell of
        # the machine hits both; each tool's best run counts
        runs: dict[str, tuple[list[float], list[int], list[float]]] = {
            "mergekit": ([], [], []),
            "crdtmerge": ([], [], []),
        }
        out = ""
        for _ in range(repeat):
            if have_mergekit:
                shutil.rmtree(out_mk, ignore_errors=True)
                w, r, _, c = run_child(
                    [
                        str(MERGEKIT),
                        str(cfg),
                        str(out_mk),
                        "--no-copy-tokenizer",
                        "--quiet",
                        "--random-seed",
                        "42",
                    ],
                    env,
                )
                for acc, v in zip(runs["mergekit"], (w, r, c), strict=True):
                    acc.append(v)
            shutil.rmtree(out_us, ignore_errors=True)
            w, r, out, c = run_child(
                [*OURS, "merge", "--recipe", str(cfg), "--out", str(out_us), "--json"], env
            )
            for acc, v in zip(runs["crdtmerge"], (w, r, c), strict=True):
                acc.append(v)
        for tool, prefix in (("mergekit", "mergekit"), ("crdtmerge", "ours")):
            walls, rss, cpus = runs[tool]
            if not walls:
                continue
            row[f"{prefix}_wall_s"] = min(walls)
            row[f"{prefix}_walls_s"] = walls
            row[f"{prefix}_cpu_s"] = min(cpus)
            row[f"{prefix}_rss_mib"] = max(rss) / 2**20
            print(
                f"{name}: {tool} {min(walls):.1f}s wall (runs: "
                f"{', '.join(f'{x:.1f}' for x in walls)}) {min(cpus):.1f}s cpu "
                f"{max(rss) / 2**20:.0f} MiB",
                flush=True,
            )
        row["root"] = json.loads(out)["root"]
        if have_mergekit:
            row["speedup"] = row["mergekit_wall_s"] / row["ours_wall_s"]
            row["cpu_ratio"] = row["mergekit_cpu_s"] / row["ours_cpu_s"]
            row["rss_ratio"] = row["ours_rss_mib"] / row["mergekit_rss_mib"]
            if name not in RANDOM:
                row.update(compare(out_mk, out_us))
        results.append(row)
        if on_row is not None:
            on_row(results)
        shutil.rmtree(out_mk, ignore_errors=True)
        shutil.rmtree(out_us, ignore_errors=True)
    return results


def _pairs(row: dict) -> str:
    """mergekit run / crdtmerge run for each alternating pair, in run order."""
    pairs = zip(row["mergekit_walls_s"], row["ours_walls_s"], strict=True)
    return ", ".join(f"{mk / us:.2f}" for mk, us in pairs)


def cpu_kind() -> str:
    """The CPU model, its widest x86 vector extension and the core count (ratios move between
    CPUs: BLAKE3 and numpy's sort use AVX-512 where they find it)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {simd}, {os.cpu_count()} CPUs"


def render(results: list[dict], repeat: int, startup: dict) -> str:
    have_mk = any("mergekit_wall_s" in r for r in results)
    lines = [
        SECTION,
        "",
        f"Command: `.venv/bin/python bench/merge_bench.py --repeat {repeat}` "
        f"(mergekit {startup.get('mergekit_version', 'not installed')} in `bench/.venv-mergekit`, "
        "installed by `bench/mergekit_setup.sh`; torch 2.13.0 CPU in both venvs).",
        "",
        "Model: synthetic Llama (vocab 32000, hidden 1024, intermediate 4096, 8 layers, untied "
        "lm_head) = 199.8M parameters, bf16, HF layout (2 shards, 400 MB); base + 3 fine-tunes "
        "(base + 1e-3 x (0.5 shared + own noise)), made with numpy. Both tools read the same "
        "mergekit YAML (`bench/out/configs/<method>.yml`: dtype bfloat16; linear weights 1,1,1 "
        "over ft1-3; task_arithmetic weight 0.5 x3; ties / dare_ties weight 1 density 0.5; della "
        "density 0.5 epsilon 0.1; breadcrumbs_ties density 0.9 gamma 0.01; slerp ft1 <-> ft2 "
        "t=0.5; model_stock base + 3). mergekit: `mergekit-yaml CFG OUT --no-copy-tokenizer "
        "--quiet --random-seed 42`; crdtmerge: `crdtmerge merge --recipe CFG --out OUT --json` "
        "(includes hashing every input and the output). The tools alternate run by run "
        "(mergekit, crdtmerge, mergekit, ...), so a slow spell of the machine hits both. Wall = "
        "min over runs (every run's wall is in `bench/out/merge_bench.json`), including process "
        "start-up (see the start-up line below); CPU = the child's user + system time (less "
        "sensitive than wall time to other load on the machine); peak RSS = the child's "
        "`ru_maxrss`, taken by a ~10 MB launcher process that spawns it (a child forked from "
        "the benchmark itself reports the benchmark's own peak RSS when that is larger). Inputs warm in the page cache, `os.sync()` before each child (no run "
        "pays for the previous one's write-back); 2 cores. "
        f"Load average at the start of this run: {startup.get('load', '?')}. "
        f"Machine: {startup.get('machine', '?')}.",
        "",
    ]
    if have_mk:
        lines += [
            "| method | mergekit wall (s) | crdtmerge wall (s) | speed-up (wall) | mergekit CPU "
            "(s) | crdtmerge CPU (s) | speed-up (CPU) | mergekit peak RSS (MiB) | crdtmerge "
            "peak RSS (MiB) | RSS ratio | speed-up per alternating pair | max abs diff vs "
            "mergekit |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            if r["method"] in RANDOM:
                diff = "n/a (random masks)"
            elif "error" in r:
                diff = r["error"]
            else:
                diff = f"{r['max_abs_diff']:.3g} ({r['differing_fraction'] * 100:.2g}% of elements)"
            lines.append(
                f"| {r['method']} | {r['mergekit_wall_s']:.1f} | {r['ours_wall_s']:.1f} | "
                f"{r['speedup']:.1f}x | {r['mergekit_cpu_s']:.1f} | {r['ours_cpu_s']:.1f} | "
                f"{r['cpu_ratio']:.1f}x | {r['mergekit_rss_mib']:.0f} | {r['ours_rss_mib']:.0f} | "
                f"{r['rss_ratio']:.2f} | {_pairs(r)} | {diff} |"
            )
    else:
        lines += [
            "mergekit could not be installed; crdtmerge alone:",
            "",
            "| method | crdtmerge wall (s) | crdtmerge CPU (s) | crdtmerge peak RSS (MiB) |",
            "|---|---|---|---|",
        ]
        for r in results:
            lines.append(
                f"| {r['method']} | {r['ours_wall_s']:.1f} | {r['ours_cpu_s']:.1f} | "
                f"{r['ours_rss_mib']:.0f} |"
            )
    lines += [
        "",
        f"Start-up alone: crdtmerge `--help` {startup['ours_help_s']:.1f} s / "
        f"{startup['ours_help_rss_mib']:.0f} MiB"
        + (
            f"; mergekit `--help` {startup['mergekit_help_s']:.1f} s / "
            f"{startup['mergekit_help_rss_mib']:.0f} MiB."
            if "mergekit_help_s" in startup
            else "."
        ),
        "",
        "Reading the numbers: both tools pay process start-up (crdtmerge: torch import; mergekit: "
        "torch + transformers); crdtmerge also hashes all inputs (1.6 GB of BLAKE3, on the idle "
        "core while torch is imported) and its output. `--help` imports no torch. The engine streams one tensor at a time on 2 workers, and every method here "
        "reads its bf16 inputs as stored, converting cache-sized chunks to float32 as it goes "
        "(`Stored` in docs/architecture.md): no whole float32 copy of an input exists, so the "
        "peak RSS is the process with torch imported (~225 MiB) plus about two output tensors "
        "of the 32000x1024 embedding / lm_head and the pages of the inputs being read (DARE and "
        "DELLA also hold one byte of keep mask per element of the tensor per contribution). "
        "Differences to mergekit "
        "come from arithmetic precision: mergekit computes these methods in the configured dtype "
        "(bfloat16), crdtmerge accumulates in float32 and casts once (linear is bit-identical; "
        "TIES-family outputs differ where bf16 rounding moves an element across the top-k "
        "threshold or flips an election; model_stock's cosines are float64 here).",
        "",
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    text = DOCS.read_text()
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt < 0 else nxt + 1
    DOCS.write_text(text[:start] + section + ("\n" if nxt >= 0 else "") + text[end:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(ORDER))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.monotonic()
    make_models()
    print(f"models ready in {time.monotonic() - t0:.1f}s", flush=True)
    cpu = cpu_kind()
    startup: dict = {"load": " / ".join(f"{x:.1f}" for x in os.getloadavg()), "machine": cpu}
    w, r, _, _ = run_child([*OURS, "--help"])
    startup.update(ours_help_s=w, ours_help_rss_mib=r / 2**20)
    if MERGEKIT.exists():
        w, r, _, _ = run_child([str(MERGEKIT), "--help"])
        startup.update(mergekit_help_s=w, mergekit_help_rss_mib=r / 2**20)
        ver = subprocess.run(
            [
                str(HERE / ".venv-mergekit" / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('mergekit'))",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        startup["mergekit_version"] = ver.stdout.strip() or "?"
    host = {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu}

    def save(results: list[dict]) -> None:
        # after every method: a slow run that is cut short still leaves its numbers
        report = {"machine": host, "startup": startup, "results": results}
        (OUT / "merge_bench.json").write_text(json.dumps(report, indent=2))
        if not args.no_docs:
            write_docs(render(results, args.repeat, startup))

    results = bench(names, args.repeat, save)
    print(render(results, args.repeat, startup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
