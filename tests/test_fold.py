"""Norm folding: which norms fold where, exactness, and architectures that cannot fold."""

from __future__ import annotations

import torch

from merge_tool import fold

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.norm.weight",
]


def test_llama_plan_untied_and_tied():
    p = fold.plan_folding("LlamaForCausalLM", NAMES + ["lm_head.weight"], tied=False, enabled=True)
    assert p.targets["model.layers.0.self_attn.k_proj.weight"] == "model.layers.0.input_layernorm.weight"
    assert p.targets["model.layers.0.mlp.up_proj.weight"] == "model.layers.0.post_attention_layernorm.weight"
    assert p.targets["lm_head.weight"] == "model.norm.weight"
    assert "model.layers.0.self_attn.o_proj.weight" not in p.targets
    assert not p.untie_lm_head and not p.merged_norms and len(p.folded_norms) == 3
    t = fold.plan_folding("Qwen2ForCausalLM", NAMES, tied=True, enabled=True)
    assert t.untie_lm_head and t.synth_lm_head and t.targets["lm_head.weight"] == "model.norm.weight"


def test_other_architectures_and_disabled_merge_norms():
    p = fold.plan_folding("GemmaForCausalLM", NAMES, tied=True, enabled=True)
    assert not p.targets and not p.untie_lm_head
    assert p.merged_norms == [n for n in NAMES if n.endswith("norm.weight")]
    assert "GemmaForCausalLM" in p.reason
    q = fold.plan_folding("LlamaForCausalLM", NAMES, tied=False, enabled=False)
    assert not q.targets and len(q.merged_norms) == 3 and "fold_norms is false" in q.reason


def test_final_norm_without_lm_head_untied_is_merged():
    p = fold.plan_folding("LlamaForCausalLM", NAMES, tied=False, enabled=True)  # no lm_head at all
    assert p.merged_norms == ["model.norm.weight"]


def test_fold_is_exact_and_unfolds():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    norm = 1 + 0.2 * torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.randn(8, generator=g, dtype=torch.float64)
    assert torch.allclose(fold.fold(w, norm) @ x, w @ (norm * x), atol=1e-12)
    assert torch.allclose(fold.unfold(fold.fold(w, norm), norm), w, atol=1e-12)
    assert fold.can_unfold(norm)
    assert not fold.can_unfold(torch.tensor([1.0, 0.0]))
