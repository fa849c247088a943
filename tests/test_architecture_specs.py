"""Every architecture of the spec table merges and extracts through the same code.

A new entry in vllm_channelmerge/architectures.py is covered here (synthetic family, merge,
folding plan, extract), and served by the plugin in tests/plugin/test_architectures.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merge_tool.config import MergeConfig
from merge_tool.extract import extract_expert
from merge_tool.merge import run_merge
from merge_tool.synthetic import make_family
from vllm_channelmerge import architectures as archs
from vllm_channelmerge import format as fmt


def test_format_tables_come_from_the_specs():
    assert fmt.WRAPPER_ARCHITECTURES == {s.name: "ChannelMerged" + s.name for s in archs.SPECS}
    for s in archs.SPECS:
        assert set(s.linears) <= set(fmt.CHANNEL_MODULE_SUFFIXES)
        assert all(fmt.FUSED_MODULES[k] == v for k, v in s.fused.items())


@pytest.mark.parametrize("spec", archs.SPECS, ids=lambda s: s.short)
def test_spec_family_merges_folds_and_extracts(spec, tmp_path):
    names = ["a", "b", "c"]
    base, dirs = make_family(tmp_path / "src", names, arch=spec.short, true_groups=2)
    cfg = MergeConfig(base_model=str(base), experts=[{"name": n, "model": str(p)} for n, p in dirs.items()],
                      num_groups=3)  # K = N: every expert stored exactly
    merged = run_merge(cfg, tmp_path / "m", progress=False)
    conf = json.loads((merged / fmt.CONFIG_FILE).read_text())
    assert conf["architectures"] == [spec.wrapper]
    qc = fmt.read_quant_config(conf)
    folded = set(qc.folded_norms)
    for norm, targets in spec.layer_folds.items():
        assert f"model.layers.0.{norm}" in folded
    # At K = N the extracted expert is the expert, whatever was folded.
    x = extract_expert(merged, "b", tmp_path / "xb")
    got = load_file(str(next(x.glob("*.safetensors"))))
    want = load_file(str(dirs["b"] / "model.safetensors"))
    unmergeable = {n for n in want if fmt.module_of(n) not in folded and n.endswith("norm.weight")
                   and fmt.module_of(n) not in qc.expert_norms}
    assert unmergeable == {n for n in want if "q_norm" in n or "k_norm" in n}  # Qwen3 only
    checked = 0
    for n, w in want.items():
        if n in unmergeable or n not in got:
            continue
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-5, msg=n)
        checked += 1
    assert checked > len(want) // 2
