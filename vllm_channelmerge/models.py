"""Wrapper model classes: vLLM's Llama / Mistral / Qwen2 with per-token expert ids.

Each wrapper is the stock vLLM model (so attention, KV cache, TP and loading stay vLLM's)
with four additions:

* ``forward`` accepts ``expert_ids`` (per token, batch order) and ``request_expert_ids``
  (per request) from the runner adapter / model state in :mod:`vllm_channelmerge.compat`
  and publishes them for the layers; without them (profiling, dummy runs) every token is
  expert 0;
* ``compute_logits`` gives the lm_head the ids of its rows (one per request);
* ``get_model_state_cls`` returns the Model Runner V2 state that produces the ids;
* ``load_weights`` skips sidecar tensors and fails with a clear error on missing tensors.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from vllm_channelmerge import compat
from vllm_channelmerge import format as fmt

log = logging.getLogger("vllm_channelmerge")

# Tensors a checkpoint may carry for other tools (never model weights).
SIDECAR_PREFIXES = (f"{fmt.SIDECAR_DIR}.", f"{fmt.ROUTER_DIR}.")


class ChannelMergedMixin:
    """Shared by every wrapper; must come first in the bases."""

    def _cm_init(self, vllm_config) -> None:
        from vllm_channelmerge.quant import ChannelMergedLinearMethod

        qc = vllm_config.model_config.hf_config.quantization_config
        self.cm_config = fmt.ChannelMergedConfig.from_dict(qc)
        compat.STEP.configure(self.cm_config.num_experts)
        for m in self.modules():
            qm = getattr(m, "quant_method", None)
            if isinstance(qm, ChannelMergedLinearMethod):
                qm.replace_bias(m)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None,
                expert_ids: torch.Tensor | None = None, request_expert_ids: torch.Tensor | None = None,
                **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        compat.STEP.begin(expert_ids, request_expert_ids, ref.shape[0], ref.device)
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if isinstance(out, torch.Tensor):
            compat.STEP.hidden = out
        return out

    def compute_logits(self, hidden_states: torch.Tensor):
        compat.STEP.logits_batch = compat.STEP.rows_batch(hidden_states)
        try:
            return super().compute_logits(hidden_states)
        finally:
            compat.STEP.logits_batch = None

    def get_model_state_cls(self):
        return compat.model_state_cls(self.cm_config.experts)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def _filter():
            for name, w in weights:
                if name.startswith(SIDECAR_PREFIXES):
                    continue
                yield name, w

        loaded = set(super().load_weights(_filter()))
        expected = {n for n, _ in self.named_parameters()}
        if getattr(self.config, "tie_word_embeddings", False):
            expected = {n for n in expected if not n.startswith("lm_head.")}
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise fmt.FormatError(f"checkpoint is missing tensors for: {shown}")
        return loaded


class ChannelMergedLlamaForCausalLM(ChannelMergedMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._cm_init(vllm_config)


class ChannelMergedMistralForCausalLM(ChannelMergedMixin, MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._cm_init(vllm_config)


class ChannelMergedQwen2ForCausalLM(ChannelMergedMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._cm_init(vllm_config)


# Every wrapper named by the format must exist here (plugin.register relies on it).
assert all(name in globals() for name in fmt.WRAPPER_ARCHITECTURES.values())
