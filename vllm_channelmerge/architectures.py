"""Every supported architecture, as data: the one place its module names are spelled.

The format (which tensors are channel-merged, which modules vLLM fuses), the merge tool's
norm folding, the synthetic models and the plugin's model wrappers all read this table.
Adding an architecture is one :class:`ArchitectureSpec` entry (plus its tests), as long as
vLLM has the base model class and the model is a pre-norm decoder whose RMSNorms feed
linear layers directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

# Names shared by every decoder below (HF module names).
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_LAYER_FOLDS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


@dataclass(frozen=True)
class ArchitectureSpec:
    """One base architecture as the merge tool and the plugin see it."""

    name: str  # HF `architectures[0]`, e.g. LlamaForCausalLM
    short: str  # `channelmerge make-synthetic --arch` name
    hf_config: str  # transformers config class (synthetic models)
    vllm_module: str  # vLLM module that defines the class of the same name
    linears: tuple[str, ...] = _ATTENTION + _MLP  # channel-merged linear module suffixes
    embedding: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    final_norm: str = "model.norm"  # kept per expert, applied before the lm_head
    # vLLM fuses these along `out` (constituents must share K).
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(_FUSED))
    # Per-layer norm -> the linears (relative to the layer) it feeds directly (foldable).
    layer_folds: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(_LAYER_FOLDS))

    @property
    def wrapper(self) -> str:
        """The plugin's model class written into a merged checkpoint's config.json."""
        return "ChannelMerged" + self.name


SPECS: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec("LlamaForCausalLM", "llama", "LlamaConfig", "vllm.model_executor.models.llama"),
    ArchitectureSpec("MistralForCausalLM", "mistral", "MistralConfig", "vllm.model_executor.models.mistral"),
    ArchitectureSpec("Qwen2ForCausalLM", "qwen2", "Qwen2Config", "vllm.model_executor.models.qwen2"),
    # Qwen3: Qwen2 without q/k/v biases, with a per-head RMSNorm on q and k after their
    # projections (not foldable: merged across experts and reported).
    ArchitectureSpec("Qwen3ForCausalLM", "qwen3", "Qwen3Config", "vllm.model_executor.models.qwen3"),
)

BY_NAME: dict[str, ArchitectureSpec] = {s.name: s for s in SPECS}
BY_SHORT: dict[str, ArchitectureSpec] = {s.short: s for s in SPECS}
BY_WRAPPER: dict[str, ArchitectureSpec] = {s.wrapper: s for s in SPECS}

# Unions over every architecture (the format's name rules do not depend on the architecture).
CHANNEL_MODULE_SUFFIXES: tuple[str, ...] = tuple(dict.fromkeys(
    m for s in SPECS for m in (*s.linears, s.embedding.rsplit(".", 1)[-1], s.lm_head.rsplit(".", 1)[-1])))
FUSED_MODULES: dict[str, tuple[str, ...]] = {k: v for s in SPECS for k, v in s.fused.items()}
EXPERT_NORM_MODULES: tuple[str, ...] = tuple(dict.fromkeys(s.final_norm for s in SPECS))
