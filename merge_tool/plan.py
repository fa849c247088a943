"""The merge plan: every tensor's job and every output byte, decided before any byte is written.

`build_plan` turns a config and the opened inputs into a `MergePlan`: which base tensor is
channel-merged (and with which K), stored once because every expert has it identical,
merged across experts, or a norm that is folded or kept per expert; which output tensors
(name, dtype, shape) each job writes and into which shard; and the totals (output bytes,
stored parameters, their ratio to the ensemble). The merge executes the plan; `channelmerge
merge --dry-run` prints it (`format_plan`) and stops.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from merge_tool import budget as budgetmod, fold as foldmod
from merge_tool.budget import layer_key, layer_of
from merge_tool.config import ConfigError, MergeConfig
from merge_tool.io import InputError, ModelReader, PlannedTensor, shard_name, split_into_shards
from vllm_channelmerge import format as fmt

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Job:
    """One base tensor (and its bias) to produce, and the output tensors it writes."""

    kind: str  # "channel" | "plain" | "ones" | "expert_norm": how it is executed
    name: str  # output weight name
    source: str  # input tensor name
    shape: tuple[int, ...]
    dtype: torch.dtype
    k: int = 1
    bias: Optional[str] = None
    norm: Optional[str] = None  # norm folded into this weight's columns
    identical: bool = False  # every expert has the same (folded) tensor: stored once, exactly
    selected: bool = True  # channel tensor chosen by include/exclude (False: merged, K=1 layout)
    outputs: list[PlannedTensor] = field(default_factory=list)  # filled by `build_plan`
    # Format v2 (a merge under a budget): each channel's k and rows; None there means one row per
    # channel (before the allocation, and for tensors stored once or excluded).
    alloc: Optional[budgetmod.TensorRows] = None

    @property
    def splittable(self) -> bool:
        """A channel tensor whose channels may get more than one row under a budget."""
        return self.kind == "channel" and self.selected and not self.identical and self.k > 1

    @property
    def num_rows(self) -> int:
        """Rows stored in format v2 (R): one per channel plus the extra rows."""
        return self.shape[0] + (self.alloc.extra_rows if self.alloc is not None else 0)

    @property
    def role(self) -> str:
        """What happens to the tensor, in words (the plan's "kind" column)."""
        if self.kind == "channel":
            if self.identical:
                return "channel, identical in every expert (stored once)"
            return "channel-merged" if self.selected else "channel, excluded (merged, K=1)"
        if self.kind == "ones":
            return "norm folded (stored as ones)"
        if self.kind == "expert_norm":
            return "norm kept per expert"
        if not self.dtype.is_floating_point:
            return "copied (not floating point)"
        return "norm merged across experts" if foldmod.is_norm(self.name) else "merged across experts"

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass
class MergePlan:
    """Everything a merge will do, known before it writes: jobs, output tensors, shards, totals."""

    config: MergeConfig
    output: Optional[Path]
    architecture: str
    tied: bool
    base_path: Path
    base_config: dict[str, Any]
    base_params: int
    fold: foldmod.FoldPlan
    jobs: list[Job]
    shards: list[list[PlannedTensor]]
    allocation: Optional[budgetmod.Allocation] = None  # format v2: set by `set_allocation`

    @property
    def row_table(self) -> bool:
        """Whether the merge writes format v2 (a row table): it runs under a budget."""
        return self.config.has_budget

    @property
    def format_version(self) -> int:
        return fmt.ROW_TABLE_VERSION if self.row_table else fmt.FORMAT_VERSION

    @property
    def experts(self) -> list[str]:
        return self.config.expert_names

    @property
    def outputs(self) -> list[PlannedTensor]:
        """The output tensors in write order (the shard writer's plan)."""
        return [t for j in self.jobs for t in j.outputs]

    @property
    def weight_map(self) -> dict[str, str]:
        """Output tensor -> shard file, as the index will say."""
        return {t.name: shard_name(i, len(self.shards)) for i, s in enumerate(self.shards) for t in s}

    @property
    def output_bytes(self) -> int:
        """Bytes of tensor data in the shards (the index's `total_size`)."""
        return sum(t.nbytes for t in self.outputs)

    @property
    def stored_params(self) -> int:
        return fmt.stored_params({t.name: t.shape for t in self.outputs})

    @property
    def ensemble_params(self) -> int:
        return len(self.experts) * self.base_params

    @property
    def param_ratio(self) -> float:
        """Stored parameters / the ensemble's (every expert kept whole): about K/N."""
        return self.stored_params / self.ensemble_params if self.base_params else 0.0

    @property
    def identical(self) -> list[str]:
        return [j.name for j in self.jobs if j.identical]

    def overrides(self) -> dict[str, int]:
        """Module -> K wherever a channel tensor's K is not `num_groups` (config.json records it)."""
        return {fmt.module_of(j.name): j.k for j in self.jobs if j.kind == "channel" and j.k != self.config.num_groups}

    def extra_rows(self) -> dict[str, int]:
        """Format v2: module -> extra rows (R - out), for every module that has some."""
        return {fmt.module_of(j.name): j.num_rows - j.shape[0] for j in self.jobs
                if j.kind == "channel" and j.num_rows > j.shape[0]}

    def set_allocation(self, alloc: budgetmod.Allocation) -> None:
        """Format v2: take each channel tensor's rows from `alloc` (others keep one row per
        channel) and re-plan the output tensors and shards; records the totals in `alloc.stats`."""
        n = len(self.experts)
        for j in self.jobs:
            if j.kind == "channel":
                j.alloc = alloc.tensors.get(j.name)
                j.outputs = job_outputs(j, n, True)
        self.shards = split_into_shards(self.outputs, self.config.shard_bytes)
        self.allocation = alloc
        lo, hi = budget_limits(self)
        alloc.stats = {"stored_params": self.stored_params, "achieved_ratio": self.param_ratio,
                       "bytes": self.output_bytes, "min_ratio": lo["ratio"], "max_ratio": hi["ratio"],
                       "min_bytes": lo["bytes"], "max_bytes": hi["bytes"]}


# -- building ----------------------------------------------------------------------------------


def build_plan(cfg: MergeConfig, base: ModelReader, experts: list[ModelReader],
               output: Optional[Path] = None) -> MergePlan:
    """The whole merge, decided and validated (fused modules share K; channel tensors are 2-D);
    reads only the few expert tensors that `collapse_identical` compares."""
    fp = foldmod.plan_folding(base.architecture, base.names, cfg.fold_norms)
    if fp.merged_norms and cfg.fold_norms:
        log.warning("norms merged across experts (not folded): %s (%s)", ", ".join(fp.merged_norms), fp.reason)
    jobs = plan_jobs(cfg, base, fp)
    identical = collapse_identical(jobs, experts, fp) if cfg.collapse_identical else []
    if identical:
        log.info("identical in every expert, stored once: %s", ", ".join(identical))
    for j in jobs:
        j.outputs = job_outputs(j, len(experts), cfg.has_budget)
    return MergePlan(
        config=cfg, output=output, architecture=base.architecture, tied=base.tied, base_path=base.path,
        base_config=dict(base.config), base_params=sum(math.prod(base.shape(t)) for t in base.names),
        fold=fp, jobs=jobs, shards=split_into_shards([t for j in jobs for t in j.outputs], cfg.shard_bytes))


def _out_dtype(cfg: MergeConfig, in_dtype: torch.dtype) -> torch.dtype:
    if cfg.dtype != "auto" and in_dtype.is_floating_point:
        return _DTYPES[cfg.dtype]
    return in_dtype


def plan_jobs(cfg: MergeConfig, base: ModelReader, fp: foldmod.FoldPlan) -> list[Job]:
    """Decide, for every base tensor, how it is produced; validates fused modules share K."""
    jobs: list[Job] = []
    names = set(base.names)
    for t in base.names:
        job = _job_for(cfg, base, fp, t, names)
        if job is not None:
            jobs.append(job)
    # q/k/v and gate/up are fused by vLLM along `out`: they must share K.
    for fused, fam in _fused_families(jobs):
        if len({j.k for j in fam}) > 1:
            raise ConfigError(
                f"num_groups_overrides/include/exclude give the fused module {fused} different "
                f"K: {', '.join(f'{fmt.module_of(j.name)}={j.k}' for j in fam)}; q/k/v and gate/up must share K")
    return jobs


def _job_for(cfg: MergeConfig, base: ModelReader, fp: foldmod.FoldPlan, t: str, names: set[str]) -> Optional[Job]:
    """The job of base tensor `t`; None for a channel bias (merged with its weight's rows)."""
    shape, dt = base.shape(t), _out_dtype(cfg, base.dtype(t))
    if fmt.is_channel_tensor(t):
        if t.endswith(".bias"):
            return None if fmt.module_of(t) + ".weight" in names else Job("plain", t, t, shape, dt)
        if len(shape) != 2:
            raise InputError(f"{base.file_of(t)}: channel tensor {t!r} has shape {list(shape)}; expected 2-D")
        bias = fmt.module_of(t) + ".bias"
        return Job("channel", t, t, shape, dt, cfg.groups_for_tensor(t), bias if bias in names else None,
                   fp.targets.get(t), selected=cfg.is_selected(t))
    if t in fp.folded_norms:
        return Job("ones", t, t, shape, dt)
    if t in fp.expert_norms:
        return Job("expert_norm", t, t, shape, dt)
    return Job("plain", t, t, shape, dt)


def _fused_families(jobs: list[Job]) -> list[tuple[str, list[Job]]]:
    """(vLLM's fused module name, its channel jobs) for every q/k/v and gate/up family."""
    by_module = {fmt.module_of(j.name): j for j in jobs if j.kind == "channel"}
    out = []
    for fused, parts in fmt.FUSED_MODULES.items():
        for mod in by_module:
            head, _, last = mod.rpartition(".")
            if last == parts[0]:
                fam = [by_module[m] for m in (f"{head}.{p}" for p in parts) if m in by_module]
                out.append((f"{head}.{fused}", fam))
    return out


def collapse_identical(jobs: list[Job], experts: list[ModelReader], fp: foldmod.FoldPlan) -> list[str]:
    """Store once (K=1, exactly) the channel tensors that every expert has identical.

    Typical case: embeddings frozen during fine-tuning. Cheap: a tensor is compared on a few
    rows first, and read in full only when those agree. Fused families (q/k/v, gate/up) are
    collapsed only together, since they must share K. Returns the collapsed tensor names.
    """
    if len(experts) < 2:
        return []
    same = {j.name: _identical(j, experts, fp) for j in jobs if j.kind == "channel" and j.k > 1}
    for _, fam in _fused_families(jobs):
        if not all(same.get(j.name, False) for j in fam):
            for j in fam:
                same[j.name] = False
    done = []
    for j in jobs:
        if same.get(j.name):
            j.k, j.identical = 1, True
            done.append(j.name)
    return done


def _identical(job: Job, experts: list[ModelReader], fp: foldmod.FoldPlan) -> bool:
    names = [n for n in (job.source, job.bias, fp.targets.get(job.name)) if n]
    for n in names:
        ref = experts[0].get(n, check=False)
        head = min(ref.shape[0], 8)
        if not all(torch.equal(ref[:head], e.get(n, check=False)[:head]) for e in experts[1:]):
            return False
    return all(torch.equal(experts[0].get(n, check=False), e.get(n, check=False))
               for n in names for e in experts[1:])


def job_outputs(job: Job, n: int, row_table: bool = False) -> list[PlannedTensor]:
    """The output tensors of one job, in write order (format v1, DESIGN §3; with `row_table`,
    format v2: rows [R, in], bias [R], row_index [N, out])."""
    if job.kind == "channel" and row_table:
        out = [PlannedTensor(job.name, job.dtype, (job.num_rows, *job.shape[1:]))]
        if job.bias:
            out.append(PlannedTensor(job.bias, job.dtype, (job.num_rows,)))
        return out + [PlannedTensor(fmt.row_index_name(job.name), torch.int32, (n, job.shape[0]))]
    if job.kind == "channel":
        out = [PlannedTensor(job.name, job.dtype, (job.k, *job.shape))]
        if job.bias:
            out.append(PlannedTensor(job.bias, job.dtype, (job.k, job.shape[0])))
        return out + [PlannedTensor(fmt.group_index_name(job.name), torch.int32, (n, job.shape[0]))]
    out = [PlannedTensor(job.name, job.dtype, job.shape)]
    if job.kind == "expert_norm":
        out.append(PlannedTensor(fmt.expert_norm_name(fmt.module_of(job.name)), job.dtype, (n, *job.shape)))
    return out


# -- the budget (format v2) ----------------------------------------------------------------------


def row_cost(job: Job, in_bytes: bool) -> float:
    """What one more row of a channel tensor costs: parameters (`in`, +1 with a bias) or bytes."""
    params = job.shape[1] + (1 if job.bias else 0)
    return float(params * (torch.empty((), dtype=job.dtype).element_size() if in_bytes else 1))


def budget_limits(plan: MergePlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """(one row per channel everywhere, K rows everywhere): stored params, ratio and bytes."""
    splittable = [j for j in plan.jobs if j.splittable]
    base_params = plan.stored_params - sum((j.num_rows - j.shape[0]) * row_cost(j, False) for j in splittable)
    base_bytes = plan.output_bytes - sum((j.num_rows - j.shape[0]) * row_cost(j, True) for j in splittable)
    more_params = sum((j.k - 1) * j.shape[0] * row_cost(j, False) for j in splittable)
    more_bytes = sum((j.k - 1) * j.shape[0] * row_cost(j, True) for j in splittable)
    ens = plan.ensemble_params or 1

    def entry(params: float, nbytes: float) -> dict[str, Any]:
        return {"params": int(params), "ratio": params / ens, "bytes": int(nbytes)}

    return entry(base_params, base_bytes), entry(base_params + more_params, base_bytes + more_bytes)


def budget_available(plan: MergePlan) -> float:
    """Budget units (parameters, or bytes for `budget_bytes`) left for extra rows once every
    channel has one row; refuses a budget below that minimum, or one with nothing to spend on."""
    cfg = plan.config
    lo, hi = budget_limits(plan)
    if cfg.budget is not None:
        field_, asked, unit = "budget", f"{cfg.budget:g}", "of the ensemble's parameters"
        target, base = cfg.budget * plan.ensemble_params, lo["params"]

        def fmt_v(e: dict[str, Any]) -> str:
            return f"{e['ratio']:.4f}"
    else:
        field_, unit = "budget_bytes", "bytes of tensor data"
        asked = f"{cfg.budget_bytes} ({cfg.budget_target_bytes:,} bytes)"
        target, base = float(cfg.budget_target_bytes or 0), lo["bytes"]

        def fmt_v(e: dict[str, Any]) -> str:
            return f"{e['bytes']:,} ({human_bytes(e['bytes'])})"
    if not any(j.splittable for j in plan.jobs):
        raise ConfigError(
            f"{field_}: {asked}: no channel can get a second row (num_groups is {cfg.num_groups}; every "
            f"channel tensor has K=1, is excluded or stored once), so this merge stores {fmt_v(lo)} {unit} "
            "whatever the budget; raise num_groups or remove the budget")
    if target < base:
        raise ConfigError(
            f"{field_}: {asked} is below the minimum this merge can store, {fmt_v(lo)} {unit} (one row "
            f"per channel); the most it can use is {fmt_v(hi)} (K rows everywhere)")
    return target - base


def requested_budget(cfg: MergeConfig) -> dict[str, Any]:
    """What the config asked for, as recorded in quantization_config.budget and report.json."""
    if cfg.budget is not None:
        return {"params_ratio": cfg.budget}
    return {"bytes": cfg.budget_target_bytes}


# -- describing (channelmerge merge --dry-run) ---------------------------------------------------


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, as `max_shard_size` accepts them)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


_ROLE_ORDER = ("channel-merged", "channel, identical in every expert (stored once)",
               "channel, excluded (merged, K=1)", "merged across experts", "norm folded (stored as ones)",
               "norm kept per expert", "norm merged across experts", "copied (not floating point)")


def _k_text(jobs: list[Job]) -> str:
    """K of a group of jobs: one value, a range, or '-' (no channel tensors)."""
    ks = sorted({j.k for j in jobs if j.kind == "channel"})
    if not ks:
        return "-"
    return str(ks[0]) if len(ks) == 1 else f"{ks[0]}-{ks[-1]}"


def summarize(plan: MergePlan, key: str) -> list[tuple[str, list[Job]]]:
    """Jobs grouped by `key` ("kind": their role; "layer": `layer_of`), in model order."""
    groups: dict[str, list[Job]] = {}
    for j in plan.jobs:
        groups.setdefault(j.role if key == "kind" else layer_of(j.name), []).append(j)
    if key == "kind":
        order = sorted(groups, key=lambda g: _ROLE_ORDER.index(g) if g in _ROLE_ORDER else len(_ROLE_ORDER))
    else:
        order = sorted(groups, key=layer_key)
    return [(g, groups[g]) for g in order]


def _table(title: str, groups: list[tuple[str, list[Job]]]) -> list[str]:
    """One row per group (jobs, K, output size) and a total row."""
    width = max([len(title)] + [len(g) for g, _ in groups])
    rule = "-" * (width + 31)
    lines = [f"{title:<{width}}  {'jobs':>5}  {'K':>4}  {'output':>14}", rule]
    for g, jobs in groups + [("total", [j for _, js in groups for j in js])]:
        if g == "total" and groups:
            lines.append(rule)
        size = sum(j.output_bytes for j in jobs)
        lines.append(f"{g:<{width}}  {len(jobs):>5}  {_k_text(jobs):>4}  {human_bytes(size):>14}")
    return lines


def _per_tensor_lines(plan: MergePlan) -> list[str]:
    """Every job with its output tensors (dtype, shape, shard): the verbose listing."""
    shard_of = plan.weight_map
    lines = ["", "per tensor (output tensors: dtype shape -> shard)"]
    for j in plan.jobs:
        rows = f", {j.num_rows} rows" if plan.row_table and j.kind == "channel" else ""
        lines.append(f"{j.name}  [{j.role}" + (f", K={j.k}" if j.role == "channel-merged" else "") + rows + "]")
        for t in j.outputs:
            dt = str(t.dtype).removeprefix("torch.")
            lines.append(f"    {t.name}  {dt} {list(t.shape)}  -> {shard_of[t.name]}")
    return lines


def _max_shard_text(cfg: MergeConfig) -> str:
    """`max_shard_size` as the config gives it (`5GB`), else in bytes and binary units."""
    if isinstance(cfg.max_shard_size, str):
        return cfg.max_shard_size
    return f"{cfg.shard_bytes:,} bytes ({human_bytes(cfg.shard_bytes)})"


def _settings_line(cfg: MergeConfig) -> str:
    params = " ".join(f"{k}={v}" for k, v in cfg.used_parameters().items())
    overrides = f" (overrides: {json.dumps(cfg.num_groups_overrides)})" if cfg.num_groups_overrides else ""
    return (f"K={cfg.num_groups}{overrides}  method={cfg.method}" + (f" ({params})" if params else "")
            + f"  similarity={cfg.similarity}  dtype={cfg.dtype}")


def format_allocation(plan: MergePlan) -> list[str]:
    """Format v2: the rows per channel, per tensor kind and per layer, and what they achieve
    (`channelmerge merge` prints it before writing; the model card and report.json carry it)."""
    assert plan.allocation is not None
    return budgetmod.format_allocation(plan.allocation, human_bytes)


def format_plan(plan: MergePlan, per_tensor: bool = False) -> str:
    """The dry-run report: the merge per tensor kind and per layer, and its totals."""
    cfg = plan.config
    where = f" into {plan.output}" if plan.output is not None else ""
    lines = [
        f"merge plan{where} (dry run: nothing was written)",
        f"experts ({len(plan.experts)}): {', '.join(plan.experts)}; architecture {plan.architecture}",
        _settings_line(cfg),
        "", *_table("kind", summarize(plan, "kind")), "", *_table("layer", summarize(plan, "layer")), "",
        f"output: {len(plan.outputs)} tensors in {len(plan.shards)} shard(s) (max_shard_size "
        f"{_max_shard_text(cfg)}): {plan.output_bytes:,} bytes ({human_bytes(plan.output_bytes)})",
        f"parameters stored: {plan.stored_params:,} = {plan.param_ratio:.3f} of the ensemble "
        f"({plan.ensemble_params:,} = {len(plan.experts)} x {plan.base_params:,})",
    ]
    if plan.allocation is not None:
        lines += ["", *format_allocation(plan)]
    lines += [f"note: {n} is identical in every expert: stored once (K=1)" for n in plan.identical]
    lines += [f"note: norm {n} merged across experts ({plan.fold.reason})" for n in plan.fold.merged_norms]
    if cfg.router is not None:
        lines.append(f"after the merge: the `auto` router is trained from {cfg.router.examples}")
    lines += ["checked: the config, the inputs (compatible with the base), the output path",
              "not checked without merging: NaN/Inf in the inputs, overflow of the merged values"]
    return "\n".join(lines + (_per_tensor_lines(plan) if per_tensor else []))
