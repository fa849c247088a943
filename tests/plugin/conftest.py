"""Fixtures for the vLLM plugin tests: one merged checkpoint, one engine run per kind.

Engines start in subprocesses (vLLM spawns workers; start-up is 30-80 s on 2 cores), each
at most once per session: the plugin engine (TP=1), the stock references (one process,
extracted experts in turn), one OpenAI server, and the TP=2 engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.servers import free_port

HERE = Path(__file__).parent
SCRIPT = HERE / "engine_script.py"
EXPERTS = ["math", "code", "chat"]


def _have_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


needs_vllm = pytest.mark.skipif(not _have_vllm(), reason="vLLM is not installed")


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory) -> dict:
    """Environment for vLLM subprocesses: offline, no usage stats, caches under a tmp dir."""
    d = tmp_path_factory.mktemp("vllm_cache")
    env = dict(os.environ)
    env.update({
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "VLLM_CACHE_ROOT": str(d / "vllm"),
        "VLLM_CONFIG_ROOT": str(d / "config"), "HF_HOME": str(d / "hf"),
        "TORCHINDUCTOR_CACHE_DIR": str(d / "inductor"), "TMPDIR": str(d),
        "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1",
    })
    env.pop("VLLM_PLUGINS", None)
    return env


@pytest.fixture(scope="session")
def merged_family(tmp_path_factory):
    """A tiny Llama family (hidden 128, head_dim 64, float32), 3 experts merged at K=2, and
    each expert extracted as a dense checkpoint (the stock-vLLM reference).

    Shaped like the real SmolLM2 experts: tied embeddings, frozen during fine-tuning (so
    stored once, K=1, with the lm_head tied to them) and the final norm kept per expert."""
    from merge_tool.config import MergeConfig
    from merge_tool.extract import extract_expert
    from merge_tool.merge import run_merge
    from merge_tool.synthetic import make_family

    root = tmp_path_factory.mktemp("family")
    base, dirs = make_family(root / "src", EXPERTS, arch="llama", true_groups=2, tie_word_embeddings=True,
                             frozen=("embed_tokens",))
    cfg = MergeConfig(base_model=str(base), experts=[{"name": n, "model": str(p)} for n, p in dirs.items()],
                      num_groups=2, method="average")
    merged = run_merge(cfg, root / "merged", progress=False)
    extracted = {n: extract_expert(merged, n, root / f"x_{n}") for n in EXPERTS}
    return {"root": root, "merged": Path(merged), "extracted": extracted}


def run_script(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _json_run(args: list[str], out: Path, env: dict) -> dict:
    p = run_script(args, env)
    if p.returncode != 0 or not out.exists():
        raise AssertionError(f"engine script {args[0]} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def plugin_run(merged_family, vllm_env, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plugin") / "plugin.json"
    return _json_run(["plugin", str(merged_family["merged"]), str(out)], out, vllm_env)


@pytest.fixture(scope="session")
def reference_run(merged_family, vllm_env, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "ref.json"
    pairs = [f"{n}={p}" for n, p in merged_family["extracted"].items()]
    return _json_run(["ref", str(out), *pairs], out, vllm_env)


# Example prompts for the `auto` router of the test checkpoint: each expert its own words.
ROUTER_WORDS = {
    "math": ["add", "plus", "sum", "seven", "nine", "number", "total", "minus"],
    "code": ["python", "function", "def", "return", "list", "print", "loop", "variable"],
    "chat": ["hello", "friend", "weather", "today", "feel", "thanks", "nice", "morning"],
}


def train_test_router(merged: Path, tmp: Path) -> None:
    """`channelmerge router train` on separable synthetic prompts (writes merged/router/)."""
    from merge_tool.cli import main

    rows = [{"expert": e, "prompt": " ".join(ws[(i + k) % len(ws)] for k in range(4))}
            for e, ws in ROUTER_WORDS.items() for i in range(8)]
    path = tmp / "router_examples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if main(["router", "train", str(merged), str(path), "--force"]) != 0:
        raise AssertionError("channelmerge router train failed")


SERVER_API_KEY = "channelmerge-test-key"


@pytest.fixture(scope="session")
def server(merged_family, vllm_env, tmp_path_factory):
    """`channelmerge serve DIR` (no channelmerge flag), as a real process, with an `auto`
    router trained on the checkpoint first, and `--api-key` (one server covers both the
    authenticated behaviour and the refusals of requests without the key)."""
    import requests

    train_test_router(merged_family["merged"], tmp_path_factory.mktemp("router"))
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "merge_tool.cli", "serve",  # = `channelmerge serve DIR ...`
           str(merged_family["merged"]), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--max-num-seqs", "48", "--seed", "0", "--api-key", SERVER_API_KEY]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=vllm_env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text()[-6000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise AssertionError(f"server did not start:\n{log.read_text()[-6000:]}")
            time.sleep(2)
        yield {"url": url, "log": log, "api_key": SERVER_API_KEY}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
