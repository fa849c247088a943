"""Quality comparison through the real serving path: experts, ensemble, channel merges,
classic single-model merges, base and the `auto` router, on every task's test split.

For each system it builds what is needed under ``work/quality/`` (merged checkpoints with
``merge_tool``; the router with ``channelmerge router train`` from router_eval's training
prompts), starts one server (``channelmerge serve`` for merged checkpoints, stock vLLM for
an expert alone and the base), scores the test split through the ``openai`` client (greedy,
concurrent requests so that the engine batches them), stops the server, and merges the
numbers into ``results.json`` (systems measured before are kept), then rewrites
``RESULTS.md`` and the plot.

System names:

- ``channel_k{K}_{method}``: channel merging, K groups per channel, in-group ``method``
  (average, task_arithmetic, ties, dare; default hyperparameters);
- ``single_{method}``: the classic single-model merge (K=1 of the same tool);
- ``auto_k{K}_{method}``: the ``channel_k{K}_{method}`` checkpoint with a router, model ``auto``;
- ``expert_{task}``: one expert alone, stock vLLM, scored on its own task;
- ``base``: the base model, stock vLLM;
- ``lora_r{R}``: the multi-LoRA peer: each expert extracted as a rank-R LoRA by mergekit
  (``lora.py``), all four served by one stock vLLM server on the base (``--enable-lora
  --lora-modules arith=DIR ... --max-lora-rank R --max-loras 4``), each task scored with
  ``model=<task>`` (R in 16, 32, 64, 128, 256; any of vLLM's ranks 8..512 is accepted). A base
  request is never sent to a LoRA server: on CPU, vLLM 0.32 serves a plain base-model request
  with another adapter's delta once adapters are loaded (an upstream bug);
- ``ensemble`` is derived (not served): each task scored by its own expert (the four
  ``expert_*`` rows), 4x the parameters (params ratio 1.0).

Merged systems take hyperparameters after ``@``: ``channel_k2_ties@density=0.7,scale=1.0``.
A channel merge under a memory budget (format v2: each channel 1..K rows) takes ``budget``
(stored parameters / the ensemble's) and optionally ``criterion`` there:
``channel_k3_ties@budget=0.35`` or ``channel_k3_average@budget=0.35,criterion=weight_per_tensor``.
They are settled on the validation split (``--split val``: results go to ``sweep.json`` and
the report's hyperparameter section, never to the test table).

The single-model merges (K=1) are the classic ones: norms merged with the method too
(``fold_norms: false``), so nothing is kept per expert. Channel merges fold the layer norms
and keep the final norm per expert (exact, ``docs/format.md``).

An interrupted system resumes: each task's score is kept in ``work/quality/partial/`` until the
system is done, and a rerun with the same adapters or checkpoint, split and concurrency scores
only the tasks left (the entry's ``resumed`` says which were kept). ``--tasks`` scores some
tasks of a system now and leaves the rest for a later run.

    python -m benchmarks.quality.compare --systems channel_k2_average single_average
    python -m benchmarks.quality.compare --systems lora_r16 lora_r32 lora_r64 lora_r128 lora_r256
    python -m benchmarks.quality.compare --split val --systems channel_k2_ties@density=0.3
    python -m benchmarks.quality.compare --report-only        # rewrite RESULTS.md + plot
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.servers import free_port, wait_until_ready

from . import lora
from .base_model import BASE_DIR, EXPERTS_DIR
from .evaluate import OpenAIGenerator, evaluate, machine_info
from .tasks import TASKS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORK = ROOT / "work" / "quality"
RESULTS_JSON = HERE / "results.json"
SWEEP_JSON = HERE / "sweep.json"
RESULTS_MD = HERE / "RESULTS.md"
PLOT_PNG = HERE / "accuracy_vs_params.png"

def _abs(p: Path) -> Path:
    return (ROOT / p).resolve()


# The activation budget criteria's calibration (calibration_texts): conversations per task, tokens in all.
CALIBRATION_ITEMS_PER_TASK = 32
CALIBRATION_TOKENS = 4096

DEFAULT_SYSTEMS = ["channel_k2_average", "single_average", "auto_k2_average", "channel_k2_ties",
                   "channel_k3_average", *(f"expert_{t}" for t in TASKS), "base"]
METHODS = ("average", "task_arithmetic", "ties", "dare")
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "64"]
ROUTER_PROMPTS_PER_TASK = 300


# ----------------------------------------------------------------------------- systems

def _param_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_system(name: str) -> dict[str, Any]:
    """What a system name means: kind, K, method, hyperparameters, and how it is served."""
    name, _, hp = name.partition("@")
    params: dict[str, Any] = {}
    for kv in filter(None, hp.split(",")):
        k, eq, v = kv.partition("=")
        if not eq:
            raise ValueError(f"{name}@{hp}: hyperparameters are key=value pairs separated by commas")
        params[k] = v if k == "criterion" else _param_value(v)
    spec = _parse_name(name)
    budget = {k: params.pop(k) for k in ("budget", "criterion") if k in params}
    if budget and spec["kind"] not in ("channel", "auto"):
        raise ValueError(f"{name}: only channel merges take a budget")
    if set(budget) == {"criterion"}:
        raise ValueError(f"{name}: criterion needs a budget")
    spec["budget"] = budget
    if params and spec["kind"] not in ("channel", "single_merge", "auto"):
        raise ValueError(f"{name}: only merged systems take hyperparameters")
    if params:
        from merge_tool.config import MethodParams

        MethodParams(**params)  # fail early on a bad name or value
    spec["parameters"] = params
    return spec


def _hp(spec: dict[str, Any]) -> str:
    """The `@...` part of a system name (method parameters, then the budget), '' for none."""
    items = sorted(spec["parameters"].items()) + sorted(spec.get("budget", {}).items())
    return ",".join(f"{a}={b}" for a, b in items)


def _parse_name(name: str) -> dict[str, Any]:
    parts = name.split("_")
    if parts[0] == "lora" and len(parts) == 2 and parts[1].startswith("r") and parts[1][1:].isdigit():
        rank = int(parts[1][1:])
        if rank not in lora.VLLM_MAX_LORA_RANKS:
            raise ValueError(f"{name}: vLLM serves LoRA ranks {lora.VLLM_MAX_LORA_RANKS}")
        return {"kind": "lora", "num_groups": None, "method": None, "lora_rank": rank}
    if name == "base":
        return {"kind": "base", "num_groups": None, "method": None}
    if parts[0] == "expert" and len(parts) == 2 and parts[1] in TASKS:
        return {"kind": "expert", "num_groups": None, "method": None, "task": parts[1]}
    if parts[0] == "single" and "_".join(parts[1:]) in METHODS:
        return {"kind": "single_merge", "num_groups": 1, "method": "_".join(parts[1:])}
    if parts[0] in ("channel", "auto") and len(parts) >= 3 and parts[1].startswith("k") \
            and parts[1][1:].isdigit() and "_".join(parts[2:]) in METHODS:
        k = int(parts[1][1:])
        if not 1 <= k <= len(TASKS):
            raise ValueError(f"{name}: K must be 1..{len(TASKS)}")
        return {"kind": "channel" if parts[0] == "channel" else "auto", "num_groups": k,
                "method": "_".join(parts[2:])}
    raise ValueError(f"unknown system {name!r} (base, expert_<task>, single_<method>, "
                     f"channel_k<K>_<method>, auto_k<K>_<method>, lora_r<R>; methods: {', '.join(METHODS)})")


def merged_dir(spec: dict[str, Any]) -> Path:
    k, m = spec["num_groups"], spec["method"]
    hp = _hp(spec)
    return WORK / ((f"single_{m}" if k == 1 else f"channel_k{k}_{m}") + (f"@{hp}" if hp else ""))


def build_merged(spec: dict[str, Any]) -> Path:
    """Merged checkpoint for a channel / single-merge / auto system (reused when present)."""
    from merge_tool.budget import measure_of as budget_measure
    from merge_tool.config import MergeConfig
    from merge_tool.merge import run_merge

    out = merged_dir(spec)
    if out.exists():  # run_merge writes a staged folder and renames it when complete
        return out
    criterion = spec["budget"].get("criterion")
    data_aware = criterion is not None and budget_measure(criterion) == "activation"
    cfg = MergeConfig(base_model=str(_abs(BASE_DIR)),
                      experts=[{"name": t, "model": str(_abs(EXPERTS_DIR / t))} for t in TASKS],
                      num_groups=spec["num_groups"], method=spec["method"], parameters=spec["parameters"],
                      fold_norms=spec["num_groups"] > 1,  # K=1: the classic merge, norms merged too
                      budget=spec["budget"].get("budget"), budget_criterion=criterion,
                      calibration={"file": str(calibration_texts()), "max_tokens": CALIBRATION_TOKENS}
                      if data_aware else None)
    t0 = time.time()
    run_merge(cfg, out, progress=False)
    print(f"merged {out.name} in {time.time() - t0:.1f} s", flush=True)
    return out


def calibration_texts() -> Path:
    """The activation criteria's calibration texts: training conversations (prompt and reference
    reply, in the base model's chat template), the tasks interleaved so that every task is in
    the first `CALIBRATION_TOKENS` tokens. Never the val or test split."""
    from transformers import AutoTokenizer

    from .tasks import chat_messages, load_split

    path = WORK / "calibration.jsonl"
    tok = AutoTokenizer.from_pretrained(str(_abs(BASE_DIR)), local_files_only=True)
    items = {t: load_split(t, "train")[:CALIBRATION_ITEMS_PER_TASK] for t in TASKS}
    lines = []
    for i in range(CALIBRATION_ITEMS_PER_TASK):
        for t in TASKS:
            it = items[t][i]
            conv = chat_messages(it) + [{"role": "assistant", "content": it.answer}]
            lines.append(json.dumps({"text": tok.apply_chat_template(conv, tokenize=False)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def ensure_router(merged: Path) -> Path:
    """Train the `auto` router into the checkpoint (channelmerge router train) unless present."""
    from .router_eval import router_examples

    if (merged / "router" / "router.json").exists():
        return merged / "router"
    ex = WORK / "router_examples.jsonl"
    ex.parent.mkdir(parents=True, exist_ok=True)
    with ex.open("w") as f:
        for t, prompts in router_examples(ROUTER_PROMPTS_PER_TASK).items():
            for p in prompts:
                f.write(json.dumps({"expert": t, "prompt": p}) + "\n")
    subprocess.run([str(Path(sys.executable).parent / "channelmerge"), "router", "train", str(merged), str(ex)],
                   check=True)
    return merged / "router"


def merge_error(model_dir: Path) -> dict[str, Any]:
    """From `channelmerge inspect`: each expert's mean relative weight error over the
    channel-merged tensors (||stored - expert|| / ||expert - base||), overall and per kind
    of tensor (q/k/v/o, gate/up/down, lm_head...), and the share of channels outside group 0."""
    from merge_tool.inspect import inspect_checkpoint

    info = inspect_checkpoint(model_dir)
    rows = [t for t in info["tensors"] if t["kind"] in ("channel", "merged")
            and all(math.isfinite(v) for v in t["rel_error"].values())]
    out: dict[str, Any] = {"mean": {}, "by_tensor_kind": {}, "by_layer": {}}
    for e in info["experts"]:
        errs = [t["rel_error"][e] for t in rows]
        out["mean"][e] = round(sum(errs) / len(errs), 4) if errs else None
        kinds: dict[str, list[float]] = {}
        for t in rows:
            k = t["tensor"].split(".")[-2] if t["tensor"].startswith("model.layers.") else t["tensor"]
            kinds.setdefault(k, []).append(t["rel_error"][e])
        out["by_tensor_kind"][e] = {k: round(sum(v) / len(v), 4) for k, v in kinds.items()}
        layers: dict[str, list[float]] = {}
        for t in rows:
            if t["tensor"].startswith("model.layers."):
                layers.setdefault(t["tensor"].split(".")[2], []).append(t["rel_error"][e])
        out["by_layer"][e] = [round(sum(v) / len(v), 4) for _, v in sorted(layers.items(), key=lambda kv: int(kv[0]))]
    return out


def params_ratio(spec: dict[str, Any], model_dir: Path) -> float:
    if spec["kind"] in ("expert", "base"):
        return 1.0 / len(TASKS)  # one model of the four
    if spec["kind"] == "lora":  # (base + the four adapters) / (4 x base), counted in the files
        return lora.params_ratio(spec["lora_rank"], list(TASKS))
    from merge_tool.inspect import inspect_checkpoint

    return inspect_checkpoint(model_dir)["params_ratio"]


# ----------------------------------------------------------------------------- servers

def server_cmd(spec: dict[str, Any], model_dir: Path, served: Optional[str], port: int,
               adapters: Optional[dict[str, Path]] = None) -> list[str]:
    """Stock vLLM (serving the model as `served`) for an expert or the base; stock vLLM
    multi-LoRA on the base for `lora_r{R}` (`adapters`: name -> adapter folder); else channelmerge."""
    if spec["kind"] == "lora":
        assert adapters
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", str(served), "--port", str(port), "--enable-lora",
                "--lora-modules", *(f"{n}={p}" for n, p in adapters.items()),
                "--max-lora-rank", str(spec["lora_rank"]), "--max-loras", str(len(adapters)), *SERVER_ARGS]
    if spec["kind"] in ("expert", "base"):
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", str(served), "--port", str(port), *SERVER_ARGS]
    return [str(Path(sys.executable).parent / "channelmerge"), "serve", str(model_dir),
            "--port", str(port), *SERVER_ARGS]


# One engine step may take minutes here: the first prefill of 64 rank-128 LoRA requests on a busy
# 2-core CPU outlasted vLLM's 300-s limit for a step, which kills the engine.
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
              "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"}


class Server:
    """One vLLM server process group; always stopped on exit (also on error or Ctrl-C)."""

    def __init__(self, cmd: list[str], port: int, log_path: Path):
        self.cmd, self.port, self.log_path = cmd, port, log_path
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Server":
        env = {**os.environ, **SERVER_ENV}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        print("starting:", " ".join(self.cmd), flush=True)
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        t0 = time.time()
        try:
            self._wait_ready(timeout=900)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = round(time.time() - t0, 1)
        print(f"ready in {self.start_seconds} s (log {self.log_path})", flush=True)
        return self

    def _wait_ready(self, timeout: float) -> None:
        wait_until_ready(f"http://127.0.0.1:{self.port}/v1", self.proc, timeout, str(self.log_path))

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None and not _group_alive(p.pid):
            return
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            t0 = time.time()
            while time.time() - t0 < wait:
                p.poll()
                if not _group_alive(p.pid):
                    return
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ----------------------------------------------------------------------------- measuring

def measure(name: str, concurrency: int, limit: Optional[int], split: str = "test",
            only: Optional[list[str]] = None) -> dict[str, Any]:
    """One system scored on every task; with `only`, just those tasks now (kept for a later run)."""
    spec = parse_system(name)
    adapters: Optional[dict[str, Path]] = None
    if spec["kind"] == "expert":
        model_dir, tasks, served = _abs(EXPERTS_DIR / spec["task"]), [spec["task"]], spec["task"]
    elif spec["kind"] == "lora":  # the base serves under a name no request uses (see the module docstring)
        adapters = {t: lora.extract(t, spec["lora_rank"]) for t in TASKS}
        model_dir, tasks, served = _abs(BASE_DIR), list(TASKS), "base-not-queried"
    elif spec["kind"] == "base":
        model_dir, tasks, served = _abs(BASE_DIR), list(TASKS), "base"
    else:
        model_dir, tasks = build_merged(spec), list(TASKS)
        if spec["kind"] == "auto":
            ensure_router(model_dir)
        served = None
    port = free_port()
    t0 = time.time()
    entry: dict[str, Any] = {"kind": spec["kind"], "num_groups": spec["num_groups"], "method": spec["method"],
                             "parameters": spec["parameters"], "budget": spec.get("budget") or None, "split": split,
                             "params_ratio": params_ratio(spec, model_dir), "accuracy": {}}
    if spec["kind"] in ("channel", "single_merge", "auto"):
        entry["merge_error"] = merge_error(model_dir)
    if spec["kind"] == "lora":
        entry["lora_rank"] = spec["lora_rank"]
        entry["lora"] = {t: {k: v for k, v in lora.info(t, spec["lora_rank"]).items() if k != "command"}
                         for t in TASKS}
        entry["lora_dirs"] = {t: str(p.relative_to(ROOT)) for t, p in adapters.items()}
    # Tasks scored by an earlier, interrupted run of the same system (same adapters or checkpoint,
    # split and concurrency) are kept: a LoRA system takes up to 100 minutes here.
    fingerprint = {"system": name, "split": split, "concurrency": concurrency, "model_dir": str(model_dir),
                   "params_ratio": entry["params_ratio"], "lora": entry.get("lora")}
    partial = WORK / "partial" / f"{name}.{split}.json"
    done = _load_partial(partial, fingerprint) if not limit else {}
    for key in ("accuracy", "eval_seconds", "samples"):
        if done.get(key):
            entry[key] = dict(done[key])
    routed: dict[str, dict[str, int]] = dict(done.get("routed_to", {}))
    if done.get("accuracy"):
        entry["resumed"] = {"tasks": sorted(done["accuracy"]), "from_run_started": done["started"]}
        print(f"  resuming {partial}: {', '.join(sorted(done['accuracy']))} already scored", flush=True)
    started = done.get("started") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    todo = [t for t in tasks if t not in entry["accuracy"] and (not only or t in only)]
    if not todo:  # e.g. `expert_arith --tasks code`, or every task saved by a run cut off before writing
        print(f"  {name}: no task left to score now; no server started", flush=True)
    server = (Server(server_cmd(spec, model_dir, served, port, adapters), port, WORK / "logs" / f"{name}.log")
              if todo else contextlib.nullcontext())
    with server as srv:
        if srv is not None:
            entry["server_start_seconds"] = srv.start_seconds
        for t in todo:
            model = t if spec["kind"] == "lora" else served or ("auto" if spec["kind"] == "auto" else t)
            gen = OpenAIGenerator(f"http://127.0.0.1:{port}/v1", model, concurrency=concurrency)
            res = evaluate(gen, [t], split, limit, verbose=True)
            entry["accuracy"][t] = res["accuracy"][t]
            entry.setdefault("eval_seconds", {})[t] = res["seconds"][t]
            entry.setdefault("samples", {})[t] = res["samples"][t][:2]
            if spec["kind"] == "auto":
                counts: dict[str, int] = {}
                for m in gen.answered_by:
                    counts[m] = counts.get(m, 0) + 1
                routed[t] = counts
            if not limit:
                _save_partial(partial, {"fingerprint": fingerprint, "started": started, "routed_to": routed,
                                        **{k: entry[k] for k in ("accuracy", "eval_seconds", "samples")}})
        if routed:
            entry["routed_to"] = routed
            n = sum(sum(c.values()) for c in routed.values())
            entry["routing_accuracy"] = sum(routed[t].get(t, 0) for t in routed) / n
    entry["average"] = (sum(entry["accuracy"].values()) / len(entry["accuracy"])
                        if len(entry["accuracy"]) == len(TASKS) else None)
    if spec["kind"] == "expert":
        entry["note"] = "scored on its own task only"
    if spec["kind"] == "lora":
        entry["note"] = ("each task scored with model=<task> (its adapter); no base-model request is sent to a "
                         "LoRA server (vLLM 0.32 CPU serves it with another adapter's delta: upstream bug)")
    entry["model_dir"] = str(model_dir.relative_to(ROOT))
    entry["server"] = {"expert": "stock vLLM", "base": "stock vLLM",
                       "lora": "stock vLLM multi-LoRA"}.get(spec["kind"], "channelmerge serve")
    entry["items_per_task"] = limit or (200 if split == "test" else 100)
    entry["seconds"] = round(time.time() - t0, 1)
    entry["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    pending = [t for t in tasks if t not in entry["accuracy"]]
    if pending:
        entry["pending"] = pending
    elif not limit:  # a smoke run leaves an interrupted full run's scores alone
        partial.unlink(missing_ok=True)
    return entry


def _load_partial(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("fingerprint") != fingerprint:
        print(f"  {path}: from another configuration of this system; scoring every task again", flush=True)
        return {}
    return saved


def _save_partial(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def derive_ensemble(systems: dict[str, Any]) -> Optional[dict[str, Any]]:
    rows = {t: systems.get(f"expert_{t}") for t in TASKS}
    if any(r is None or t not in r["accuracy"] for t, r in rows.items()):
        return None
    acc = {t: rows[t]["accuracy"][t] for t in TASKS}
    return {"kind": "ensemble", "num_groups": None, "method": None, "params_ratio": 1.0, "accuracy": acc,
            "average": sum(acc.values()) / len(acc),
            "note": "derived from the expert_* rows: each task scored by its own expert (not served separately)"}


def load_results() -> dict[str, Any]:
    if RESULTS_JSON.exists():
        return json.loads(RESULTS_JSON.read_text())
    return {"tasks": list(TASKS), "systems": {}}


def save_results(res: dict[str, Any]) -> None:
    res["tasks"] = list(TASKS)
    ens = derive_ensemble(res["systems"])
    if ens:
        res["systems"]["ensemble"] = ens
    RESULTS_JSON.write_text(json.dumps(res, indent=2) + "\n")


# ----------------------------------------------------------------------------- report

ORDER = {"ensemble": 0, "expert": 1, "channel": 2, "auto": 3, "single_merge": 4, "lora": 5, "base": 6}


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def plot(res: dict[str, Any], path: Path = PLOT_PNG) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {n: s for n, s in res["systems"].items() if s.get("average") is not None}
    if not pts:
        return None
    # Everything, and a zoom on the budget merges and the LoRA peers (0.27..0.47, 75..97%).
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    _draw(ax, pts)
    _draw(zoom, pts)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title("SmolLM2-135M experts (arith, date, reverse, code), served through vLLM", fontsize=10)
    ax.set_xlim(0, 1.1)
    ax.set_ylim(-3, 103)
    zoom.set_title("zoom: memory budgets and multi-LoRA", fontsize=10)
    zoom.set_xlim(0.27, 0.47)
    zoom.set_ylim(75, 97)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw(ax: Any, pts: dict[str, dict[str, Any]]) -> None:
    """One panel of the accuracy-vs-parameters plot."""
    # One line per in-group method through K = 1 (the single merge), 2, 3 (default hyperparameters).
    for m, color in zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        line = sorted((s["params_ratio"], 100 * s["average"]) for s in pts.values()
                      if s["kind"] in ("channel", "single_merge") and s["method"] == m and not s.get("parameters")
                      and not s.get("budget"))
        if line:
            ax.plot(*zip(*line), marker="o", color=color, label=f"{m} (K = 1, 2, 3)")
        # The budget curves: channel merges of this method under a memory budget (1..K rows a
        # channel), one per cap K and criterion.
        curves: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for s in pts.values():
            if s["kind"] == "channel" and s["method"] == m and s.get("budget") and not s.get("parameters"):
                crit = s["budget"].get("criterion", "weight_per_tensor")
                curves.setdefault((s["num_groups"], crit), []).append((s["params_ratio"], 100 * s["average"]))
        for (k, crit), curve in sorted(curves.items()):
            ax.plot(*zip(*sorted(curve)), marker="P" if crit.startswith("activation") else "D",
                    linestyle="--" if k > 2 else "-.", color=color, label=f"{m}, budget, K ≤ {k}, {crit}")
    # The multi-LoRA peer: mergekit-extracted rank-R adapters on stock vLLM, one point per rank.
    lora_pts = sorted((s["params_ratio"], 100 * s["average"], s["lora_rank"]) for s in pts.values()
                      if s["kind"] == "lora")
    if lora_pts:
        ax.plot([p[0] for p in lora_pts], [p[1] for p in lora_pts], marker="^", linestyle=":", color="tab:brown",
                label="vLLM multi-LoRA (mergekit extract, rank R)")
        for x, y, r in lora_pts:
            ax.annotate(f"r{r}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7, color="tab:brown")
    marks = {"ensemble": ("black", "s"), "auto": ("tab:purple", "*"), "base": ("tab:gray", "v")}
    for n, s in pts.items():
        if s["kind"] in marks:
            color, marker = marks[s["kind"]]
            ax.scatter(s["params_ratio"], 100 * s["average"], color=color, marker=marker, s=70, zorder=3)
            ax.annotate(n, (s["params_ratio"], 100 * s["average"]), textcoords="offset points",
                        xytext=(6, -12 if s["kind"] == "auto" else 4), fontsize=8)
    ax.set_xlabel("parameters stored ÷ ensemble of 4 experts")
    ax.set_ylabel("average test accuracy over 4 tasks (%)")
    ax.grid(alpha=0.3)


def lora_section(res: dict[str, Any], systems: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The multi-LoRA peer: how each adapter was made and what it holds, and the channel merge
    (default hyperparameters, no budget) nearest in parameters to each rank."""
    rows = [(n, s) for n, s in systems if s["kind"] == "lora"]
    if not rows:
        return []
    lines = ["## Multi-LoRA peer (`lora_r*`)", "",
             "Each expert extracted by mergekit 0.1.5 (`python -m mergekit.scripts.extract_lora --model EXPERT "
             "--base-model BASE --out-path OUT --max-rank R --skip-undecomposable -e 'embed_tokens|lm_head' "
             "--no-copy-tokenizer`, absolute paths; a truncated SVD of each linear layer's delta, rank "
             "min(R, rows, columns)), the four adapters served by one stock vLLM server on the base "
             "(`--enable-lora --lora-modules arith=DIR ... --max-lora-rank R --max-loras 4`, same flags as "
             "above), each task requested with `model=<task>`. The adapters load in vLLM as mergekit writes "
             "them (no post-processing). Params ÷ ensemble = (base + the four adapters' parameters) ÷ "
             "(4 × base). Shares of each expert's delta (squared L2 over all tensors): *dropped* = tensors "
             "with no LoRA (the RMSNorm weights; the embeddings / tied lm_head are excluded, and equal to the "
             "base's for these experts), *truncated* = what the rank-R SVD leaves out of the linear layers. "
             "Extraction: wall-clock seconds per expert (CPU seconds), on the shared CPU above.", "",
             "No base-model request is sent to a LoRA server: on CPU, vLLM 0.32 serves a plain base-model "
             "request with another adapter's delta once adapters are loaded (an upstream bug), so the base row "
             "comes from its own server.", "",
             "| system | expert | adapter params | dropped (norms) | truncated | kept | extraction s (CPU s) |",
             "|---|---|---|---|---|---|---|"]
    for n, s in rows:
        for t in res["tasks"]:
            i = s.get("lora", {}).get(t)
            if i:
                lines.append(f"| `{n}` | {t} | {i['adapter_params']:,} | {100 * i['dropped_share']:.3f}% | "
                             f"{100 * i['truncation_share']:.1f}% | {100 * i['kept_share']:.1f}% | "
                             f"{i['extract_seconds']:.0f} ({i.get('extract_cpu_seconds', float('nan')):.0f}) |")
    lines.append("")
    merges = [(n, s) for n, s in systems if s["kind"] in ("channel", "single_merge") and s.get("average") is not None
              and not s.get("parameters") and not s.get("budget")]
    if merges:
        lines += ["Nearest merge in parameters (default hyperparameters):", ""]
        for n, s in rows:
            if s.get("average") is None:
                continue
            near = min((ms["params_ratio"] for _, ms in merges), key=lambda x: abs(x - s["params_ratio"]))
            same = ", ".join(f"`{m}` {_pct(ms['average'])}" for m, ms in merges if abs(ms["params_ratio"] - near) < 1e-6)
            lines.append(f"- `{n}` ({s['params_ratio']:.3f}): {_pct(s['average'])}; at {near:.3f}: {same}")
        lines.append("")
    return lines


def _machines_line(res: dict[str, Any]) -> str:
    """Which systems were measured on which machine, when not all on the last one (rows
    measured before machines were recorded per system came from `first_machine`)."""
    last = res.get("machine", "")
    by: dict[str, list[str]] = {}
    for n, s in res["systems"].items():
        if s["kind"] != "ensemble":
            by.setdefault(s.get("machine") or res.get("first_machine", "earlier machine"), []).append(n)
    if set(by) <= {last}:
        return ""
    return " (last run). Systems by machine: " + "; ".join(
        f"{m}: " + ", ".join(f"`{n}`" for n in sorted(ns)) for m, ns in by.items())


def write_report(res: dict[str, Any], notes: str = "") -> None:
    systems = sorted(res["systems"].items(),
                     key=lambda kv: (ORDER.get(kv[1]["kind"], 9), kv[1].get("num_groups") or 0,
                                     kv[1].get("lora_rank") or 0,
                                     METHODS.index(kv[1]["method"]) if kv[1].get("method") in METHODS else 0,
                                     kv[0]))
    lines = ["# Quality comparison: channel merging of four real experts, served through vLLM", "",
             "Test split of each task (200 items, greedy, max tokens per task as in `tasks.py`), scored by "
             "`tasks.score` through the `openai` client against a live server: `channelmerge serve` for merged "
             "checkpoints (the expert picked by the `model` name; `auto`: by the checkpoint's router), stock "
             "vLLM for an expert alone and the base, stock vLLM multi-LoRA (the expert's adapter picked by "
             "the `model` name) for `lora_r*`. Generated by `benchmarks/quality/compare.py` from "
             "`results.json`.", "",
             "- Commands (the systems were measured in parts; results of earlier runs are kept): "
             + ", ".join(f"`{c}`" for c in res.get("commands", [res.get("command", "")])),
             f"- Machine: {res.get('machine', '')}" + _machines_line(res),
             f"- Date: {res.get('date', '')}",
             "- Server flags: `--dtype float32 --max-model-len 1024 --max-num-seqs 64`, "
             "`VLLM_CPU_KVCACHE_SPACE=2`, one server at a time, 64 concurrent requests.", "",
             "| system | kind | K | method | " + " | ".join(res["tasks"]) + " | average | params ÷ ensemble |",
             "|---|---|---|---|" + "---|" * len(res["tasks"]) + "---|---|"]
    for n, s in systems:
        acc = [_pct(s["accuracy"].get(t)) for t in res["tasks"]]
        method = s.get("method") or (f"rank {s['lora_rank']}" if s["kind"] == "lora" else "–")
        lines.append(f"| `{n}` | {s['kind']} | {s.get('num_groups') or '–'} | {method} | "
                     + " | ".join(acc) + f" | {_pct(s.get('average'))} | {s['params_ratio']:.3f} |")
    lines += ["", "![average accuracy against parameters](accuracy_vs_params.png)", ""]
    auto = [(n, s) for n, s in systems if s["kind"] == "auto"]
    if auto:
        lines += ["## `auto` router", ""]
        for n, s in auto:
            oracle = res["systems"].get(n.replace("auto_", "channel_", 1))
            o = f"; oracle routing (`{n.replace('auto_', 'channel_', 1)}`): {_pct(oracle['average'])}" if oracle else ""
            lines.append(f"- `{n}`: routing accuracy {_pct(s.get('routing_accuracy'))} (response `model` "
                         f"field), end-to-end average {_pct(s.get('average'))}{o}.")
        lines.append("")
    lines += lora_section(res, systems)
    if SWEEP_JSON.exists():
        sweep = json.loads(SWEEP_JSON.read_text())["systems"]
        lines += ["## Hyperparameters, settled on the validation split", "",
                  "Validation split (100 items per task, disjoint from the test split), same serving path. "
                  "Generated from `sweep.json` (`--split val`).", "",
                  "| system | " + " | ".join(res["tasks"]) + " | average | params ÷ ensemble |",
                  "|---|" + "---|" * len(res["tasks"]) + "---|---|"]
        for n, s in sorted(sweep.items()):
            lines.append(f"| `{n}` | " + " | ".join(_pct(s["accuracy"].get(t)) for t in res["tasks"])
                         + f" | {_pct(s.get('average'))} | {s['params_ratio']:.3f} |")
        lines.append("")
    lines += ["## Notes", "", notes.strip() or "–", ""]
    RESULTS_MD.write_text("\n".join(lines))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, help="systems to measure, in order")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--limit", type=int, help="first N test items per task (smoke runs; not written)")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS),
                    help="score only these tasks now; a system is written once a later run has scored the rest")
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="val: settle hyperparameters (results to sweep.json, not to the test table)")
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md and the plot from results.json")
    ap.add_argument("--notes", type=Path, help="markdown file: notes for RESULTS.md (kept in results.json)")
    a = ap.parse_args(argv)
    for s in a.systems:
        parse_system(s)
    # SIGTERM unwinds like Ctrl-C, so the running server is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = load_results()
    if not a.report_only:
        for name in a.systems:
            print(f"== {name}", flush=True)
            entry = measure(name, a.concurrency, a.limit, a.split, a.tasks)
            entry["machine"] = machine_info()
            print(f"{name}: {json.dumps(entry['accuracy'])} average {entry['average']}", flush=True)
            if a.limit:
                continue
            if entry.get("pending"):
                print(f"{name}: not written yet, {', '.join(entry['pending'])} still to score "
                      f"(work/quality/partial/ keeps the rest)", flush=True)
                continue
            if a.split == "val":
                sweep = json.loads(SWEEP_JSON.read_text()) if SWEEP_JSON.exists() else {"systems": {}}
                sweep["systems"][name] = entry
                SWEEP_JSON.write_text(json.dumps(sweep, indent=2) + "\n")
                write_report(load_results(), load_results().get("notes", ""))
                continue
            res = load_results()
            res.setdefault("first_machine", res.get("machine", ""))  # the machine of rows without one
            res["systems"][name] = entry
            cmd = "python -m benchmarks.quality.compare --systems " + " ".join(a.systems)
            res.update(date=entry["date"], machine=machine_info(), command=cmd)
            if cmd not in res.setdefault("commands", []):
                res["commands"].append(cmd)
            res.setdefault("seconds", {})[name] = entry["seconds"]
            save_results(res)
            plot(res)
            write_report(res, res.get("notes", ""))  # after every system: a partial run leaves a report
    # Read again: another run may have saved systems since this one started (a validation run
    # never saves, and a smoke run writes nothing unless it brings notes).
    res = load_results()
    if a.notes:
        res["notes"] = a.notes.read_text()
    if a.split == "val" and not a.notes and not a.report_only:
        return 0
    if res["systems"] and not (a.limit and not a.notes and not a.report_only):
        save_results(res)
        plot(res)
        write_report(res, res.get("notes", ""))
        print(f"wrote {RESULTS_JSON}, {RESULTS_MD}, {PLOT_PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
