"""The merge: base + N experts -> one channel-merged checkpoint (DESIGN §2, format v1 §3).

Streaming: one tensor of the base and of every expert is in memory at a time; its output
channels are processed in row blocks (cluster, merge inside groups, cast, measure), and
the result goes straight into a pre-planned safetensors shard. Everything is written into a
temporary folder beside the target and renamed at the end, so a failed or interrupted
merge leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from merge_tool import clustering, fold as foldmod, methods
from merge_tool.config import ConfigError, MergeConfig, dump_config
from merge_tool.io import (InputError, ModelReader, PlannedTensor, StreamingShardWriter,
                           check_compatible, check_not_overlapping, check_replaceable,
                           copy_tokenizer_files, merged_output_problem, staged_dir)
from vllm_channelmerge import format as fmt

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BLOCK_ELEMS = 1 << 22  # per expert per block: bounds the float32 temporaries


@dataclass
class Job:
    """One base tensor (and its bias) to produce."""

    kind: str  # "channel" | "plain" | "ones" | "expert_norm"
    name: str  # output weight name
    source: str  # input tensor name
    shape: tuple[int, ...]
    dtype: torch.dtype
    k: int = 1
    bias: Optional[str] = None
    norm: Optional[str] = None  # norm folded into this weight's columns
    identical: bool = False  # every expert has the same (folded) tensor: stored once, exactly


@dataclass
class MergeStats:
    """Per-tensor numbers for the report and the model card."""

    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)


def _out_dtype(cfg: MergeConfig, in_dtype: torch.dtype) -> torch.dtype:
    if cfg.dtype != "auto" and in_dtype.is_floating_point:
        return _DTYPES[cfg.dtype]
    return in_dtype


def plan_jobs(cfg: MergeConfig, base: ModelReader, fp: foldmod.FoldPlan) -> list[Job]:
    """Decide, for every base tensor, how it is produced; validates fused modules share K."""
    jobs: list[Job] = []
    names = base.names
    name_set = set(names)
    for t in names:
        shape, dt = base.shape(t), _out_dtype(cfg, base.dtype(t))
        if fmt.is_channel_tensor(t):
            if t.endswith(".bias"):
                if fmt.module_of(t) + ".weight" in name_set:
                    continue  # merged with its weight: part of the channel
                jobs.append(Job("plain", t, t, shape, dt))
                continue
            if len(shape) != 2:
                raise InputError(f"{base.file_of(t)}: channel tensor {t!r} has shape {list(shape)}; expected 2-D")
            bias = fmt.module_of(t) + ".bias"
            jobs.append(Job("channel", t, t, shape, dt, cfg.groups_for_tensor(t),
                            bias if bias in name_set else None, fp.targets.get(t)))
        elif t in fp.folded_norms:
            jobs.append(Job("ones", t, t, shape, dt))
        elif t in fp.expert_norms:
            jobs.append(Job("expert_norm", t, t, shape, dt))
        else:
            jobs.append(Job("plain", t, t, shape, dt))
    # q/k/v and gate/up are fused by vLLM along `out`: they must share K.
    for fused, fam in _fused_families(jobs):
        if len({j.k for j in fam}) > 1:
            raise ConfigError(
                f"num_groups_overrides/include/exclude give the fused module {fused} different "
                f"K: {', '.join(f'{fmt.module_of(j.name)}={j.k}' for j in fam)}; q/k/v and gate/up must share K")
    return jobs


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


def _planned_outputs(jobs: list[Job], n: int) -> list[PlannedTensor]:
    out = []
    for j in jobs:
        if j.kind == "channel":
            out.append(PlannedTensor(j.name, j.dtype, (j.k, *j.shape)))
            if j.bias:
                out.append(PlannedTensor(j.bias, j.dtype, (j.k, j.shape[0])))
            out.append(PlannedTensor(fmt.group_index_name(j.name), torch.int32, (n, j.shape[0])))
        else:
            out.append(PlannedTensor(j.name, j.dtype, j.shape))
            if j.kind == "expert_norm":
                out.append(PlannedTensor(fmt.expert_norm_name(fmt.module_of(j.name)), j.dtype, (n, *j.shape)))
    return out


class _Merger:
    """Holds the readers, norms and method for the duration of one merge."""

    def __init__(self, cfg: MergeConfig, base: ModelReader, experts: list[ModelReader],
                 device: torch.device, fp: foldmod.FoldPlan) -> None:
        self.cfg = cfg
        self.base = base
        self.experts = experts
        self.names = cfg.expert_names
        self.dev = device
        self.method = methods.get_method(cfg.method)
        self.sparsifier = self.method.sparsifier  # None: the method keeps task vectors whole
        self.params = cfg.merge_params()
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.norms: dict[str, list[torch.Tensor]] = {}  # norm -> [base, expert...] float32
        for nname in set(fp.targets.values()):
            self.norms[nname] = [r.get(nname).to(device, torch.float32) for r in [base, *experts]]

    def _rows(self, t: torch.Tensor, r0: int, r1: int, norm: Optional[torch.Tensor]) -> torch.Tensor:
        x = t[r0:r1].to(self.dev, torch.float32)
        return foldmod.fold(x, norm) if norm is not None else x

    def _stats(self, base_t: torch.Tensor, ex_t: list[torch.Tensor], norms: Optional[list[torch.Tensor]],
               is_vec: bool = False) -> list[float]:
        """Per-expert whole-tensor statistics of the (folded) task vectors, for a sparsifier
        that needs them (TIES's magnitude thresholds); [] for the others."""
        sp = self.sparsifier
        if sp is None or not sp.needs_stats:
            return []
        out = []
        dens = self.params.density_list(len(ex_t))
        for i, w in enumerate(ex_t):
            if is_vec:
                delta = w.to(self.dev, torch.float32) - base_t.to(self.dev, torch.float32)
            else:
                nb = norms[0] if norms else None
                ne = norms[i + 1] if norms else None
                delta = self._rows(w, 0, w.shape[0], ne) - self._rows(base_t, 0, base_t.shape[0], nb)
            out.append(sp.stat(delta, dens[i]))
            del delta
        return out

    def _sparsify(self, d: torch.Tensor, key_name: str, stats: list[float], flat0: int,
                  row_len: int) -> torch.Tensor:
        """The method's whole-tensor sparsification of a block [R, N, I] of `key_name`."""
        if self.sparsifier is None:
            return d
        return self.sparsifier.apply(d, methods.Block(key_name, flat0, row_len), stats, self.params)

    def _ws(self, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A reusable work buffer: fresh big allocations cost page faults on every tensor."""
        n = math.prod(shape)
        buf = self._bufs.get((key, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=self.dev)
            self._bufs[(key, dtype)] = buf
        return buf[:n].view(shape)

    def _load_rows(self, dst: torch.Tensor, src: torch.Tensor, r0: int, r1: int,
                   norm: Optional[torch.Tensor]) -> None:
        """Copy rows of an input (any dtype) into a float32 slice, folding the norm in place."""
        dst.copy_(src[r0:r1])
        if norm is not None:
            dst.mul_(norm.unsqueeze(0))

    def _check_finite(self, job: Job) -> None:
        """Slow path, only when a block's statistics were not finite: name the culprit."""
        for r in [self.base, *self.experts]:
            for name in filter(None, (job.source, job.bias)):
                t = r.get(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise InputError(f"{r.file_of(name)}: tensor {name!r} contains {bad} NaN/Inf value(s)")

    # -- one channel tensor ----------------------------------------------------------------

    def channel(self, job: Job, writer: StreamingShardWriter, stats: MergeStats) -> None:
        n_exp = len(self.experts)
        out_rows, in_dim = job.shape
        # NaN/Inf in these big tensors is caught from the block statistics (no extra pass).
        bt = self.base.get(job.source, check=False)
        ets = [r.get(job.source, check=False) for r in self.experts]
        bb = self.base.get(job.bias, check=False) if job.bias else None
        ebs = [r.get(job.bias, check=False) for r in self.experts] if job.bias else None
        norms = self.norms[job.norm] if job.norm else None
        thr_w: list[float] = []
        thr_b: list[float] = []
        if not job.identical:
            thr_w = self._stats(bt, ets, norms)
            if job.bias:
                thr_b = self._stats(bb, ebs, None, is_vec=True)
        k = job.k
        width = in_dim + (1 if job.bias else 0)
        esize = torch.empty((), dtype=job.dtype).element_size()
        b_out = torch.empty((k, out_rows), dtype=job.dtype) if job.bias else None
        idx_out = torch.empty((n_exp, out_rows), dtype=torch.int32)
        err = torch.zeros(n_exp, dtype=torch.float64)
        dnorm = torch.zeros(n_exp, dtype=torch.float64)
        outside = torch.zeros(n_exp, dtype=torch.float64)
        step = max(1, min(self.cfg.block_rows, _BLOCK_ELEMS // max(1, in_dim)))
        writer.begin(job.name)  # the group rows go to the file block by block
        for r0 in range(0, out_rows, step):
            r1 = min(out_rows, r0 + step)
            rr = r1 - r0
            base_rows = self._ws("base", (rr, width))
            w = self._ws("w", (rr, n_exp, width))  # [R, N, I]
            self._load_rows(base_rows[:, :in_dim], bt, r0, r1, norms[0] if norms else None)
            for i, e in enumerate(ets):
                self._load_rows(w[:, i, :in_dim], e, r0, r1, norms[i + 1] if norms else None)
            if job.bias:
                base_rows[:, in_dim].copy_(bb[r0:r1])
                for i, e in enumerate(ebs):
                    w[:, i, in_dim].copy_(e[r0:r1])
            d = torch.sub(w, base_rows.unsqueeze(1), out=self._ws("d", (rr, n_exp, width)))
            if 1 < k < n_exp:
                gram = clustering.row_gram(d)
                dnorm += torch.diagonal(gram, dim1=1, dim2=2).sum(0).double().cpu()
            else:
                gram = torch.zeros(rr, n_exp, n_exp, device=self.dev)
                dnorm += _sumsq(d)
            assign = clustering.partition_from_gram(gram, k, self.cfg.similarity, self.cfg.kmeans_threshold)
            if self.sparsifier is None or job.identical:
                ds = d
            else:
                ds = self._sparsify(d[:, :, :in_dim], job.name, thr_w, r0 * in_dim, in_dim)
                if job.bias:
                    ds = torch.cat([ds, self._sparsify(d[:, :, in_dim:], job.bias, thr_b, r0, 1)], 2)
            g = self._combine(ds, base_rows, w, assign, k, out=self._ws("g", (k, rr, width)))  # [K, R, I]
            if job.identical:
                g[0].copy_(w[:, 0])  # not base + mean(delta): that rounds
            if job.dtype == torch.float32:
                gc = gf = g
            else:
                gc = self._ws("gc", (k, rr, width), job.dtype)
                gc.copy_(g)
                gf = g.copy_(gc)  # the rounded values, in float32
            # Measure what the runtime will see: the stored (rounded) group rows, looked up.
            flat = (assign * rr + torch.arange(rr, device=self.dev).unsqueeze(1)).reshape(-1)
            rec = self._ws("rec", (rr, n_exp, width))
            torch.index_select(gf.view(k * rr, width), 0, flat, out=rec.view(rr * n_exp, width))
            err += _sumsq(rec.sub_(w))
            outside += (assign != 0).sum(0).double().cpu()
            for gi in range(k):
                writer.write_at((gi * out_rows + r0) * in_dim * esize, gc[gi, :, :in_dim])
            if b_out is not None:
                b_out[:, r0:r1] = gc[:, :, in_dim].cpu()
            idx_out[:, r0:r1] = assign.t().to(torch.int32).cpu()
        if not (bool(torch.isfinite(err).all()) and bool(torch.isfinite(dnorm).all())):
            self._check_finite(job)
        writer.end()
        del bt, ets, bb, ebs
        if job.bias and b_out is not None:
            writer.write(job.bias, b_out)
        writer.write(fmt.group_index_name(job.name), idx_out)
        stats.tensors[job.name] = {
            "kind": "channel", "shape": [out_rows, in_dim], "num_groups": k,
            "bias": job.bias is not None, "folded_norm": job.norm, "source": job.source,
            "identical_across_experts": job.identical,
            "channel_merged": self.cfg.is_selected(job.name),
            "rel_error": dict(zip(self.names, _rel(err, dnorm))),
            "outside_group0": dict(zip(self.names, (outside / out_rows).tolist())),
        }

    def _combine(self, ds: torch.Tensor, base_rows: torch.Tensor, w: torch.Tensor, assign: torch.Tensor,
                 k: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Group rows [K, R, I]: base + merged delta; one-member groups keep their expert exactly.

        ds, w: [R, N, I]; base_rows: [R, I]; assign: [R, N].
        """
        r, width = base_rows.shape
        onehot = torch.nn.functional.one_hot(assign, k)  # [R, N, K]
        sizes = onehot.sum(1)  # [R, K]
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
        empty = sizes == 0
        if bool(empty.any()):  # fewer than K groups in some channels: never looked up; copy group 0
            for gi in range(1, k):
                rows = empty[:, gi]
                g[gi, rows] = g[0, rows]
        single = sizes.gather(1, assign) == 1  # [R, N]
        if bool(single.any()):
            rr, nn = single.nonzero(as_tuple=True)
            g[assign[rr, nn], rr] = w[rr, nn]
        return g

    # -- other tensors ---------------------------------------------------------------------

    def plain(self, job: Job, writer: StreamingShardWriter, stats: MergeStats) -> None:
        """Not channel-merged: merged across all experts with the method (K=1, no index)."""
        bt = self.base.get(job.source)
        ets = [r.get(job.source) for r in self.experts]
        if not bt.is_floating_point():
            writer.write(job.name, bt)
            stats.tensors[job.name] = {"kind": "copied", "shape": list(bt.shape)}
            return
        b = bt.to(self.dev, torch.float32).reshape(1, -1)
        w = torch.stack([e.to(self.dev, torch.float32).reshape(-1) for e in ets]).unsqueeze(0)  # [1, N, I]
        d = w - b.unsqueeze(1)
        ds = self._sparsify(d, job.name, self._stats(bt, ets, None, is_vec=True), 0, d.shape[2])
        assign = torch.zeros((1, len(ets)), dtype=torch.int64, device=self.dev)
        g = self._combine(ds, b, w, assign, 1)[0, 0]
        gc = g.to(job.dtype)
        err = ((gc.float().view(1, 1, -1) - w) ** 2).sum((0, 2)).double().cpu()
        dn = (d ** 2).sum((0, 2)).double().cpu()
        writer.write(job.name, gc.reshape(bt.shape).cpu())
        stats.tensors[job.name] = {"kind": "merged", "shape": list(bt.shape),
                                   "norm": foldmod.is_norm(job.name),
                                   "rel_error": dict(zip(self.names, _rel(err, dn)))}

    def ones(self, job: Job, writer: StreamingShardWriter, stats: MergeStats) -> None:
        """A folded norm: stored as ones (its per-expert values live in the folded weights)."""
        writer.write(job.name, torch.ones(job.shape, dtype=job.dtype))
        stats.tensors[job.name] = {"kind": "folded_norm", "shape": list(job.shape)}

    def expert_norm(self, job: Job, writer: StreamingShardWriter, stats: MergeStats) -> None:
        """The final norm: ones, plus every expert's own weight as `[N, hidden]` (exact)."""
        writer.write(job.name, torch.ones(job.shape, dtype=job.dtype))
        per_expert = torch.stack([r.get(job.source) for r in self.experts]).to(job.dtype)
        writer.write(fmt.expert_norm_name(fmt.module_of(job.name)), per_expert)
        stats.tensors[job.name] = {"kind": "expert_norm", "shape": list(job.shape)}


def _sumsq(x: torch.Tensor) -> torch.Tensor:
    """Per-expert sum of squares of [R, N, I] (row norms first: 6x faster than one big norm)."""
    return torch.linalg.vector_norm(x, dim=2).double().square().sum(0).cpu()


def _rel(err: torch.Tensor, ref: torch.Tensor) -> list[float]:
    out = []
    for e, r in zip(err.tolist(), ref.tolist()):
        out.append(0.0 if e == 0 else (math.sqrt(e / r) if r > 0 else float("inf")))
    return out


def _base_params(base: ModelReader) -> int:
    return sum(math.prod(base.shape(t)) for t in base.names)


def _config_json(cfg: MergeConfig, base: ModelReader, fp: foldmod.FoldPlan, jobs: list[Job]) -> dict[str, Any]:
    arch = base.architecture
    wrapper = fmt.WRAPPER_ARCHITECTURES.get(arch)
    if wrapper is None:
        wrapper = "ChannelMerged" + arch
        log.warning("architecture %s has no channelmerge runtime wrapper; writing %s anyway", arch, wrapper)
    overrides = {fmt.module_of(j.name): j.k for j in jobs if j.kind == "channel" and j.k != cfg.num_groups}
    qc = fmt.ChannelMergedConfig(
        experts=cfg.expert_names, num_groups=cfg.num_groups, method=cfg.method,
        similarity=cfg.similarity, base_architecture=arch,
        folded_norms=[fmt.module_of(n) for n in fp.folded_norms],
        expert_norms=[fmt.module_of(n) for n in fp.expert_norms],
        num_groups_overrides=overrides, default_expert=cfg.default_expert)
    c = dict(base.config)
    c["architectures"] = [wrapper]
    c["quantization_config"] = qc.to_dict()
    if cfg.dtype != "auto":
        for key in ("torch_dtype", "dtype"):
            if key in c or key == "torch_dtype":
                c[key] = cfg.dtype
    return c


def _model_card(cfg: MergeConfig, report: dict[str, Any]) -> str:
    p = report["params"]
    lines = [
        "---", "library_name: vllm", "tags: [channelmerge, merge]", "---", "",
        f"# Channel-merged checkpoint ({len(cfg.experts)} experts)", "",
        "Made with `channelmerge merge` (Channel Merging, Zhang et al., AAAI 2025). Serve it with "
        "`vllm serve` (with the channelmerge plugin installed) or `channelmerge serve`; pick an "
        "expert by its OpenAI model name.", "",
        f"- Base architecture: `{report['architecture']}`",
        f"- Groups per channel (K): {cfg.num_groups}" + (
            f" (per-tensor overrides: {json.dumps(cfg.num_groups_overrides)})" if cfg.num_groups_overrides else ""),
        f"- In-group method: `{cfg.method}` {cfg.used_parameters() or ''}",
        f"- Similarity: {cfg.similarity}",
        f"- Parameters stored: {p['stored']:,} = {p['ratio']:.3f} of the ensemble ({p['ensemble']:,})",
        f"- Norms folded into linear layers: {len(report['folded_norms'])}; merged across experts: "
        f"{len(report['merged_norms'])}; kept per expert: {len(report['expert_norms'])}",
        f"- Tensors identical in every expert, stored once: {len(report['identical_tensors'])}",
        "", "## Experts", "", "| name | source | mean rel. error | channels outside group 0 |",
        "|---|---|---|---|",
    ]
    ch = [t for t in report["tensors"].values() if t["kind"] == "channel"]
    for e in cfg.experts:
        errs = [t["rel_error"][e.name] for t in ch]
        out = [t["outside_group0"][e.name] for t in ch]
        me = sum(errs) / len(errs) if errs else 0.0
        mo = sum(out) / len(out) if out else 0.0
        lines.append(f"| `{e.name}` | `{e.model}` | {me:.4f} | {mo:.1%} |")
    lines += ["", "## Per-layer reconstruction error", "",
              "Relative error of each expert's weights, ||stored - expert|| / ||expert - base||, "
              "mean over the layer's channel-merged tensors.", "",
              "| layer | " + " | ".join(cfg.expert_names) + " |", "|---" * (len(cfg.experts) + 1) + "|"]
    for layer, errs in _per_layer(report).items():
        lines.append(f"| {layer} | " + " | ".join(f"{errs[n]:.4f}" for n in cfg.expert_names) + " |")
    lines += ["", "The merge config used is `channelmerge.yaml`; per-tensor numbers are in "
              f"`{fmt.REPORT_FILE}` (`channelmerge inspect` shows them).", ""]
    return "\n".join(lines)


def _per_layer(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, list[float]]] = {}
    for name, t in report["tensors"].items():
        if t["kind"] != "channel":
            continue
        parts = name.split(".")
        layer = ".".join(parts[:3]) if name.startswith("model.layers.") else fmt.module_of(name)
        for e, v in t["rel_error"].items():
            acc.setdefault(layer, {}).setdefault(e, []).append(v)
    return {l: {e: sum(v) / len(v) for e, v in d.items()} for l, d in acc.items()}


def _open_inputs(cfg: MergeConfig) -> tuple[ModelReader, list[ModelReader]]:
    base = ModelReader(cfg.base_model, "base_model", cfg.allow_pickle_weights)
    experts = [ModelReader(e.model, f"expert {e.name!r}", cfg.allow_pickle_weights) for e in cfg.experts]
    check_compatible(base, dict(zip(cfg.expert_names, experts)))
    return base, experts


def run_merge(config: MergeConfig, out_dir: str | Path, force: bool = False, device: str = "cpu",
              progress: bool = True, threads: Optional[int] = 1) -> Path:
    """Merge `config.experts` into a channel-merged checkpoint at `out_dir`; returns its path.

    Refuses to overwrite an existing `out_dir` unless `force`. On any error nothing is left.
    `device="cuda"` runs the math on the GPU (same results within float tolerance).
    `threads`: torch intra-op threads during the merge (None: leave torch's setting). The
    work is memory-bound; on a shared 2-core machine 2 threads were 3.5x slower than 1.
    """
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    try:
        return _run_merge(config, out_dir, force, device, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _run_merge(config: MergeConfig, out_dir: str | Path, force: bool, device: str, progress: bool) -> Path:
    t0 = time.perf_counter()
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
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is available")
    base, experts = _open_inputs(config)
    fp = foldmod.plan_folding(base.architecture, base.names, config.fold_norms)
    if fp.merged_norms and config.fold_norms:
        log.warning("norms merged across experts (not folded): %s (%s)", ", ".join(fp.merged_norms), fp.reason)
    jobs = plan_jobs(config, base, fp)
    identical = collapse_identical(jobs, experts, fp) if config.collapse_identical else []
    if identical:
        log.info("identical in every expert, stored once: %s", ", ".join(identical))
    planned = _planned_outputs(jobs, len(experts))
    try:
        with staged_dir(out, force=force, own=merged_output_problem) as tmp:
            writer = StreamingShardWriter(tmp, planned, config.shard_bytes,
                                          metadata=fmt.shard_metadata(config.expert_names))
            try:
                merger = _Merger(config, base, experts, dev, fp)
                stats = MergeStats()
                with torch.no_grad():
                    for job in tqdm(jobs, desc="merging", unit="tensor", disable=not progress):
                        getattr(merger, job.kind)(job, writer, stats)
                writer.close()
            finally:
                writer.abort()
            _write_metadata(tmp, config, base, experts, fp, jobs, stats, planned, time.perf_counter() - t0)
    finally:
        base.close()
        for e in experts:
            e.close()
    log.info("wrote %s in %.1fs", out, time.perf_counter() - t0)
    return given


def _write_metadata(tmp: Path, cfg: MergeConfig, base: ModelReader, experts: list[ModelReader],
                    fp: foldmod.FoldPlan, jobs: list[Job], stats: MergeStats, planned: list[PlannedTensor],
                    seconds: float) -> None:
    from safetensors.torch import save_file

    n = len(experts)
    base_params = _base_params(base)
    stored = fmt.stored_params({t.name: t.shape for t in planned})
    report: dict[str, Any] = {
        "format_version": fmt.FORMAT_VERSION,
        "experts": cfg.expert_names,
        "num_groups": cfg.num_groups,
        "method": cfg.method,
        "parameters": cfg.used_parameters(),
        "similarity": cfg.similarity,
        "architecture": base.architecture,
        "tie_word_embeddings": base.tied,
        "folded_norms": list(fp.folded_norms),
        "expert_norms": list(fp.expert_norms),
        "identical_tensors": [j.name for j in jobs if j.identical],
        "fold_targets": dict(fp.targets),
        "merged_norms": list(fp.merged_norms),
        "fold_note": fp.reason,
        "params": {"stored": stored, "base": base_params, "ensemble": n * base_params,
                   "ratio": stored / (n * base_params) if base_params else 0.0},
        "seconds": round(seconds, 3),
        "tensors": stats.tensors,
    }
    (tmp / fmt.SIDECAR_DIR).mkdir(exist_ok=True)
    # Each expert's original folded norms ([N, hidden] per norm), so that extract can unfold.
    norms = {nn: torch.stack([r.get(nn) for r in experts]).contiguous() for nn in fp.folded_norms}
    if norms:
        save_file(norms, str(tmp / fmt.NORMS_FILE), metadata={"format": "pt"})
    (tmp / fmt.REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    (tmp / fmt.CONFIG_FILE).write_text(json.dumps(_config_json(cfg, base, fp, jobs), indent=2) + "\n")
    copy_tokenizer_files(base.path, tmp)
    (tmp / fmt.MERGE_CONFIG_FILE).write_text(dump_config(cfg))
    (tmp / fmt.MODEL_CARD_FILE).write_text(_model_card(cfg, report))
