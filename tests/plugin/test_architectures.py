"""Mistral, Qwen2 (biases) and Qwen3 (per-head q/k norms) wrappers against stock vLLM on
extracted experts.

Qwen3 runs in every suite: it was added through the architecture table alone
(vllm_channelmerge/architectures.py), and this proves the table is enough. Mistral and Qwen2
are four more engine start-ups (~3-4 minutes on 2 cores), so opt-in:
``CHANNELMERGE_TEST_ALL_ARCHS=1 pytest tests/plugin/test_architectures.py``.
(The Llama wrapper is covered by test_engine.py in every run.)
"""

from __future__ import annotations

import json
import os

import pytest

from .conftest import needs_vllm, run_script

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]
_OPT_IN = pytest.mark.skipif(os.environ.get("CHANNELMERGE_TEST_ALL_ARCHS") != "1",
                             reason="opt-in: set CHANNELMERGE_TEST_ALL_ARCHS=1")


@pytest.mark.parametrize("arch", [pytest.param("mistral", marks=_OPT_IN), pytest.param("qwen2", marks=_OPT_IN),
                                  "qwen3"])
def test_architecture_matches_extracted(arch, vllm_env, tmp_path):
    from merge_tool.config import MergeConfig
    from merge_tool.extract import extract_expert
    from merge_tool.merge import run_merge
    from merge_tool.synthetic import make_family

    names = ["math", "code", "chat"]
    base, dirs = make_family(tmp_path / "src", names, arch=arch, true_groups=2)
    cfg = MergeConfig(base_model=str(base), experts=[{"name": n, "model": str(p)} for n, p in dirs.items()],
                      num_groups=2)
    merged = run_merge(cfg, tmp_path / "merged", progress=False)
    # One reference engine: expert "code" (index 1), so a plugin that fell back to expert 0
    # fails; every expert is compared on Llama in test_engine.py.
    checked = ["code"]
    refs = [f"{n}={extract_expert(merged, n, tmp_path / f'x_{n}')}" for n in checked]
    out_p, out_r = tmp_path / "plugin.json", tmp_path / "ref.json"
    p = run_script(["plugin", str(merged), str(out_p), "--quick"], vllm_env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    r = run_script(["ref", str(out_r), *refs], vllm_env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    got, want = json.loads(out_p.read_text()), json.loads(out_r.read_text())
    for n in checked:
        assert len(got["single"][n]) == len(want[n]["prompts"]) > 0, f"{arch} {n}"  # zip() passes on empty
        for i, (a, b) in enumerate(zip(got["single"][n], want[n]["prompts"])):
            assert a["tokens"] == b["tokens"], f"{arch} {n} prompt {i}"
            assert len(a["logprobs"]) == len(b["logprobs"]) > 0, f"{arch} {n} prompt {i}"
            for sa, sb in zip(a["logprobs"], b["logprobs"]):
                for t in set(sa) & set(sb):
                    assert abs(sa[t] - sb[t]) <= 1e-3
