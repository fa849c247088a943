"""Wrapper model classes: vLLM's Llama / Mistral / Qwen2 with per-token expert ids.

Each wrapper is the stock vLLM model (so attention, KV cache, TP and loading stay vLLM's)
with four additions:

* ``forward`` accepts ``expert_ids`` (per token, batch order) and ``request_expert_ids``
  (per request) from the runner adapter / model state in :mod:`vllm_channelmerge.compat`
  and publishes them for the layers; a forward without them is refused unless it is one of
  the runner's own dummy runs (profiling, warm-up), where every token is expert 0;
* ``compute_logits`` gives the lm_head the ids of its rows (one per request) and applies
  each row's expert norm (the final norm kept per expert, format ``expert_norms``);
* ``get_model_state_cls`` returns the Model Runner V2 state that produces the ids;
* ``load_weights`` skips sidecar tensors and fails with a clear error on missing tensors and
  on weights that are not floating point (indices that are not integers).
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


def check_dtype(name: str, w: torch.Tensor) -> None:
    """Group indices are integers, everything else floating point: vLLM's loaders would cast an
    int32 weight into the float parameter silently and change every expert's output."""
    if name.endswith(fmt.GROUP_INDEX_SUFFIX):
        if w.is_floating_point() or w.is_complex() or w.dtype == torch.bool:
            raise fmt.FormatError(f"checkpoint tensor {name!r} is {w.dtype}; group indices must be "
                                  f"an integer tensor ({fmt.GROUP_INDEX_DTYPE})")
    elif not w.is_floating_point():
        raise fmt.FormatError(f"checkpoint tensor {name!r} is {w.dtype}; model weights must be "
                              "floating point (float32, bfloat16 or float16)")


class ChannelMergedMixin:
    """Shared by every wrapper; must come first in the bases."""

    def _cm_init(self, vllm_config) -> None:
        from vllm_channelmerge.quant import ChannelMergedLinearMethod

        qc = vllm_config.model_config.hf_config.quantization_config
        self.cm_config = fmt.ChannelMergedConfig.from_dict(qc)
        compat.STEP.configure(self.cm_config.num_experts)
        # The final norm kept per expert: stored as ones in the model, each expert's weight
        # here, applied to the rows given to the lm_head (a tied lm_head stays tied).
        if self.cm_config.expert_norms:
            hidden = vllm_config.model_config.hf_config.hidden_size
            self.cm_expert_norm = torch.nn.Parameter(
                torch.ones(self.cm_config.num_experts, hidden, dtype=vllm_config.model_config.dtype),
                requires_grad=False)
        else:
            self.register_parameter("cm_expert_norm", None)
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
        batch = compat.STEP.logits_batch = compat.STEP.rows_batch(hidden_states)
        if self.cm_expert_norm is not None:
            hidden_states = hidden_states * self.cm_expert_norm[batch.expert_ids]
        try:
            return super().compute_logits(hidden_states)
        finally:
            compat.STEP.logits_batch = None

    def get_model_state_cls(self):
        return compat.model_state_cls(self.cm_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        norm_tensors = {fmt.expert_norm_name(m) for m in self.cm_config.expert_norms}
        got_norm = set()

        def _filter():
            for name, w in weights:
                if name.startswith(SIDECAR_PREFIXES):
                    continue
                check_dtype(name, w)
                if name in norm_tensors:
                    self._load_expert_norm(name, w)
                    got_norm.add(name)
                    continue
                yield name, w

        loaded = set(super().load_weights(_filter()))
        if norm_tensors - got_norm:
            raise fmt.FormatError(f"checkpoint tensor {sorted(norm_tensors - got_norm)[0]!r} is missing "
                                  "(quantization_config.expert_norms lists its norm)")
        if got_norm:
            loaded.add("cm_expert_norm")
        expected = {n for n, _ in self.named_parameters()}
        if getattr(self.config, "tie_word_embeddings", False):
            expected = {n for n in expected if not n.startswith("lm_head.")}
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise fmt.FormatError(f"checkpoint is missing tensors for: {shown}")
        return loaded

    def _load_expert_norm(self, name: str, w: torch.Tensor) -> None:
        want = tuple(self.cm_expert_norm.shape)
        if tuple(w.shape) != want:
            raise fmt.FormatError(f"checkpoint tensor {name!r} has shape {tuple(w.shape)}, expected {want} "
                                  "(experts x hidden)")
        if not bool(torch.isfinite(w).all()):
            raise fmt.FormatError(f"checkpoint tensor {name!r} contains NaN or Inf")
        self.cm_expert_norm.data.copy_(w)


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
