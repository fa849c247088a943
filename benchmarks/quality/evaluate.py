"""Greedy evaluation of a model on the quality tasks.

Two back ends, one scorer (``tasks.score``):

- an HF model directory, run with ``transformers`` (float32, batched, left padding, greedy);
- an OpenAI-compatible endpoint (``--openai-base-url URL --model NAME``; chat completions,
  temperature 0), e.g. ``channelmerge serve`` or stock vLLM.

Both send the same chat messages (one user message, the model's own chat template).

    python -m benchmarks.quality.evaluate work/experts/arith --tasks arith date --split test
    python -m benchmarks.quality.evaluate --openai-base-url http://127.0.0.1:8000/v1 --model arith
    python -m benchmarks.quality.evaluate --experts-table   # base + each expert -> experts.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .base_model import BASE_DIR, EXPERTS_DIR
from .tasks import MAX_NEW_TOKENS, SPLITS, TASKS, Item, chat_messages, load_split, score_all

HERE = Path(__file__).resolve().parent
EXPERTS_JSON = HERE / "experts.json"


class HFGenerator:
    """Greedy batched generation with transformers from an HF directory."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.name = str(path)

    def generate(self, items: list[Item], max_new_tokens: int, batch_size: int = 50) -> list[str]:
        import torch

        outs: list[str] = []
        stop = [self.tok.convert_tokens_to_ids("<|im_end|>"), self.tok.eos_token_id]
        stop = [s for s in dict.fromkeys(stop) if s is not None and s >= 0]
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            texts = [self.tok.apply_chat_template(chat_messages(it), add_generation_prompt=True,
                                                  tokenize=False) for it in chunk]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=stop, pad_token_id=self.tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                outs.append(self.tok.decode(row, skip_special_tokens=True))
        return outs


# One request waits for the whole batch it shares the engine with: 64 rank-128 LoRA requests on a
# 2-core CPU took longer than the client's default 600 s. No retries: the client's default two
# would resend a request the server is still working on, and an error must end the run loudly.
REQUEST_TIMEOUT_S = 3 * 3600.0


class OpenAIGenerator:
    """Chat completions at temperature 0 against an OpenAI-compatible server."""

    def __init__(self, base_url: str, model: str, api_key: str = "EMPTY", concurrency: int = 16,
                 timeout: float = REQUEST_TIMEOUT_S):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.model = model
        self.name = f"{base_url}#{model}"
        self.concurrency = concurrency
        self.answered_by: list[str] = []  # response `model` field (which expert answered, for `auto`)

    def _one(self, item: Item, max_new_tokens: int) -> tuple[str, str]:
        r = self.client.chat.completions.create(model=self.model, messages=chat_messages(item),
                                                temperature=0, max_tokens=max_new_tokens)
        return r.choices[0].message.content or "", r.model

    def generate(self, items: list[Item], max_new_tokens: int, batch_size: int = 0) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            res = list(ex.map(lambda it: self._one(it, max_new_tokens), items))
        self.answered_by.extend(m for _, m in res)
        return [t for t, _ in res]


def evaluate(gen, tasks: list[str], split: str = "test", limit: int | None = None,
             verbose: bool = False) -> dict:
    """Accuracy per task (0..1) plus replies for inspection."""
    result: dict = {"accuracy": {}, "seconds": {}, "samples": {}}
    for t in tasks:
        items = load_split(t, split)[:limit]
        t0 = time.time()
        replies = gen.generate(items, MAX_NEW_TOKENS[t])
        ok = score_all(items, replies)
        result["accuracy"][t] = sum(ok) / len(ok)
        result["seconds"][t] = round(time.time() - t0, 1)
        result["samples"][t] = [{"prompt": it.prompt, "reply": r, "answer": it.answer, "ok": o}
                                for it, r, o in list(zip(items, replies, ok))[:3]]
        if verbose:
            print(f"  {t}: {result['accuracy'][t]:.3f} ({sum(ok)}/{len(ok)}, {result['seconds'][t]}s)"
                  f"  e.g. {replies[0]!r}", flush=True)
    return result


def machine_info() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def experts_table(split: str = "test", limit: int | None = None, out: Path = EXPERTS_JSON,
                  full: bool = False, only: list[str] | None = None) -> dict:
    """Accuracy of the base (every task) and each built expert (its own task; every task with
    ``full``) -> experts.json. Entries already in the file are kept unless re-evaluated."""
    models = {"base": BASE_DIR}
    for t in TASKS:
        if (EXPERTS_DIR / t / "model.safetensors").exists():
            models[t] = EXPERTS_DIR / t
    if only:
        models = {k: v for k, v in models.items() if k in only}
    table: dict = json.loads(out.read_text()) if out.exists() else {}
    if table.get("split") not in (None, split):
        table = {}
    table.update({"split": split, "tasks": list(TASKS), "machine": machine_info(),
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    table.setdefault("models", {})
    for name, path in models.items():
        tasks = list(TASKS) if (name == "base" or full) else [name]
        print(f"{name} ({path}) on {', '.join(tasks)}", flush=True)
        res = evaluate(HFGenerator(path), tasks, split, limit, verbose=True)
        entry = table["models"].get(name, {})
        entry["path"] = str(path)
        entry.setdefault("accuracy", {}).update(res["accuracy"])
        entry.setdefault("eval_seconds", {}).update(res["seconds"])
        entry.setdefault("samples", {}).update(res["samples"])
        info = Path(path) / "train_info.json"
        if info.exists():
            ti = json.loads(info.read_text())
            entry["train_seconds"] = ti["train_seconds"]
            entry["train_config"] = ti["config"]
            entry["train_tokens"] = ti["train_tokens"]
        table["models"][name] = entry
        out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {out}")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help="HF model directory (transformers back end)")
    ap.add_argument("--openai-base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", help="model name for the endpoint (an expert name or `auto`)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--limit", type=int, help="first N items per task only")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--experts-table", action="store_true",
                    help="base (all tasks) + each built expert (own task) into experts.json")
    ap.add_argument("--full", action="store_true", help="with --experts-table: every expert on every task")
    ap.add_argument("--only", nargs="+", help="with --experts-table: these models only (base, task names)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (transformers back end)")
    a = ap.parse_args(argv)
    if a.experts_table:
        import torch

        torch.set_num_threads(a.threads)
        experts_table(a.split, a.limit, full=a.full, only=a.only)
        return 0
    if a.openai_base_url:
        if not a.model:
            ap.error("--openai-base-url needs --model")
        gen = OpenAIGenerator(a.openai_base_url, a.model)
    elif a.model_dir:
        gen = HFGenerator(a.model_dir, threads=a.threads)
    else:
        ap.error("give a model directory or --openai-base-url URL --model NAME")
    res = evaluate(gen, a.tasks, a.split, a.limit, verbose=True)
    res["model"] = gen.name
    if isinstance(gen, OpenAIGenerator):
        res["answered_by"] = sorted(set(gen.answered_by))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["accuracy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
