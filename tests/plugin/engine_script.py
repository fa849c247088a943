"""Runs one vLLM engine (or several stock ones in turn) and writes what the tests compare.

A script, not a test: vLLM spawns its workers, so engines run in their own process
(``if __name__ == "__main__"``), one at a time, and the tests read the JSON it writes.

    engine_script.py plugin MERGED OUT.json [--tp N] [--quick]
    engine_script.py ref OUT.json NAME=DIR [NAME=DIR ...]
    engine_script.py load MERGED          (exit 0 if the engine starts)
    engine_script.py loads OUT.json NAME=DIR [NAME=DIR ...]   (each checkpoint's load error, in turn)
    engine_script.py refusals MERGED OUT.json   (start-up settings the plugin must refuse)
    engine_script.py untested MERGED PLAIN OUT.json   (as if vLLM were an untested release)
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

PROMPTS = [
    "hello world the cat",
    "add one two three four",
    "the moon is big and the sun is",
    "def print list return",
]
# Long enough to fill more than one KV block (128 tokens on CPU).
LONG_PROMPT = " ".join(["the red cat and the blue dog were big and fast"] * 30)
MAX_TOKENS = 32
TOP_LOGPROBS = 5
ENGINE_KW = dict(dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=16,
                 kv_cache_memory_bytes=1 << 27, seed=0, enable_prefix_caching=True,
                 # Small steps: long prompts are prefilled in chunks, mixed with decodes.
                 max_num_batched_tokens=128)


def _close(llm) -> None:
    """Shut the engine's worker processes down before the interpreter exits: left to
    interpreter teardown, they have been seen to abort the script (exit -6) after its
    results were written."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def _sp(expert=None, logprobs=TOP_LOGPROBS):
    from vllm import SamplingParams

    extra = {"expert": expert} if expert is not None else None
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=logprobs,
                          ignore_eos=True, extra_args=extra)


def _prompt_sp(expert=None):
    from vllm import SamplingParams

    extra = {"expert": expert} if expert is not None else None
    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=3, extra_args=extra)


def _prompt_lps(out) -> list:
    return [None if step is None else {str(t): float(lp.logprob) for t, lp in step.items()}
            for step in out.prompt_logprobs]


def _record(out) -> dict:
    c = out.outputs[0]
    lps = []
    for step in c.logprobs or []:
        lps.append({str(t): float(lp.logprob) for t, lp in step.items()})
    return {"tokens": list(c.token_ids), "text": c.text, "logprobs": lps,
            "cached": int(getattr(out, "num_cached_tokens", 0) or 0)}


def run_plugin(merged: str, out_path: str, tp: int = 1, quick: bool = False) -> None:
    from vllm import LLM

    t0 = time.time()
    llm = LLM(model=merged, tensor_parallel_size=tp, **ENGINE_KW)
    res: dict = {"startup_s": time.time() - t0}
    experts = json.load(open(os.path.join(merged, "config.json")))["quantization_config"]["experts"]
    res["experts"] = experts
    res["single"] = {}
    for e in experts:  # one expert per batch
        outs = llm.generate(PROMPTS, _sp(e), use_tqdm=False)
        res["single"][e] = [_record(o) for o in outs]
    if not quick:
        # One batch mixing every expert, in an interleaved order.
        pairs = [(e, p) for i, p in enumerate(PROMPTS) for e in experts[i % len(experts):] + experts[: i % len(experts)]]
        outs = llm.generate([p for _, p in pairs], [_sp(e) for e, _ in pairs], use_tqdm=False)
        res["mixed"] = [{"expert": e, "prompt": PROMPTS.index(p), **_record(o)} for (e, p), o in zip(pairs, outs)]
        # The same long prompt to two experts, one after the other (prefix caching on).
        a, b = experts[0], experts[1]
        res["long"] = {}
        for e in (a, b, a):
            o = llm.generate([LONG_PROMPT], _sp(e), use_tqdm=False)[0]
            res["long"].setdefault(e, []).append(_record(o))
        # An unknown expert is refused when the request is admitted.
        try:
            llm.generate(["hello"], _sp("no-such-expert"), use_tqdm=False)
            res["unknown_error"] = None
        except Exception as exc:  # noqa: BLE001
            res["unknown_error"] = f"{type(exc).__name__}: {exc}"
        # Prompt logprobs (logits over a slice of the tokens, not one row per request), two
        # experts in one batch.
        outs = llm.generate([PROMPTS[1], PROMPTS[1]], [_prompt_sp(a), _prompt_sp(b)], use_tqdm=False)
        res["prompt_logprobs"] = {a: _prompt_lps(outs[0]), b: _prompt_lps(outs[1])}
        # No expert at all (and no default_expert in the checkpoint) is refused at admission.
        try:
            llm.generate(PROMPTS[:1], _sp(None), use_tqdm=False)
            res["no_expert_error"] = None
        except Exception as exc:  # noqa: BLE001
            res["no_expert_error"] = f"{type(exc).__name__}: {exc}"
    _close(llm)
    json.dump(res, open(out_path, "w"))


def run_ref(out_path: str, pairs: list[str]) -> None:
    from vllm import LLM

    res: dict = {}
    for pair in pairs:
        name, path = pair.split("=", 1)
        t0 = time.time()
        llm = LLM(model=path, **ENGINE_KW)
        outs = llm.generate(PROMPTS + [LONG_PROMPT], _sp(None), use_tqdm=False)
        plp = llm.generate([PROMPTS[1]], _prompt_sp(None), use_tqdm=False)[0]
        res[name] = {"prompts": [_record(o) for o in outs[:-1]], "long": _record(outs[-1]),
                     "prompt_logprobs": _prompt_lps(plp), "startup_s": time.time() - t0}
        _close(llm)
        del llm
    json.dump(res, open(out_path, "w"))


def run_load(merged: str) -> None:
    from vllm import LLM

    _close(LLM(model=merged, **ENGINE_KW))


def run_loads(out_path: str, pairs: list[str]) -> None:
    """Start an engine on each checkpoint in turn, the engine core in this process (so that its
    error is the exception raised here, and vLLM is imported once for all of them); record the
    full error text of each (None: it started)."""
    import traceback

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    res = {}
    for pair in pairs:
        name, path = pair.split("=", 1)
        try:
            _close(LLM(model=path, **ENGINE_KW))
            res[name] = None
        except Exception as exc:  # noqa: BLE001
            res[name] = "".join(traceback.format_exception(exc))
        gc.collect()
    json.dump(res, open(out_path, "w"))


def run_refusals(merged: str, out_path: str) -> None:
    """Build the engine config (the plugin's config hook runs; no engine starts) for each
    setting the plugin must refuse at start-up; record each error (None: accepted)."""
    from vllm.engine.arg_utils import EngineArgs

    cases = {
        "plain_cpu_worker": {"worker_cls": "vllm.v1.worker.cpu_worker.CPUWorker"},
        "pipeline_parallel": {"pipeline_parallel_size": 2},
        "data_parallel": {"data_parallel_size": 2},
        "plugin_worker": {"worker_cls": "vllm_channelmerge.compat.ChannelMergedCPUWorker"},
    }
    res = {}
    for name, kw in cases.items():
        try:
            EngineArgs(model=merged, **{**ENGINE_KW, **kw}).create_engine_config()
            res[name] = None
        except Exception as exc:  # noqa: BLE001
            res[name] = f"{type(exc).__name__}: {exc}"
    json.dump(res, open(out_path, "w"))


def run_untested(merged: str, plain: str, out_path: str) -> None:
    """As if vLLM were an untested release: the merged checkpoint must be refused with the
    reason, a plain model in the same environment must still build its config."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    vllm.__version__ = "0.99.0"
    res = {}
    for name, model in (("merged", merged), ("plain", plain)):
        try:
            EngineArgs(model=model, **ENGINE_KW).create_engine_config()
            res[name] = None
        except Exception as exc:  # noqa: BLE001
            res[name] = f"{type(exc).__name__}: {exc}"
    json.dump(res, open(out_path, "w"))


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "plugin":
        tp = int(argv[argv.index("--tp") + 1]) if "--tp" in argv else 1
        run_plugin(argv[1], argv[2], tp=tp, quick="--quick" in argv)
    elif mode == "ref":
        run_ref(argv[1], argv[2:])
    elif mode == "load":
        run_load(argv[1])
    elif mode == "loads":
        run_loads(argv[1], argv[2:])
    elif mode == "refusals":
        run_refusals(argv[1], argv[2])
    elif mode == "untested":
        run_untested(argv[1], argv[2], argv[3])
    else:
        raise SystemExit(f"unknown mode {mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
