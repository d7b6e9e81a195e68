"""Layer 2: the deterministic, streaming merge of (recipe, base, live contributions).

:func:`merge` is a pure function of its inputs' *content*: the contributions are sorted by root
(their order, the thread count, the schedule and the file layout never change a byte), the seed
is ``derive_seed(set_root(roots), recipe.hash())`` and every tensor draws its randomness from
``CounterRNG(tensor_key(seed, name))`` with the contribution roots as streams. The output is a
canonical object whose root (the merged model hash) is returned with its manifest.

How it runs:

1. :func:`~crdtmerge.plan.make_plan` validates everything before a tensor is computed
   (recipe, base, counts, names, shapes, dtypes, per-model parameters, non-float tensors).
2. Global strategies (``spec.observe``/``spec.reduce``) get a streaming pre-pass over every
   float tensor; ``reduce`` sees the summaries in sorted name order.
3. The merge pass takes one tensor name at a time: inputs are read lazily, upcast to the
   compute dtype, checked for NaN/Inf, merged, cast once to the output dtype, and written in
   sorted name order through the streaming writer while being hashed.

Independent tensors run concurrently on a small thread pool; a byte budget keeps the working
set at about one largest tensor's worth (the largest tensors run alone, with torch's intra-op
threads), and results are written strictly in name order from a bounded reorder window, so
scheduling never shows in the output. Peak memory is O(contributions x largest tensor).

Output goes to a temporary sibling of ``out`` and is renamed into place only when complete;
on any error nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

# Large CPU tensors on transparent huge pages: torch reads this once, at its first CPU
# allocation, and then madvises big buffers MADV_HUGEPAGE. Every merge allocates and frees
# tensor-sized buffers; with 4 KiB pages the kernel's page faults are a large share of the merge
# time on small VMs (measured here: ~50x fewer faults, ~30-40% less system time). Best effort:
# no effect if torch already allocated before this import; THP_MEM_ALLOC_ENABLE=0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

from . import _prehash
from .errors import InvalidInput, InvalidRecipe
from .identity import Manifest, TensorEntry, TensorHasher, contribution_metadata_header
from .plan import MergePlan, TensorPlan, make_plan
from .recipe import Recipe
from .rng import CounterRNG, tensor_key
from .strategies.base import Stored, TensorTask, check_finite
from .tensors import StreamingWriter, TensorInfo, TensorSource, dtype_code, tensor_bytes

__all__ = ["Contribution", "MergeResult", "hash_source", "merge", "plan_merge"]

#: tensors whose compute-dtype inputs together stay under this many bytes may overlap.
_MIN_BUDGET_BYTES = 128 << 20
#: elementwise strategies (no reduction over the tensor, no randomness) whose large tensors are
#: merged in row blocks of about this many elements: same bits, a fraction of the memory.
#: A strategy spec can opt in with a truthy ``elementwise`` attribute.
_ELEMENTWISE = {("linear", 1), ("task_arithmetic", 1)}
_BLOCK_ELEMENTS = 4 << 20
#: how many finished-but-unwritten tensors may wait in the reorder window.
_WINDOW = 3

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Contribution:
    """One live contribution: its root, a lazy tensor source and its merge-relevant metadata.

    Attributes:
        root: the object's 32-byte root (the caller vouches that ``source`` hashes to it).
        source: a :class:`~crdtmerge.tensors.TensorSource` (file, HF directory, mapping).
        metadata: ``{"params": {name: value}}`` (model-scope strategy parameters), as recorded
            in the object's merge-relevant metadata.
    """

    root: bytes
    source: TensorSource
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeResult:
    """The merged object: its root (the merged model hash), manifest and written files."""

    root: bytes
    manifest: Manifest
    files: list[Path]


def plan_merge(
    recipe: Recipe, contributions: Sequence[Contribution], *, base: TensorSource | None = None
) -> MergePlan:
    """Validate a merge without computing it (what :func:`merge` does first)."""
    return make_plan(recipe, contributions, base)


def merge(
    recipe: Recipe,
    contributions: Sequence[Contribution],
    *,
    base: TensorSource | None = None,
    out: str | os.PathLike[str],
    max_shard_bytes: int | None = None,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> MergeResult:
    """Merge ``contributions`` under ``recipe`` into a canonical object at ``out``.

    Args:
        recipe: the merge recipe (its hash seeds the randomness; it is recorded in the output).
        contributions: the live set, in any order (sorted by root here; a repeated root counts
            once).
        base: the base object's tensors when the recipe names a base.
        out: a ``.safetensors`` file path (one canonical file; ``max_shard_bytes`` must then be
            None) or a directory (Hugging Face layout: ``model.safetensors`` or
            ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``). It must not
            exist yet.
        max_shard_bytes: split a directory output into shards of at most this many bytes.
        threads: CPU threads to use (default: ``torch.get_num_threads()``).
        device: where the arithmetic runs; ``"cpu"`` is the determinism contract.
        progress: called as ``progress(done_bytes, total_bytes)`` after each written tensor.

    Returns:
        MergeResult: ``root == hash_tensors(files).root``.

    Raises:
        UnsupportedStrategy, InvalidRecipe, IncompatibleInputs, InvalidInput: before anything
        is written (NaN/Inf inputs are found while streaming; the partial output is removed).
    """
    plan = make_plan(recipe, contributions, base)
    out_path = Path(out)
    single_file = out_path.suffix == ".safetensors"
    if single_file and max_shard_bytes is not None:
        raise InvalidInput("max_shard_bytes needs a directory output, not a .safetensors file")
    if out_path.exists():
        raise InvalidInput(f"output {str(out_path)!r} already exists")
    dev = torch.device(device)
    runner = _Runner(plan, threads=threads, device=dev)
    stats = runner.prepass() if _needs_prepass(plan) else None

    created = _missing_parents(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # a directory is built under a temporary sibling name and renamed into place when complete;
    # a single file is made atomic by the writer itself (temporary file + rename)
    target = out_path
    if not single_file:
        target = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        files, manifest = _write(plan, runner, stats, target, max_shard_bytes, progress)
        if not single_file:
            os.replace(target, out_path)
            files = [out_path / f.relative_to(target) for f in files]
            _fsync_dir(out_path.parent)
        else:
            files = [out_path]
    except BaseException:
        if not single_file:
            shutil.rmtree(target, ignore_errors=True)
        for d in created:  # nothing left behind: not even the directories made for `out`
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return MergeResult(root=manifest.root, manifest=manifest, files=files)


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, deepest first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _needs_prepass(plan: MergePlan) -> bool:
    spec = plan.spec
    if spec.observe is None or spec.reduce is None:
        return False
    needs = getattr(spec, "needs_prepass", None)
    return True if needs is None else bool(needs(dict(plan.global_params)))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_source(source: TensorSource, metadata: Mapping[str, Any]) -> Manifest:
    """The manifest of ``source`` with ``metadata``, reading one tensor at a time.

    Same result as :func:`~crdtmerge.identity.hash_tensors`, but only one tensor's pages are
    mapped at a time (``hash_tensors`` walks the whole memory-mapped file, so a process hashing
    a large checkpoint holds all of it resident until the file is closed). A tensor whose
    leaves :mod:`crdtmerge._prehash` already computed (a CLI command's inputs, hashed while
    torch was loading) takes them from there.
    """
    entries = []
    for info in source.infos():
        where = source.location(info.name) if info.nbytes else None
        leaves = _prehash.lookup(*where, info.nbytes) if where else None
        if leaves is not None:  # hashed while torch was loading (a CLI command's inputs)
            info.check()
            entries.append(TensorEntry(info.name, info.dtype, info.shape, info.nbytes, leaves))
            continue
        hasher = TensorHasher(info)
        hasher.update(tensor_bytes(source.tensor(info.name)))
        entries.append(hasher.finish())
    return Manifest.build(entries, metadata)


def _write(
    plan: MergePlan,
    runner: _Runner,
    stats: Any,
    target: Path,
    max_shard_bytes: int | None,
    progress: Progress | None,
) -> tuple[list[Path], Manifest]:
    infos = [
        TensorInfo(t.name, dtype_code(t.out_dtype), t.shape, t.out_nbytes) for t in plan.tensors
    ]
    header = contribution_metadata_header(plan.metadata)
    writer = StreamingWriter(target, infos, header, max_shard_bytes)
    entries = []
    total = plan.total_out_bytes
    done = 0
    try:
        for (tp, tensor), info in zip(runner.merged(stats), infos, strict=True):
            view = tensor_bytes(tensor)
            writer.write(tp.name, view)
            hasher = TensorHasher(info)
            hasher.update(view)
            entries.append(hasher.finish())
            del view, tensor
            done += tp.out_nbytes
            if progress is not None:
                progress(done, total)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    return [Path(f) for f in files], Manifest.build(entries, plan.metadata)


class _Runner:
    """Computes tensors concurrently and hands them back in plan (sorted name) order."""

    def __init__(self, plan: MergePlan, *, threads: int | None, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.threads = max(1, threads if threads is not None else torch.get_num_threads())
        self.workers = min(2, self.threads)
        n_inputs = len(plan.contributions) + (1 if plan.base is not None else 0)
        self._cost = {
            t.name: min(t.numel, _BLOCK_ELEMENTS if self._blocks(t) else t.numel)
            * n_inputs
            * _itemsize(t.compute_dtype)
            for t in plan.tensors
            if not self._stored(t)
        }
        # a tensor merged from its stored inputs holds only its result (plus cache-sized
        # chunks): two of the largest may run at once, each on one core
        stored = {t.name: 2 * t.numel * _itemsize(t.compute_dtype) for t in plan.tensors}
        stored = {k: v for k, v in stored.items() if k not in self._cost}
        self.budget = max([_MIN_BUDGET_BYTES, *self._cost.values(), *stored.values()])
        self._cost.update({k: v // 2 for k, v in stored.items()})
        self.roots = tuple(plan.roots)

    # -- scheduling ---------------------------------------------------------------------------

    def _ordered(
        self, items: Sequence[TensorPlan], fn: Callable[[TensorPlan], Any]
    ) -> Iterator[tuple[TensorPlan, Any]]:
        """Run ``fn`` over ``items`` concurrently; yield results in ``items`` order."""
        if self.workers == 1:
            with _torch_threads(self.threads):
                for tp in items:
                    yield tp, fn(tp)
            return
        intra = max(1, self.threads // self.workers)
        pending: deque[tuple[TensorPlan, Future[Any], int]] = deque()
        in_use = 0
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="crdtmerge-merge")
        cancel = threading.Event()
        saved = torch.get_num_threads()

        def job(tp: TensorPlan, alone: bool) -> Any:
            if cancel.is_set():
                return None
            torch.set_num_threads(self.threads if alone else intra)
            return fn(tp)

        try:
            for tp in items:
                cost = self._cost[tp.name]
                while pending and (in_use + cost > self.budget or len(pending) >= _WINDOW):
                    done_tp, fut, c = pending.popleft()
                    in_use -= c
                    yield done_tp, fut.result()
                alone = cost * 2 > self.budget
                pending.append((tp, pool.submit(job, tp, alone), cost))
                in_use += cost
            while pending:
                done_tp, fut, _ = pending.popleft()
                yield done_tp, fut.result()
        finally:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(saved)  # the workers' calls also touch the process default

    # -- per tensor ---------------------------------------------------------------------------

    def _load(
        self,
        source: TensorSource,
        name: str,
        dtype: torch.dtype,
        label: str,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        t = source.tensor(name)
        if rows is not None:
            t = t[rows[0] : rows[1]]  # a view of the mapping: only these rows are read
        t = t.to(device=self.device, dtype=dtype)
        check_finite(t, name, label)
        return t

    def _task(self, tp: TensorPlan, stats: Any, rows: tuple[int, int] | None = None) -> TensorTask:
        plan = self.plan
        base = (
            self._load(plan.base, tp.name, tp.compute_dtype, "the base", rows)
            if plan.base is not None
            else None
        )
        inputs = _LazyInputs(
            [(c.source, _label(c)) for c in plan.contributions],
            lambda src, label: self._load(src, tp.name, tp.compute_dtype, label, rows),
        )
        side = [
            {
                kind: self._load(c.source, side_name, tp.compute_dtype, _label(c))
                for kind, side_name in sides.items()
            }
            for c, sides in zip(plan.contributions, tp.side, strict=True)
        ]
        return TensorTask(
            name=tp.name,
            base=base,
            inputs=inputs,
            params=tp.params,
            model_params=tp.model_params,
            rng=CounterRNG(tensor_key(plan.seed, tp.name)),
            streams=self.roots,
            side=side,
            stats=stats,
            layer=tp.layer,
            num_layers=plan.num_layers,
        )

    def _stored(self, tp: TensorPlan) -> bool:
        """Whether ``tp`` is merged by the strategy's ``merge_stored`` (see :class:`Stored`)."""
        spec = self.plan.spec
        return (
            tp.merged
            and spec.merge_stored is not None
            and (spec.uses_stored is None or bool(spec.uses_stored(tp.params)))
            and (self.plan.base is not None or not spec.needs_base)
            and tp.compute_dtype == torch.float32
            and self.device.type == "cpu"
            and not tp.side_any
        )

    def _stored_task(self, tp: TensorPlan) -> TensorTask:
        plan = self.plan
        # NaN/Inf are found as the strategy reads each chunk (Stored checks every first read)
        base = plan.base.tensor(tp.name).reshape(-1) if plan.base is not None else None
        return TensorTask(
            name=tp.name,
            base=None,
            inputs=(),
            params=tp.params,
            model_params=tp.model_params,
            rng=CounterRNG(tensor_key(plan.seed, tp.name)),
            streams=self.roots,
            layer=tp.layer,
            num_layers=plan.num_layers,
            stored=Stored(
                base,
                tuple(c.source.tensor(tp.name).reshape(-1) for c in plan.contributions),
                tp.shape,
                tp.compute_dtype,
                tp.out_dtype,
                name=tp.name,
                labels=tuple(_label(c) for c in plan.contributions),
            ),
        )

    def _merge_one(self, tp: TensorPlan, stats: Any) -> torch.Tensor:
        if not tp.merged:
            src: TensorSource = (
                self.plan.base if self.plan.base is not None else self.plan.contributions[0].source
            )
            return src.tensor(tp.name)
        if self._stored(tp):
            assert self.plan.spec.merge_stored is not None
            return self._checked(self.plan.spec.merge_stored(self._stored_task(tp)), tp.shape, tp)
        blocks = self._blocks(tp)
        if blocks is None:
            return self._checked(self.plan.spec.merge(self._task(tp, stats)), tp.shape, tp)
        # an elementwise strategy on a large tensor: merge it block of rows by block of rows
        # into the output buffer (same bits: every element sees the same operations)
        out = torch.empty(tp.shape, dtype=tp.out_dtype)
        for r0, r1 in blocks:
            part = self.plan.spec.merge(self._task(tp, stats, (r0, r1)))
            out[r0:r1].copy_(self._checked(part, (r1 - r0, *tp.shape[1:]), tp, cast=False))
        return out

    def _blocks(self, tp: TensorPlan) -> list[tuple[int, int]] | None:
        """Row blocks for an elementwise strategy on a tensor above the block size."""
        spec = self.plan.spec
        elementwise = getattr(spec, "elementwise", False) or (
            (spec.name, spec.version) in _ELEMENTWISE
        )
        if not elementwise or tp.numel <= _BLOCK_ELEMENTS or not tp.shape or tp.side_any:
            return None
        rows = tp.shape[0]
        per_row = max(1, tp.numel // max(rows, 1))
        step = max(1, _BLOCK_ELEMENTS // per_row)
        return [(r, min(rows, r + step)) for r in range(0, rows, step)]

    def _checked(
        self, out: Any, shape: tuple[int, ...], tp: TensorPlan, *, cast: bool = True
    ) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidRecipe(
                f"strategy {self.plan.spec.name!r} returned {got} for tensor {tp.name!r}, "
                f"expected shape {list(shape)}"
            )
        if not cast:
            return out.to(device="cpu")
        return out.to(device="cpu", dtype=tp.out_dtype).contiguous()

    def merged(self, stats: Any) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
        return self._ordered(self.plan.tensors, lambda tp: self._merge_one(tp, stats))

    def prepass(self) -> Any:
        spec = self.plan.spec
        observe, reduce = spec.observe, spec.reduce
        assert observe is not None and reduce is not None
        floats = [t for t in self.plan.tensors if t.merged]
        summaries = [s for _, s in self._ordered(floats, lambda tp: observe(self._task(tp, None)))]
        return reduce(summaries, dict(self.plan.global_params))


class _LazyInputs(Sequence[torch.Tensor]):
    """The contributions' tensors for one name, loaded (and upcast) on access.

    A strategy that walks the inputs one at a time (a running sum, ``task.deltas()``) then
    holds one upcast input at a time instead of all of them. An input still referenced by the
    strategy is handed back without a reload (weak cache); otherwise it is read again from the
    memory-mapped source, which gives the same values.
    """

    def __init__(
        self,
        items: list[tuple[TensorSource, str]],
        load: Callable[[TensorSource, str], torch.Tensor],
        indices: range | None = None,
    ) -> None:
        self._items = items
        self._load = load
        self._indices = range(len(items)) if indices is None else indices
        self._cache: dict[int, weakref.ref[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._indices)

    def _get(self, i: int) -> torch.Tensor:
        ref = self._cache.get(i)
        t = ref() if ref is not None else None
        if t is None:
            t = self._load(*self._items[i])
            self._cache[i] = weakref.ref(t)
        return t

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> _LazyInputs: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | _LazyInputs:
        if isinstance(index, slice):
            view = _LazyInputs(self._items, self._load, self._indices[index])
            view._cache = self._cache
            return view
        return self._get(self._indices[index])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in self._indices:
            yield self._get(i)


class _torch_threads:
    """Context manager: set torch's intra-op thread count, restore it after."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.saved = 0

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


def _label(c: Contribution) -> str:
    """How errors name a contribution."""
    return f"contribution {c.root.hex()[:16]}"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
