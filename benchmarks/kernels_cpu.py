"""Microbenchmark of the channel-merged strategies against a dense layer on this CPU.

Shapes: one SmolLM2-135M decoder layer's linears (hidden 576, intermediate 1536, 9 query and
3 KV heads of 64: qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536), N=4 experts, K=2
groups with random per-channel partitions (group 0 the largest), float32 and, where the CPU
has native bf16 (AVX512-BF16 / AMX), bfloat16. Each cell is the time of all four linears of
one layer in microseconds: best of interleaved runs over several distinct layers (so weights
stream from DRAM as in a real model). ``dense`` is one expert's dense weight through
``F.linear``; ``vllm`` is what stock vLLM runs for that weight (its CPU GEMM dispatch:
prepacked oneDNN, or sgl-kernel for small bf16 weights on AMX); the strategies run with the
plugin's GEMM backend (vLLM's, prepacked at load), ``auto F.linear`` with the plain one (the
kernels before prepacking).

Results are kept per host kind (AVX2 / AVX-512 / ...): a run replaces only its own host's
section of the results file.

    nice -n 10 .venv/bin/python benchmarks/kernels_cpu.py [--dtype float32 bfloat16] [--write benchmarks/kernels_RESULTS.md]

``--isa avx2`` runs as on an AVX2-only host, on a host with AVX-512: oneDNN and torch's own
kernels and MKL (``F.linear``'s BLAS) limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``, set by a re-exec before any
of them initialises) and the plugin's view of the CPU flags masked to AVX2 (so
its cost constants are the AVX2 ones). An emulation, not the hardware: the caches and memory
are the host's; its section is named as such.

``--split S`` runs the same layers as row tables (format v2, a budget merge): only a share S of
each layer's channels keeps a second row, so the merged layer stores (1 + S) x the dense rows;
its results are a section of their own.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vllm_channelmerge import kernels as kk  # noqa: E402
from vllm_channelmerge import costfit  # noqa: E402
from vllm_channelmerge.kernels import (  # noqa: E402
    ExpertBatch,
    HotExpertCache,
    channel_merged_linear,
    choose_strategy,
    prepare_layer,
    prepare_rows,
    reference_linear,
)
from vllm_channelmerge.rowtable import compact_groups  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
N, K = 4, 2
STRATS = ["all_groups", "per_expert_gather", "majority_residual", "hot_cache", "auto"]


NOTES = """
## Reading the tables (bytes and FLOPs)

- One SmolLM2-135M layer's four linears hold 3.54 M weights per expert: 14.2 MB in float32
  (7.1 MB in bfloat16); the K=2 merged layer stores twice that. Four distinct layers are run
  in turn so that weights stream from memory rather than sit in cache, as in a real model.
- Decode is memory-bound at small T: a dense layer at T=1 streams the dense bytes. A mixed
  batch needs, for each channel, every group that some present expert uses. With random
  partitions of 4 experts into <= 2 groups, 7 of 8 channels need both groups, so any strategy
  must stream >= 1.875x the dense bytes. `all_groups` streams 2x and does 2x the FLOPs;
  `majority_residual` streams group 0 once plus each expert's differing rows (gathered per
  call) and does (1 + r)x the FLOPs. So about 2x dense is the floor for mixed decode with this
  composition; it falls as a merge makes more channels agree across experts.
- A one-expert batch reaches dense speed only from a dense copy (`hot_cache`, prepacked when
  admitted): the memory of one more model per cached expert, within the cache's byte budget.
  Without one, `per_expert_gather` pays one gather per layer.
- Prefill is compute-bound: `per_expert_gather` does the dense FLOPs (on a per-call gather:
  the backend's `per_call` GEMM, oneDNN's unpacked inner product from 16 rows where torch runs
  it, else `F.linear`) plus one gather per present expert; `all_groups` does K x the FLOPs on
  the prepacked GEMM.
- AVX-512 + AVX512-BF16 host without AMX (AMD EPYC; 2026-12-06): torch's `F.linear` in
  float32 is MKL, which takes a slower path on this CPU: 2.2-2.5x slower than oneDNN from
  T=8 up. Before per-call GEMMs went through oneDNN, float32 prefill (`auto`, T=512) cost
  35.5 ms per layer, 2.59x stock; after, 20.8-22.4 ms, 1.48-1.52x (same machine, runs of
  the same day). Under `--isa avx2` on that host: prefill 39.7 -> 34.4-35.9 ms, one expert at
  T=32 3.4 -> 3.0-3.3 ms, mixed decode within noise (-4% to +6%).
- AVX-512 + AVX512-BF16 host without AMX (Intel Xeon; 2026-12-07): `F.linear`, oneDNN and
  vLLM's prepacked GEMM run float32 at the same speed; bfloat16 costs more per token than
  float32 (no AMX: prefill T=512 44-50 ms per layer against 27-30 ms), so bf16 saves bytes in
  decode but not compute in prefill. This VM's timings move 10-20% between runs.
- AVX2 hosts, emulated (`--isa avx2`, section below; two runs each, same machine, quiet):
  with oneDNN limited to AVX2, vLLM's prepacked GEMM is ~19% slower than `F.linear` at T=1,
  10–16% faster at T=8–32, and even at T=64 and in prefill. Against the kernels before the
  prepacked GEMMs (commit 20ee93c, plain `F.linear`, same emulation), `auto` is 7–20% slower
  for mixed decode at T=1 and 4–8% slower at T=64, 18–21% faster at T=8, 2–3% faster at T=32
  and 8–11% faster in prefill; one-expert T=32 moved +11% / −14% between runs (noise). So on
  an AVX2 host, concurrency-1 decode is the one place the prepacked path costs time.
- `auto` follows `choose_strategy`'s cost model (`kernels.CostModel`). With vLLM's backend its
  constants are timed on the host at load (`vllm_channelmerge/costfit.py`, printed above each
  table); rows before 2026-12-07 used the table keyed by CPU flags (`kernels.prepacked_cpu_cost`,
  still `CHANNELMERGE_COST_MODEL=table`). On the Intel AVX512-BF16 host without AMX the table
  (calibrated with AMX, where bf16 compute is ~10x cheaper per token) made bf16 prefill take
  `all_groups`: 99.2 ms per layer against 57.4 ms with the measured rule (stock 44-45 ms).
"""

HEADER = "\n".join([
    "# Channel-merged kernels on CPU (SmolLM2-135M layer shapes)", "",
    "One section per host kind (a run replaces only its own host's section). Command: "
    "`nice -n 10 .venv/bin/python benchmarks/kernels_cpu.py --write benchmarks/kernels_RESULTS.md` "
    "(defaults: --reps 12 --layers 4 --threads 1; float32, plus bfloat16 where the CPU has native bf16).", "",
    "`dense` = one expert's dense weight via `F.linear`; `vllm` = stock vLLM's CPU GEMM on that weight "
    "(its own dispatch: prepacked oneDNN, or sgl-kernel for small bf16 weights on AMX; the single-model "
    "bound); the strategy columns are `channel_merged_linear` with the plugin's GEMM backend (vLLM's, "
    "prepacked at load; `hot_cache` with every expert cached, i.e. the memory of N dense models: an "
    "upper bound; the other columns and `auto` use no cache); `auto F.linear` = `auto` with plain "
    "`F.linear` GEMMs (the kernels before prepacking); `auto / vllm` = the cost against stock. "
    "`auto picks` = its choices over the 4 layers. mixed = tokens round-robin over the 4 experts; "
    "single = all one expert; prefill = 4 contiguous segments.",
    NOTES])

HOST_START = "<!-- host: {} -->"
HOST_END = "<!-- end host: {} -->"


def host_sections(text: str) -> dict[str, str]:
    """The per-host-kind sections of a results file (kept when another host kind runs)."""
    out = {}
    for m in re.finditer(r"<!-- host: (.+?) -->\n(.*?)\n<!-- end host: \1 -->", text, re.S):
        out[m.group(1)] = m.group(2)
    return out


def write_sections(path: Path, header: str, kind: str, body: str) -> None:
    """Rewrite `path` as `header` + every host section, this host kind's replaced by `body`."""
    old = host_sections(path.read_text()) if path.exists() else {}
    old[kind] = body.strip()
    parts = [header.rstrip(), ""]
    for k in sorted(old):
        parts += [HOST_START.format(k), old[k], HOST_END.format(k), ""]
    path.write_text("\n".join(parts))


def host_line() -> str:
    flags = kk.cpu_flags()
    on = " ".join(k for k, v in flags.items() if v) or "none"
    cpu = kk.cpuinfo_field("model name") or platform.processor() or platform.machine()
    return f"{kk.host_kind(flags)}; CPU flags: {on}; {cpu}, {os.cpu_count()} cores"


# What ``--isa`` limits: the environment each library reads at initialisation.
EMULATED_ISA = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                         "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def emulate_isa(isa: str) -> str:
    """Re-exec this process with oneDNN and ATen limited to `isa` (once), then mask the plugin's
    CPU flags to it; returns the label of the emulation for the host line."""
    env = EMULATED_ISA[isa]
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    real = kk.cpu_flags()
    if isa == "avx2" and not real.get("avx2"):
        raise SystemExit("--isa avx2: this CPU has no AVX2")
    masked = {k: (k == "avx2") for k in real}
    kk.cpu_flags = lambda: dict(masked)  # every caller looks it up in the module
    return f" (emulated on {kk.host_kind(real)}: {', '.join(f'{k}={v}' for k, v in env.items())})"


def native_bf16() -> bool:
    f = kk.cpu_flags()
    return bool(f.get("avx512_bf16") or f.get("amx_bf16"))


def group_index(n: int, k: int, out: int, gen: torch.Generator) -> torch.Tensor:
    """Random per-channel partitions into <= k groups, relabelled so group 0 is the largest."""
    gi = torch.randint(0, k, (n, out), generator=gen)
    sizes = torch.stack([(gi == g).sum(0) for g in range(k)])
    rank = torch.argsort(sizes, dim=0, descending=True, stable=True)
    relabel = torch.empty_like(rank)
    relabel.scatter_(0, rank, torch.arange(k).unsqueeze(1).expand(k, out).contiguous())
    return relabel.gather(0, gi).to(torch.int32)


def vllm_gemm():
    """The plugin's GEMM backend in an engine on this CPU (vLLM's CPU dispatch), or None."""
    try:
        import logging

        logging.getLogger("vllm").setLevel(logging.WARNING)
        from vllm_channelmerge import compat

        f = compat.cpu_gemm_factory()
        if f is kk.TORCH_GEMM:
            return None
        f.prepack(torch.randn(8, 8))(torch.randn(2, 8))
        return f
    except Exception as e:  # optional baseline
        print(f"# vLLM's CPU GEMM skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def bench_interleaved(fns: dict, reps: int, clock=time.perf_counter) -> dict:
    """Best-of-reps microseconds per function, round-robin (the timer the cost rule's start-up
    measurement uses). With one torch thread the clock is this thread's CPU time, which does
    not count the time the OS gives to other processes."""
    return costfit.interleaved_best_us(fns, reps, clock)


COLS = ["dense", "vllm"] + STRATS + ["auto F.linear"]


def run_dtype(dtype: torch.dtype, args, gemm) -> tuple[list, float, list[str], str]:
    """One table: rows (T, kind, {column: us}, auto picks), mean residual fraction, GEMM paths
    and the cost rule."""
    gen = torch.Generator().manual_seed(0)
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    plugin = gemm or kk.TORCH_GEMM
    cache = HotExpertCache(budget_bytes=1 << 33)
    # L distinct layers, run in turn, so that weights stream from memory as in a real model.
    # Per layer and linear: (weight, group_index, state with cache, state, plain-F.linear state)
    layers = []
    for _ in range(args.layers):
        lay = {}
        for name, (out, inp) in SHAPES.items():
            w = (torch.randn(K, out, inp, generator=gen) / inp**0.5).to(dtype)
            gi = group_index(N, K, out, gen)
            if args.split is None:
                prep = lambda **kw: prepare_layer(w, gi, name=name, **kw)  # noqa: E731
            else:  # a row table: a share of the channels split, the others one row
                gi = (gi * (torch.rand(1, out, generator=gen) < args.split)).to(torch.int32)
                rows, ri, _ = compact_groups(w, gi)
                prep = lambda **kw: prepare_rows(rows, ri, None, out, name=name, **kw)  # noqa: E731
            lay[name] = (w, gi, prep(cache=cache, gemm=plugin), prep(gemm=plugin), prep())
        layers.append(lay)
    resid = statistics.mean(f for lay in layers for v in lay.values() for f in v[3].residual_fraction)
    dense_w = [{n: v[3].expert_weight(1)[0].contiguous() for n, v in lay.items()} for lay in layers]
    stock = [{n: gemm.prepack(w) for n, w in d.items()} for d in dense_w] if gemm else None
    paths = sorted({getattr(fn, "path", "torch") for lay in layers for v in lay.values() for fn in v[3].packs.values()})
    nl = len(layers)
    rows = [(1, "mixed"), (8, "mixed"), (32, "mixed"), (64, "mixed"), (32, "single"), (512, "prefill")]
    lines = []
    for t, kind in rows:
        if kind == "single":
            ids = torch.full((t,), 1, dtype=torch.long)
        elif kind == "prefill":
            ids = torch.arange(t) // (t // N)
        else:
            ids = torch.arange(t) % N
        batch = ExpertBatch.build(ids, N)
        xs = {n: torch.randn(t, inp).to(dtype) for n, (_, inp) in SHAPES.items()}
        for lay in layers:  # check once, and warm the cache
            for n, (w, gi, st_c, st, st_p) in lay.items():
                ref = reference_linear(xs[n], w, gi, ids).float()
                for s_, st_ in (("hot_cache", st_c), ("auto", st), ("auto", st_p)):
                    torch.testing.assert_close(channel_merged_linear(xs[n], st_, batch, s_).float(), ref, **tol)
        fns = {"dense": lambda: [F.linear(xs[n], d[n]) for d in dense_w for n in SHAPES]}
        if stock:
            fns["vllm"] = lambda: [o[n](xs[n]) for o in stock for n in SHAPES]
        for s in STRATS:
            j = 2 if s == "hot_cache" else 3
            fns[s] = lambda s=s, j=j: [channel_merged_linear(xs[n], lay[n][j], batch, s) for lay in layers for n in SHAPES]
        fns["auto F.linear"] = lambda: [channel_merged_linear(xs[n], lay[n][4], batch) for lay in layers for n in SHAPES]
        clock = time.thread_time if args.threads == 1 else time.perf_counter
        res = bench_interleaved(fns, args.reps if t < 512 else max(3, args.reps // 4), clock)
        res = {k: v / nl for k, v in res.items()}
        res.setdefault("vllm", float("nan"))
        picks = sorted({choose_strategy(batch, lay[n][3]) for lay in layers for n in SHAPES})
        lines.append((t, kind, res, ",".join(picks)))
        print(f"# {dtype} T={t} {kind}: " + ", ".join(f"{k} {v:.0f}" for k, v in res.items()), file=sys.stderr)
    return lines, resid, paths, layers[0]["qkv"][3].cost_model.summary()


def table(lines: list) -> tuple[str, str]:
    fixed = ("all_groups", "per_expert_gather", "majority_residual")
    matched = sum(p == min(fixed, key=r.__getitem__) for _, _, r, p in lines)
    hdr = "| T | batch | " + " | ".join(COLS) + " | auto / vllm | auto picks |"
    sep = "|" + "---|" * (len(COLS) + 4)
    body = []
    for t, kind, r, p in lines:
        cells = " | ".join("n/a" if r[c] != r[c] else f"{r[c]:.0f}" for c in COLS)
        ratio = "n/a" if r["vllm"] != r["vllm"] else f"{r['auto'] / r['vllm']:.2f}"
        body.append(f"| {t} | {kind} | {cells} | {ratio} | {p} |")
    note = (f"`auto` picked the fastest of all_groups / per_expert_gather / majority_residual in "
            f"{matched} of {len(lines)} rows.")
    return "\n".join([hdr, sep, *body]), note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", default=None, help="also write the markdown tables to this file (this host's section)")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--layers", type=int, default=4, help="distinct layers run in turn (defeats the cache)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--dtype", nargs="+", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32, and bfloat16 where the CPU has native bf16")
    ap.add_argument("--split", type=float, default=None,
                    help="row tables (format v2) with this share of channels split (default: K=2 groups)")
    ap.add_argument("--isa", choices=sorted(EMULATED_ISA), default=None,
                    help="run as on a host with only this ISA (see the module docstring)")
    args = ap.parse_args()
    emulated = emulate_isa(args.isa) if args.isa else ""
    dtypes = args.dtype or (["float32", "bfloat16"] if native_bf16() else ["float32"])
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    gemm = vllm_gemm()
    when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    host = host_line()
    kind = kk.host_kind() + emulated + ("" if args.split is None else f", row tables with {args.split:.0%} of channels split")
    out = [f"## {kind}", "",
           f"Host: {host}. torch {torch.__version__}, {torch.get_num_threads()} thread(s); {when}.  ",
           f"Command: `nice -n 10 .venv/bin/python benchmarks/kernels_cpu.py {' '.join(sys.argv[1:])}`  ",
           f"Plugin GEMM backend: {gemm.name if gemm else 'torch F.linear (vLLM not importable)'}.", ""]
    for dt in dtypes:
        lines, resid, paths, cost = run_dtype(getattr(torch, dt), args, gemm)
        tab, note = table(lines)
        meta = (f"Microseconds ({'thread CPU time' if args.threads == 1 else 'wall clock'}) per decoder layer "
                f"(4 linears), best of {args.reps} interleaved runs (prefill: {max(3, args.reps // 4)}); {dt}; "
                f"N={N}, K={K}; mean residual fraction {resid:.2f}; {args.layers} distinct layers in turn; "
                + ("" if args.split is None else f"row tables storing {1 + args.split:.2f}x the dense rows (expected); ")
                + f"prepacked GEMMs: {', '.join(paths)}; `auto`'s cost rule ({cost}).")
        print(f"### {dt}\n\n{meta}\n\n{tab}\n\n{note}\n")
        out += [f"### {dt}", "", meta, "", tab, "", note, ""]
    if args.write:
        write_sections(Path(args.write), HEADER, kind, "\n".join(out))


if __name__ == "__main__":
    main()
