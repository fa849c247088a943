"""Build (or reuse) the base model and the four fine-tuned experts under ``work/experts/``.

    nice -n 19 python -m benchmarks.quality.build_experts [--tasks arith date ...] [--force]
                                                         [--evaluate]

An expert whose directory already holds ``model.safetensors`` is reused (cache); the
directories are written atomically, so an interrupted run leaves no half expert.
``--evaluate`` then scores base and experts on the test split into ``experts.json``.
"""

from __future__ import annotations

import argparse
import sys
import time

from .base_model import BASE_DIR, EXPERTS_DIR, WEIGHTS_FILE, build_base
from .finetune import TrainConfig, finetune
from .tasks import TASKS

# Steps per task (batch 16, lr 1e-4, one thread). Sized for a shared 2-core CPU where a
# 1k-token step takes ~20 s; arithmetic and code replies need the most examples.
STEPS = {"arith": 70, "date": 40, "reverse": 50, "code": 60}


def build_all(tasks=TASKS, force: bool = False, steps: dict | None = None) -> dict[str, float]:
    build_base(BASE_DIR)
    times: dict[str, float] = {}
    for t in tasks:
        out = EXPERTS_DIR / t
        if (out / WEIGHTS_FILE).exists() and not force:
            print(f"[{t}] reusing {out}", flush=True)
            continue
        t0 = time.time()
        finetune(t, out, TrainConfig(steps=(steps or STEPS)[t]))
        times[t] = time.time() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--force", action="store_true", help="retrain experts even if present")
    ap.add_argument("--evaluate", action="store_true", help="score base + experts into experts.json")
    a = ap.parse_args(argv)
    times = build_all(a.tasks, a.force)
    for t, s in times.items():
        print(f"[{t}] built in {s:.0f}s")
    if a.evaluate:
        from .evaluate import experts_table

        experts_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
