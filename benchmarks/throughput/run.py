"""Throughput of mixed-expert serving against its alternatives, over HTTP, one machine, one run.

Systems (same prompts, greedy, fixed output length, N experts, K groups):
  a  stock vLLM serving one dense expert (the per-token upper bound)
  b  channelmerge serving all N experts, requests spread evenly (round robin) over them
  b_torch  b with the kernels' GEMMs on plain F.linear (CHANNELMERGE_CPU_GEMM=torch: the
           kernels as they were before they ran on vLLM's prepacked CPU GEMM)
  b_budget  b on a checkpoint merged under a memory budget (format v2: each channel 1..K rows),
           given with --budget-checkpoint DIR (its experts must be the same N)
  c  the ensemble: N stock vLLM servers, one per dense expert, each given its share at once
  d  channelmerge with every request for one expert
  d_cache  d with the hot-expert cache holding that expert's dense copy
           (CHANNELMERGE_HOT_CACHE_BYTES = one expert's weight bytes)
  e  the multi-LoRA peer: stock vLLM on the base serving each expert as a rank-R LoRA extracted
     by mergekit (benchmarks/quality/lora.py; --enable-lora --max-lora-rank R --max-loras N),
     the same mixed round-robin load as b (requests name the N adapters, never the base: on
     CPU vLLM serves a base request with another adapter's delta once adapters are loaded).
     `e_r{R}` picks the rank; plain `e` is the rank whose params ratio ((base + N adapters) /
     (N x base)) is closest to the K-group merge's (K=2: 0.447 -> r64). Rows are named e_r{R};
     weight bytes = base + the N adapters (files on disk). Needs the real experts.
Each system runs in each --dtype (default: float32, and bfloat16 where the CPU has native bf16).
The load generator is vLLM's own serving benchmark (`vllm.benchmarks.serve`); its
`--lora-modules NAME... --lora-assignment round-robin` sets each request's `model`.

Usage: python -m benchmarks.throughput.run [--systems a b c d e e_r16] [--concurrency 1 8 32 64] [--dtype float32 bfloat16]
Writes benchmarks/throughput/results.json, RESULTS.md and throughput.png. Results are kept per
host kind (AVX2 / AVX-512 + AVX512-BF16 + AMX / ...: the CPU flags are recorded with every
run) and dtype: a run replaces only the rows of its own host kind and dtypes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import psutil

from benchmarks.kernels_cpu import host_line, native_bf16
from benchmarks.servers import free_port, wait_until_ready
from vllm_channelmerge import kernels as kk

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = ROOT / "work" / "throughput"
REAL_EXPERTS = ROOT / "work" / "experts"
log = logging.getLogger("throughput")

# SmolLM2-135M shape (Llama): random weights when the real experts are not built. Like the
# real experts, the (tied) embeddings are frozen: one group for the embedding and the lm_head.
SMOLLM2_SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                     intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
RANDOM_FAMILY = "family-frozen-embed"


def prepare(num_experts: int, num_groups: int) -> tuple[dict[str, Path], Path]:
    """Dense experts (real ones if built, else random SmolLM2-shaped) and their K-group merge."""
    from merge_tool.config import MergeConfig
    from merge_tool.merge import run_merge
    from merge_tool.synthetic import make_family

    real = sorted(p.parent for p in REAL_EXPERTS.glob("*/config.json") if p.parent.name != "base")
    if len(real) >= num_experts:
        experts = {p.name: p for p in real[:num_experts]}
        base = REAL_EXPERTS / "base"
    else:
        names = [f"expert{i}" for i in range(num_experts)]
        fam = WORK / RANDOM_FAMILY
        if not all((fam / n / "model.safetensors").exists() for n in names):
            log.info("building random SmolLM2-shaped experts in %s", fam)
            make_family(fam, names, arch="llama", frozen=("embed_tokens",), **SMOLLM2_SHAPE)
        experts = {n: fam / n for n in names}
        base = fam / "base"
    merged = WORK / (f"merged-k{num_groups}" if len(real) >= num_experts else f"merged-{RANDOM_FAMILY}-k{num_groups}")
    if not (merged / "config.json").exists():
        cfg = MergeConfig(base_model=str(base), num_groups=num_groups, method="average",
                          experts=[{"name": n, "model": str(p)} for n, p in experts.items()])
        run_merge(cfg, merged)
    return experts, merged


def budget_summary(model_dir: Path) -> str:
    """What the budget checkpoint stores: format, K, its budget and parameters ÷ ensemble."""
    from vllm_channelmerge import format as fmt

    qc = fmt.read_checkpoint_config(model_dir)
    report = json.loads((model_dir / fmt.REPORT_FILE).read_text())
    return (f"format v{qc.format_version}, K={qc.num_groups}, method {qc.method}, budget {qc.budget}, "
            f"params ÷ ensemble {report['params']['ratio']:.3f}")


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


class RssMonitor:
    """Peak summed RSS of a set of process trees, sampled in a thread."""

    def __init__(self, pids: list[int], interval: float = 0.5):
        self.pids, self.interval, self.peak = pids, interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                for p in [root, *root.children(recursive=True)]:
                    total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> "RssMonitor":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def server_env(threads_bind: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    cache = WORK / "cache"
    return {**os.environ, **(extra or {}), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
            "VLLM_CACHE_ROOT": str(cache / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}


SYSTEMS = ("a", "b", "b_torch", "b_budget", "c", "d", "d_cache")
LORA_SYSTEM = re.compile(r"e_r(\d+)$")  # e_r{R}: system e at LoRA rank R


def lora_rank(system: str) -> int | None:
    m = LORA_SYSTEM.match(system)
    return int(m.group(1)) if m else None


def system_arg(name: str) -> str:
    """argparse type of --systems: a fixed system, `e`, or `e_r{R}` with R one of vLLM's ranks."""
    from benchmarks.quality.lora import VLLM_MAX_LORA_RANKS

    r = lora_rank(name)
    if name in SYSTEMS or name == "e" or (r is not None and r in VLLM_MAX_LORA_RANKS):
        return name
    raise argparse.ArgumentTypeError(f"{name!r}: one of {', '.join(SYSTEMS)}, e, e_r<R> "
                                     f"(R in {VLLM_MAX_LORA_RANKS})")


def merged_params_ratio(merged: Path) -> float:
    """Stored parameters / the ensemble's, from the merged checkpoint's report."""
    from vllm_channelmerge import format as fmt

    return json.loads((merged / fmt.REPORT_FILE).read_text())["params"]["ratio"]


def require_real_experts(experts: dict[str, Path]) -> None:
    """System e extracts the real experts' LoRAs (benchmarks/quality/lora.py works on those only)."""
    from benchmarks.quality import lora

    if any(p.resolve() != lora.expert_dir(n) for n, p in experts.items()):
        raise SystemExit("system e needs the real experts (python -m benchmarks.quality.build_experts)")


def lora_adapters(experts: dict[str, Path], rank: int) -> dict[str, Path]:
    """Each real expert's rank-R LoRA (mergekit, cached under work/quality/lora_r{R}/)."""
    from benchmarks.quality import lora

    require_real_experts(experts)
    return {n: lora.extract(n, rank) for n in experts}


def system_order(name: str) -> tuple[int, int]:
    r = lora_rank(name)
    return (len(SYSTEMS), r) if r is not None else (SYSTEMS.index(name), 0)
COMMON_ARGS = ["--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "64"]


@contextmanager
def servers(cmds: list[list[str]], ports: list[int], logs: list[Path],
            extra_env: dict[str, str] | None = None) -> Iterator[list[subprocess.Popen]]:
    procs = []
    try:
        for cmd, lp in zip(cmds, logs):
            log.info("starting: %s", " ".join(cmd))
            procs.append(subprocess.Popen(cmd, env=server_env("auto", extra_env), stdout=lp.open("w"),
                                          stderr=subprocess.STDOUT))
        for port, p in zip(ports, procs):
            wait_until_ready(f"http://127.0.0.1:{port}/v1", p)
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def stock_cmd(model: Path, name: str, port: int, dtype: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", name, "--port", str(port), "--dtype", dtype, *COMMON_ARGS]


def lora_cmd(base: Path, adapters: dict[str, Path], rank: int, port: int, dtype: str) -> list[str]:
    """Stock vLLM multi-LoRA: the base (served under a name no request uses) + every adapter."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
            "--served-model-name", "base-not-queried", "--port", str(port), "--dtype", dtype,
            "--enable-lora", "--lora-modules", *(f"{n}={p}" for n, p in adapters.items()),
            "--max-lora-rank", str(rank), "--max-loras", str(len(adapters)), *COMMON_ARGS]


def channelmerge_cmd(merged: Path, port: int, dtype: str) -> list[str]:
    exe = str(Path(sys.executable).parent / "channelmerge")
    return [exe, "serve", str(merged), "--port", str(port), "--dtype", dtype, *COMMON_ARGS]


def bench(port: int, model: str, tokenizer: Path, names: list[str] | None, concurrency: int,
          num_prompts: int, input_len: int, output_len: int, seed: int) -> dict:
    """One run of vLLM's serving benchmark in a subprocess (it owns its own event loop)."""
    out = WORK / "raw" / f"p{port}-c{concurrency}-{time.time_ns()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys, json, argparse\n"
        "from vllm.benchmarks.serve import add_cli_args, main\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "p = FlexibleArgumentParser(); add_cli_args(p); a = p.parse_args(sys.argv[2:])\n"
        "r = main(a)\n"
        "json.dump({k: v for k, v in r.items() if isinstance(v, (int, float, str))}, open(sys.argv[1], 'w'))\n"
    )
    args = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
            "--seed", str(seed), "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
            "--temperature", "0", "--disable-tqdm"]
    if names:
        args += ["--lora-modules", *names, "--lora-assignment", "round-robin"]
    subprocess.run([sys.executable, "-c", code, str(out), *args], check=True, env=server_env("nobind"),
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def summarise(system: str, conc: int, results: list[dict], wbytes: int, rss: int, dtype: str = "float32") -> dict:
    """Aggregate one or more simultaneous benchmark clients into one row."""
    duration = max(r["duration"] for r in results)
    tokens = sum(r["total_output_tokens"] for r in results)
    pick = lambda key: max(r[key] for r in results)  # noqa: E731  worst client for latency
    return {"system": system, "dtype": dtype, "concurrency": conc, "output_tokens_per_s": tokens / duration,
            "ttft_ms_p50": pick("p50_ttft_ms"), "ttft_ms_p99": pick("p99_ttft_ms"),
            "itl_ms_p50": pick("p50_itl_ms"), "itl_ms_p99": pick("p99_itl_ms"),
            "weight_bytes": wbytes, "peak_rss_bytes": rss, "completed": sum(r["completed"] for r in results),
            "num_clients": len(results)}


def run_system(system: str, experts: dict[str, Path], merged: Path, concs: list[int], a: argparse.Namespace,
               dtype: str = "float32") -> list[dict]:
    names = list(experts)
    first = names[0]
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if system == "c":
        ports = [free_port() for _ in names]
        cmds = [stock_cmd(experts[n], n, p, dtype) for n, p in zip(names, ports)]
        wbytes = sum(weight_bytes(experts[n]) for n in names)
    elif system == "a":
        ports = [free_port()]
        cmds = [stock_cmd(experts[first], first, ports[0], dtype)]
        wbytes = weight_bytes(experts[first])
    elif lora_rank(system) is not None:
        rank = lora_rank(system)
        adapters = lora_adapters(experts, rank)
        base = REAL_EXPERTS / "base"
        ports = [free_port()]
        cmds = [lora_cmd(base, adapters, rank, ports[0], dtype)]
        wbytes = weight_bytes(base) + sum(weight_bytes(p) for p in adapters.values())
    else:
        served = a.budget_checkpoint if system == "b_budget" else merged
        ports = [free_port()]
        cmds = [channelmerge_cmd(served, ports[0], dtype)]
        wbytes = weight_bytes(served)
    env = {}
    if system == "d_cache":  # room for one dense expert (weights counted once more below)
        env["CHANNELMERGE_HOT_CACHE_BYTES"] = str(int(1.05 * weight_bytes(experts[first])))
        wbytes += weight_bytes(experts[first])
    if system == "b_torch":
        env["CHANNELMERGE_CPU_GEMM"] = "torch"
    rows = []
    with servers(cmds, ports, [logs / f"{system}-{dtype}-{i}.log" for i in range(len(cmds))], env) as procs:
        with RssMonitor([p.pid for p in procs]) as mon:
            for conc in concs:
                n_prompts = max(a.prompts_per_concurrency * conc, a.min_prompts)
                if system == "c":  # each server gets its share, all at once
                    share_c, share_n = max(conc // len(names), 1), max(n_prompts // len(names), 1)
                    with cf.ThreadPoolExecutor(len(names)) as pool:
                        res = list(pool.map(lambda i: bench(ports[i], names[i], experts[names[i]], None, share_c,
                                                            share_n, a.input_len, a.output_len, a.seed + i),
                                            range(len(names))))
                elif system in ("b", "b_torch", "b_budget") or lora_rank(system) is not None:
                    res = [bench(ports[0], first, experts[first], names, conc, n_prompts, a.input_len,
                                 a.output_len, a.seed)]
                else:
                    res = [bench(ports[0], first, experts[first], None, conc, n_prompts, a.input_len,
                                 a.output_len, a.seed)]
                rows.append(summarise(system, conc, res, wbytes, mon.peak, dtype))
                log.info("%s %s c=%d: %.1f tok/s", system, dtype, conc, rows[-1]["output_tokens_per_s"])
        for r in rows:
            r["peak_rss_bytes"] = mon.peak
    return rows


RESULTS_JSON = HERE / "results.json"
LEGACY_HOST = "AVX2"  # results.json written before host kinds were recorded came from the AVX2 host
LABELS = {"a": "a: one dense expert (stock)", "b": "b: channelmerge, mixed",
          "b_torch": "b on plain F.linear GEMMs", "b_budget": "b on the budget checkpoint",
          "c": "c: ensemble of stock servers",
          "d": "d: channelmerge, one expert", "d_cache": "d with the hot-expert cache"}


def label(system: str) -> str:
    r = lora_rank(system)
    return f"e: stock vLLM multi-LoRA, rank {r}" if r is not None else LABELS[system]


def load_results() -> dict:
    """{"hosts": {host kind: {"host", "meta": {dtype: meta}, "runs": [rows], "notes"?}}}."""
    if not RESULTS_JSON.exists():
        return {"hosts": {}}
    data = json.loads(RESULTS_JSON.read_text())
    if "hosts" not in data:  # one run of one host, float32 (the first format)
        meta = dict(data.get("meta", {}))
        data = {"hosts": {LEGACY_HOST: {
            "host": "AVX2 (the 2-core AVX2 host of DESIGN.md section 6; CPU flags not recorded then), "
                    + meta.get("machine", "?"),
            "meta": {"float32": meta},
            "runs": [{"dtype": "float32", **r} for r in data.get("runs", [])],
            "notes_file": "notes.md"}}}
    return data


def merge_run(data: dict, kind: str, host: str, rows: list[dict], meta: dict, dtypes: list[str]) -> dict:
    """This run replaces the rows of its host kind and dtypes; every other row is kept."""
    ent = data["hosts"].setdefault(kind, {"host": host, "meta": {}, "runs": []})
    ent["host"] = host
    ent["runs"] = [r for r in ent["runs"] if r.get("dtype", "float32") not in dtypes] + rows
    for dt in dtypes:
        ent["meta"][dt] = meta
    return data


def section(kind: str, ent: dict) -> list[str]:
    lines = [f"## {kind}", "", f"Host: {ent['host']}", ""]
    for dt in sorted({r.get("dtype", "float32") for r in ent["runs"]}, key=lambda d: d != "float32"):
        rows = [r for r in ent["runs"] if r.get("dtype", "float32") == dt]
        meta = ent["meta"].get(dt, {})
        by = {(r["system"], r["concurrency"]): r for r in rows}
        lines += [
            f"### {dt}", "",
            f"Command: `{meta.get('command', '?')}`  ", f"Machine: {meta.get('machine', '?')}  ",
            f"Date: {meta.get('date', '?')}  ",
            f"Experts: {meta.get('experts', '?')}, N={meta.get('num_experts', '?')}, K={meta.get('num_groups', '?')}, "
            f"input {meta.get('input_len', '?')} / output {meta.get('output_len', '?')} tokens, greedy, {dt}, eager.", "",
            "| system | conc | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | weight MB | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['system']} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} | {r['ttft_ms_p50']:.0f} | "
                         f"{r['ttft_ms_p99']:.0f} | {r['itl_ms_p50']:.1f} | {r['itl_ms_p99']:.1f} | "
                         f"{r['weight_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
        lines += ["", "Ratios (same host, dtype and run):", ""]
        e_systems = sorted({r["system"] for r in rows if lora_rank(r["system"]) is not None}, key=system_order)
        for conc in sorted({r["concurrency"] for r in rows}):
            tp = {s: by[(s, conc)]["output_tokens_per_s"] for s in (*SYSTEMS, *e_systems) if (s, conc) in by}
            pairs = [("b", "a"), ("b_torch", "a"), ("b_budget", "a"), ("d", "a"), ("d_cache", "a"),
                     ("b", "c"), ("b", "b_torch")]
            pairs += [p for e in e_systems for p in (("b", e), (e, "a"))]
            parts = [f"{x}/{y} = {tp[x] / tp[y]:.2f}" for x, y in pairs if x in tp and y in tp]
            if parts:
                lines.append(f"- concurrency {conc}: " + ", ".join(parts))
        c0 = rows[0]["concurrency"] if rows else None
        for x in ("b", "b_budget", *e_systems):
            if (x, c0) in by and ("c", c0) in by:
                lines.append(f"- weight bytes {x}/c = {by[(x, c0)]['weight_bytes'] / by[('c', c0)]['weight_bytes']:.2f}")
        if meta.get("budget_checkpoint"):
            lines.append(f"- b_budget served `{meta['budget_checkpoint']}` ({meta.get('budget_summary', '')})")
        for e, info in sorted(meta.get("lora", {}).items(), key=lambda kv: system_order(kv[0])):
            if e in e_systems:
                lines.append(f"- {e}: the N experts as rank-{info['rank']} LoRAs (mergekit extract_lora, "
                             f"`{info['adapters']}`), params ÷ ensemble {info['params_ratio']:.3f} "
                             f"(the K={meta.get('num_groups', '?')} merge: {info['merge_params_ratio']:.3f}); "
                             "requests name the adapters, never the base")
        lines.append("")
    notes = ent.get("notes")
    if ent.get("notes_file") and (HERE / ent["notes_file"]).exists():  # written by hand after that run
        notes = (HERE / ent["notes_file"]).read_text()
    if notes:  # its headings one level down, under the host's
        lines += ["\n".join(("#" + ln) if ln.startswith("#") else ln for ln in notes.strip().splitlines()), ""]
    return lines


def write_report(data: dict) -> None:
    RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Throughput: mixed-expert serving against its alternatives", "",
             "One section per host kind (the CPU flags decide which GEMM is fast: see DESIGN.md section 6) "
             "and dtype; compare ratios within a section, not tokens/s across them. Written by "
             "`python -m benchmarks.throughput.run` from `results.json`; a run replaces only the rows of "
             "its own host kind and dtypes. `weight MB` = checkpoint bytes on disk.", ""]
    for kind in sorted(data["hosts"]):
        lines += section(kind, data["hosts"][kind])
    (HERE / "RESULTS.md").write_text("\n".join(lines).rstrip() + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [(k, dt) for k, ent in sorted(data["hosts"].items())
                  for dt in sorted({r.get("dtype", "float32") for r in ent["runs"]}, key=lambda d: d != "float32")]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (kind, dt) in zip(axes[0], panels):
            rows = [r for r in data["hosts"][kind]["runs"] if r.get("dtype", "float32") == dt]
            e_systems = sorted({r["system"] for r in rows if lora_rank(r["system"]) is not None}, key=system_order)
            for s in (*SYSTEMS, *e_systems):
                pts = sorted((r["concurrency"], r["output_tokens_per_s"]) for r in rows if r["system"] == s)
                if pts:
                    ax.plot(*zip(*pts), marker="^" if s in e_systems else "o", label=label(s))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel("output tokens/s")
            ax.set_title(f"{kind}, {dt}", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(HERE / "throughput.png", dpi=120)
    except ImportError:
        log.warning("matplotlib not installed: no plot")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=list("abcd"), type=system_arg,
                    help=f"{', '.join(SYSTEMS)}, e (the LoRA rank matched to the K-group merge's params ratio) "
                         "or e_r<R> (rank R); default: a b c d")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--dtype", nargs="+", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32, and bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX)")
    ap.add_argument("--num-experts", type=int, default=4)
    ap.add_argument("--num-groups", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prompts-per-concurrency", type=int, default=2)
    ap.add_argument("--min-prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--notes", type=Path, help="markdown file: this host kind's reading of its numbers "
                                                 "(kept in results.json)")
    ap.add_argument("--budget-checkpoint", type=Path,
                    help="merged checkpoint system b_budget serves (e.g. a budget merge of the same experts)")
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md and the plot from results.json")
    a = ap.parse_args()
    if "b_budget" in a.systems and not (a.budget_checkpoint and (a.budget_checkpoint / "config.json").exists()):
        ap.error("system b_budget needs --budget-checkpoint DIR (a merged checkpoint folder with config.json)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = load_results()
    kind, host = kk.host_kind(), host_line()
    if not a.report_only:
        dtypes = a.dtype or (["float32", "bfloat16"] if native_bf16() else ["float32"])
        experts, merged = prepare(a.num_experts, a.num_groups)
        lora_meta = {}
        if any(s == "e" or lora_rank(s) is not None for s in a.systems):
            from benchmarks.quality import lora

            require_real_experts(experts)
            target = merged_params_ratio(merged)
            systems = list(dict.fromkeys(f"e_r{lora.matched_rank(target, num_experts=len(experts))}"
                                         if s == "e" else s for s in a.systems))
            for s in systems:
                if lora_rank(s) is not None:
                    adapters = lora_adapters(experts, lora_rank(s))  # extracted before any server starts
                    lora_meta[s] = {"rank": lora_rank(s), "merge_params_ratio": round(target, 4),
                                    "params_ratio": round(lora.params_ratio(lora_rank(s), list(experts)), 4),
                                    "adapters": str(next(iter(adapters.values())).parent.relative_to(ROOT))}
            log.info("LoRA systems: %s", lora_meta)
        else:
            systems = list(a.systems)
        rows: list[dict] = []
        for dt in dtypes:
            for s in systems:
                rows += run_system(s, experts, merged, a.concurrency, a, dt)
        meta = {"command": "python -m benchmarks.throughput.run " + " ".join(sys.argv[1:]),
                "machine": f"{host}, {psutil.virtual_memory().total / 2**30:.0f} GiB",
                "cpu_flags": kk.cpu_flags(),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "experts": ("real" if (REAL_EXPERTS / "base").exists()
                            else "random SmolLM2-135M-shaped, embeddings frozen (K=1 for them)"),
                "num_experts": a.num_experts, "num_groups": a.num_groups,
                "input_len": a.input_len, "output_len": a.output_len}
        if lora_meta:
            meta["lora"] = lora_meta
        if "b_budget" in a.systems:
            meta["budget_checkpoint"] = str(a.budget_checkpoint)
            meta["budget_summary"] = budget_summary(a.budget_checkpoint)
        data = merge_run(data, kind, host, rows, meta, dtypes)
    if a.notes:
        data["hosts"].setdefault(kind, {"host": host, "meta": {}, "runs": []})["notes"] = a.notes.read_text()
    write_report(data)


if __name__ == "__main__":
    main()
