"""``crdtmerge merge``: merge local checkpoints offline, exactly as a replica would.

Inputs are safetensors files or Hugging Face directories (sharded or not). Each input's root is
computed from its tensors and its merge-relevant metadata; per-model parameters from a YAML
recipe (mergekit style) become that contribution's metadata ``params`` and so part of its root.
The order of the INPUTs never changes a byte of the output: contributions are sorted by root.

Example::

    crdtmerge merge --strategy ties --base base/ --param density=0.5 ft1/ ft2/ ft3/ --out merged/
    crdtmerge merge --recipe ties.yaml --out merged.safetensors --json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidInput, InvalidRecipe

__all__ = ["load_yaml_recipe", "parse_param", "parse_size", "register"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}
# files copied beside a directory output when the base (else first input) directory has them
_TAG_ALONG = ("config.json", "generation_config.json")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge local checkpoints into one canonical object",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="safetensors file or HF directory")
    p.add_argument("--strategy", help="strategy name (see `crdtmerge strategies`)")
    p.add_argument("--version", type=int, default=None, help="strategy version (default newest)")
    p.add_argument("--base", help="base model (file or HF directory)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="recipe parameter; V parsed as JSON when possible (density=0.5, t=[0,0.5,1])",
    )
    p.add_argument("--recipe", metavar="FILE.yaml", help="mergekit-style YAML recipe")
    p.add_argument("--out-dtype", help="output dtype: float32, float16, bfloat16, float64")
    p.add_argument("--max-shard-size", help="shard a directory output (e.g. 5GB, 200MB)")
    p.add_argument("--out", required=True, help="output: FILE.safetensors or a directory")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--json", action="store_true", help="print {'root': hex, ...} as JSON")
    p.set_defaults(func=run)


def parse_param(text: str) -> tuple[str, Any]:
    """``k=v`` with ``v`` parsed as JSON when possible, else kept as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidRecipe(f"--param expects NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def parse_size(text: str) -> int:
    """``5GB`` / ``200MB`` / ``1GiB`` / ``1000`` -> bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidInput(f"cannot parse size {text!r}; use e.g. 5GB, 200MB, 1GiB")
    unit = (m.group(2) or "").lower()
    binary = "i" in unit
    letter = unit[:1] if unit[:1] in "kmgt" else ""
    factor = (1024 ** "kmgt".index(letter) * 1024 if letter else 1) if binary else _UNITS[letter]
    size = int(float(m.group(1)) * factor)
    if size <= 0:
        raise InvalidInput(f"size must be positive, got {text!r}")
    return size


def _dtype(name: Any, what: str) -> str:
    if not isinstance(name, str) or name.lower() not in _DTYPE_ALIASES:
        raise InvalidRecipe(f"{what} must be one of {sorted(set(_DTYPE_ALIASES.values()))}")
    return _DTYPE_ALIASES[name.lower()]


def _resolve_path(value: Any, yaml_dir: Path, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise InvalidRecipe(f"{what} must be a path")
    p = Path(value).expanduser()
    if not p.exists() and not p.is_absolute() and (yaml_dir / p).exists():
        p = yaml_dir / p
    return p


def load_yaml_recipe(path: str | Path) -> dict[str, Any]:
    """Read a mergekit-style YAML recipe.

    Returns a dict with ``strategy``, ``base`` (Path or None), ``models`` (list of (Path,
    params)), ``params`` (global) and ``out_dtype``.
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InvalidInput(f"cannot read recipe {str(path)!r}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InvalidRecipe(f"recipe {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise InvalidRecipe(f"recipe {str(path)!r} must be a mapping")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "version"}
    unknown = set(doc) - known
    if unknown:
        raise InvalidRecipe(
            f"recipe {str(path)!r}: unsupported key(s) {sorted(unknown)}; supported: {sorted(known)}"
        )
    ydir = path.parent
    base = _resolve_path(doc["base_model"], ydir, "base_model") if doc.get("base_model") else None
    models: list[tuple[Path, dict[str, Any]]] = []
    for i, entry in enumerate(doc.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise InvalidRecipe(f"models[{i}] must be {{model: PATH, parameters: {{...}}}}")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise InvalidRecipe(f"models[{i}].parameters must be a mapping")
        mpath = _resolve_path(entry["model"], ydir, f"models[{i}].model")
        if base is not None and mpath.resolve() == base.resolve():
            continue  # mergekit lists the base among the models; it is the base here
        models.append((mpath, dict(params)))
    params = doc.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise InvalidRecipe("parameters must be a mapping")
    out_dtype = doc.get("out_dtype") or doc.get("dtype")
    return {
        "strategy": doc.get("merge_method"),
        "version": doc.get("version"),
        "base": base,
        "models": models,
        "params": dict(params),
        "out_dtype": _dtype(out_dtype, "dtype/out_dtype") if out_dtype else None,
    }


class _ProgressBar:
    """A one-line progress bar on stderr (only used when stderr is a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        frac = done / total if total else 1.0
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        rate = done / max(now - self.start, 1e-9) / 1e6
        sys.stderr.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% {rate:7.1f} MB/s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _source_metadata(source: Any) -> dict[str, Any]:
    from ..identity import read_contribution_metadata

    meta = read_contribution_metadata(source)
    return dict(meta) if meta else {}


#: the GIL switch interval while merging (Python's default is 5 ms). The merge workers and the
#: writer run short Python steps between long GIL-free kernels. Measured on the bench model
#: (the CLI, alternating 5 ms and 0.2 ms, 3 pairs): model_stock 5.1-6.2 s -> 4.7-5.4 s, every
#: pair faster; ties and linear unchanged within the noise (in-process, ties' merge phase
#: 4.2 -> 3.7-3.9 s); della unchanged. Set for the command only: it is process-wide state.
_SWITCH_INTERVAL = 0.0002


def run(args: argparse.Namespace) -> int:
    strategy = args.strategy
    version = args.version
    base_path = Path(args.base) if args.base else None
    params: dict[str, Any] = {}
    out_dtype = _dtype(args.out_dtype, "--out-dtype") if args.out_dtype else None
    models: list[tuple[Path, dict[str, Any] | None]] = []
    if args.recipe:
        y = load_yaml_recipe(args.recipe)
        strategy = strategy or y["strategy"]
        if version is None and y["version"] is not None:
            version = int(y["version"])
        base_path = base_path or y["base"]
        params.update(y["params"])
        out_dtype = out_dtype or y["out_dtype"]
        models.extend((p, mp) for p, mp in y["models"])
    models.extend((Path(p), None) for p in args.inputs)
    for text in args.param:
        k, v = parse_param(text)
        params[k] = v
    if not strategy:
        raise InvalidRecipe("no strategy: give --strategy NAME or a recipe with merge_method")
    if not models:
        raise InvalidInput("no inputs: give INPUT paths or a recipe with models")
    max_shard = parse_size(args.max_shard_size) if args.max_shard_size else None
    paths = [*(m for m, _ in models), *([base_path] if base_path else [])]
    for p in paths:
        if not p.exists():
            raise InvalidInput(f"input {str(p)!r} does not exist")
    # hash the inputs on the idle core while torch loads (the imports below need it)
    from .._prehash import start

    start(paths)
    from ..engine import Contribution, hash_source, merge
    from ..recipe import Recipe
    from ..strategies import get_strategy
    from ..tensors import open_tensors

    spec = get_strategy(strategy, version)
    # check the recipe before hashing anything (the base root is not known yet)
    placeholder = b"\0" * 32 if base_path else None
    Recipe(spec.name, spec.version, params, placeholder, out_dtype).validated()
    base = open_tensors(base_path) if base_path else None
    base_root = hash_source(base, _source_metadata(base)).root if base is not None else None
    recipe = Recipe(spec.name, spec.version, params, base_root, out_dtype)

    contributions = []
    for mpath, mparams in models:
        source = open_tensors(mpath)
        meta = _source_metadata(source)
        if mparams:
            meta = {**meta, "params": {**(meta.get("params") or {}), **mparams}}
        root = hash_source(source, meta).root
        contributions.append(Contribution(root=root, source=source, metadata=meta))

    progress = _ProgressBar("merging") if sys.stderr.isatty() else None
    out = Path(args.out)
    t0 = time.monotonic()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(_SWITCH_INTERVAL)
    try:
        result = merge(
            recipe,
            contributions,
            base=base,
            out=out,
            max_shard_bytes=max_shard,
            threads=args.threads,
            progress=progress,
        )
    finally:
        sys.setswitchinterval(interval)
    elapsed = time.monotonic() - t0
    if out.is_dir():
        ref = base_path if base_path is not None else models[0][0]
        if ref.is_dir():
            for fname in _TAG_ALONG:
                if (ref / fname).is_file() and not (out / fname).exists():
                    shutil.copyfile(ref / fname, out / fname)
    root_hex = result.root.hex()
    if args.json:
        print(
            json.dumps(
                {
                    "root": root_hex,
                    "strategy": spec.name,
                    "version": spec.version,
                    "inputs": sorted(c.root.hex() for c in contributions),
                    "base": base_root.hex() if base_root else None,
                    "files": [str(f) for f in result.files],
                    "seconds": round(elapsed, 3),
                }
            )
        )
    else:
        print(root_hex)
    return 0
