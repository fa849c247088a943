"""Exact RMSNorm folding: `W @ (g * x) == (W * g) @ x`.

Experts differ in their norm weights too. Where an RMSNorm feeds linear layers directly
(each architecture's `layer_folds` in vllm_channelmerge/architectures.py, e.g.
`input_layernorm` -> q/k/v, `post_attention_layernorm` -> gate/up),
each expert's norm is multiplied into the columns of those layers and the stored norm
becomes ones, so the per-channel lookup carries the norm exactly. Biases are untouched by
folding (`W (g x) + b = (W g) x + b`).

The final norm is not folded into the lm_head: that would make every lm_head row differ
between experts (and untie a tied lm_head), storing the largest matrix K times for a
vector's worth of difference. It is kept per expert instead (an *expert norm*, format
§Tensors) and applied by the runtime to the rows given to the lm_head. Other architectures
get their norms merged across experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from vllm_channelmerge import architectures as archs
from vllm_channelmerge import format as fmt

FOLDABLE_ARCHITECTURES = frozenset(s.name for s in archs.SPECS if s.layer_folds)
FINAL_NORM = "model.norm.weight"  # the same in every supported architecture (checked below)
LM_HEAD = fmt.LM_HEAD_MODULE + ".weight"
EMBED = fmt.EMBED_MODULE + ".weight"
assert {s.final_norm + ".weight" for s in archs.SPECS} == {FINAL_NORM}


def is_norm(tensor_name: str) -> bool:
    """Norm weights (not channel-merged; folded or merged across experts)."""
    return tensor_name.endswith(("norm.weight", "norm.bias"))


@dataclass
class FoldPlan:
    """What folding does for one model: target weight -> the norm folded into it."""

    targets: dict[str, str] = field(default_factory=dict)
    folded_norms: list[str] = field(default_factory=list)
    merged_norms: list[str] = field(default_factory=list)
    expert_norms: list[str] = field(default_factory=list)  # kept per expert (the final norm)
    reason: str = ""


def plan_folding(architecture: str, tensor_names: list[str], enabled: bool) -> FoldPlan:
    """Decide which norms are folded into which weights (a norm only if all targets exist)
    and which are kept per expert."""
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
    folds = archs.BY_NAME[architecture].layer_folds
    layer_norm = re.compile(r"^(model\.layers\.\d+)\.(" + "|".join(map(re.escape, folds)) + r")\.weight$")
    for n in norms:
        m = layer_norm.match(n)
        targets: list[str] = []
        if m:
            targets = [f"{m.group(1)}.{t}.weight" for t in folds[m.group(2)]]
        elif n == FINAL_NORM and (LM_HEAD in names or EMBED in names):
            plan.expert_norms.append(n)
            continue
        if targets and all(t in names for t in targets):
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
