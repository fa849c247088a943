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


def test_llama_plan_folds_layer_norms_and_keeps_the_final_norm_per_expert():
    for names in (NAMES + ["lm_head.weight"], NAMES):  # untied, tied
        p = fold.plan_folding("LlamaForCausalLM", names, enabled=True)
        assert p.targets["model.layers.0.self_attn.k_proj.weight"] == "model.layers.0.input_layernorm.weight"
        assert p.targets["model.layers.0.mlp.up_proj.weight"] == "model.layers.0.post_attention_layernorm.weight"
        assert "model.layers.0.self_attn.o_proj.weight" not in p.targets
        assert "lm_head.weight" not in p.targets  # never folded into the lm_head
        assert p.expert_norms == ["model.norm.weight"]
        assert not p.merged_norms and len(p.folded_norms) == 2


def test_other_architectures_and_disabled_merge_norms():
    p = fold.plan_folding("GemmaForCausalLM", NAMES, enabled=True)
    assert not p.targets and not p.expert_norms
    assert p.merged_norms == [n for n in NAMES if n.endswith("norm.weight")]
    assert "GemmaForCausalLM" in p.reason
    q = fold.plan_folding("LlamaForCausalLM", NAMES, enabled=False)
    assert not q.targets and not q.expert_norms and len(q.merged_norms) == 3 and "fold_norms is false" in q.reason


def test_final_norm_without_any_head_is_merged():
    names = [n for n in NAMES if n != "model.embed_tokens.weight"]
    p = fold.plan_folding("LlamaForCausalLM", names, enabled=True)
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
