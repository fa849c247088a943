"""Routing accuracy of the `auto` router on held-out prompts of the four quality tasks.

Trains ``vllm_channelmerge.router`` on the first N training prompts of each task (the expert
name is the task name), saves and reloads it (numpy-only path), and reports accuracy on the
test prompts, plus the confusion counts, and on prompts in wordings that no training
prompt uses (``unseen_wording``). ``--write-examples`` writes the training prompts as
``examples.jsonl`` for ``channelmerge router train``.

    python -m benchmarks.quality.router_eval [--per-task 300] [--write-examples work/router_examples.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from merge_tool.router_train import save_router, train_router
from vllm_channelmerge.router import Router

from .tasks import TASKS, load_split

HERE = Path(__file__).resolve().parent
ROUTER_JSON = HERE / "router.json"


# Wordings never seen in training (the task generators use other templates): a check that
# the router keys on the task, not on the template.
_UNSEEN = {
    "arith": ["How much is {a} plus {b}?", "{a} + {b} = ?", "Please sum {a} and {b}.",
              "If I have {a} apples and get {b} more, how many do I have?"],
    "date": ["Give {d} as YYYY-MM-DD.", "What is {d} in ISO date format?", "Reformat the date {d}.",
             "Turn {d} into a year-month-day string."],
    "reverse": ["Say these words backwards, last word first: {w}", "Flip the word order: {w}",
                "Put the words in the opposite order: {w}", "Read this list from the end: {w}"],
    "code": ["Python: define {f}(x) to return x minus {a}.", "Give me a Python def {f}(s) that counts the letters in s.",
             "Code a function {f}(nums) returning the product of nums.", "Write {f}(text) in Python returning text without spaces."],
}


def unseen_wording(n_per_task: int = 50, seed: int = 7) -> tuple[list[str], list[str]]:
    import random

    from .tasks import _MONTHS, _WORDS

    rng = random.Random(seed)
    texts, labels = [], []
    for t, temps in _UNSEEN.items():
        for _ in range(n_per_task):
            fill = {"a": rng.randint(100, 999), "b": rng.randint(100, 999),
                    "d": f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2049)}",
                    "w": " ".join(rng.sample(_WORDS, rng.randint(3, 5))),
                    "f": rng.choice(["g", "run", "do_it", "my_func"])}
            texts.append(rng.choice(temps).format(**fill))
            labels.append(t)
    return texts, labels


def router_examples(per_task: int) -> dict[str, list[str]]:
    return {t: [it.prompt for it in load_split(t, "train")[:per_task]] for t in TASKS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-task", type=int, default=300, help="training prompts per task")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--write-examples", type=Path, help="also write the training prompts as JSONL")
    ap.add_argument("--out", type=Path, default=ROUTER_JSON)
    a = ap.parse_args(argv)

    examples = router_examples(a.per_task)
    if a.write_examples:
        a.write_examples.parent.mkdir(parents=True, exist_ok=True)
        with a.write_examples.open("w") as f:
            for t, prompts in examples.items():
                for p in prompts:
                    f.write(json.dumps({"expert": t, "prompt": p}) + "\n")
    t0 = time.time()
    router, pipe = train_router(examples, return_pipeline=True)
    train_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        loaded = Router.load(save_router(router, Path(tmp) / "router"), experts=list(TASKS))
    texts, labels = [], []
    for t in TASKS:
        items = load_split(t, a.split)
        texts += [it.prompt for it in items]
        labels += [t] * len(items)
    t0 = time.time()
    pred = loaded.predict(texts)
    pred_s = time.time() - t0
    same = pred == [str(p) for p in pipe.predict(texts)]
    confusion = {t: {u: 0 for u in TASKS} for t in TASKS}
    for y, p in zip(labels, pred):
        confusion[y][p] += 1
    acc = sum(p == y for p, y in zip(pred, labels)) / len(labels)
    per_task = {t: confusion[t][t] / sum(confusion[t].values()) for t in TASKS}
    res = {"split": a.split, "train_prompts_per_task": a.per_task, "accuracy": acc, "per_task": per_task,
           "confusion": confusion, "same_as_sklearn": same, "train_seconds": round(train_s, 2),
           "predict_ms_per_prompt": round(1000 * pred_s / len(texts), 3),
           "features": sum(len(b.vocab) for b in loaded.blocks)}
    u_texts, u_labels = unseen_wording()
    u_pred = loaded.predict(u_texts)
    res["unseen_wording"] = {
        "accuracy": sum(p == y for p, y in zip(u_pred, u_labels)) / len(u_labels),
        "n": len(u_labels),
        "errors": [{"prompt": x, "expert": y, "routed": p} for x, y, p in zip(u_texts, u_labels, u_pred) if p != y][:10],
    }
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
