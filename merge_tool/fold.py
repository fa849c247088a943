"""Exact RMSNorm folding: `W @ (g * x) == (W * g) @ x`.

Experts differ in their norm weights too. Where an RMSNorm feeds linear layers directly
(Llama, Mistral, Qwen2: `input_layernorm` -> q/k/v, `post_attention_layernorm` -> gate/up,
final `norm` -> lm_head), each expert's norm is multiplied into the columns of those layers
and the stored norm becomes ones, so the per-channel lookup carries the norm exactly.
Biases are untouched by folding (`W (g x) + b = (W g) x + b`). Folding the final norm into
a tied lm_head unties it. Other architectures get their norms merged across experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

FOLDABLE_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
LAYER_FOLDS: dict[str, tuple[str, ...]] = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
_LAYER_NORM_RE = re.compile(r"^(model\.layers\.\d+)\.(" + "|".join(LAYER_FOLDS) + r")\.weight$")


def is_norm(tensor_name: str) -> bool:
    """Norm weights (not channel-merged; folded or merged across experts)."""
    return tensor_name.endswith(("norm.weight", "norm.bias"))


@dataclass
class FoldPlan:
    """What folding does for one model: target weight -> the norm folded into it."""

    targets: dict[str, str] = field(default_factory=dict)
    folded_norms: list[str] = field(default_factory=list)
    merged_norms: list[str] = field(default_factory=list)
    untie_lm_head: bool = False  # tied embeddings, final norm folded: lm_head becomes its own tensor
    synth_lm_head: bool = False  # lm_head is not in the files: made from the embedding
    reason: str = ""


def plan_folding(architecture: str, tensor_names: list[str], tied: bool, enabled: bool) -> FoldPlan:
    """Decide which norms are folded into which weights (a norm only if all targets exist)."""
    names = set(tensor_names)
    plan = FoldPlan()
    norms = [n for n in tensor_names if is_norm(n)]
    if not enabled:
        plan.merged_norms = norms
        plan.reason = "fold_norms is false"
        return plan
    if architecture not in FOLDABLE_ARCHITECTURES:
        plan.merged_norms = norms
        plan.reason = (f"{architecture} is not known to apply RMSNorm right before its linear layers "
                       f"(foldable: {', '.join(sorted(FOLDABLE_ARCHITECTURES))})")
        return plan
    for n in norms:
        m = _LAYER_NORM_RE.match(n)
        targets: list[str] = []
        if m:
            targets = [f"{m.group(1)}.{t}.weight" for t in LAYER_FOLDS[m.group(2)]]
        elif n == FINAL_NORM:
            if LM_HEAD in names:
                targets = [LM_HEAD]
                plan.untie_lm_head = tied
            elif tied and EMBED in names:
                targets = [LM_HEAD]  # synthesised from the embedding: unties lm_head
                plan.untie_lm_head = plan.synth_lm_head = True
        if targets and all(t in names or (t == LM_HEAD and plan.synth_lm_head) for t in targets):
            plan.folded_norms.append(n)
            for t in targets:
                plan.targets[t] = n
        else:
            plan.merged_norms.append(n)
    if plan.merged_norms:
        plan.reason = "no linear layer directly after these norms"
    return plan


def fold(weight_rows: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Rows of W [R, in] times the norm weight [in] on the input side (float math)."""
    return weight_rows * norm.to(weight_rows.dtype).unsqueeze(0)


def can_unfold(norm: torch.Tensor) -> bool:
    """Unfolding divides by the norm: exact in exact arithmetic when no entry is 0."""
    return bool(torch.isfinite(norm).all() and (norm != 0).all())


def unfold(weight_rows: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Inverse of `fold` (up to rounding)."""
    return weight_rows / norm.to(weight_rows.dtype).unsqueeze(0)
