"""A checkpoint merged under a memory budget (format v2, a row table) in a real vLLM engine.

The family's embeddings are not frozen, so the tied embedding / lm_head has extra rows too;
K=3, TIES, and a budget between one row and K rows per channel, so some channels of every
linear (q/k/v and gate/up fused by vLLM, each constituent with its own extra rows) keep one row
and others two. The reference is stock vLLM on `channelmerge extract` of each expert (the
row-table lookup, what the plugin must compute).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import EXPERTS, _json_run, needs_vllm, run_script
from .test_engine import _same_logprobs
from .test_tensor_parallel import assert_tp2_equals_tp1, needs_tp2

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]

BUDGET = 0.45


@pytest.fixture(scope="module")
def budget_family(tmp_path_factory) -> dict:
    from merge_tool.config import MergeConfig
    from merge_tool.extract import extract_expert
    from merge_tool.merge import run_merge
    from merge_tool.synthetic import make_family

    root = tmp_path_factory.mktemp("budget_family")
    base, dirs = make_family(root / "src", EXPERTS, arch="llama", true_groups=2, tie_word_embeddings=True)
    cfg = MergeConfig(base_model=str(base), experts=[{"name": n, "model": str(p)} for n, p in dirs.items()],
                      num_groups=3, method="ties", budget=BUDGET)
    merged = Path(run_merge(cfg, root / "merged", progress=False))
    extracted = {n: extract_expert(merged, n, root / f"x_{n}") for n in EXPERTS}
    return {"merged": merged, "extracted": extracted}


@pytest.fixture(scope="module")
def budget_runs(budget_family, vllm_env, tmp_path_factory) -> tuple[dict, dict]:
    d = tmp_path_factory.mktemp("budget_runs")
    plugin = _json_run(["plugin", str(budget_family["merged"]), str(d / "plugin.json")], d / "plugin.json", vllm_env)
    pairs = [f"{n}={p}" for n, p in budget_family["extracted"].items()]
    ref = _json_run(["ref", str(d / "ref.json"), *pairs], d / "ref.json", vllm_env)
    return plugin, ref


def test_the_checkpoint_is_a_row_table_with_split_and_unsplit_channels(budget_family):
    qc = json.loads((budget_family["merged"] / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2 and qc["budget"]["params_ratio"] == BUDGET
    extra = qc["extra_rows"]
    for m in ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
              "model.layers.1.mlp.up_proj"):
        assert 0 < extra[m], m
    report = json.loads((budget_family["merged"] / "channelmerge" / "report.json").read_text())
    kinds = {r["kind"]: r["rows"] for r in report["allocation"]["by_kind"]}
    assert all(rows[0] > 0 and rows[1] > 0 for k, rows in kinds.items() if k != "lm_head"), kinds


@pytest.mark.parametrize("expert", EXPERTS)
def test_budget_checkpoint_matches_extracted_expert(budget_runs, expert):
    plugin, ref = budget_runs
    for i, (g, w) in enumerate(zip(plugin["single"][expert], ref[expert]["prompts"], strict=True)):
        assert g["tokens"] == w["tokens"], f"{expert} prompt {i}"
        _same_logprobs(g["logprobs"], w["logprobs"], f"{expert} prompt {i}")
    for g in plugin["long"].get(expert, []):
        assert g["tokens"] == ref[expert]["long"]["tokens"], f"{expert} long prompt"


def test_budget_checkpoint_mixed_batch_and_prompt_logprobs(budget_runs):
    plugin, ref = budget_runs
    assert len(plugin["mixed"]) == len(EXPERTS) * 4
    for r in plugin["mixed"]:
        assert r["tokens"] == ref[r["expert"]]["prompts"][r["prompt"]]["tokens"], r["expert"]
    assert len({tuple(plugin["single"][e][0]["tokens"]) for e in EXPERTS}) == len(EXPERTS)
    for e, got in plugin["prompt_logprobs"].items():
        _same_logprobs(got[1:], ref[e]["prompt_logprobs"][1:], f"prompt logprobs {e}")


def test_a_row_index_pointing_at_another_channel_is_refused(budget_family, vllm_env, tmp_path):
    """Loading checks every row index: one that points at another channel's row names the tensor."""
    import shutil

    import torch

    from .test_load_errors import _edit_tensors

    d = tmp_path / "m"
    shutil.copytree(budget_family["merged"], d)
    victim = "model.layers.1.self_attn.k_proj.row_index"

    def swap(sd):
        ri = sd[victim].clone()
        ri[0, 0] = 1  # channel 0 of expert 0 reads channel 1's primary row
        sd[victim] = ri.to(torch.int32)
        return sd

    _edit_tensors(d, swap)
    p = run_script(["load", str(d)], vllm_env, timeout=400)
    err = p.stdout + p.stderr
    assert p.returncode != 0 and f"'{victim}'" in err and "a channel may use only its own rows" in err


@needs_tp2
def test_budget_checkpoint_tp2_equals_tp1(budget_family, budget_runs, vllm_env, tmp_path):
    """Each rank holds its channels' rows (and the tied embedding its vocabulary's) of a row
    table whose channels have one, two or three rows."""
    assert_tp2_equals_tp1(budget_family["merged"], budget_runs[0], vllm_env, tmp_path)
