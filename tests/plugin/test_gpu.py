"""GPU only (skipped elsewhere): both model runners give the same answers.

On a CUDA build of vLLM the rest of tests/plugin runs on the GPU with the default runner
(Model Runner V2, through the model's ModelState); this adds a run with Model Runner V1
(the runner-subclass path) and checks that both agree.
"""

from __future__ import annotations

import json

import pytest

from .conftest import EXPERTS, needs_vllm, run_script

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow, pytest.mark.gpu]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.skipif(not _cuda(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("runner", ["0", "1"])
def test_runner_v1_and_v2_agree(runner, merged_family, plugin_run, vllm_env, tmp_path):
    env = dict(vllm_env, VLLM_USE_V2_MODEL_RUNNER=runner)
    out = tmp_path / "run.json"
    p = run_script(["plugin", str(merged_family["merged"]), str(out), "--quick"], env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    got = json.loads(out.read_text())
    for e in EXPERTS:
        assert len(got["single"][e]) == len(plugin_run["single"][e]) > 0, (runner, e)  # zip() passes on empty
        for a, b in zip(got["single"][e], plugin_run["single"][e]):
            assert a["tokens"] == b["tokens"], (runner, e)
