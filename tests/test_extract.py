"""Integration: merge -> extract -> stock transformers gives each expert's own logits (K=N),
tied embeddings and norm folding/unfolding, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_tool.extract import extract_expert
from merge_tool.inspect import format_table, inspect_checkpoint
from merge_tool.merge import run_merge
from vllm_channelmerge import format as fmt


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(ids).logits


def _ids(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def _load(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in Path(d).glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("fam", ["llama_family", "mistral_family", "qwen2_tied_family"])
def test_kn_extract_gives_the_experts_logits(fam, request, tmp_path):
    family = request.getfixturevalue(fam)
    n = len(family.experts)
    merged = run_merge(family.merge_config(num_groups=n), tmp_path / "m", progress=False)
    info = inspect_checkpoint(merged)
    assert info["expert_norms"] == ["model.norm"]  # the final norm: kept per expert
    ids = _ids()
    for name in list(family.experts)[:2]:
        x = extract_expert(merged, name, tmp_path / name)
        cfg = json.loads((x / "config.json").read_text())
        assert "quantization_config" not in cfg
        assert cfg["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
        ref = logits(family.experts[name], ids)
        got = logits(x, ids)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), float((got - ref).abs().max())
        # norms are unfolded back: the extracted norms are the expert's own
        ex, orig = _load(x), _load(family.experts[name])
        assert torch.equal(ex["model.layers.0.input_layernorm.weight"], orig["model.layers.0.input_layernorm.weight"])
        q = "model.layers.0.self_attn.q_proj.weight"
        assert torch.allclose(ex[q], orig[q], atol=1e-6)
        assert torch.equal(ex["model.norm.weight"], orig["model.norm.weight"])
        assert not any(k.endswith(fmt.EXPERT_WEIGHT_SUFFIX) for k in ex)
        if family.tied:
            assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ex  # stays tied


def test_extract_tied_without_folding_reties(qwen2_tied_family, tmp_path):
    merged = run_merge(qwen2_tied_family.merge_config(num_groups=3, fold_norms=False), tmp_path / "m", progress=False)
    info = inspect_checkpoint(merged)
    assert not info["expert_norms"] and len(info["merged_norms"]) == 5
    assert any("merged across experts" in n for n in info["notes"])
    x = extract_expert(merged, "b", tmp_path / "b")
    cfg = json.loads((x / "config.json").read_text())
    ex = _load(x)
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ex
    orig = _load(qwen2_tied_family.experts["b"])
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.bias"):
        assert torch.equal(ex[name], orig[name]), name  # channel tensors exact at K=N
    logits(x, _ids())  # loads in stock transformers


def test_extract_is_the_group_lookup(merged_llama_k2, tmp_path):
    """At K<N the extracted expert is exactly what the runtime computes (rows of its groups)."""
    x = extract_expert(merged_llama_k2, "chat", tmp_path / "chat", unfold_norms=False)
    st, ex = _load(merged_llama_k2), _load(x)
    e = 2
    for name, t in ex.items():
        if fmt.is_channel_tensor(name):
            idx = st[fmt.group_index_name(name)][e].long()
            assert torch.equal(t, st[name][idx, torch.arange(idx.numel())]), name
        elif name == "model.norm.weight":  # an expert norm: the runtime applies row e
            assert torch.equal(t, st[fmt.expert_norm_name("model.norm")][e])
        else:
            assert torch.equal(t, st[name]), name
    assert not any(k.endswith((fmt.GROUP_INDEX_SUFFIX, fmt.EXPERT_WEIGHT_SUFFIX)) for k in ex)


def test_extract_errors(merged_llama_k2, tmp_path, leftovers):
    with pytest.raises(fmt.FormatError, match="unknown expert 'nope'; valid names: math, code, chat, zh"):
        extract_expert(merged_llama_k2, "nope", tmp_path / "x")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        extract_expert(merged_llama_k2, "math", tmp_path / "x")
    extract_expert(merged_llama_k2, "math", tmp_path / "x", force=True)
    assert (tmp_path / "x" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
    with pytest.raises(FileExistsError, match="would overwrite the merged checkpoint"):
        extract_expert(merged_llama_k2, "math", merged_llama_k2, force=True)
    with pytest.raises(fmt.FormatError, match="no quantization_config"):
        extract_expert(tmp_path / "x", "math", tmp_path / "y")
    assert leftovers(tmp_path, "y") == []


def test_inspect_table_and_json(merged_llama_k2, llama_family):
    info = inspect_checkpoint(merged_llama_k2)
    assert info["experts"] == ["math", "code", "chat", "zh"] and info["num_groups"] == 2
    assert 0.45 < info["params_ratio"] < 0.55
    chans = [t for t in info["tensors"] if t["kind"] == "channel"]
    # Every channel tensor of the base (7 linears per layer, embedding, lm_head) is reported.
    base_channels = {n for n in load_file(str(llama_family.base / "model.safetensors"))
                     if fmt.is_channel_tensor(n) and n.endswith(".weight")}
    assert {t["tensor"] for t in chans} == base_channels and len(chans) == len(base_channels)
    assert all(0 < t["rel_error_mean"] < 1 for t in chans)
    # synthetic truth is two groups of two, so the tie-break puts expert 0 in group 0
    assert all(t["outside_group0"]["math"] < 0.05 for t in chans)
    text = format_table(info)
    assert "model.layers.0.self_attn.q_proj.weight" in text and "of the ensemble" in text
    assert "folded (stored as ones)" in text
    json.dumps(info)


def test_extract_refuses_a_reordered_expert_list(tmp_path):
    """Row n of every group_index belongs to the expert named n in the shards' metadata: with
    the config's list reordered, extract would write another expert under this name."""
    from merge_tool.config import MergeConfig
    from merge_tool.synthetic import make_family

    base, dirs = make_family(tmp_path / "src", ["a", "b"], arch="llama", true_groups=2)
    cfg = MergeConfig(base_model=str(base), experts=[{"name": n, "model": str(p)} for n, p in dirs.items()],
                      num_groups=2)
    merged = run_merge(cfg, tmp_path / "m", progress=False)
    conf = json.loads((merged / "config.json").read_text())
    conf["quantization_config"]["experts"] = ["b", "a"]
    (merged / "config.json").write_text(json.dumps(conf))
    with pytest.raises(fmt.FormatError, match="reordered"):
        extract_expert(merged, "a", tmp_path / "x")
    assert not (tmp_path / "x").exists()
