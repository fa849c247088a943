"""Where a decode step's time goes: torch profiler on one engine, in-process, per system.

Runs the same load as the throughput benchmark (random 128-token prompts, 64 greedy output
tokens, ignore EOS, `--concurrency` requests at once) through vLLM's offline `LLM` with the
engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that ``torch.profiler``
sees the model. The channelmerge kernels are labelled by monkeypatching (``channelmerge::<strategy>``,
``channelmerge::embedding``, ``channelmerge::logits``); nothing in the plugin changes. Dense
linears of the stock model show as ``aten::linear``.

    python -m benchmarks.throughput.profile --system a     # stock vLLM, one dense expert
    python -m benchmarks.throughput.profile --system b     # channelmerge, experts mixed
    python -m benchmarks.throughput.profile --system d     # channelmerge, one expert
    python -m benchmarks.throughput.profile --system b --dtype bfloat16

Each run writes ``work/throughput/profile-<system>[-<dtype>].json`` (the buckets; no suffix
for float32) and, with ``--report``, all present runs are summarised into
``benchmarks/throughput/PROFILE.md``.
The engine runs one thread by default (``--threads``): on a shared 2-core machine, OpenMP
threads wait for each other whenever one is descheduled, which inflates short ops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = ROOT / "work" / "throughput"

# Buckets: a profiler event name -> the part of the step it belongs to. Inclusive CPU time
# of these top-level events is summed; the rest of the step is "other".
LINEAR_EVENTS = ("aten::linear", "_C::onednn_mm")  # F.linear; vLLM's prepacked CPU GEMM
ATTENTION_MARKERS = ("attention", "attn", "paged")


def _label(fn, name: str):
    import torch

    def wrapped(*a, **kw):
        with torch.profiler.record_function(name):
            return fn(*a, **kw)

    return wrapped


def _instrument() -> None:
    """Label every channelmerge kernel entry point for the profiler (in this process only)."""
    from vllm_channelmerge import compat, kernels

    for name in list(kernels.STRATEGIES):
        kernels.STRATEGIES[name] = _label(kernels.STRATEGIES[name], f"channelmerge::{name}")
    kernels.embedding_lookup = _label(kernels.embedding_lookup, "channelmerge::embedding")
    mixin = compat.ChannelMergedModelMixin
    mixin.compute_logits = _label(mixin.compute_logits, "channelmerge::logits")


def _prompts(tokenizer_dir: Path, n: int, input_len: int, seed: int) -> list[list[int]]:
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = random.Random(seed)
    vocab = [i for i in range(tok.vocab_size) if i not in set(tok.all_special_ids)]
    return [[rng.choice(vocab) for _ in range(input_len)] for _ in range(n)]


def run(system: str, concurrency: int, input_len: int, output_len: int, seed: int, threads: int = 1,
        dtype: str = "float32") -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # One thread by default: on a shared machine, OpenMP threads of every op wait for each
    # other when one is descheduled, which inflates short ops; one thread keeps the shares true.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from .run import prepare

    experts, merged = prepare(4, 2)
    names = list(experts)
    model = experts[names[0]] if system == "a" else merged
    if system != "a":
        _instrument()
    llm = LLM(model=str(model), dtype=dtype, enforce_eager=True, max_model_len=1024,
              max_num_seqs=64, seed=seed, enable_prefix_caching=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompts(experts[names[0]], concurrency, input_len, seed)]

    def params(i: int) -> SamplingParams:
        extra = None if system == "a" else {"expert": names[i % len(names)] if system == "b" else names[0]}
        return SamplingParams(max_tokens=output_len, min_tokens=output_len, ignore_eos=True, temperature=0.0,
                              extra_args=extra)

    sps = [params(i) for i in range(concurrency)]
    llm.generate(prompts, sps, use_tqdm=False)  # warm-up (allocations, first-call costs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    events = {e.key: e for e in prof.key_averages()}
    total = lambda key: events[key].cpu_time_total / 1e6 if key in events else 0.0  # noqa: E731  seconds
    buckets: dict[str, float] = {}
    for key in events:
        if key.startswith("channelmerge::"):
            buckets[key] = total(key)
    # stock: every linear and the lm_head are aten::linear; channelmerge: its strategies
    # (q/k/v, o, gate/up, down, and the lm_head inside channelmerge::logits)
    buckets["GEMMs: " + " + ".join(LINEAR_EVENTS) + " (inside the above for channelmerge)"] = sum(
        total(k) for k in LINEAR_EVENTS)
    attn = [k for k in events if any(m in k.lower() for m in ATTENTION_MARKERS) and not k.startswith("channelmerge")]
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "system": system, "dtype": dtype, "concurrency": concurrency, "input_len": input_len, "output_len": output_len,
        "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
        "buckets_s": buckets,
        "attention_events_s": {k: total(k) for k in attn},
        "top_self_s": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top],
        "threads": torch.get_num_threads(),
    }


DTYPES = ("float32", "bfloat16")


def _path(system: str, dtype: str) -> Path:
    return WORK / (f"profile-{system}.json" if dtype == "float32" else f"profile-{system}-{dtype}.json")


def kernels_host() -> str:
    """The host's CPU kind and flags, as the other benchmarks record them."""
    try:
        from vllm_channelmerge import kernels

        return kernels.cpu_isa_summary()
    except ImportError:
        return ""


def report() -> Path:
    runs = {}
    for dt in DTYPES:
        for s in "abd":
            p = _path(s, dt)
            if p.exists():
                runs[(s, dt)] = json.loads(p.read_text())
    labels = {"a": "a: stock vLLM, one dense expert", "b": "b: channelmerge, 4 experts mixed",
              "d": "d: channelmerge, one expert"}
    lines = ["# Profile of a decode-heavy load (torch profiler, in-process engine)", "",
             "Command: `python -m benchmarks.throughput.profile --system a|b|d [--dtype bfloat16]` then `--report`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; CPU: {kernels_host() or 'not recorded'}  ",
             f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ", ""]
    for (s, dt), r in runs.items():
        lines += [f"## {labels[s]} ({dt})", "",
                  f"{r['concurrency']} requests at once, {r['input_len']} in / {r['output_len']} out tokens; "
                  f"{r['output_tokens']} tokens in {r['wall_s']:.2f} s = {r['tokens_per_s']:.1f} tok/s "
                  f"(under the profiler, {r['threads']} thread).", "",
                  "| part (inclusive CPU time) | s | share of wall |", "|---|---|---|"]
        for k, v in sorted(r["buckets_s"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| `{k}` | {v:.2f} | {v / r['wall_s']:.0%} |")
        att = sum(r["attention_events_s"].values())
        if att:
            lines.append(f"| attention ops ({', '.join(f'`{k}`' for k in r['attention_events_s'])}) | {att:.2f} | "
                         f"{att / r['wall_s']:.0%} |")
        lines += ["", "Top ops by self CPU time:", "", "| op | self s | calls |", "|---|---|---|"]
        for t in r["top_self_s"][:10]:
            lines.append(f"| `{t['op']}` | {t['self_s']:.2f} | {t['calls']} |")
        lines.append("")
    out = HERE / "PROFILE.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=list("abd"))
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of the engine")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--report", action="store_true", help="summarise the runs present into PROFILE.md")
    a = ap.parse_args(argv)
    if a.system:
        r = run(a.system, a.concurrency, a.input_len, a.output_len, a.seed, a.threads, a.dtype)
        WORK.mkdir(parents=True, exist_ok=True)
        _path(a.system, a.dtype).write_text(json.dumps(r, indent=1) + "\n")
        print(json.dumps({k: r[k] for k in ("system", "tokens_per_s", "buckets_s")}, indent=1))
    if a.report:
        print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
