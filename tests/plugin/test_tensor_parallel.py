"""TP=2 on the CPU (one core per rank) gives the same tokens as TP=1."""

from __future__ import annotations

import json
import os

import pytest

from .conftest import EXPERTS, needs_vllm, run_script

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]


def _tp2_possible() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count() >= 2
    return (os.cpu_count() or 1) >= 2


needs_tp2 = pytest.mark.skipif(not _tp2_possible(), reason="TP=2 needs two cores (CPU) or two GPUs")


def assert_tp2_equals_tp1(merged, tp1: dict, vllm_env: dict, tmp_path) -> None:
    """Serve ``merged`` with TP=2 and compare each expert's tokens and logprobs with ``tp1``."""
    env = dict(vllm_env, VLLM_CPU_OMP_THREADS_BIND="0|1")
    out = tmp_path / "tp2.json"
    p = run_script(["plugin", str(merged), str(out), "--tp", "2", "--quick"], env)
    assert p.returncode == 0, p.stderr[-6000:]
    tp2 = json.loads(out.read_text())
    for e in EXPERTS:
        assert len(tp2["single"][e]) == len(tp1["single"][e]) > 0, e  # zip() passes on empty
        for i, (a, b) in enumerate(zip(tp2["single"][e], tp1["single"][e])):
            assert a["tokens"] == b["tokens"], f"{e} prompt {i}"
            assert len(a["logprobs"]) == len(b["logprobs"]) > 0, f"{e} prompt {i}"
            for sa, sb in zip(a["logprobs"], b["logprobs"]):
                for t in set(sa) & set(sb):
                    assert abs(sa[t] - sb[t]) <= 1e-3


@needs_tp2
def test_tp2_equals_tp1(merged_family, plugin_run, vllm_env, tmp_path):
    assert_tp2_equals_tp1(merged_family["merged"], plugin_run, vllm_env, tmp_path)
