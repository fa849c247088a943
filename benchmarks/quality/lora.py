"""The multi-LoRA peer: each expert extracted as a rank-R LoRA by mergekit, for stock vLLM.

What a user with full fine-tunes would do instead of channel merging: extract a LoRA from
each fine-tune (``mergekit-extract-lora``: a truncated SVD of each linear layer's delta)
and serve all of them on one base with vLLM's own multi-LoRA. This module builds the
adapters and measures what they keep; ``compare.py`` (systems ``lora_r{R}``) and
``benchmarks/throughput/run.py`` (system ``e``) serve them.

``extract(task, rank)`` runs mergekit's extractor exactly as::

    python -m mergekit.scripts.extract_lora --model EXPERT --base-model BASE --out-path OUT \\
        --max-rank R --skip-undecomposable -e 'embed_tokens|lm_head' --no-copy-tokenizer

with absolute paths (a relative path is looked up on the model hub when mergekit writes the
adapter's README, and fails offline), into ``work/quality/lora_r{R}/{task}/``: written to a
temporary folder and renamed when complete, reused when present. Next to the adapter it
writes ``lora_info.json``: the command, the extraction's wall-clock and CPU seconds (and the
load average around it: the CPU may be shared; one torch thread unless ``OMP_NUM_THREADS`` is
set), the adapter's parameter count, and how much of the expert's delta the adapter does not hold:

- ``dropped_share``: ||delta of the tensors the adapter has no LoRA for||² / ||total delta||².
  mergekit skips the RMSNorm weights (``--skip-undecomposable``: a norm is not a linear layer,
  so it has no low-rank form; vLLM could not load it either, ``modules_to_save`` is only for
  classifier heads), and the embeddings / lm_head are excluded (``-e``); for these experts the
  embeddings (tied lm_head) are frozen, so only the norms' deltas count, split per kind in
  ``dropped_by_kind``;
- ``truncation_share``: sum over the extracted linear layers of ||delta - scale·B·A||² /
  ||total delta||² (what the rank-R SVD truncation loses);
- ``kept_share`` = 1 - both.

The adapter is then checked against what vLLM loads (``check_for_vllm``): vLLM's own
``PEFTHelper`` reads ``adapter_config.json`` and rejects unsupported features
(``modules_to_save`` other than classifier heads, DoRA, biases...), every tensor name parses
as a LoRA A/B weight of a target module, every module's rank is <= R and matches
``r``/``rank_pattern``. mergekit 0.1.5's output passes unchanged for this Llama model, so
there is no post-processing step: a failed check raises (the adapter is left in its
temporary folder) instead of being fixed silently.

Parameters: mergekit's rank per matrix is min(R, rows, columns) (so at R=256 the 192-row
k_proj / v_proj are stored at their full rank 192, via ``rank_pattern``), i.e.
min(R, m, n)·(m + n) per matrix. ``params_ratio(rank)`` = (base parameters + all adapters'
parameters) / (N experts × base parameters), counted from the files, the same measure as a
channel-merged checkpoint's (stored parameters ÷ the ensemble's).

    python -m benchmarks.quality.lora --ranks 16 32 64 128 256      # extract + print the table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .base_model import BASE_DIR, EXPERTS_DIR
from .tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent.parent
WORK = ROOT / "work" / "quality"
RANKS = (16, 32, 64, 128, 256)
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
EXCLUDE = "embed_tokens|lm_head"
INFO_FILE = "lora_info.json"
ADAPTER_FILE = "adapter_model.safetensors"
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _abs(p: Path) -> Path:
    return (ROOT / p).resolve()


def base_dir() -> Path:
    return _abs(BASE_DIR)


def expert_dir(task: str) -> Path:
    return _abs(EXPERTS_DIR / task)


def lora_dir(task: str, rank: int) -> Path:
    return WORK / f"lora_r{rank}" / task


def extract_cmd(task: str, rank: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "mergekit.scripts.extract_lora", "--model", str(expert_dir(task)),
            "--base-model", str(base_dir()), "--out-path", str(out.resolve()), "--max-rank", str(rank),
            "--skip-undecomposable", "-e", EXCLUDE, "--no-copy-tokenizer"]


def is_complete(out: Path) -> bool:
    return (out / ADAPTER_FILE).exists() and (out / "adapter_config.json").exists() and (out / INFO_FILE).exists()


def extract(task: str, rank: int, quiet: bool = True) -> Path:
    """The rank-`rank` LoRA of expert `task` (mergekit's extractor), reused when present."""
    out = lora_dir(task, rank)
    if is_complete(out):
        return out
    if not (expert_dir(task) / "model.safetensors").exists():
        raise FileNotFoundError(f"expert {task} not built: {expert_dir(task)} has no model.safetensors "
                                "(python -m benchmarks.quality.build_experts)")
    if rank not in VLLM_MAX_LORA_RANKS:
        raise ValueError(f"rank {rank}: vLLM serves ranks {VLLM_MAX_LORA_RANKS}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{task}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = extract_cmd(task, rank, tmp)
    log = out.parent / f"{task}.extract.log"
    print(f"extracting lora_r{rank}/{task}: {' '.join(cmd)}", flush=True)
    # One torch thread unless OMP_NUM_THREADS says otherwise: the SVDs are small (<= 1536 x 576), and on
    # a shared CPU torch's default threads spin-wait on each other (measured here: 12 min instead of 11 s).
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1"}
    t0, c0, load0 = time.time(), _children_cpu(), os.getloadavg()[0]
    with log.open("w") as f:
        r = subprocess.run(cmd, env=env, stdout=f if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                           cwd=ROOT)
    seconds, cpu = time.time() - t0, _children_cpu() - c0
    if r.returncode != 0:
        raise RuntimeError(f"mergekit extract_lora failed for {task} r={rank} (exit {r.returncode}); see {log}")
    problems = check_for_vllm(tmp, rank)
    if problems:
        raise RuntimeError(f"{tmp}: mergekit's adapter is not what vLLM loads: " + "; ".join(problems))
    info: dict[str, Any] = {
        "task": task, "rank": rank, "command": " ".join(extract_cmd(task, rank, out)),
        "extract_seconds": round(seconds, 1), "extract_cpu_seconds": round(cpu, 1),
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)], "threads": env["OMP_NUM_THREADS"],
        "adapter_params": adapter_params(tmp),
        "module_ranks": _rank_counts(tmp),
        "post_processing": "none (mergekit's output loads in vLLM unchanged; checked by check_for_vllm)",
        **delta_shares(task, tmp),
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():  # an incomplete earlier folder (no lora_info.json)
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"lora_r{rank}/{task}: {seconds:.1f} s, {info['adapter_params']:,} params, dropped "
          f"{100 * info['dropped_share']:.2f}%, truncated {100 * info['truncation_share']:.2f}% of the delta",
          flush=True)
    return out


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def info(task: str, rank: int) -> dict[str, Any]:
    return json.loads((lora_dir(task, rank) / INFO_FILE).read_text())


# ----------------------------------------------------------------------------- checks and measures

def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def adapter_params(adapter: Path) -> int:
    """Parameters stored in an adapter (all tensors of adapter_model.safetensors)."""
    total = 0
    for shape in _tensor_shapes(adapter / ADAPTER_FILE).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def model_params(model_dir: Path) -> int:
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        for shape in _tensor_shapes(f).values():
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def _rank_counts(adapter: Path) -> dict[str, int]:
    """{rank: number of modules} of an adapter (from its lora_A shapes)."""
    counts: dict[str, int] = {}
    for k, s in _tensor_shapes(adapter / ADAPTER_FILE).items():
        if ".lora_A." in k:
            counts[str(s[0])] = counts.get(str(s[0]), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def check_for_vllm(adapter: Path, rank: int) -> list[str]:
    """What vLLM would reject or misread in this adapter ([] = loads as is)."""
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    problems: list[str] = []
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    helper = PEFTHelper.from_dict(cfg)
    problems += helper._validate_features()  # the same list validate_legal raises from
    if max([helper.r, *helper.rank_pattern.values()]) > rank:
        problems.append(f"rank above --max-lora-rank {rank}")
    if cfg.get("use_rslora") or cfg.get("use_dora"):
        problems.append("rsLoRA / DoRA set")
    targets = set(cfg["target_modules"]) if isinstance(cfg["target_modules"], list) else None
    if targets is None or not targets <= set(LINEAR_SUFFIXES):
        problems.append(f"target_modules {cfg['target_modules']} not the Llama linear layers")
    shapes = _tensor_shapes(adapter / ADAPTER_FILE)
    modules: dict[str, dict[bool, list[int]]] = {}
    for name, shape in shapes.items():
        try:
            module, is_a = parse_fine_tuned_lora_name(name)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if targets is not None and module.split(".")[-1] not in targets:
            problems.append(f"{name}: module not in target_modules")
        modules.setdefault(module, {})[is_a] = shape
    for module, ab in modules.items():
        if set(ab) != {True, False}:
            problems.append(f"{module}: lora_A or lora_B missing")
            continue
        r_a, r_b = ab[True][0], ab[False][1]
        want, _ = helper.get_rank_and_scaling(module)
        if not r_a == r_b == want:
            problems.append(f"{module}: rank A {r_a} / B {r_b}, config says {want}")
    if not modules:
        problems.append("no LoRA tensors")
    return problems


def delta_shares(task: str, adapter: Path) -> dict[str, Any]:
    """How much of the expert's delta (squared L2, all tensors) the adapter does not hold."""
    from safetensors.torch import load_file

    from vllm.lora.peft_helper import PEFTHelper

    base = load_file(str(base_dir() / "model.safetensors"))
    expert = load_file(str(expert_dir(task) / "model.safetensors"))
    lora = load_file(str(adapter / ADAPTER_FILE))
    helper = PEFTHelper.from_dict(json.loads((adapter / "adapter_config.json").read_text()))
    if set(base) != set(expert):
        raise ValueError(f"{task}: tensor names differ from the base's")
    total = truncated = 0.0
    dropped: dict[str, float] = {}
    for name in sorted(expert):
        d = expert[name].double() - base[name].double()
        n2 = float((d * d).sum())
        total += n2
        module = name.removesuffix(".weight")
        a = lora.get(f"base_model.model.{module}.lora_A.weight")
        if a is not None:
            b = lora[f"base_model.model.{module}.lora_B.weight"]
            _, scale = helper.get_rank_and_scaling(module)
            r = d - scale * (b.double() @ a.double())
            truncated += float((r * r).sum())
        elif n2 > 0:
            kind = name.split(".")[-2] if name.startswith("model.layers.") else name.removesuffix(".weight")
            dropped[kind] = dropped.get(kind, 0.0) + n2
    total = total or 1.0
    drop = sum(dropped.values())
    return {"delta_sq_norm": total, "dropped_share": drop / total, "truncation_share": truncated / total,
            "kept_share": 1 - (drop + truncated) / total,
            "dropped_by_kind": {k: v / total for k, v in sorted(dropped.items())}}


# ----------------------------------------------------------------------------- parameters

def _base_linear_shapes() -> list[tuple[int, int]]:
    return [tuple(s) for k, s in _tensor_shapes(base_dir() / "model.safetensors").items()
            if k.startswith("model.layers.") and k.split(".")[-2] in LINEAR_SUFFIXES]


def predicted_adapter_params(rank: int) -> int:
    """Parameters of one adapter at `rank`, from the base's shapes (mergekit keeps
    min(rank, m, n) singular vectors of an m x n matrix): sum of min(R, m, n)·(m + n)."""
    return sum(min(rank, m, n) * (m + n) for m, n in _base_linear_shapes())


def predicted_params_ratio(rank: int, num_experts: int = len(TASKS)) -> float:
    base = model_params(base_dir())
    return (base + num_experts * predicted_adapter_params(rank)) / (num_experts * base)


def params_ratio(rank: int, tasks: Optional[list[str]] = None) -> float:
    """(base + every adapter's parameters, counted in the files) / (N x base parameters)."""
    tasks = list(tasks or TASKS)
    base = model_params(base_dir())
    return (base + sum(adapter_params(lora_dir(t, rank)) for t in tasks)) / (len(tasks) * base)


def matched_rank(target_ratio: float, ranks: tuple[int, ...] = RANKS, num_experts: int = len(TASKS)) -> int:
    """The rank whose params ratio is closest to `target_ratio` (e.g. a K=2 merge's)."""
    return min(ranks, key=lambda r: abs(predicted_params_ratio(r, num_experts) - target_ratio))


# ----------------------------------------------------------------------------- command line

def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--predict-only", action="store_true", help="print the predicted params ratios, extract nothing")
    a = ap.parse_args(argv)
    if a.predict_only:
        for r in a.ranks:
            print(f"r={r}: {predicted_adapter_params(r):,} params per adapter, params ratio "
                  f"{predicted_params_ratio(r):.3f}")
        return 0
    print("| rank | expert | adapter params | extraction s (CPU s) | dropped (norms) | truncated | kept |")
    rows = []
    for r in a.ranks:
        for t in a.tasks:
            extract(t, r)
            i = info(t, r)
            rows.append(f"| {r} | {t} | {i['adapter_params']:,} | {i['extract_seconds']:.0f} "
                        f"({i.get('extract_cpu_seconds', float('nan')):.0f}) | "
                        f"{100 * i['dropped_share']:.2f}% | {100 * i['truncation_share']:.1f}% | "
                        f"{100 * i['kept_share']:.1f}% |")
            print(rows[-1], flush=True)
        if set(a.tasks) == set(TASKS):
            print(f"r={r}: params ratio {params_ratio(r):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
