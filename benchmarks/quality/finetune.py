"""Full fine-tuning of the base model on one task (float32, CPU-friendly).

Recipe (fits a 2-core CPU): chat-formatted examples (one user message + the reference
reply), loss on the reply tokens and the end-of-turn token only, embeddings frozen (they
are tied to lm_head, so lm_head stays the base's too), AdamW, linear warm-up then cosine
decay, gradient clipping. The result is an HF directory with the base's config.json and
tokenizer files and one ``model.safetensors`` (tied: no lm_head tensor), written to a
temporary folder and renamed at the end.

    python -m benchmarks.quality.finetune TASK [--steps 60] [--batch-size 16] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .base_model import BASE_DIR, EXPERTS_DIR, WEIGHTS_FILE, copy_model_files, save_weights
from .tasks import TASKS, chat_messages, load_split

TRAIN_INFO_FILE = "train_info.json"


@dataclass
class TrainConfig:
    steps: int = 60
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1  # one thread: on a shared 2-core machine two OpenMP threads spin and gain nothing


def encode_example(tok, prompt_messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted exchange and labels (-100 outside the reply)."""
    prompt = tok.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(prompt_messages + [{"role": "assistant", "content": reply}],
                                   tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template: the full exchange does not start with the generation prompt")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    if f_ids[: len(p_ids)] != p_ids:
        raise ValueError("tokenisation of the prompt is not a prefix of the full exchange")
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    # Train up to and including the first end-of-turn token after the prompt.
    end = len(f_ids)
    for i in range(len(p_ids), len(f_ids)):
        if f_ids[i] == eos:
            end = i + 1
            break
    ids = f_ids[:end]
    labels = [-100] * len(p_ids) + ids[len(p_ids):]
    return ids, labels


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), n), dtype=torch.long)
    for r, (ids, lab) in enumerate(batch):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        attn[r, : len(ids)] = 1
    return input_ids, attn, labels


def answer_loss(model, input_ids, attn, labels):
    """Mean next-token cross-entropy over the reply tokens, computing logits only there
    (the 49k-row lm_head is ~20% of the model's FLOPs; most positions are the prompt)."""
    import torch.nn.functional as F

    h = model.model(input_ids=input_ids, attention_mask=attn).last_hidden_state[:, :-1]
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = model.lm_head(h[sel])
    return F.cross_entropy(logits.float(), tgt[sel])


def finetune(task: str, out: Path | None = None, cfg: TrainConfig | None = None,
             base: Path = BASE_DIR, log_every: int = 10) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or TrainConfig()
    out = Path(out or EXPERTS_DIR / task)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)
    if model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight.requires_grad_(False)  # tied or not: keep the vocab map
    params = [p for p in model.parameters() if p.requires_grad]

    items = load_split(task, "train")
    rng = random.Random(cfg.seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    need = cfg.steps * cfg.batch_size
    order = (order * (need // len(order) + 1))[:need]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    t0 = time.time()
    c0 = time.process_time()
    n_tokens = 0
    losses: list[float] = []
    for step in range(cfg.steps):
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = [encode_example(tok, chat_messages(items[i]), items[i].answer) for i in idx]
        input_ids, attn, labels = _collate(batch, pad_id)
        n_tokens += int(attn.sum())
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = answer_loss(model, input_ids, attn, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0:
            el = time.time() - t0
            print(f"[{task}] step {step + 1}/{cfg.steps} loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f} "
                  f"lr {lr_at(step):.2e} {el:.0f}s ({el / (step + 1):.1f}s/step)", flush=True)
    train_s = time.time() - t0
    cpu_s = time.process_time() - c0

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = bool(model.config.tie_word_embeddings)
    save_weights(model.state_dict(), tmp, tied)
    copy_model_files(Path(base), tmp)
    info = {"task": task, "config": asdict(cfg), "train_seconds": round(train_s, 1), "train_cpu_seconds": round(cpu_s, 1),
            "train_tokens": n_tokens, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "losses": [round(x, 4) for x in losses], "base": str(base)}
    (tmp / TRAIN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"[{task}] wrote {out} in {train_s:.0f}s ({n_tokens} tokens)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("--out", type=Path)
    d = TrainConfig()
    for k, v in asdict(d).items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = ap.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(a, k) for k in asdict(d)})
    finetune(a.task, a.out, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
