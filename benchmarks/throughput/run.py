"""Throughput of mixed-expert serving against its alternatives, over HTTP, one machine, one run.

Systems (same prompts, greedy, fixed output length, N experts, K groups):
  a  stock vLLM serving one dense expert (the per-token upper bound)
  b  channelmerge serving all N experts, requests spread evenly (round robin) over them
  c  the ensemble: N stock vLLM servers, one per dense expert, each given its share at once
  d  channelmerge with every request for one expert
  d_cache  d with the hot-expert cache holding that expert's dense copy
           (CHANNELMERGE_HOT_CACHE_BYTES = one expert's weight bytes)
The load generator is vLLM's own serving benchmark (`vllm.benchmarks.serve`); its
`--lora-modules NAME... --lora-assignment round-robin` sets each request's `model`.

Usage: python -m benchmarks.throughput.run [--systems a b c d] [--concurrency 1 8 32 64]
Writes benchmarks/throughput/results.json, RESULTS.md and throughput.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import psutil

from benchmarks.servers import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = ROOT / "work" / "throughput"
REAL_EXPERTS = ROOT / "work" / "experts"
log = logging.getLogger("throughput")

# SmolLM2-135M shape (Llama): random weights when the real experts are not built.
SMOLLM2_SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                     intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


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
        fam = WORK / "family"
        if not all((fam / n / "model.safetensors").exists() for n in names):
            log.info("building random SmolLM2-shaped experts in %s", fam)
            make_family(fam, names, arch="llama", **SMOLLM2_SHAPE)
        experts = {n: fam / n for n in names}
        base = fam / "base"
    merged = WORK / f"merged-k{num_groups}"
    if not (merged / "config.json").exists():
        cfg = MergeConfig(base_model=str(base), num_groups=num_groups, method="average",
                          experts=[{"name": n, "model": str(p)} for n, p in experts.items()])
        run_merge(cfg, merged)
    return experts, merged


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


SYSTEMS = ("a", "b", "c", "d", "d_cache")
COMMON_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--max-num-seqs", "64"]


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


def stock_cmd(model: Path, name: str, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", name, "--port", str(port), *COMMON_ARGS]


def channelmerge_cmd(merged: Path, port: int) -> list[str]:
    exe = str(Path(sys.executable).parent / "channelmerge")
    return [exe, "serve", str(merged), "--port", str(port), *COMMON_ARGS]


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


def summarise(system: str, conc: int, results: list[dict], wbytes: int, rss: int) -> dict:
    """Aggregate one or more simultaneous benchmark clients into one row."""
    duration = max(r["duration"] for r in results)
    tokens = sum(r["total_output_tokens"] for r in results)
    pick = lambda key: max(r[key] for r in results)  # noqa: E731  worst client for latency
    return {"system": system, "concurrency": conc, "output_tokens_per_s": tokens / duration,
            "ttft_ms_p50": pick("p50_ttft_ms"), "ttft_ms_p99": pick("p99_ttft_ms"),
            "itl_ms_p50": pick("p50_itl_ms"), "itl_ms_p99": pick("p99_itl_ms"),
            "weight_bytes": wbytes, "peak_rss_bytes": rss, "completed": sum(r["completed"] for r in results),
            "num_clients": len(results)}


def run_system(system: str, experts: dict[str, Path], merged: Path, concs: list[int], a: argparse.Namespace) -> list[dict]:
    names = list(experts)
    first = names[0]
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if system == "c":
        ports = [free_port() for _ in names]
        cmds = [stock_cmd(experts[n], n, p) for n, p in zip(names, ports)]
        wbytes = sum(weight_bytes(experts[n]) for n in names)
    elif system == "a":
        ports = [free_port()]
        cmds = [stock_cmd(experts[first], first, ports[0])]
        wbytes = weight_bytes(experts[first])
    else:
        ports = [free_port()]
        cmds = [channelmerge_cmd(merged, ports[0])]
        wbytes = weight_bytes(merged)
    env = {}
    if system == "d_cache":  # room for one dense expert (weights counted once more below)
        env["CHANNELMERGE_HOT_CACHE_BYTES"] = str(int(1.05 * weight_bytes(experts[first])))
        wbytes += weight_bytes(experts[first])
    rows = []
    with servers(cmds, ports, [logs / f"{system}-{i}.log" for i in range(len(cmds))], env) as procs:
        with RssMonitor([p.pid for p in procs]) as mon:
            for conc in concs:
                n_prompts = max(a.prompts_per_concurrency * conc, a.min_prompts)
                if system == "c":  # each server gets its share, all at once
                    share_c, share_n = max(conc // len(names), 1), max(n_prompts // len(names), 1)
                    with cf.ThreadPoolExecutor(len(names)) as pool:
                        res = list(pool.map(lambda i: bench(ports[i], names[i], experts[names[i]], None, share_c,
                                                            share_n, a.input_len, a.output_len, a.seed + i),
                                            range(len(names))))
                elif system == "b":
                    res = [bench(ports[0], first, experts[first], names, conc, n_prompts, a.input_len,
                                 a.output_len, a.seed)]
                else:
                    res = [bench(ports[0], first, experts[first], None, conc, n_prompts, a.input_len,
                                 a.output_len, a.seed)]
                rows.append(summarise(system, conc, res, wbytes, mon.peak))
                log.info("%s c=%d: %.1f tok/s", system, conc, rows[-1]["output_tokens_per_s"])
        for r in rows:
            r["peak_rss_bytes"] = mon.peak
    return rows


def write_report(rows: list[dict], meta: dict) -> None:
    (HERE / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    by = {(r["system"], r["concurrency"]): r for r in rows}
    lines = [
        "# Throughput: mixed-expert serving against its alternatives", "",
        f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Date: {meta['date']}  ",
        f"Experts: {meta['experts']}, N={meta['num_experts']}, K={meta['num_groups']}, "
        f"input {meta['input_len']} / output {meta['output_len']} tokens, greedy, float32, eager.", "",
        "| system | conc | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | weight MB | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} | {r['ttft_ms_p50']:.0f} | "
                     f"{r['ttft_ms_p99']:.0f} | {r['itl_ms_p50']:.1f} | {r['itl_ms_p99']:.1f} | "
                     f"{r['weight_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    lines += ["", "Ratios (targets: b/a ≥ 0.8 at 32, d/a ≥ 0.95, b/c ≥ 1.5, weight b/c ≤ 0.55):", ""]
    for conc in sorted({r["concurrency"] for r in rows}):
        tp = {s: by[(s, conc)]["output_tokens_per_s"] for s in SYSTEMS if (s, conc) in by}
        parts = [f"{x}/{y} = {tp[x] / tp[y]:.2f}" for x, y in (("b", "a"), ("d", "a"), ("d_cache", "a"), ("b", "c"))
                 if x in tp and y in tp]
        lines.append(f"- concurrency {conc}: " + ", ".join(parts))
    if ("b", rows[0]["concurrency"]) in by and ("c", rows[0]["concurrency"]) in by:
        wb = by[("b", rows[0]["concurrency"])]["weight_bytes"] / by[("c", rows[0]["concurrency"])]["weight_bytes"]
        lines.append(f"- weight bytes b/c = {wb:.2f}")
    notes = HERE / "notes.md"  # the reading of the numbers, written by hand after a run
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = {"a": "a: one dense expert (stock)", "b": "b: channelmerge, mixed",
                  "c": "c: ensemble of stock servers", "d": "d: channelmerge, one expert",
                  "d_cache": "d with the hot-expert cache"}
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in SYSTEMS:
            pts = sorted((r["concurrency"], r["output_tokens_per_s"]) for r in rows if r["system"] == s)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=labels[s])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("output tokens/s")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(HERE / "throughput.png", dpi=120)
    except ImportError:
        log.warning("matplotlib not installed: no plot")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=list("abcd"), choices=[*"abcd", "d_cache"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--num-experts", type=int, default=4)
    ap.add_argument("--num-groups", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prompts-per-concurrency", type=int, default=2)
    ap.add_argument("--min-prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    experts, merged = prepare(a.num_experts, a.num_groups)
    rows: list[dict] = []
    for s in a.systems:
        rows += run_system(s, experts, merged, a.concurrency, a)
    meta = {"command": "python -m benchmarks.throughput.run " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "experts": "real" if (REAL_EXPERTS / "base").exists() else "random SmolLM2-135M-shaped",
            "num_experts": a.num_experts, "num_groups": a.num_groups,
            "input_len": a.input_len, "output_len": a.output_len}
    write_report(rows, meta)


if __name__ == "__main__":
    main()
