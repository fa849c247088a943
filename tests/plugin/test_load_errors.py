"""A broken checkpoint fails when vLLM loads it, with a message naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import needs_vllm, run_script

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]


def _copy(merged: Path, dst: Path) -> Path:
    shutil.copytree(merged, dst)
    return dst


def _edit_tensors(d: Path, fn) -> None:
    """Rewrite every shard through `fn(state_dict)`, keeping its safetensors metadata (the
    expert binding) so that only the edit is wrong."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    idx = json.loads((d / "model.safetensors.index.json").read_text()) if (d / "model.safetensors.index.json").exists() else None
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
        sd = load_file(str(f))
        new = fn(dict(sd))
        save_file(new, str(f), metadata=meta)
        if idx is not None:
            idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if k in new or v != f.name}
    if idx is not None:
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def _fails(d: Path, env) -> str:
    p = run_script(["load", str(d)], env, timeout=400)
    assert p.returncode != 0, "a broken checkpoint loaded"
    return p.stdout + p.stderr  # vLLM logs the worker's error to stdout


def test_wrong_format_version(merged_family, vllm_env, tmp_path):
    d = _copy(merged_family["merged"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    err = _fails(d, vllm_env)
    assert "format_version is 99" in err


def test_missing_tensor(merged_family, vllm_env, tmp_path):
    d = _copy(merged_family["merged"], tmp_path / "m")
    victim = "model.layers.1.self_attn.k_proj.weight"
    _edit_tensors(d, lambda sd: {k: v for k, v in sd.items() if k != victim})
    err = _fails(d, vllm_env)
    assert f"'{victim}' is missing" in err


def test_wrong_shape(merged_family, vllm_env, tmp_path):
    d = _copy(merged_family["merged"], tmp_path / "m")
    victim = "model.layers.0.mlp.down_proj.group_index"

    def cut(sd):
        sd[victim] = sd[victim][:, :-1].contiguous()
        return sd

    _edit_tensors(d, cut)
    err = _fails(d, vllm_env)
    assert victim in err and "shape" in err


def test_integer_weights_are_refused(merged_family, vllm_env, tmp_path):
    """vLLM's loaders would cast an int32 weight into the float parameter without a word."""
    import torch

    d = _copy(merged_family["merged"], tmp_path / "m")
    victim = "model.layers.0.mlp.up_proj.weight"

    def to_int(sd):
        sd[victim] = sd[victim].round().to(torch.int32)
        return sd

    _edit_tensors(d, to_int)
    err = _fails(d, vllm_env)
    assert victim in err and "floating point" in err


def test_reordered_experts_are_refused(merged_family, vllm_env, tmp_path):
    """The expert names are bound to the group_index rows inside the shards: a config whose
    expert list was reordered would otherwise swap experts silently."""
    d = _copy(merged_family["merged"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    order = cfg["quantization_config"]["experts"]
    cfg["quantization_config"]["experts"] = list(reversed(order))
    (d / "config.json").write_text(json.dumps(cfg))
    err = _fails(d, vllm_env)
    assert str(order) in err and str(list(reversed(order))) in err and "reordered" in err
