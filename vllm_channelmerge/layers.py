"""What the plugin does with each linear layer, the embedding and the lm_head: free of vLLM.

The adapter (:mod:`vllm_channelmerge.compat`) reads vLLM's layer attributes into a
:class:`Geometry` and calls these functions from vLLM's quantization-method hooks:

* **load**: every checkpoint tensor is checked against its full (unsharded) shape and dtype
  before vLLM narrows it (:func:`check_loaded`), each fused shard is recorded, and after
  loading :func:`check_complete` and :func:`check_values` refuse a missing shard, an index
  out of range or a non-finite weight, naming the checkpoint tensor;
* **run**: :func:`linear`, :func:`embedding` and :func:`lm_head` take the rows' expert ids
  from the :class:`~vllm_channelmerge.context.EngineContext` and call the kernels.

Per module: ``weight [K, out, in]``, ``group_index [N, out]`` and ``bias [K, out]`` where the
layer has one (format v1, :mod:`vllm_channelmerge.format`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from vllm_channelmerge import format as fmt
from vllm_channelmerge import kernels
from vllm_channelmerge.context import EngineContext

PARAMS = ("weight", "group_index", "bias")
# Tensors a checkpoint may carry for other tools (never model weights).
SIDECAR_PREFIXES = (f"{fmt.SIDECAR_DIR}.", f"{fmt.ROUTER_DIR}.")


@dataclass(frozen=True)
class Geometry:
    """Full checkpoint shapes of one (possibly fused) module, as the adapter read them."""

    prefix: str  # module prefix as vLLM names it (qkv_proj, gate_up_proj, ...)
    shards: tuple[Any, ...]  # shard ids vLLM loads it from: ("q", "k", "v"), (0, 1), or (None,)
    out_rows: dict[Any, int]  # full output rows per shard id (None: the whole module)
    in_features: int

    def rows(self, shard: Any) -> int:
        return self.out_rows[shard] if shard is not None else sum(self.out_rows[s] for s in self.shards)


def hf_name(prefix: str, shard: Any, pname: str) -> str:
    """Checkpoint tensor name for a (fused) module prefix, shard id and parameter name."""
    parts = fmt.fused_constituents(prefix)
    if len(parts) > 1 and shard is not None:
        idx = {"q": 0, "k": 1, "v": 2}.get(shard, shard) if isinstance(shard, str) else int(shard)
        return f"{parts[idx]}.{pname}"
    return f"{prefix}.{pname}"


def check_loaded(geom: Geometry, k: int, n: int, shard: Any, pname: str, loaded: torch.Tensor) -> str:
    """Refuse a checkpoint tensor whose full shape or dtype is wrong; returns its name."""
    name = hf_name(geom.prefix, shard, pname)
    out = geom.rows(shard)
    want = {"weight": (k, out, geom.in_features), "group_index": (n, out), "bias": (k, out)}[pname]
    if tuple(loaded.shape) != want:
        raise fmt.FormatError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, expected "
                              f"{want} (K={k} groups, N={n} experts)")
    check_dtype(name, loaded)
    return name


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


def record_shard(param: torch.nn.Parameter, geom: Geometry, shard: Any) -> None:
    shards = param.__dict__.setdefault("_cm_loaded", set())
    shards.update(geom.shards if shard is None else (shard,))


def check_complete(layer: torch.nn.Module, geom: Geometry, pnames: tuple[str, ...] = PARAMS) -> None:
    """vLLM does not track missing weights of quantized models: every shard must have loaded."""
    for pname in pnames:
        p = getattr(layer, pname, None)
        if p is None:
            continue
        got = p.__dict__.get("_cm_loaded", set())
        for shard in geom.shards:
            if shard not in got and not (shard is None and got):
                raise fmt.FormatError(f"checkpoint tensor {hf_name(geom.prefix, shard, pname)!r} is "
                                      f"missing (module {geom.prefix!r} needs it)")


def check_values(prefix: str, k: int, weight: torch.Tensor, gi: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> None:
    if gi.numel():
        lo, hi = int(gi.min()), int(gi.max())
        if lo < 0 or hi >= k:
            raise fmt.FormatError(f"checkpoint tensor {prefix}.group_index has values in [{lo}, {hi}]; "
                                  f"expected [0, {k}) (K={k} groups)")
    for t, what in ((weight, "weight"), (bias, "bias")):
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise fmt.FormatError(f"checkpoint tensor {prefix}.{what} contains NaN or Inf")


@dataclass
class Prepared:
    """A layer's kernel state, with and without its bias (vLLM passes bias=None on the ranks
    of a row-parallel layer that must not add it)."""

    with_bias: kernels.LayerState
    without_bias: kernels.LayerState

    def pick(self, bias: Optional[torch.Tensor]) -> kernels.LayerState:
        return self.with_bias if bias is not None else self.without_bias


def prepare(ctx: EngineContext, prefix: str, weight: torch.Tensor, gi: torch.Tensor,
            bias: Optional[torch.Tensor], use_cache: bool = True) -> Prepared:
    try:
        st = kernels.prepare_layer(weight, gi, bias, cache=ctx.hot_cache if use_cache else None, name=prefix,
                                   gemm=ctx.gemm)
    except ValueError as e:
        raise fmt.FormatError(f"{prefix}: {e}") from None
    return Prepared(st, st if bias is None else dataclasses.replace(st, bias=None))


def linear(ctx: EngineContext, prepared: Prepared, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y[t] = x[t] @ W_{expert(t)}^T``: one row per token of the step."""
    state = prepared.pick(bias)
    batch = ctx.step.token_batch(x.numel() // state.in_features, x.device)
    return kernels.channel_merged_linear(x, state, batch, ctx.strategy)


def embedding(ctx: EngineContext, weight: torch.Tensor, gi: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    ids = ctx.step.token_ids_for(token_ids.numel(), token_ids.device).reshape(token_ids.shape)
    return kernels.embedding_lookup(token_ids, weight, gi, ids)


def lm_head(ctx: EngineContext, state: kernels.LayerState, x: torch.Tensor,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """lm_head: one row per sampled request (or a prompt-logprob slice of tokens)."""
    rows = x.reshape(-1, x.shape[-1])
    batch = ctx.step.logits_batch
    if batch is None or batch.num_tokens != rows.shape[0]:
        batch = ctx.step.rows_batch(rows)
    y = kernels.channel_merged_linear(x, state, batch, ctx.strategy)
    return y if bias is None else y + bias


def check_expert_norm(name: str, w: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(w.shape) != want:
        raise fmt.FormatError(f"checkpoint tensor {name!r} has shape {tuple(w.shape)}, expected {want} "
                              "(experts x hidden)")
    check_dtype(name, w)
    if not bool(torch.isfinite(w).all()):
        raise fmt.FormatError(f"checkpoint tensor {name!r} contains NaN or Inf")
