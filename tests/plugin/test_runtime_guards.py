"""The runtime never falls back to one expert silently: start-up refusals and step guards.

Unit tests on the vLLM-free pieces, plus one subprocess that builds the engine config (the
plugin's config hook runs, no engine starts) for each setting that must be refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vllm_channelmerge import format as fmt

from .conftest import EXPERTS, needs_vllm, run_script

CM = fmt.ChannelMergedConfig(experts=list(EXPERTS), num_groups=2)


def test_resolve_expert_refuses_a_request_without_expert():
    with pytest.raises(fmt.ExpertRequestError, match="names no expert") as e:
        CM.resolve(None)
    assert all(n in str(e.value) for n in EXPERTS)


def test_resolve_expert_uses_the_named_default():
    cm = fmt.ChannelMergedConfig(experts=list(EXPERTS), num_groups=2, default_expert="code")
    assert cm.resolve(None) == EXPERTS.index("code")
    assert cm.resolve("chat") == EXPERTS.index("chat")


@pytest.mark.parametrize("bad", ["nope", "math\n", True, -1, 3, 1.0, "1"])
def test_resolve_expert_refuses_unknown_values(bad):
    with pytest.raises(fmt.ExpertRequestError):
        CM.resolve(bad)


def test_resolve_expert_accepts_indices():
    assert CM.resolve(1) == 1
    assert CM.resolve(np.int64(2)) == 2


def test_default_expert_must_be_an_expert():
    d = {**CM.to_dict(), "default_expert": "other"}
    with pytest.raises(fmt.FormatError, match="default_expert is 'other'"):
        fmt.ChannelMergedConfig.from_dict(d)


def test_request_without_ids_is_refused_outside_dummy_runs():
    from vllm_channelmerge.context import StepState

    step = StepState(len(EXPERTS))
    with pytest.raises(RuntimeError, match="without expert ids"):
        step.begin(None, None, 4, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="without expert ids"):
        step.token_batch(4, torch.device("cpu"))  # a layer outside any forward
    with step.dummy_run():
        step.begin(None, None, 4, torch.device("cpu"))
        assert step.token_batch(4, torch.device("cpu")).expert_ids.tolist() == [0, 0, 0, 0]
    step.begin(torch.tensor([2, 1, 0]), torch.tensor([2]), 3, torch.device("cpu"))
    assert step.token_batch(3, torch.device("cpu")).expert_ids.tolist() == [2, 1, 0]


def test_worker_choice_refuses_foreign_workers_and_platforms():
    from vllm_channelmerge import compat

    assert compat.choose_worker_cls("auto", True, False, "cpu").endswith("ChannelMergedCPUWorker")
    assert compat.choose_worker_cls("auto", False, True, "cuda").endswith("ChannelMergedGPUWorker")
    with pytest.raises(ValueError, match="neither CPU nor CUDA"):
        compat.choose_worker_cls("auto", False, False, "tpu")
    with pytest.raises(ValueError, match="not a channelmerge worker"):
        compat.choose_worker_cls("json.JSONDecoder", True, False, "cpu")
    with pytest.raises(ValueError, match="cannot be imported"):
        compat.choose_worker_cls("no_such_module.Worker", True, False, "cpu")

    class Mine(compat.ChannelMergedWorkerMixin):
        pass

    assert compat.choose_worker_cls(Mine, True, False, "cpu") is Mine


def test_untested_vllm_is_refused_by_default(monkeypatch):
    from vllm_channelmerge import compat

    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=compat.ALLOW_UNTESTED_ENV):
        compat.check_vllm_version("0.99.0")
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    assert "0.99.0" in compat.check_vllm_version("0.99.0")
    assert compat.check_vllm_version("0.32.1") is None


def test_non_float_weights_and_float_indices_are_refused():
    from vllm_channelmerge.layers import check_dtype

    with pytest.raises(fmt.FormatError, match="'a.weight' is torch.int32"):
        check_dtype("a.weight", torch.zeros(2, dtype=torch.int32))
    with pytest.raises(fmt.FormatError, match="'a.group_index' is torch.float32"):
        check_dtype("a.group_index", torch.zeros(2))
    check_dtype("a.weight", torch.zeros(2, dtype=torch.bfloat16))
    check_dtype("a.group_index", torch.zeros(2, dtype=torch.int32))


def test_shard_binding(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(f), metadata=fmt.shard_metadata(EXPERTS))
    fmt.check_checkpoint_experts(str(tmp_path), list(EXPERTS))
    with pytest.raises(fmt.FormatError, match="reordered"):
        fmt.check_checkpoint_experts(str(tmp_path), list(reversed(EXPERTS)))
    save_file({"x": torch.zeros(1)}, str(f), metadata={"format": "pt"})
    with pytest.raises(fmt.FormatError, match="older channelmerge"):
        fmt.check_checkpoint_experts(str(tmp_path), list(EXPERTS))


@needs_vllm
@pytest.mark.vllm
def test_start_up_refusals(merged_family, vllm_env, tmp_path):
    """A foreign worker (the hook would be missing), pipeline and data parallelism are refused
    when the engine config is built, each with a reason; the plugin's own worker is accepted."""
    out = tmp_path / "refusals.json"
    p = run_script(["refusals", str(merged_family["merged"]), str(out)], vllm_env, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    res = json.loads(out.read_text())
    assert res["plugin_worker"] is None
    assert "not a channelmerge worker" in res["plain_cpu_worker"]
    assert "pipeline" in (res["pipeline_parallel"] or "").lower()
    assert "data parallel" in (res["data_parallel"] or "").lower()


@needs_vllm
@pytest.mark.vllm
def test_untested_vllm_refuses_merged_checkpoints_only(merged_family, vllm_env, tmp_path):
    out = tmp_path / "untested.json"
    plain = merged_family["extracted"][EXPERTS[0]]
    env = {k: v for k, v in vllm_env.items() if k != "CHANNELMERGE_ALLOW_UNTESTED_VLLM"}
    p = run_script(["untested", str(merged_family["merged"]), str(plain), str(out)], env, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    res = json.loads(out.read_text())
    assert "0.99.0" in (res["merged"] or "") and "CHANNELMERGE_ALLOW_UNTESTED_VLLM" in res["merged"]
    assert res["plain"] is None
