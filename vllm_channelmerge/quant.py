"""The `channel_merged` quantization config: vLLM hands every linear layer, the embedding and
the lm_head of a channel-merged checkpoint to the methods here.

Per module (K from ``ChannelMergedConfig.groups_for(prefix)``, N experts):

* ``weight [K, out, in]`` and ``group_index [N, out]`` (``bias [K, out]`` where the layer has
  one) are created with ``output_dim=1`` (``input_dim=2``) so vLLM's own weight loaders shard
  and fuse them (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) exactly like dense
  weights; embeddings and lm_head use their own loader (vocab-parallel on dim 1, padded).
* Every load is checked against the checkpoint's expected full shape before vLLM narrows
  it, and ``process_weights_after_loading`` checks that every tensor (every fused shard)
  was loaded, that indices are in range and weights finite: vLLM does not track missing
  weights for quantized models. Errors are :class:`~vllm_channelmerge.format.FormatError`
  naming the checkpoint tensor.
* ``apply`` reads the step's expert ids (:data:`vllm_channelmerge.compat.STEP`) and calls the
  kernels; the lm_head's ``apply`` sees one row per request (sampled rows), not per token.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import torch
from torch.nn import Parameter

from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.utils import set_weight_attrs

from vllm_channelmerge import format as fmt
from vllm_channelmerge import kernels
from vllm_channelmerge.compat import STEP

log = logging.getLogger("vllm_channelmerge")

STRATEGY_ENV = "CHANNELMERGE_STRATEGY"  # force one kernel strategy (tests, benchmarks)
CACHE_ENV = "CHANNELMERGE_HOT_CACHE_BYTES"  # hot-expert dense cache budget (default 0: off)

_HOT_CACHE: Optional[kernels.HotExpertCache] = None


def _hot_cache() -> Optional[kernels.HotExpertCache]:
    global _HOT_CACHE
    budget = int(os.environ.get(CACHE_ENV, "0") or 0)
    if budget <= 0:
        return None
    if _HOT_CACHE is None:
        _HOT_CACHE = kernels.HotExpertCache(budget)
    return _HOT_CACHE


def _strategy() -> str:
    return os.environ.get(STRATEGY_ENV, "auto") or "auto"


@register_quantization_config(fmt.QUANT_METHOD)
class ChannelMergedQuantConfig(QuantizationConfig):
    """vLLM's view of the `quantization_config` block (format v1)."""

    def __init__(self, cm: fmt.ChannelMergedConfig):
        super().__init__()
        self.cm = cm
        STEP.configure(cm.num_experts)

    def __repr__(self) -> str:
        return f"ChannelMergedQuantConfig(experts={self.cm.experts}, num_groups={self.cm.num_groups})"

    def get_name(self) -> str:
        return fmt.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ChannelMergedQuantConfig":
        return cls(fmt.ChannelMergedConfig.from_dict(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if isinstance(layer, VocabParallelEmbedding):  # embed_tokens and lm_head
            head = isinstance(layer, ParallelLMHead)
            # vLLM's Llama/Mistral/Qwen2 build embed_tokens without a prefix: name it, so that
            # its own K (num_groups_overrides) applies.
            prefix = prefix or (fmt.LM_HEAD_MODULE if head else fmt.EMBED_MODULE)
            return ChannelMergedEmbeddingMethod(self.cm, prefix, is_head=head)
        if isinstance(layer, LinearBase):
            return ChannelMergedLinearMethod(self.cm, prefix)
        return None


# ------------------------------------------------------------------------------------------
# Load-time bookkeeping and shape checks
# ------------------------------------------------------------------------------------------


def _hf_name(prefix: str, shard: Any, suffix: str) -> str:
    """Checkpoint tensor name for a (fused) module prefix, shard id and param suffix."""
    parts = fmt.fused_constituents(prefix)
    if len(parts) > 1 and shard is not None:
        idx = {"q": 0, "k": 1, "v": 2}.get(shard, shard) if isinstance(shard, str) else int(shard)
        return f"{parts[idx]}.{suffix}"
    return f"{prefix}.{suffix}"


def _expected_shards(layer: torch.nn.Module) -> list[Any]:
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(len(layer.output_sizes)))
    return [None]


def _full_out(layer: torch.nn.Module, shard: Any) -> int:
    """Full (unsharded) output rows a checkpoint tensor of this shard must have."""
    if isinstance(layer, VocabParallelEmbedding):
        return layer.org_vocab_size
    if isinstance(layer, QKVParallelLinear):
        sizes = {"q": layer.total_num_heads * layer.head_size,
                 "k": layer.total_num_kv_heads * layer.head_size,
                 "v": layer.total_num_kv_heads * getattr(layer, "v_head_size", layer.head_size)}
        return sizes[shard] if shard is not None else sum(sizes.values())
    if isinstance(layer, MergedColumnParallelLinear):
        return layer.output_sizes[shard] if shard is not None else sum(layer.output_sizes)
    return layer.output_size


def _full_in(layer: torch.nn.Module) -> int:
    if isinstance(layer, VocabParallelEmbedding):
        return layer.embedding_dim
    return layer.input_size


def _checked_loader(layer: torch.nn.Module, method: "_Base", pname: str, inner):
    """Wrap a vLLM weight loader: check the full checkpoint shape, record the shard."""

    def loader(param: Parameter, loaded: torch.Tensor, *args: Any, **kwargs: Any):
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        name = _hf_name(method.prefix, shard, pname)
        k, n = method.k, method.cm.num_experts
        out = _full_out(layer, shard)
        want = {"weight": (k, out, _full_in(layer)), "group_index": (n, out), "bias": (k, out)}[pname]
        if tuple(loaded.shape) != want:
            raise fmt.FormatError(
                f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, expected {want} "
                f"(K={k} groups, N={n} experts)")
        if pname == "group_index" and loaded.is_floating_point():
            raise fmt.FormatError(f"checkpoint tensor {name!r} must be an integer tensor, got {loaded.dtype}")
        try:
            inner(param, loaded, *args, **kwargs)
        except AssertionError as e:
            raise fmt.FormatError(f"checkpoint tensor {name!r} ({tuple(loaded.shape)}) does not fit "
                                  f"parameter {tuple(param.shape)}: {e}") from None
        shards = param.__dict__.setdefault("_cm_loaded", set())
        if shard is None:
            shards.update(_expected_shards(layer))
        else:
            shards.add(shard)

    return loader


class _Base(QuantizeMethodBase):
    def __init__(self, cm: fmt.ChannelMergedConfig, prefix: str):
        self.cm = cm
        self.prefix = prefix
        self.k = cm.groups_for(prefix)

    def _check_loaded(self, layer: torch.nn.Module, pnames: list[str]) -> None:
        for pname in pnames:
            p = getattr(layer, pname, None)
            if p is None:
                continue
            got = p.__dict__.get("_cm_loaded", set())
            for shard in _expected_shards(layer):
                if shard not in got and not (shard is None and got):
                    raise fmt.FormatError(
                        f"checkpoint tensor {_hf_name(self.prefix, shard, pname)!r} is missing "
                        f"(module {self.prefix!r} needs it)")

    def _validate_values(self, layer: torch.nn.Module, weight: torch.Tensor, gi: torch.Tensor,
                         bias: Optional[torch.Tensor], out_rows: Optional[int] = None) -> None:
        if gi.numel():
            lo, hi = int(gi.min()), int(gi.max())
            if lo < 0 or hi >= self.k:
                raise fmt.FormatError(
                    f"checkpoint tensor {self.prefix}.group_index has values in [{lo}, {hi}]; "
                    f"expected [0, {self.k}) (K={self.k} groups)")
        for t, what in ((weight, "weight"), (bias, "bias")):
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise fmt.FormatError(f"checkpoint tensor {self.prefix}.{what} contains NaN or Inf")


# ------------------------------------------------------------------------------------------
# Linear layers
# ------------------------------------------------------------------------------------------


class ChannelMergedLinearMethod(_Base, LinearMethodBase):
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        out = sum(output_partition_sizes)
        inner = extra_weight_attrs.pop("weight_loader")
        w = Parameter(torch.zeros(self.k, out, input_size_per_partition, dtype=params_dtype),
                      requires_grad=False)
        set_weight_attrs(w, {"input_dim": 2, "output_dim": 1, **extra_weight_attrs,
                             "weight_loader": _checked_loader(layer, self, "weight", inner)})
        layer.register_parameter("weight", w)
        gi = Parameter(torch.zeros(self.cm.num_experts, out, dtype=torch.int32), requires_grad=False)
        set_weight_attrs(gi, {"output_dim": 1, **extra_weight_attrs,
                              "weight_loader": _checked_loader(layer, self, "group_index", inner)})
        layer.register_parameter("group_index", gi)
        layer._cm_inner_loader = inner

    def replace_bias(self, layer: torch.nn.Module) -> None:
        """Layers create their own `[out]` bias after create_weights; make it `[K, out]`.

        Called by the wrapper model right after construction."""
        b = getattr(layer, "bias", None)
        if b is None or getattr(b, "_cm_bias", False):
            return
        if getattr(layer, "skip_bias_add", False):
            raise NotImplementedError(f"{self.prefix}: skip_bias_add is not supported by channel_merged")
        nb = Parameter(torch.zeros(self.k, *b.shape, dtype=b.dtype), requires_grad=False)
        set_weight_attrs(nb, {"output_dim": 1,
                              "weight_loader": _checked_loader(layer, self, "bias", layer._cm_inner_loader)})
        nb._cm_bias = True
        layer.bias = nb

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self._check_loaded(layer, ["weight", "group_index", "bias"])
        bias = layer.bias if getattr(layer, "bias", None) is not None else None
        self._validate_values(layer, layer.weight, layer.group_index, bias)
        try:
            layer._cm_state = kernels.prepare_layer(layer.weight.data, layer.group_index.data,
                                                    None if bias is None else bias.data,
                                                    cache=_hot_cache(), name=self.prefix)
        except ValueError as e:
            raise fmt.FormatError(f"{self.prefix}: {e}") from None
        layer._cm_state_nobias = (layer._cm_state if bias is None
                                  else dataclasses.replace(layer._cm_state, bias=None))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # `bias` is layer.bias ([K, out]) or None (RowParallel on ranks > 0): pick the state.
        state = layer._cm_state if bias is not None else layer._cm_state_nobias
        rows = x.numel() // state.in_features
        batch = STEP.token_batch(rows, x.device)
        return kernels.channel_merged_linear(x, state, batch, _strategy())


# ------------------------------------------------------------------------------------------
# Embedding and lm_head
# ------------------------------------------------------------------------------------------


class ChannelMergedEmbeddingMethod(_Base):
    def __init__(self, cm: fmt.ChannelMergedConfig, prefix: str, is_head: bool):
        super().__init__(cm, prefix)
        self.is_head = is_head

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        rows = sum(output_partition_sizes)
        extra_weight_attrs.pop("weight_loader", None)
        w = Parameter(torch.zeros(self.k, rows, input_size_per_partition, dtype=params_dtype),
                      requires_grad=False)
        set_weight_attrs(w, {"input_dim": 2, "output_dim": 1, **extra_weight_attrs,
                             "weight_loader": _checked_loader(layer, self, "weight", _vocab_loader(layer))})
        layer.register_parameter("weight", w)
        gi = Parameter(torch.zeros(self.cm.num_experts, rows, dtype=torch.int32), requires_grad=False)
        set_weight_attrs(gi, {"output_dim": 1, **extra_weight_attrs,
                              "weight_loader": _checked_loader(layer, self, "group_index", _vocab_loader(layer))})
        layer.register_parameter("group_index", gi)

    def tie_weights(self, layer, embed_tokens):
        layer.weight = embed_tokens.weight
        layer.group_index = embed_tokens.group_index
        layer._cm_tied_to = embed_tokens
        return layer

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "_cm_tied_to", None) is not None:
            return  # checked and prepared through the embedding it is tied to
        self._check_loaded(layer, ["weight", "group_index"])
        self._validate_values(layer, layer.weight, layer.group_index, None)

    def _state(self, layer: torch.nn.Module) -> kernels.LayerState:
        st = getattr(layer, "_cm_state", None)
        if st is None:
            try:
                st = layer._cm_state = kernels.prepare_layer(layer.weight.data, layer.group_index.data,
                                                             None, name=self.prefix)
            except ValueError as e:
                raise fmt.FormatError(f"{self.prefix}: {e}") from None
        return st

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        ids = STEP.token_ids_for(input_.numel(), input_.device).reshape(input_.shape)
        return kernels.embedding_lookup(input_, layer.weight, layer.group_index, ids)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """lm_head: one row per sampled request (or a prompt-logprob slice of tokens)."""
        batch = STEP.logits_batch
        if batch is None or batch.num_tokens != x.reshape(-1, x.shape[-1]).shape[0]:
            batch = STEP.rows_batch(x.reshape(-1, x.shape[-1]))
        y = kernels.channel_merged_linear(x, self._state(layer), batch, _strategy())
        if bias is not None:
            y = y + bias
        return y


def _vocab_loader(layer: VocabParallelEmbedding):
    """Vocab-parallel loading on dim 1 of `[K|N, vocab, ...]` (vLLM's own loader narrows dim
    `output_dim` but copies along dim 0), zero-filling the padded rows."""

    def load(param: Parameter, loaded: torch.Tensor) -> None:
        start = layer.shard_indices.org_vocab_start_index
        size = layer.shard_indices.org_vocab_end_index - start
        part = loaded.narrow(1, start, size)
        param.data.zero_()
        param.data.narrow(1, 0, size).copy_(part)

    return load
