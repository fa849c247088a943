"""Merge speed against the I/O floor, and peak memory (issue: merge tool, "measured, not asserted").

Builds (once, under work/merge_speed/, git-ignored) a random base with the shape of
SmolLM2-135M (Llama: hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536,
vocab 49152, tied embeddings, bfloat16) and 4 experts with structured task vectors, then
runs, each in a fresh subprocess, alternating:

- floor: read every input tensor (base + 4 experts) with safetensors and write tensors of
  exactly the merged output's names, shapes and dtypes with `safetensors.torch.save_file`;
- merge: `channelmerge merge` of the same inputs (K=2, average, norms folded).

Reports wall time (best of the repeats), ratio to the floor and peak RSS of each process.

    nice -n 10 python benchmarks/merge_speed.py [--repeats 2] [--method average] [--k 2] [--budget 0.35]
                                                [--threads 1]

``--threads T`` is the merge's ``--threads`` (torch CPU threads for its math; the floor, which
only reads and writes, runs on one).

With ``--budget B`` the merge runs under a memory budget (format v2: its extra allocation pass
reads every channel tensor once more); the floor is then that output's own tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "work" / "merge_speed"
NAMES = ["math", "code", "chat", "zh"]
SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
             vocab_size=49152, tie_word_embeddings=True)


def build() -> None:
    """Base + experts, once (they are cached under work/)."""
    if (WORK / "fam" / NAMES[-1] / "model.safetensors").exists():
        return
    import torch

    from merge_tool.synthetic import make_family

    shutil.rmtree(WORK / "fam", ignore_errors=True)
    t = time.time()
    make_family(WORK / "fam", NAMES, arch="llama", dtype=torch.bfloat16, **SHAPE)
    print(f"built base + {len(NAMES)} experts in {time.time() - t:.0f}s", flush=True)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_floor(merged: str, out: str) -> dict:
    """Read all inputs, write the merged output's tensors (same names/shapes/dtypes)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # as the merge: faster on a shared machine
    t0 = time.perf_counter()
    nbytes = 0
    for d in ["base", *NAMES]:
        for f in sorted((WORK / "fam" / d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    t = h.get_tensor(k).clone()  # touch the bytes (get_tensor may map lazily)
                    nbytes += t.numel() * t.element_size()
                    del t
    t_read = time.perf_counter() - t0
    index = json.loads((Path(merged) / "model.safetensors.index.json").read_text())
    shards: dict[str, list[str]] = {}
    for k, f in index["weight_map"].items():
        shards.setdefault(f, []).append(k)
    Path(out).mkdir(parents=True, exist_ok=True)
    wbytes = 0
    for f, keys in shards.items():
        with safe_open(str(Path(merged) / f), "pt") as h:
            meta = {k: h.get_slice(k) for k in keys}
            dt = {"BF16": torch.bfloat16, "F32": torch.float32, "I32": torch.int32, "F16": torch.float16}
            tensors = {k: torch.ones(s.get_shape(), dtype=dt[s.get_dtype()]) for k, s in meta.items()}
        wbytes += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(Path(out) / f), metadata={"format": "pt"})
        del tensors
    return {"seconds": time.perf_counter() - t0, "read_seconds": t_read, "read_bytes": nbytes,
            "write_bytes": wbytes, "peak_rss": peak_rss()}


def child_merge(out: str, method: str, k: int, budget: str = "none", threads: int = 1) -> dict:
    from merge_tool.config import parse_config
    from merge_tool.merge import run_merge

    fam = WORK / "fam"
    cfg = parse_config({"base_model": str(fam / "base"), "num_groups": k, "method": method,
                        "experts": [{"name": n, "model": str(fam / n)} for n in NAMES],
                        **({} if budget == "none" else {"budget": float(budget)})})
    t0 = time.perf_counter()
    run_merge(cfg, out, force=True, progress=False, threads=threads)
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss()}


def run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--method", default="average")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--budget", type=float, help="merge under this budget (stored params / ensemble)")
    ap.add_argument("--threads", type=int, default=1, help="the merge's torch threads (its --threads)")
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        res = child_floor(*rest) if kind == "floor" else child_merge(rest[0], rest[1], int(rest[2]), rest[3], int(rest[4]))
        print(json.dumps(res))
        return
    build()
    merged = WORK / "merged"
    floor_out = WORK / "floor_out"
    in_bytes = sum(f.stat().st_size for d in ["base", *NAMES] for f in (WORK / "fam" / d).glob("*.safetensors"))
    merges, floors = [], []
    # A first merge so that the floor knows the output's shapes (and the caches are warm for both).
    budget = "none" if args.budget is None else str(args.budget)
    merges.append(run_child("merge", str(merged), args.method, str(args.k), budget, str(args.threads)))
    for _ in range(args.repeats):
        floors.append(run_child("floor", str(merged), str(floor_out)))
        merges.append(run_child("merge", str(merged), args.method, str(args.k), budget, str(args.threads)))
    shutil.rmtree(floor_out, ignore_errors=True)
    out_bytes = sum(f.stat().st_size for f in merged.glob("*.safetensors"))
    best_m = min(m["seconds"] for m in merges)
    best_f = min(f["seconds"] for f in floors)
    res = {
        "model": "SmolLM2-135M-shaped Llama, random bf16 weights, tied embeddings",
        "experts": len(NAMES), "num_groups": args.k, "method": args.method, "budget": args.budget,
        "threads": args.threads,
        "input_bytes": in_bytes, "output_bytes": out_bytes,
        "merge_seconds": [round(m["seconds"], 2) for m in merges],
        "floor_seconds": [round(f["seconds"], 2) for f in floors],
        "floor_read_seconds": [round(f["read_seconds"], 2) for f in floors],
        "best_merge_seconds": round(best_m, 2), "best_floor_seconds": round(best_f, 2),
        "ratio": round(best_m / best_f, 2),
        "median_merge_seconds": round(statistics.median(m["seconds"] for m in merges), 2),
        "median_floor_seconds": round(statistics.median(f["seconds"] for f in floors), 2),
        "median_ratio": round(statistics.median(m["seconds"] for m in merges)
                              / statistics.median(f["seconds"] for f in floors), 2),
        "merge_peak_rss_bytes": max(m["peak_rss"] for m in merges),
        "floor_peak_rss_bytes": max(f["peak_rss"] for f in floors),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
    }
    print(json.dumps(res, indent=1))
    tag = ("" if args.budget is None else f"_budget{args.budget}") + ("" if args.threads == 1 else f"_t{args.threads}")
    (WORK / f"result_{args.method}_k{args.k}{tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
