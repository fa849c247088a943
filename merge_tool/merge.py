"""The merge: base + N experts -> one channel-merged checkpoint (DESIGN §2, format v1 §3; under
a memory budget, format v2: a row table, with the rows per channel from `merge_tool.budget`).

Plan, execute, report. `merge_tool.plan.build_plan` decides every tensor's job and every
output byte before anything is written (`plan_merge` validates and stops there: `channelmerge
merge --dry-run`). Execution streams: one tensor of the base and of every expert is in memory
at a time, and a channel tensor's output rows go block by block through small steps (load
the rows with their norm folded -> cluster -> sparsify -> combine -> round -> measure ->
write) straight into the planned safetensors shard. The report and the model card are built
from the plan and the measurements. Everything is written into a temporary folder beside the
target and renamed at the end, so a failed or interrupted merge leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm import tqdm

from merge_tool import budget as budgetmod, calibration as calib, clustering, fold as foldmod, methods
from merge_tool.config import ConfigError, MergeConfig, dump_config
from merge_tool.io import (InputError, ModelReader, StreamingShardWriter, check_compatible,
                           check_not_overlapping, check_replaceable, copy_tokenizer_files, lock_path,
                           merged_output_problem, staged_dir)
from merge_tool.plan import (Job, MergePlan, budget_available, build_plan, format_allocation, layer_of,
                             requested_budget, row_cost)
from vllm_channelmerge import format as fmt, rowtable

log = logging.getLogger(__name__)

_BLOCK_ELEMS = 1 << 22  # per expert per block: bounds the float32 temporaries

Measured = dict[str, dict[str, Any]]  # output tensor -> its entry in the report (report.json "tensors")
Step = Callable[[Job, StreamingShardWriter, Measured], None]


# -- entry points ------------------------------------------------------------------------------


def plan_merge(config: MergeConfig, out_dir: str | Path, force: bool = False, device: str = "cpu",
               progress: bool = False) -> MergePlan:
    """The plan of `run_merge(config, out_dir, force, device)`, validated as the merge validates
    before it writes (config, inputs, output path, device). Writes nothing: no output, temporary
    or lock file, not even the output's parent folder. Under a budget it reads every channel
    tensor once to allocate the rows (`allocate_rows`), as the merge does."""
    given, out = _check_output(config, out_dir, force)
    _check_parent_writable(out)
    dev = _check_device(device)
    base, experts = _open_inputs(config)
    try:
        plan = build_plan(config, base, experts, given)
        allocate_rows(plan, base, experts, dev, progress)
        return plan
    finally:
        _close(base, experts)


def run_merge(config: MergeConfig, out_dir: str | Path, force: bool = False, device: str = "cpu",
              progress: bool = True, threads: Optional[int] = 1,
              on_plan: Optional[Callable[[MergePlan], None]] = None) -> Path:
    """Merge `config.experts` into a channel-merged checkpoint at `out_dir`; returns its path.

    Refuses to overwrite an existing `out_dir` unless `force`. On any error nothing is left.
    `device="cuda"` runs the math on the GPU (same results within float tolerance).
    `threads`: torch intra-op threads during the merge (None: leave torch's setting). The
    work is memory-bound; on a shared 2-core machine 2 threads were 3.5x slower than 1.
    `on_plan`: called with the final plan (the row allocation under a budget) before writing.
    """
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    try:
        return _run_merge(config, out_dir, force, device, progress, on_plan)
    finally:
        torch.set_num_threads(saved_threads)


def _run_merge(config: MergeConfig, out_dir: str | Path, force: bool, device: str, progress: bool,
               on_plan: Optional[Callable[[MergePlan], None]]) -> Path:
    t0 = time.perf_counter()
    given, out = _check_output(config, out_dir, force)
    dev = _check_device(device)
    base, experts = _open_inputs(config)
    try:
        plan = build_plan(config, base, experts, given)
        allocate_rows(plan, base, experts, dev, progress)
        if on_plan is not None:
            on_plan(plan)
        with staged_dir(out, force=force, own=merged_output_problem) as tmp:
            measured = _write_tensors(tmp, plan, base, experts, dev, progress)
            _write_metadata(tmp, plan, experts, measured, time.perf_counter() - t0)
    finally:
        _close(base, experts)
    log.info("wrote %s in %.1fs", out, time.perf_counter() - t0)
    return given


# -- checks before anything is written ---------------------------------------------------------


def _check_output(config: MergeConfig, out_dir: str | Path, force: bool) -> tuple[Path, Path]:
    """(the output as given, made absolute; its real path) after refusing an output that is or
    holds an input, or exists without `force`, or is not channelmerge's own output with it."""
    given = Path(out_dir).expanduser().absolute()
    # Inputs are compared resolved (symlinks, `..`, bind mounts): `a/../base` is the base.
    inputs = [("the input model", Path(src).expanduser().absolute())
              for src in [config.base_model, *(e.model for e in config.experts)]]
    if config.router is not None:
        inputs.append(("the router examples file", Path(config.router.examples).expanduser().absolute()))
    check_not_overlapping(given, inputs, ConfigError)
    out = Path(os.path.realpath(given))  # write beside the real folder, never through a symlink
    if os.path.lexists(out):
        if not force:
            raise FileExistsError(f"{given} already exists; pass force=True (--force) to overwrite it")
        check_replaceable(out, merged_output_problem)  # fail before the merge, not after it
    return given, out


def _check_parent_writable(out: Path) -> None:
    """What the merge needs of `out`'s parent: a folder (or one it can create) where it may
    create files. Checked without creating anything (the dry run); the errors are the ones
    the merge would meet (`staged_dir`: mkdir, then the lock file)."""
    missing, existing = None, out.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        missing, existing = existing, existing.parent
    if not existing.is_dir():
        code = errno.EEXIST if missing is None else errno.ENOTDIR
        raise OSError(code, os.strerror(code), str(out.parent))
    if not os.access(existing, os.W_OK | os.X_OK):
        if missing is not None:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(missing))
        raise OSError(errno.EACCES, f"cannot create the lock file {lock_path(out).name} "
                                    f"({os.strerror(errno.EACCES)})", str(out.parent))


def _check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is available")
    return dev


def _open_inputs(cfg: MergeConfig) -> tuple[ModelReader, list[ModelReader]]:
    base = ModelReader(cfg.base_model, "base_model", cfg.allow_pickle_weights)
    experts = [ModelReader(e.model, f"expert {e.name!r}", cfg.allow_pickle_weights) for e in cfg.experts]
    check_compatible(base, dict(zip(cfg.expert_names, experts)))
    return base, experts


def _close(base: ModelReader, experts: list[ModelReader]) -> None:
    for r in [base, *experts]:
        r.close()


# -- the row allocation (merges under a budget, format v2) -------------------------------------


def allocate_rows(plan: MergePlan, base: ModelReader, experts: list[ModelReader], dev: torch.device,
                  progress: bool = False) -> None:
    """Under a budget: measure every channel tensor's error per k, choose each channel's rows
    (`merge_tool.budget`) and set them in the plan (output shapes, shards). No-op without one.
    A budget below one row per channel is refused before anything is read."""
    if not plan.row_table:
        return
    t0 = time.perf_counter()
    available = budget_available(plan)
    cfg = plan.config
    in_bytes = cfg.budget is None
    merger = _Merger(plan, base, experts, dev)
    if cfg.calibration is not None:
        try:
            merger.activations = calib.collect(cfg.base_model, calib.load_texts(cfg.calibration.file),
                                               cfg.calibration.max_tokens,
                                               {j.source for j in plan.jobs if j.splittable}, dev)
        except calib.CalibrationError as e:
            raise ConfigError(f"calibration: {e}") from None
    curves = merger.measure(in_bytes, progress)
    choice = budgetmod.allocate(curves, available, cfg.criterion)
    caps = {j.name: j.k for j in plan.jobs}
    tensors = {cv.name: budgetmod.tensor_rows(cv, choice[cv.name], caps[cv.name]) for cv in curves}
    for j in plan.jobs:
        if j.kind == "channel" and j.name not in tensors:
            tensors[j.name] = budgetmod.TensorRows.single(j.name, j.shape[0], j.k)
    tensors = {j.name: tensors[j.name] for j in plan.jobs if j.kind == "channel"}  # plan order
    plan.set_allocation(budgetmod.Allocation(tensors, cfg.criterion, requested_budget(cfg)))
    assert plan.allocation is not None
    if merger.activations is not None:
        plan.allocation.calibration = {"file": cfg.calibration.file, "texts": merger.activations.texts,
                                       "tokens": merger.activations.tokens}
    log.info("row allocation in %.1fs: %s stored parameters (%.4f of the ensemble), error removed %s",
             time.perf_counter() - t0, f"{plan.stored_params:,}", plan.param_ratio,
             budgetmod.pct(plan.allocation.error_removed))


# -- execution ---------------------------------------------------------------------------------


def _write_tensors(tmp: Path, plan: MergePlan, base: ModelReader, experts: list[ModelReader],
                   dev: torch.device, progress: bool) -> Measured:
    """Every planned output tensor into the shards under `tmp`; returns the measurements."""
    writer = StreamingShardWriter(tmp, plan.outputs, plan.config.shard_bytes,
                                  metadata=fmt.shard_metadata(plan.experts, plan.format_version))
    try:
        measured = _Merger(plan, base, experts, dev).run(writer, progress)
        writer.close()
    finally:
        writer.abort()
    return measured


def _fold_into(dst: torch.Tensor, rows: torch.Tensor, norm: Optional[torch.Tensor]) -> torch.Tensor:
    """dst <- rows (any dtype) in float32, times the norm on the input side: `W · diag(g)`.

    The merge's one way of folding a norm (`fold.fold`'s math, in place: no temporary the
    size of the rows), for the whole-tensor statistics and the row blocks alike.
    """
    dst.copy_(rows)
    if norm is not None:
        dst.mul_(norm.unsqueeze(0))
    return dst


@dataclass
class _Sources:
    """One channel tensor's inputs, `[base, expert_1, ..., expert_N]`: memory-mapped, read block
    by block. NaN/Inf in them is caught from the block statistics (no extra pass)."""

    weights: list[torch.Tensor]
    biases: Optional[list[torch.Tensor]]
    norms: Optional[list[torch.Tensor]]  # float32, folded into the weights' columns

    def norm(self, i: int) -> Optional[torch.Tensor]:
        return self.norms[i] if self.norms else None


@dataclass(frozen=True)
class _Rows:
    """A block of output rows [start, stop)."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class _Measures:
    """Per-expert sums over a channel tensor's blocks (float64): what the report says of it."""

    err: torch.Tensor  # ||stored row looked up - expert row||²
    dnorm: torch.Tensor  # ||expert row - base row||² (the task vector)
    outside: torch.Tensor  # channels where the expert is not in group 0

    @classmethod
    def zeros(cls, n: int) -> "_Measures":
        return cls(*(torch.zeros(n, dtype=torch.float64) for _ in range(3)))

    def add_lookup_error(self, rounded: torch.Tensor, assign: torch.Tensor, w: torch.Tensor,
                         rec: torch.Tensor) -> None:
        """Measure what the runtime will see: the stored (rounded) group rows [K, R, I], looked
        up per expert by `assign` [R, N] into `rec` [R, N, I], against the experts' rows `w`."""
        self.err += _sumsq(_lookup_residual(rounded, assign, w, rec))
        self.outside += (assign != 0).sum(0).double().cpu()

    def finite(self) -> bool:
        return bool(torch.isfinite(self.err).all()) and bool(torch.isfinite(self.dnorm).all())


@dataclass
class _ChannelState:
    """What one channel tensor carries from block to block."""

    job: Job
    src: _Sources
    thresholds: tuple[list[float], list[float]]  # the sparsifier's statistics: weight, bias
    measures: _Measures
    bias_out: Optional[torch.Tensor]  # [K, out] ([R] in format v2), written after the weight
    index_out: torch.Tensor  # [N, out] int32, written after the bias
    table: Optional["_RowTable"] = None  # format v2: where each channel's rows go


@dataclass
class _RowTable:
    """Format v2, one channel tensor: each channel's k (its partition) and rows, and where its
    extra rows start (rows `out..R-1`, ordered by channel, then by group)."""

    k: torch.Tensor  # [out] int64
    rows: torch.Tensor  # [out] int64
    extra_start: torch.Tensor  # [out + 1] int64: channel c's extra rows are rows out + [s[c], s[c+1])
    partition: Optional[torch.Tensor] = None  # [out, N] int8: the measuring pass's partitions

    @classmethod
    def of(cls, job: Job) -> "_RowTable":
        out = job.shape[0]
        alloc = job.alloc or budgetmod.TensorRows.single(job.name, out)
        start = torch.zeros(out + 1, dtype=torch.int64)
        torch.cumsum(alloc.rows - 1, 0, out=start[1:])
        return cls(alloc.k, alloc.rows, start, alloc.partition)


class _Merger:
    """Executes a plan's jobs: holds the readers, the norms to fold and the method."""

    def __init__(self, plan: MergePlan, base: ModelReader, experts: list[ModelReader],
                 device: torch.device) -> None:
        self.plan = plan
        self.cfg = plan.config
        self.base = base
        self.experts = experts
        self.names = plan.experts
        self.dev = device
        self.method = methods.get_method(self.cfg.method)
        self.sparsifier = self.method.sparsifier  # None: the method keeps task vectors whole
        self.params = self.cfg.merge_params()
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.norms: dict[str, list[torch.Tensor]] = {}  # norm -> [base, expert...] float32
        self.activations: Optional[calib.Calibration] = None  # an activation* budget criterion's
        for nname in set(plan.fold.targets.values()):
            self.norms[nname] = [r.get(nname).to(device, torch.float32) for r in [base, *experts]]

    def run(self, writer: StreamingShardWriter, progress: bool) -> Measured:
        """Every job in plan order (the writer's order)."""
        steps = self._steps()
        measured: Measured = {}
        with torch.no_grad():
            for job in tqdm(self.plan.jobs, desc="merging", unit="tensor", disable=not progress):
                steps[job.kind](job, writer, measured)
        return measured

    def _steps(self) -> dict[str, Step]:
        """Job kind -> the function that produces it."""
        return {"channel": self.channel, "plain": self.plain, "ones": self.ones,
                "expert_norm": self.expert_norm}

    def _ws(self, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A reusable work buffer: fresh big allocations cost page faults on every tensor."""
        n = math.prod(shape)
        buf = self._bufs.get((key, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=self.dev)
            self._bufs[(key, dtype)] = buf
        return buf[:n].view(shape)

    def _folded(self, t: torch.Tensor, norm: Optional[torch.Tensor]) -> torch.Tensor:
        """A whole input tensor in float32 on the device, its norm folded in (a new tensor)."""
        return _fold_into(torch.empty(t.shape, dtype=torch.float32, device=self.dev), t, norm)

    # -- one channel tensor: the pipeline ---------------------------------------------------

    def channel(self, job: Job, writer: StreamingShardWriter, measured: Measured) -> None:
        """A channel tensor: its output rows block by block through `_merge_block`, then its
        bias and group index (format v2: row index)."""
        n, out_rows = len(self.experts), job.shape[0]
        src = self._sources(job)
        table = _RowTable.of(job) if self.plan.row_table else None
        bias_shape = (job.k, out_rows) if table is None else (job.num_rows,)
        st = _ChannelState(job, src, self._thresholds(job, src), _Measures.zeros(n),
                           torch.empty(bias_shape, dtype=job.dtype) if job.bias else None,
                           torch.empty((n, out_rows), dtype=torch.int32), table)
        writer.begin(job.name)  # the group rows go to the file block by block
        for rows in self._blocks(job):
            self._merge_block(st, rows, writer)
        if not st.measures.finite():
            self._check_finite(job)
        writer.end()
        if st.bias_out is not None:
            writer.write(job.bias, st.bias_out)
        if table is None:
            writer.write(fmt.group_index_name(job.name), st.index_out)
        else:
            rowtable.check_row_index(fmt.row_index_name(job.name), st.index_out, job.num_rows)
            writer.write(fmt.row_index_name(job.name), st.index_out)
        measured[job.name] = self._channel_record(job, st.measures)

    def _sources(self, job: Job) -> _Sources:
        readers = [self.base, *self.experts]
        return _Sources([r.get(job.source, check=False) for r in readers],
                        [r.get(job.bias, check=False) for r in readers] if job.bias else None,
                        self.norms[job.norm] if job.norm else None)

    def _thresholds(self, job: Job, src: _Sources) -> tuple[list[float], list[float]]:
        """The sparsifier's whole-tensor statistics of the weight's and the bias's task vectors
        (none for a tensor stored once: it is copied, not merged)."""
        if job.identical:
            return [], []
        weight = self._stats(src.weights, src.norms)
        return weight, self._stats(src.biases, None) if src.biases else []

    def _stats(self, tensors: list[torch.Tensor], norms: Optional[list[torch.Tensor]]) -> list[float]:
        """Per-expert whole-tensor statistics of the (folded) task vectors of `tensors` ([base,
        expert...]), for a sparsifier that needs them (TIES's magnitude thresholds); [] else."""
        sp = self.sparsifier
        if sp is None or not sp.needs_stats:
            return []
        base = self._folded(tensors[0], norms[0] if norms else None)
        dens = self.params.density_list(len(tensors) - 1)
        return [sp.stat(self._folded(t, norms[i] if norms else None).sub_(base), dens[i - 1])
                for i, t in enumerate(tensors) if i > 0]

    def _blocks(self, job: Job) -> Iterator[_Rows]:
        """Output rows in blocks that bound the float32 temporaries (results do not depend on it)."""
        out_rows, in_dim = job.shape
        step = max(1, min(self.cfg.block_rows, _BLOCK_ELEMS // max(1, in_dim)))
        for r0 in range(0, out_rows, step):
            yield _Rows(r0, min(out_rows, r0 + step))

    def _merge_block(self, st: _ChannelState, rows: _Rows, writer: StreamingShardWriter) -> None:
        """One block of output rows through every step: load (norms folded) -> task vectors ->
        cluster -> sparsify -> combine -> round to the stored dtype -> measure -> write."""
        job = st.job
        base_rows, w = self._load_rows(st.src, rows, job)
        d = torch.sub(w, base_rows.unsqueeze(1), out=self._ws("d", tuple(w.shape)))
        if st.table is None:
            assign, k = self._cluster(job, d, st.measures), job.k
        else:
            assign = self._cluster_rows(job, d, st.table, rows, st.measures)
            k = int(st.table.k[rows.start:rows.stop].max())
        ds = self._sparsify_block(job, d, st.thresholds, rows)
        g = self._combine(ds, base_rows, w, assign, k, out=self._ws("g", (k, *base_rows.shape)))
        if job.identical:
            g[0].copy_(w[:, 0])  # not base + mean(delta): that rounds
        stored, rounded = self._round(g, job.dtype)
        st.measures.add_lookup_error(rounded, assign, w, self._ws("rec", tuple(w.shape)))
        if st.table is None:
            self._write_block(st, rows, stored, assign, writer)
        else:
            self._write_rows(st, rows, stored, assign, writer)

    def _load_rows(self, src: _Sources, rows: _Rows, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's base rows [R, I'] and expert rows [R, N, I'] in float32, norms folded. A
        channel is its row plus its bias element: the bias is the extra last column (I' = I+1)."""
        in_dim = job.shape[1]
        width = in_dim + (1 if job.bias else 0)
        base_rows = self._ws("base", (rows.size, width))
        w = self._ws("w", (rows.size, len(self.experts), width))  # [R, N, I']
        for i, dst in enumerate([base_rows, *w.unbind(1)]):
            _fold_into(dst[:, :in_dim], src.weights[i][rows.start:rows.stop], src.norm(i))
            if src.biases:
                dst[:, in_dim].copy_(src.biases[i][rows.start:rows.stop])
        return base_rows, w

    def _cluster(self, job: Job, d: torch.Tensor, measures: _Measures) -> torch.Tensor:
        """Each channel's partition of the experts into <= K groups, [R, N] (group 0 the largest);
        adds the task vectors' squared norms to `measures` (from the Gram diagonal if computed)."""
        # K=1 or K=N: the partition does not depend on the Gram matrix
        return self._partition(self._gram(d, 1 < job.k < d.shape[1], measures), job.k)

    def _gram(self, d: torch.Tensor, needed: bool, measures: Optional[_Measures] = None) -> torch.Tensor:
        """The block's Gram matrices [R, N, N] (zeros when no partition needs them), adding the
        task vectors' squared norms to `measures` as `_cluster` does."""
        rr, n = d.shape[0], d.shape[1]
        if needed:
            gram = clustering.row_gram(d)
            if measures is not None:
                measures.dnorm += torch.diagonal(gram, dim1=1, dim2=2).sum(0).double().cpu()
            return gram
        if measures is not None:
            measures.dnorm += _sumsq(d)
        return torch.zeros(rr, n, n, device=self.dev)

    def _partition(self, gram: torch.Tensor, k: int) -> torch.Tensor:
        """Each channel's best partition into <= k groups [R, N] (the v1 merge's, for the same
        block): the one function both the measuring and the writing pass call."""
        return clustering.partition_from_gram(gram, k, self.cfg.similarity, self.cfg.kmeans_threshold)

    def _cluster_rows(self, job: Job, d: torch.Tensor, table: _RowTable, rows: _Rows,
                      measures: _Measures) -> torch.Tensor:
        """Format v2: each channel's partition for its own k [R, N] (labels 0..rows-1, group 0
        the largest): the measuring pass's, else computed again and checked against the rows
        the plan allocated."""
        n = d.shape[1]
        if table.partition is not None:
            measures.dnorm += _sumsq(d)  # what `_gram` adds
            return table.partition[rows.start:rows.stop].to(self.dev, torch.int64)
        ks = table.k[rows.start:rows.stop].to(self.dev)
        kvals = sorted(set(ks.unique().tolist()))
        gram = self._gram(d, any(1 < k < n for k in kvals), measures)
        assign = torch.zeros(d.shape[0], n, dtype=torch.int64, device=self.dev)
        for k in kvals:
            sel = ks == k
            assign[sel] = self._partition(gram, k)[sel]
        used = assign.max(1).values.cpu() + 1
        if not torch.equal(used, table.rows[rows.start:rows.stop]):
            raise RuntimeError(f"{job.name}: channels {rows.start}..{rows.stop - 1} partition into other "
                               "group counts than measured when the rows were allocated (nondeterministic "
                               "clustering?)")
        return assign

    # -- format v2: the measuring pass of a merge under a budget ----------------------------------

    def measure(self, in_bytes: bool, progress: bool) -> list[budgetmod.Curve]:
        """Every channel tensor that may get more than one row per channel: its error per k."""
        jobs = [j for j in self.plan.jobs if j.splittable]
        with torch.no_grad():
            return [self._curve(j, in_bytes) for j in tqdm(jobs, desc="measuring", unit="tensor",
                                                            disable=not progress)]

    def _curve(self, job: Job, in_bytes: bool) -> budgetmod.Curve:
        """The criterion's error of each channel's best k-group partition, k = 1..K, and the
        groups it uses, block by block as the write pass reads them."""
        out_rows, n = job.shape[0], len(self.experts)
        src = self._sources(job)
        measure = budgetmod.measure_of(self.cfg.criterion)
        by_method = measure != "weight"
        inputs, counts = self._activations(job) if measure == "activation" else (None, None)
        thresholds = self._thresholds(job, src) if by_method else ([], [])
        error = torch.empty(out_rows, job.k, dtype=torch.float64)
        groups = torch.empty(out_rows, job.k, dtype=torch.int64)
        parts = torch.empty(out_rows, job.k, n, dtype=torch.int8)
        for rows in self._blocks(job):
            base_rows, w = self._load_rows(src, rows, job)
            d = torch.sub(w, base_rows.unsqueeze(1), out=self._ws("d", tuple(w.shape)))
            gram = self._gram(d, True)
            ds = self._sparsify_block(job, d, thresholds, rows) if by_method else d
            d2 = None if by_method else clustering.sq_distances(gram, "euclidean")
            for k in range(1, job.k + 1):
                assign = self._partition(gram, k)
                groups[rows.start:rows.stop, k - 1] = assign.max(1).values.cpu() + 1
                parts[rows.start:rows.stop, k - 1] = assign.cpu()
                if by_method:
                    g = self._combine(ds, base_rows, w, assign, k, out=self._ws("g", (k, *base_rows.shape)))
                    r = _lookup_residual(g, assign, w, self._ws("rec", tuple(w.shape)))
                    if measure == "activation":
                        e = calib.output_error(r, inputs, None if counts is None else counts[rows.start:rows.stop])
                    else:
                        e = _sumsq_rows(r)
                elif k >= n:
                    e = torch.zeros(rows.size, dtype=torch.float64)
                else:  # within-group sum of squares = the in-group average's error
                    e = clustering.partition_cost(d2, assign).cpu()
                error[rows.start:rows.stop, k - 1] = e.cpu()
        if not bool(torch.isfinite(error).all()):
            self._check_finite(job)
        return budgetmod.Curve(job.name, error, groups, row_cost(job, in_bytes), parts)

    def _activations(self, job: Job) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The calibration inputs F [M, I'] (a folded norm's base weight divided out: the stored
        rows see the unscaled normalized input) and token counts [out] of a channel tensor."""
        if self.activations is None or job.source not in self.activations.tensors:
            raise RuntimeError(f"{job.source}: no calibration activations for the activation criterion")
        acts = self.activations.tensors[job.source]
        inputs, counts = acts.inputs, acts.counts
        if inputs is not None:
            width = job.shape[1] + (1 if job.bias else 0)
            if inputs.shape[1] != width:
                raise ConfigError(f"calibration: {job.source}: the base model's layer reads {inputs.shape[1]} "
                                  f"input features, the checkpoint's tensor has {width} columns")
            inputs = inputs.to(self.dev)
            if job.norm:
                g = self.norms[job.norm][0]
                if not bool((g != 0).all()):
                    raise ConfigError(f"calibration: {job.norm} of the base model has zero entries, so the "
                                      f"activation criterion cannot recover {job.source}'s input before it")
                inputs = torch.cat([inputs[:, :job.shape[1]] / g, inputs[:, job.shape[1]:]], 1)
        if counts is not None:
            counts = counts.to(self.dev)
            if counts.shape[0] != job.shape[0]:
                raise ConfigError(f"calibration: {job.source}: the base model's embedding has {counts.shape[0]} "
                                  f"tokens, the checkpoint's tensor {job.shape[0]} rows")
        return inputs, counts

    def _sparsify_block(self, job: Job, d: torch.Tensor, thresholds: tuple[list[float], list[float]],
                        rows: _Rows) -> torch.Tensor:
        """The method's whole-tensor sparsification of the block's weight and bias columns."""
        if self.sparsifier is None or job.identical:
            return d
        in_dim = job.shape[1]
        ds = self._sparsify(d[:, :, :in_dim], job.name, thresholds[0], rows.start * in_dim, in_dim)
        if job.bias:
            ds = torch.cat([ds, self._sparsify(d[:, :, in_dim:], job.bias, thresholds[1], rows.start, 1)], 2)
        return ds

    def _sparsify(self, d: torch.Tensor, key_name: str, stats: list[float], flat0: int,
                  row_len: int) -> torch.Tensor:
        """The method's whole-tensor sparsification of a block [R, N, I] of `key_name`."""
        if self.sparsifier is None:
            return d
        return self.sparsifier.apply(d, methods.Block(key_name, flat0, row_len), stats, self.params)

    def _round(self, g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(the group rows in the stored dtype, the same rounded values in float32, in `g`)."""
        if dtype == torch.float32:
            return g, g
        stored = self._ws("gc", tuple(g.shape), dtype)
        stored.copy_(g)
        return stored, g.copy_(stored)

    def _write_block(self, st: _ChannelState, rows: _Rows, stored: torch.Tensor, assign: torch.Tensor,
                     writer: StreamingShardWriter) -> None:
        """The group rows into the open weight at their offsets (layout [K, out, in]); the bias
        and group-index columns into the tensors written after it."""
        out_rows, in_dim = st.job.shape
        for gi in range(st.job.k):
            writer.write_at((gi * out_rows + rows.start) * in_dim * stored.element_size(), stored[gi, :, :in_dim])
        if st.bias_out is not None:
            st.bias_out[:, rows.start:rows.stop] = stored[:, :, in_dim].cpu()
        st.index_out[:, rows.start:rows.stop] = assign.t().to(torch.int32).cpu()

    def _write_rows(self, st: _ChannelState, rows: _Rows, stored: torch.Tensor, assign: torch.Tensor,
                    writer: StreamingShardWriter) -> None:
        """Format v2: the primary rows (group 0) at rows `start..stop-1`, the block's extra rows
        (groups 1.., by channel then group) at their place after the `out` primary rows; bias
        and row index entries into the tensors written after it."""
        table = st.table
        assert table is not None
        out_rows, in_dim = st.job.shape
        elem = stored.element_size()
        writer.write_at(rows.start * in_dim * elem, stored[0, :, :in_dim])
        n_extra = (table.rows[rows.start:rows.stop] - 1).to(self.dev)
        first = int(table.extra_start[rows.start])
        chan = torch.repeat_interleave(torch.arange(rows.size, device=self.dev), n_extra)
        # group of each extra row: 1..rows-1 within its channel
        offs = torch.cumsum(n_extra, 0) - n_extra
        grp = torch.arange(chan.numel(), device=self.dev) - offs[chan] + 1
        extra = stored.view(-1, stored.shape[2]).index_select(0, grp * rows.size + chan)  # [E, I']
        if extra.shape[0]:
            writer.write_at((out_rows + first) * in_dim * elem, extra[:, :in_dim])
        if st.bias_out is not None:
            st.bias_out[rows.start:rows.stop] = stored[0, :, in_dim].cpu()
            st.bias_out[out_rows + first:out_rows + first + extra.shape[0]] = extra[:, in_dim].cpu()
        own = torch.arange(rows.start, rows.stop, device=self.dev).unsqueeze(1)
        start = (table.extra_start[rows.start:rows.stop].to(self.dev) + out_rows).unsqueeze(1)
        idx = torch.where(assign == 0, own, start + assign - 1)  # [R, N]
        st.index_out[:, rows.start:rows.stop] = idx.t().to(torch.int32).cpu()

    def _check_finite(self, job: Job) -> None:
        """Slow path, only when a block's statistics were not finite: name the culprit."""
        for r in [self.base, *self.experts]:
            for name in filter(None, (job.source, job.bias)):
                t = r.get(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise InputError(f"{r.file_of(name)}: tensor {name!r} contains {bad} NaN/Inf value(s)")

    def _channel_record(self, job: Job, m: _Measures) -> dict[str, Any]:
        out_rows, in_dim = job.shape
        rec = {
            "kind": "channel", "shape": [out_rows, in_dim], "num_groups": job.k,
            "bias": job.bias is not None, "folded_norm": job.norm, "source": job.source,
            "identical_across_experts": job.identical,
            "channel_merged": job.selected,
            "rel_error": dict(zip(self.names, _rel(m.err, m.dnorm))),
            "outside_group0": dict(zip(self.names, (m.outside / out_rows).tolist())),
        }
        if self.plan.row_table:
            alloc = job.alloc or budgetmod.TensorRows.single(job.name, out_rows, job.k)
            rec.update(rows=job.num_rows, extra_rows=job.num_rows - out_rows,
                       rows_per_channel=alloc.histogram(),
                       error_removed=budgetmod.removed_share([alloc]))
        return rec

    # -- combining the members of each group ---------------------------------------------

    def _combine(self, ds: torch.Tensor, base_rows: torch.Tensor, w: torch.Tensor, assign: torch.Tensor,
                 k: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Group rows [K, R, I]: base + merged delta; one-member groups keep their expert exactly.

        ds, w: [R, N, I]; base_rows: [R, I]; assign: [R, N].
        """
        r, width = base_rows.shape
        onehot = torch.nn.functional.one_hot(assign, k)  # [R, N, K]
        g = out if out is not None else torch.empty((k, r, width), dtype=torch.float32, device=self.dev)
        if self.method.linear:
            coef = self.method.coefficients(onehot.transpose(1, 2).to(ds.dtype), self.params)  # [R, K, N]
            for gi in range(k):
                torch.bmm(coef[:, gi:gi + 1, :], ds, out=g[gi].unsqueeze(1))
                g[gi] += base_rows
        else:
            dt = ds.transpose(0, 1).contiguous()  # [N, R, I] for the reference combine functions
            for gi in range(k):
                torch.add(base_rows, self.method.combine(dt, assign == gi, self.params), out=g[gi])
        _fix_small_groups(g, w, assign, onehot.sum(1))
        return g

    # -- other tensors ---------------------------------------------------------------------

    def plain(self, job: Job, writer: StreamingShardWriter, measured: Measured) -> None:
        """Not channel-merged: merged across all experts with the method (K=1, no index)."""
        bt = self.base.get(job.source)
        ets = [r.get(job.source) for r in self.experts]
        if not bt.is_floating_point():
            writer.write(job.name, bt)
            measured[job.name] = {"kind": "copied", "shape": list(bt.shape)}
            return
        b = bt.to(self.dev, torch.float32).reshape(1, -1)
        w = torch.stack([e.to(self.dev, torch.float32).reshape(-1) for e in ets]).unsqueeze(0)  # [1, N, I]
        d = w - b.unsqueeze(1)
        ds = self._sparsify(d, job.name, self._stats([bt, *ets], None), 0, d.shape[2])
        assign = torch.zeros((1, len(ets)), dtype=torch.int64, device=self.dev)
        stored = self._combine(ds, b, w, assign, 1)[0, 0].to(job.dtype)
        err = ((stored.float().view(1, 1, -1) - w) ** 2).sum((0, 2)).double().cpu()
        dn = (d ** 2).sum((0, 2)).double().cpu()
        writer.write(job.name, stored.reshape(bt.shape).cpu())
        measured[job.name] = {"kind": "merged", "shape": list(bt.shape), "norm": foldmod.is_norm(job.name),
                              "rel_error": dict(zip(self.names, _rel(err, dn)))}

    def ones(self, job: Job, writer: StreamingShardWriter, measured: Measured) -> None:
        """A folded norm: stored as ones (its per-expert values live in the folded weights)."""
        writer.write(job.name, torch.ones(job.shape, dtype=job.dtype))
        measured[job.name] = {"kind": "folded_norm", "shape": list(job.shape)}

    def expert_norm(self, job: Job, writer: StreamingShardWriter, measured: Measured) -> None:
        """The final norm: ones, plus every expert's own weight as `[N, hidden]` (exact)."""
        writer.write(job.name, torch.ones(job.shape, dtype=job.dtype))
        per_expert = torch.stack([r.get(job.source) for r in self.experts]).to(job.dtype)
        writer.write(fmt.expert_norm_name(fmt.module_of(job.name)), per_expert)
        measured[job.name] = {"kind": "expert_norm", "shape": list(job.shape)}


def _fix_small_groups(g: torch.Tensor, w: torch.Tensor, assign: torch.Tensor, sizes: torch.Tensor) -> None:
    """In place on the group rows g [K, R, I]: a group with no member (fewer than K groups in a
    channel; never looked up) copies group 0, a group with one member is that expert's row
    exactly (whatever the method and weight). sizes: [R, K] members per group."""
    empty = sizes == 0
    if bool(empty.any()):
        for gi in range(1, g.shape[0]):
            rows = empty[:, gi]
            g[gi, rows] = g[0, rows]
    single = sizes.gather(1, assign) == 1  # [R, N]
    if bool(single.any()):
        rr, nn = single.nonzero(as_tuple=True)
        g[assign[rr, nn], rr] = w[rr, nn]


def _lookup_residual(g: torch.Tensor, assign: torch.Tensor, w: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Each expert's looked-up row minus its own, g[assign[c, n], c] - w[c, n] -> [R, N, I'] in
    `rec` (one row lookup, then one subtraction: cheaper than a broadcast against group 0 and a
    second lookup for the pairs outside it)."""
    k, rr, width = g.shape
    flat = (assign * rr + torch.arange(rr, device=assign.device).unsqueeze(1)).reshape(-1)
    torch.index_select(g.reshape(k * rr, width), 0, flat, out=rec.view(-1, width))
    return rec.sub_(w)


def _sumsq_rows(x: torch.Tensor) -> torch.Tensor:
    """Per channel sum of squares of [R, N, I] -> [R] float64 (on the CPU)."""
    return torch.linalg.vector_norm(x, dim=2).double().square().sum(1).cpu()


def _sumsq(x: torch.Tensor) -> torch.Tensor:
    """Per-expert sum of squares of [R, N, I] (row norms first: 6x faster than one big norm)."""
    return torch.linalg.vector_norm(x, dim=2).double().square().sum(0).cpu()


def _rel(err: torch.Tensor, ref: torch.Tensor) -> list[float]:
    out = []
    for e, r in zip(err.tolist(), ref.tolist()):
        out.append(0.0 if e == 0 else (math.sqrt(e / r) if r > 0 else float("inf")))
    return out


# -- report, config.json and model card: from the plan and the measurements --------------------


def _write_metadata(tmp: Path, plan: MergePlan, experts: list[ModelReader], measured: Measured,
                    seconds: float) -> None:
    report = _report(plan, measured, seconds)
    (tmp / fmt.SIDECAR_DIR).mkdir(exist_ok=True)
    _write_folded_norms(tmp, plan, experts)
    (tmp / fmt.REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    (tmp / fmt.CONFIG_FILE).write_text(json.dumps(_config_json(plan), indent=2) + "\n")
    copy_tokenizer_files(plan.base_path, tmp)
    (tmp / fmt.MERGE_CONFIG_FILE).write_text(dump_config(plan.config))
    (tmp / fmt.MODEL_CARD_FILE).write_text(_model_card(plan, measured))


def _write_folded_norms(tmp: Path, plan: MergePlan, experts: list[ModelReader]) -> None:
    """Each expert's original folded norms ([N, hidden] per norm), so that extract can unfold."""
    from safetensors.torch import save_file

    norms = {nn: torch.stack([r.get(nn) for r in experts]).contiguous() for nn in plan.fold.folded_norms}
    if norms:
        save_file(norms, str(tmp / fmt.NORMS_FILE), metadata={"format": "pt"})


def _report(plan: MergePlan, measured: Measured, seconds: float) -> dict[str, Any]:
    """report.json: the plan's decisions, its totals and the per-tensor measurements."""
    cfg, fp = plan.config, plan.fold
    report = {
        "format_version": plan.format_version,
        "experts": cfg.expert_names,
        "num_groups": cfg.num_groups,
        "method": cfg.method,
        "parameters": cfg.used_parameters(),
        "similarity": cfg.similarity,
        "architecture": plan.architecture,
        "tie_word_embeddings": plan.tied,
        "folded_norms": list(fp.folded_norms),
        "expert_norms": list(fp.expert_norms),
        "identical_tensors": plan.identical,
        "fold_targets": dict(fp.targets),
        "merged_norms": list(fp.merged_norms),
        "fold_note": fp.reason,
        "params": {"stored": plan.stored_params, "base": plan.base_params, "ensemble": plan.ensemble_params,
                   "ratio": plan.param_ratio},
        "seconds": round(seconds, 3),
        "tensors": measured,
    }
    if plan.allocation is not None:
        alloc = plan.allocation
        report["budget"] = {**alloc.requested, "criterion": alloc.criterion,
                            "achieved_ratio": alloc.stats["achieved_ratio"],
                            "achieved_bytes": alloc.stats["bytes"], "error_removed": alloc.error_removed,
                            "min_ratio": alloc.stats["min_ratio"], "max_ratio": alloc.stats["max_ratio"],
                            "min_bytes": alloc.stats["min_bytes"], "max_bytes": alloc.stats["max_bytes"]}
        if alloc.calibration is not None:
            report["budget"]["calibration"] = alloc.calibration
        report["allocation"] = {"by_kind": budgetmod.summary(alloc, "kind"),
                                "by_layer": budgetmod.summary(alloc, "layer")}
    return report


def _config_json(plan: MergePlan) -> dict[str, Any]:
    """The base's config.json with the plugin's wrapper architecture and quantization_config."""
    cfg, arch = plan.config, plan.architecture
    wrapper = fmt.WRAPPER_ARCHITECTURES.get(arch)
    if wrapper is None:
        wrapper = "ChannelMerged" + arch
        log.warning("architecture %s has no channelmerge runtime wrapper; writing %s anyway", arch, wrapper)
    qc = fmt.ChannelMergedConfig(
        experts=cfg.expert_names, num_groups=cfg.num_groups, method=cfg.method,
        similarity=cfg.similarity, base_architecture=arch,
        folded_norms=[fmt.module_of(n) for n in plan.fold.folded_norms],
        expert_norms=[fmt.module_of(n) for n in plan.fold.expert_norms],
        num_groups_overrides=plan.overrides(), default_expert=cfg.default_expert,
        format_version=plan.format_version)
    qd = qc.to_dict()
    if plan.allocation is None:  # format v1: config.json exactly as before format v2 existed
        qd.pop("extra_rows", None)
        qd.pop("budget", None)
    else:
        alloc = plan.allocation
        qd["extra_rows"] = plan.extra_rows()
        qd["budget"] = {**alloc.requested, "criterion": alloc.criterion,
                        "achieved_ratio": round(alloc.stats["achieved_ratio"], 6)}
    c = dict(plan.base_config)
    c["architectures"] = [wrapper]
    c["quantization_config"] = qd
    if cfg.dtype != "auto":
        for key in ("torch_dtype", "dtype"):
            if key in c or key == "torch_dtype":
                c[key] = cfg.dtype
    return c


def _model_card(plan: MergePlan, measured: Measured) -> str:
    """README.md: what was merged and how (from the plan), and how well (the measurements)."""
    channels = {n: t for n, t in measured.items() if t["kind"] == "channel"}
    return "\n".join(_card_summary(plan) + _card_experts(plan, channels) + _card_allocation(plan)
                     + _card_layers(plan, channels))


def _card_allocation(plan: MergePlan) -> list[str]:
    """Format v2: the memory budget and the rows per channel (the merge's allocation print)."""
    if plan.allocation is None:
        return []
    return ["", "## Rows per channel (memory budget, format v2)", "",
            "Each channel stores 1..K rows; extra rows went where they remove the most error.", "",
            "```", *format_allocation(plan), "```"]


def _card_summary(plan: MergePlan) -> list[str]:
    cfg, fp = plan.config, plan.fold
    return [
        "---", "library_name: vllm", "tags: [channelmerge, merge]", "---", "",
        f"# Channel-merged checkpoint ({len(cfg.experts)} experts)", "",
        "Made with `channelmerge merge` (Channel Merging, Zhang et al., AAAI 2025). Serve it with "
        "`vllm serve` (with the channelmerge plugin installed) or `channelmerge serve`; pick an "
        "expert by its OpenAI model name.", "",
        f"- Base architecture: `{plan.architecture}`",
        f"- Groups per channel (K): {cfg.num_groups}" + (
            f" (per-tensor overrides: {json.dumps(cfg.num_groups_overrides)})" if cfg.num_groups_overrides else ""),
        f"- In-group method: `{cfg.method}` {cfg.used_parameters() or ''}",
        f"- Similarity: {cfg.similarity}",
        f"- Parameters stored: {plan.stored_params:,} = {plan.param_ratio:.3f} of the ensemble "
        f"({plan.ensemble_params:,})" + (_card_budget(plan) if plan.allocation is not None else ""),
        f"- Norms folded into linear layers: {len(fp.folded_norms)}; merged across experts: "
        f"{len(fp.merged_norms)}; kept per expert: {len(fp.expert_norms)}",
        f"- Tensors identical in every expert, stored once: {len(plan.identical)}",
    ]


def _card_budget(plan: MergePlan) -> str:
    alloc = plan.allocation
    assert alloc is not None
    asked = (f"{alloc.requested['params_ratio']}" if "params_ratio" in alloc.requested
             else f"{alloc.requested['bytes']:,} bytes")
    return (f"; memory budget {asked} (criterion `{alloc.criterion}`): 1..K rows per channel, "
            f"format v2, error removed {budgetmod.pct(alloc.error_removed)} of what K rows everywhere remove")


def _card_experts(plan: MergePlan, channels: Measured) -> list[str]:
    lines = ["", "## Experts", "", "| name | source | mean rel. error | channels outside group 0 |",
             "|---|---|---|---|"]
    for e in plan.config.experts:
        errs = [t["rel_error"][e.name] for t in channels.values()]
        out = [t["outside_group0"][e.name] for t in channels.values()]
        me = sum(errs) / len(errs) if errs else 0.0
        mo = sum(out) / len(out) if out else 0.0
        lines.append(f"| `{e.name}` | `{e.model}` | {me:.4f} | {mo:.1%} |")
    return lines


def _card_layers(plan: MergePlan, channels: Measured) -> list[str]:
    names = plan.experts
    lines = ["", "## Per-layer reconstruction error", "",
             "Relative error of each expert's weights, ||stored - expert|| / ||expert - base||, "
             "mean over the layer's channel-merged tensors.", "",
             "| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for layer, errs in _per_layer(channels).items():
        lines.append(f"| {layer} | " + " | ".join(f"{errs[n]:.4f}" for n in names) + " |")
    return lines + ["", "The merge config used is `channelmerge.yaml`; per-tensor numbers are in "
                    f"`{fmt.REPORT_FILE}` (`channelmerge inspect` shows them).", ""]


def _per_layer(channels: Measured) -> dict[str, dict[str, float]]:
    """Layer -> expert -> mean relative error over the layer's channel tensors."""
    acc: dict[str, dict[str, list[float]]] = {}
    for name, t in channels.items():
        for e, v in t["rel_error"].items():
            acc.setdefault(layer_of(name), {}).setdefault(e, []).append(v)
    return {layer: {e: sum(v) / len(v) for e, v in d.items()} for layer, d in acc.items()}
