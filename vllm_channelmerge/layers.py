"""What the plugin does with each linear layer, the embedding and the lm_head: free of vLLM.

The adapter (:mod:`vllm_channelmerge.compat`) reads vLLM's layer attributes into a
:class:`Geometry` and calls these functions from vLLM's quantization-method hooks:

* **load**: every checkpoint tensor is checked against its full (unsharded) shape and dtype
  before vLLM narrows it (:func:`check_loaded`), each fused shard is recorded, and after
  loading :func:`check_complete` and :func:`check_values` refuse a missing shard, an index
  out of range or a non-finite weight, naming the checkpoint tensor;
* **run**: :func:`linear`, :func:`embedding` and :func:`lm_head` take the rows' expert ids
  from the :class:`~vllm_channelmerge.context.EngineContext` and call the kernels.

Per module, format v1: ``weight [K, out, in]``, ``group_index [N, out]`` and ``bias [K, out]``
where the layer has one; format v2 (a row table): ``weight [R, in]``, ``row_index [N, out]``,
``bias [R]``, where a fused module (q/k/v, gate/up) holds its constituents' primary rows first
and all their extra rows after them (:class:`RowLayout`). Both run as row tables
(:mod:`vllm_channelmerge.format`, :mod:`vllm_channelmerge.rowtable`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from vllm_channelmerge import format as fmt
from vllm_channelmerge import kernels, rowtable
from vllm_channelmerge.context import EngineContext

PARAMS = ("weight", "group_index", "bias")
ROW_PARAMS = ("weight", "row_index", "bias")
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
    if name.endswith(fmt.INDEX_SUFFIXES):
        if w.is_floating_point() or w.is_complex() or w.dtype == torch.bool:
            raise fmt.FormatError(f"checkpoint tensor {name!r} is {w.dtype}; group / row indices must be "
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
    check_finite(prefix, weight, bias)


def check_finite(prefix: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    for t, what in ((weight, "weight"), (bias, "bias")):
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise fmt.FormatError(f"checkpoint tensor {prefix}.{what} contains NaN or Inf")


@dataclass(frozen=True)
class RowLayout:
    """Where a (possibly fused) module's checkpoint rows go in its row-table parameter (format v2).

    The shards' primary rows come first, in shard order (as vLLM fuses them); all extra rows
    follow the ``out_total`` primary rows, again in shard order (:meth:`_offsets`). ``out_total``
    may exceed the checkpoint's rows (the vocabulary padding vLLM adds to embeddings): those
    rows are zero and every expert uses them as they are.

    Under tensor parallelism a rank holds the ``channels`` of each shard and the ``columns`` of
    the input that vLLM gives it. Its extra rows depend on the row index, which may load after
    the weight, so every extra row of the shard is loaded and those of channels the rank does
    not hold are dropped once all tensors are in (:func:`rowtable.drop_unused_rows`).
    """

    geom: Geometry
    extra: dict[Any, int]  # the checkpoint's extra rows per shard id
    out_total: int  # primary rows this rank holds, padding included
    channels: dict[Any, tuple[int, int]]  # per shard id: (first channel, count) this rank holds
    columns: tuple[int, int]  # (first input feature, count) this rank holds

    @classmethod
    def of(cls, geom: Geometry, extras: list[int], out_total: Optional[int] = None,
           channels: Optional[dict[Any, tuple[int, int]]] = None,
           columns: Optional[tuple[int, int]] = None) -> "RowLayout":
        if len(extras) != len(geom.shards):
            raise fmt.FormatError(f"{geom.prefix}: {len(extras)} extra-row counts for {len(geom.shards)} modules")
        channels = channels or {s: (0, geom.out_rows[s]) for s in geom.shards}
        total = out_total if out_total is not None else sum(n for _, n in channels.values())
        return cls(geom, dict(zip(geom.shards, extras)), total, channels, columns or (0, geom.in_features))

    @property
    def num_rows(self) -> int:
        return self.out_total + sum(self.extra.values())

    def _offsets(self, shard: Any) -> tuple[int, int]:
        p = e = 0
        for s in self.geom.shards:
            if s == shard:
                return p, self.out_total + e
            p += self.channels[s][1]
            e += self.extra[s]
        raise fmt.FormatError(f"{self.geom.prefix}: unknown shard {shard!r}")

    def check(self, n: int, shard: Any, pname: str, loaded: torch.Tensor) -> str:
        """Refuse a checkpoint tensor whose shape or dtype is wrong; returns its name."""
        name = hf_name(self.geom.prefix, shard, pname)
        if shard is None and len(self.geom.shards) > 1:
            raise fmt.FormatError(f"checkpoint tensor {name!r}: a fused module's tensors are loaded per "
                                  "constituent in format v2")
        s = self.geom.shards[0] if shard is None else shard
        out, extra = self.geom.out_rows[s], self.extra[s]
        want = {"weight": (out + extra, self.geom.in_features), "row_index": (n, out), "bias": (out + extra,)}[pname]
        if tuple(loaded.shape) != want:
            raise fmt.FormatError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, expected {want} "
                                  f"({out} channels + {extra} extra rows, N={n} experts; format v2)")
        check_dtype(name, loaded)
        if pname == "row_index":
            rowtable.check_row_index(name, loaded, out + extra)
        return name

    def load(self, param: torch.Tensor, shard: Any, pname: str, loaded: torch.Tensor) -> None:
        """Copy this rank's part of one checked shard into the fused row table, remapping its
        row indices: its channels' primary rows and all the shard's extra rows."""
        s = self.geom.shards[0] if shard is None else shard
        out, (c0, cn) = self.geom.out_rows[s], self.channels[s]
        p0, e0 = self._offsets(s)
        if pname == "row_index":
            v = loaded[:, c0 : c0 + cn].to(torch.long)
            mapped = torch.where(v < out, v - c0 + p0, v - out + e0)
            param[:, p0 : p0 + cn].copy_(mapped.to(param.dtype))
            return
        if pname == "weight":
            loaded = loaded.narrow(1, *self.columns)
        param[p0 : p0 + cn].copy_(loaded[c0 : c0 + cn])
        param[e0 : e0 + self.extra[s]].copy_(loaded[out:])

    def init_index(self, row_index: torch.Tensor) -> None:
        """Rows no checkpoint tensor fills (vocabulary padding) use their own primary row."""
        row_index.copy_(torch.arange(row_index.shape[1], dtype=row_index.dtype).expand_as(row_index))


def rank_slice(full: int, part: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """(first, count) of the ``part`` of ``full`` channels or features that tensor-parallel
    rank ``rank`` of ``size`` holds: vLLM's column/row split, where ``full // part`` distinct
    slices are shared by ``size`` ranks (k/v heads replicated over ranks; ``part == full``:
    not split). ``what`` names the module in the error."""
    if part <= 0 or full % part or size % (full // part):
        raise fmt.FormatError(f"{what}: a tensor-parallel rank holds {part} of {full} rows or features "
                              f"with {size} ranks, which is not an even split")
    return (rank // (size // (full // part))) * part, part


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
    """A format v1 layer's kernel state (``weight [K, out, in]``, ``group_index``)."""
    cache = ctx.hot_cache if use_cache else None
    return _prepared(prefix, lambda: kernels.prepare_layer(weight, gi, bias, cache=cache, name=prefix, gemm=ctx.gemm))


def prepare_rows(ctx: EngineContext, prefix: str, rows: torch.Tensor, row_index: torch.Tensor,
                 bias: Optional[torch.Tensor], use_cache: bool = True, groups: Optional[int] = None) -> Prepared:
    """:func:`prepare` for a row table (format v2, indices checked at load; or a v1 table with
    its K ``groups``)."""
    cache = ctx.hot_cache if use_cache else None
    return _prepared(prefix, lambda: kernels.prepare_rows(rows, row_index, bias, row_index.shape[1], cache=cache,
                                                          name=prefix, gemm=ctx.gemm, groups=groups))


def _prepared(prefix: str, make) -> Prepared:
    """The state ``make()`` builds, with and without its bias; its ValueError names the layer."""
    try:
        st = make()
    except ValueError as e:
        raise fmt.FormatError(f"{prefix}: {e}") from None
    return Prepared(st, st if st.bias is None else dataclasses.replace(st, bias=None))


def linear(ctx: EngineContext, prepared: Prepared, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y[t] = x[t] @ W_{expert(t)}^T``: one row per token of the step."""
    state = prepared.pick(bias)
    batch = ctx.step.token_batch(x.numel() // state.in_features, x.device)
    return kernels.channel_merged_linear(x, state, batch, ctx.strategy)


def embedding(ctx: EngineContext, rows: torch.Tensor, row_index: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Each token's embedding row for its expert (``rows [R, H]``, ``row_index [N, V]``)."""
    ids = ctx.step.token_ids_for(token_ids.numel(), token_ids.device).reshape(token_ids.shape)
    return kernels.embedding_lookup(token_ids, rows, row_index, ids)


def lm_head(ctx: EngineContext, state: kernels.LayerState, x: torch.Tensor,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """lm_head: the rows the model's compute_logits resolved (``StepState.logits_rows``), whose
    ExpertBatch it set; called any other way, the rows' experts are unknown and it refuses."""
    n = x.numel() // x.shape[-1]
    batch = ctx.step.logits_batch
    if batch is None:
        raise RuntimeError("channelmerge: the lm_head was called outside the model's compute_logits; "
                           "its rows' experts are unknown")
    if batch.num_tokens != n:
        raise RuntimeError(f"channelmerge: the lm_head got {n} rows but compute_logits resolved "
                           f"{batch.num_tokens}; their experts are unknown")
    y = kernels.channel_merged_linear(x, state, batch, ctx.strategy)
    return y if bias is None else y + bias


def check_expert_norm(name: str, w: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(w.shape) != want:
        raise fmt.FormatError(f"checkpoint tensor {name!r} has shape {tuple(w.shape)}, expected {want} "
                              "(experts x hidden)")
    check_dtype(name, w)
    if not bool(torch.isfinite(w).all()):
        raise fmt.FormatError(f"checkpoint tensor {name!r} contains NaN or Inf")
