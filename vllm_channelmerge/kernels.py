"""Compute kernels for channel-merged linear layers (pure PyTorch, no vLLM import).

A channel-merged layer stores ``weight[K, out, in]`` (K groups), ``group_index[N, out]``
(expert ``n``'s output channel ``c`` uses row ``weight[group_index[n, c], c]``) and optionally
``bias[K, out]``. A batch mixes experts token by token (``expert_ids[T]``). Every function here
computes ``y[t] = x[t] @ W_{e(t)}^T (+ b_{e(t)})`` with ``W_e[c] = weight[group_index[e, c], c]``
without materialising the N dense weights.

Per forward step the integration builds one :class:`ExpertBatch` from the per-token expert ids
(and one more from the per-request ids for lm_head); every layer reuses it. Per layer, once at
load time, it builds a :class:`LayerState` with :func:`prepare_layer`. Then each layer call is
``channel_merged_linear(x, state, batch)``, which picks a strategy with :func:`choose_strategy`.

Strategies (all return exactly what :func:`reference_linear` returns, up to float rounding):

* ``dense``             -- K == 1, or the batch is one expert whose channels all sit in one
                           group: a plain ``F.linear`` on a view of that group.
* ``all_groups``        -- one GEMM against all K groups (``[T, K*out]``), then a
                           per-(token, channel) select. K x the FLOPs of a dense layer, but
                           one pass over the weights: best for small mixed (decode) batches.
* ``per_expert_gather`` -- gather each present expert's dense rows, one GEMM per expert segment
                           of the expert-sorted batch: best when there are many tokens per
                           expert (prefill).
* ``majority_residual`` -- dense GEMM with group 0 (each channel's largest group) for all
                           tokens, then per expert only its rows outside group 0, on its own
                           tokens: cost ~ 1 + the fraction of differing rows.
* ``hot_cache``         -- per-expert GEMMs on dense copies kept by a :class:`HotExpertCache`
                           (a global byte budget across layers); a batch of one cached expert
                           is a single plain ``F.linear``.
* ``triton``            -- CUDA only: fused gather-GEMM (see ``triton_kernels``).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "STRATEGIES",
    "CacheStats",
    "CostModel",
    "ExpertBatch",
    "HotExpertCache",
    "LayerState",
    "all_groups",
    "channel_merged_linear",
    "choose_strategy",
    "dense",
    "embedding_lookup",
    "hot_cache",
    "majority_residual",
    "per_expert_gather",
    "prepare_layer",
    "reference_embedding",
    "reference_linear",
    "strategy_costs",
    "triton_fused",
]

_ids = itertools.count()


# --------------------------------------------------------------------------------------------
# Reference (the oracle)
# --------------------------------------------------------------------------------------------


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_index: torch.Tensor,
    expert_ids: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Obviously-right oracle: materialise each token's own weight rows, then a batched matvec.

    Memory ``T * out * in``; for tests only.
    """
    k, out, inp = weight.shape
    x2 = x.reshape(-1, inp)
    eid = expert_ids.reshape(-1).long().to(weight.device)
    sel = group_index.long().to(weight.device)[eid]  # [T, out]: group of (token, channel)
    chan = torch.arange(out, device=weight.device)
    w_tok = weight[sel, chan]  # [T, out, in]
    y = torch.einsum("ti,toi->to", x2.to(torch.float32), w_tok.to(torch.float32))
    if bias is not None:
        y = y + bias[sel, chan].to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


def reference_embedding(
    token_ids: torch.Tensor,
    weight: torch.Tensor,
    group_index: torch.Tensor,
    expert_ids: torch.Tensor,
) -> torch.Tensor:
    """Oracle for :func:`embedding_lookup`: build each expert's dense table, then index it."""
    n = group_index.shape[0]
    rows = torch.arange(weight.shape[1], device=weight.device)
    tables = torch.stack([weight[group_index[e].long(), rows] for e in range(n)])  # [N, V, H]
    return tables[expert_ids.long(), token_ids.long()]


# --------------------------------------------------------------------------------------------
# Per-step batch description
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ExpertBatch:
    """How the rows of one forward step split by expert; built once per step, shared by layers.

    ``order`` sorts the rows by expert (stable); rows ``offsets[i]:offsets[i]+counts[i]`` of the
    sorted batch belong to ``experts[i]``. The Python lists are read once here (one host sync per
    step) so that no layer has to synchronise or loop over tokens.
    """

    expert_ids: torch.Tensor  # [T] int64, on the activations' device
    num_experts: int
    order: torch.Tensor  # [T] int64: row indices sorted by expert
    experts: list[int]  # present experts, ascending
    counts: list[int]  # rows per present expert
    offsets: list[int]  # start of each present expert in the sorted order
    segments: list[torch.Tensor]  # row indices of each present expert (views of `order`)
    uid: int = field(default_factory=lambda: next(_ids), init=False)  # fresh on dataclasses.replace
    _scratch: dict = field(default_factory=dict, repr=False, init=False)

    def __post_init__(self) -> None:
        self.device = self.expert_ids.device

    @classmethod
    def build(
        cls,
        expert_ids: torch.Tensor | list[int],
        num_experts: int,
        device: torch.device | str | None = None,
    ) -> "ExpertBatch":
        """From per-row expert ids (per token for most layers, per sampled row for lm_head).

        Raises ``ValueError`` for ids outside ``[0, num_experts)``.
        """
        ids = torch.as_tensor(expert_ids, device=device).reshape(-1).long()
        t = ids.numel()
        if t == 0:
            empty = ids.new_empty(0)
            return cls(ids, num_experts, empty, [], [], [], [])
        try:
            binc = torch.bincount(ids, minlength=num_experts)
        except RuntimeError:  # negative ids
            raise ValueError(f"expert ids must be in [0, {num_experts}); got a negative id") from None
        if binc.numel() > num_experts:
            raise ValueError(f"expert ids must be in [0, {num_experts}); got {binc.numel() - 1}")
        all_counts = binc.tolist()
        experts = [e for e, c in enumerate(all_counts) if c]
        counts = [all_counts[e] for e in experts]
        offsets = [0] + list(itertools.accumulate(counts))[:-1]
        if len(experts) == 1:
            order = torch.arange(t, device=ids.device)
        else:
            order = torch.sort(ids, stable=True).indices
        segments = list(torch.split(order, counts))
        return cls(ids, num_experts, order, experts, counts, offsets, segments)

    @classmethod
    def single(cls, expert: int, num_tokens: int, num_experts: int, device=None) -> "ExpertBatch":
        """All rows one expert (profiling / dummy runs use expert 0)."""
        return cls.build(torch.full((num_tokens,), expert, dtype=torch.long, device=device), num_experts)

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.numel()

    @property
    def num_present(self) -> int:
        return len(self.experts)

    @property
    def single_expert(self) -> Optional[int]:
        """The one expert of the batch, or None if it mixes experts (or is empty)."""
        return self.experts[0] if len(self.experts) == 1 else None

    @property
    def max_count(self) -> int:
        return max(self.counts, default=0)

    def scratch(self, key, make: Callable[[], object]):
        """Per-step memo (e.g. tile tables for the Triton kernel), shared by all layers."""
        v = self._scratch.get(key)
        if v is None:
            v = self._scratch[key] = make()
        return v


# --------------------------------------------------------------------------------------------
# Per-layer precomputed state
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LayerState:
    """Everything a layer's strategies need, computed once at load (process_weights_after_loading).

    Holds references to (not copies of) the stored weight and bias, plus index tables:
    ``flat_index[e, c] = group_index[e, c] * out + c`` (row of ``weight_flat``),
    ``uniform_group[e]`` (the one group expert ``e`` uses everywhere, else -1),
    ``residual_rows[e]`` / ``residual_flat[e]`` (channels where ``e`` leaves group 0 and their
    rows), and ``residual_fraction[e]``.
    """

    weight: torch.Tensor  # [K, out, in]
    group_index: torch.Tensor  # [N, out] int64
    bias: Optional[torch.Tensor]  # [K, out]
    flat_index: torch.Tensor  # [N, out] int64
    uniform_group: list[int]
    residual_rows: list[torch.Tensor]
    residual_flat: list[torch.Tensor]
    residual_fraction: list[float]
    cache: Optional["HotExpertCache"] = None
    name: str = ""
    uid: int = field(default_factory=lambda: next(_ids), init=False)  # fresh on dataclasses.replace

    @property
    def num_groups(self) -> int:
        return self.weight.shape[0]

    @property
    def num_experts(self) -> int:
        return self.group_index.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    @property
    def in_features(self) -> int:
        return self.weight.shape[2]

    def __post_init__(self) -> None:
        # flat views, made once: a per-call reshape costs microseconds on every layer
        self.weight_flat = self.weight.view(-1, self.weight.shape[2])  # [K*out, in]
        self.bias_flat = None if self.bias is None else self.bias.view(-1)  # [K*out]

    @property
    def dense_bytes(self) -> int:
        """Bytes of one expert's dense copy (weight + bias)."""
        b = self.out_features * self.in_features
        if self.bias is not None:
            b += self.out_features
        return b * self.weight.element_size()

    def expert_weight(self, e: int) -> tuple[torch.Tensor, Optional[torch.Tensor], bool]:
        """Expert ``e``'s dense ``(weight [out,in], bias [out])`` and whether it is a copy.

        A view of one group when all of ``e``'s channels sit in it (no copy), else a gather.
        """
        g = self.uniform_group[e]
        if g >= 0:
            return self.weight[g], (None if self.bias is None else self.bias[g]), False
        idx = self.flat_index[e]
        w = self.weight_flat.index_select(0, idx)
        b = None if self.bias is None else self.bias_flat.index_select(0, idx)
        return w, b, True


def prepare_layer(
    weight: torch.Tensor,
    group_index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    cache: Optional["HotExpertCache"] = None,
    name: str = "",
) -> LayerState:
    """Validate a layer's tensors and precompute its index tables (call once, at load).

    ``weight`` must be ``[K, out, in]`` and ``group_index`` ``[N, out]`` with values in
    ``[0, K)``; ``bias`` (optional) ``[K, out]``. Index tables go to the weight's device.
    """
    if weight.dim() != 3:
        raise ValueError(f"{name or 'layer'}: weight must be [K, out, in], got {tuple(weight.shape)}")
    k, out, _ = weight.shape
    if group_index.dim() != 2 or group_index.shape[1] != out:
        raise ValueError(
            f"{name or 'layer'}: group_index must be [N, {out}], got {tuple(group_index.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (k, out):
        raise ValueError(f"{name or 'layer'}: bias must be [{k}, {out}], got {tuple(bias.shape)}")
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    dev = weight.device
    gi = group_index.to(device=dev, dtype=torch.long)
    if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= k):
        raise ValueError(f"{name or 'layer'}: group_index values must be in [0, {k})")
    chan = torch.arange(out, device=dev)
    flat = gi * out + chan
    n = gi.shape[0]
    gmin = gi.min(dim=1).values.tolist() if out else [0] * n
    gmax = gi.max(dim=1).values.tolist() if out else [0] * n
    uniform = [a if a == b else -1 for a, b in zip(gmin, gmax)]
    res_rows, res_flat, res_frac = [], [], []
    for e in range(n):  # once per layer at load, over experts (not tokens)
        rows = torch.nonzero(gi[e] != 0).flatten()
        res_rows.append(rows)
        res_flat.append(flat[e].index_select(0, rows))
        res_frac.append(rows.numel() / out if out else 0.0)
    return LayerState(weight, gi, bias, flat, uniform, res_rows, res_flat, res_frac, cache, name)


# --------------------------------------------------------------------------------------------
# Hot-expert cache
# --------------------------------------------------------------------------------------------


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    admissions: int = 0
    evictions: int = 0
    rejections: int = 0  # admission refused: no budget, and nothing colder to evict
    bytes_used: int = 0
    budget_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class HotExpertCache:
    """Dense copies of the hottest experts' layers within one byte budget shared by all layers.

    Hotness is an exponentially decayed count of each expert's rows, updated once per step by
    :meth:`observe`. An entry (layer, expert) is admitted if it fits, or after evicting entries of
    strictly colder experts (coldest first, then least recently used); equally hot experts never
    evict each other, so a budget too small for every hot expert does not thrash.
    Experts whose channels all sit in one group need no copy and are never stored.
    """

    def __init__(self, budget_bytes: int, decay: float = 0.9) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = int(budget_bytes)
        self.decay = float(decay)
        self.hotness: dict[int, float] = {}
        self._entries: dict[tuple[int, int], tuple[torch.Tensor, Optional[torch.Tensor], int]] = {}
        self._last_use: dict[tuple[int, int], int] = {}
        self._tick = 0
        self._last_batch_uid = -1
        self.stats = CacheStats(budget_bytes=self.budget_bytes)

    ENV_BUDGET = "CHANNELMERGE_HOT_CACHE_BYTES"

    @classmethod
    def from_env(cls, default_bytes: int = 0) -> "HotExpertCache":
        """A cache whose budget is ``$CHANNELMERGE_HOT_CACHE_BYTES`` (else ``default_bytes``)."""
        raw = os.environ.get(cls.ENV_BUDGET)
        try:
            budget = int(float(raw)) if raw not in (None, "") else int(default_bytes)
        except ValueError:
            raise ValueError(f"{cls.ENV_BUDGET}={raw!r}: expected a number of bytes") from None
        return cls(budget_bytes=budget)

    # -- bookkeeping -------------------------------------------------------------------------
    def observe(self, batch: ExpertBatch) -> None:
        """Update expert hotness from a batch's composition (idempotent per batch)."""
        if batch.uid == self._last_batch_uid:
            return
        self._last_batch_uid = batch.uid
        for e in list(self.hotness):
            self.hotness[e] *= self.decay
        for e, c in zip(batch.experts, batch.counts):
            self.hotness[e] = self.hotness.get(e, 0.0) + c

    def would_admit(self, state: LayerState, expert: int) -> bool:
        """Whether a miss on (layer, expert) would be kept: it fits, or colder entries make room."""
        size = state.dense_bytes
        if size > self.budget_bytes:
            return False
        need = self.stats.bytes_used + size - self.budget_bytes
        if need <= 0:
            return True
        heat = self.hotness.get(expert, 0.0)
        return sum(v[2] for k, v in self._entries.items() if self.hotness.get(k[1], 0.0) < heat) >= need

    def contains(self, state: LayerState, expert: int) -> bool:
        """Whether a dense weight is available without a gather (peek: no stats)."""
        return state.uniform_group[expert] >= 0 or (state.uid, expert) in self._entries

    def cached_experts(self) -> set[int]:
        return {e for _, e in self._entries}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._last_use.clear()
        self.stats.bytes_used = 0

    # -- lookup / admission ------------------------------------------------------------------
    def get(
        self, state: LayerState, expert: int, admit: bool = True
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Expert's dense ``(weight, bias)``: from the cache (hit), else gathered (miss) and,
        if ``admit``, kept when the budget allows."""
        self._tick += 1
        key = (state.uid, expert)
        ent = self._entries.get(key)
        if ent is not None:
            self.stats.hits += 1
            self._last_use[key] = self._tick
            return ent[0], ent[1]
        w, b, copied = state.expert_weight(expert)
        if not copied:  # a view of one group: as good as a hit, costs nothing
            self.stats.hits += 1
            return w, b
        self.stats.misses += 1
        if admit:
            self._admit(key, w, b, state.dense_bytes)
        return w, b

    def _admit(self, key: tuple[int, int], w: torch.Tensor, b: Optional[torch.Tensor], size: int) -> bool:
        if size > self.budget_bytes:
            self.stats.rejections += 1
            return False
        need = self.stats.bytes_used + size - self.budget_bytes
        if need > 0:
            heat = self.hotness.get(key[1], 0.0)
            victims = sorted(
                (k for k in self._entries if self.hotness.get(k[1], 0.0) < heat),
                key=lambda k: (self.hotness.get(k[1], 0.0), self._last_use.get(k, 0)),
            )
            chosen, freed = [], 0
            for v in victims:
                if freed >= need:
                    break
                chosen.append(v)
                freed += self._entries[v][2]
            if freed < need:
                self.stats.rejections += 1
                return False
            for v in chosen:
                self.stats.bytes_used -= self._entries.pop(v)[2]
                self._last_use.pop(v, None)
                self.stats.evictions += 1
        self._entries[key] = (w, b, size)
        self._last_use[key] = self._tick
        self.stats.bytes_used += size
        self.stats.admissions += 1
        return True


# --------------------------------------------------------------------------------------------
# Strategies: all take (x [T, in], state, batch) and return [T, out]
# --------------------------------------------------------------------------------------------


def _flat2d(x: torch.Tensor, state: LayerState) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, state.in_features)


def dense(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """Plain ``F.linear`` for K == 1 or a one-expert batch whose rows are one group's view."""
    e = batch.single_expert if batch.single_expert is not None else 0
    if state.num_groups != 1 and batch.num_present > 1:
        raise ValueError("dense strategy needs K == 1 or a single-expert batch")
    g = 0 if state.num_groups == 1 else state.uniform_group[e]
    if g < 0:
        raise ValueError(f"dense strategy: expert {e} mixes groups; use hot_cache or a gather")
    return F.linear(x, state.weight[g], None if state.bias is None else state.bias[g])


def all_groups(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """One GEMM against all K groups, then pick each (token, channel)'s group.

    Reads the weights once; K x the FLOPs and output of a dense layer. Best for decode.
    """
    x2 = _flat2d(x, state)
    y_all = F.linear(x2, state.weight_flat, state.bias_flat)  # [T, K*out], bias folded in
    if state.num_groups == 1:
        return y_all
    sel = state.flat_index.index_select(0, batch.expert_ids)  # [T, out] rows of y_all
    return y_all.gather(1, sel)


def per_expert_gather(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """Gather each present expert's dense rows (precomputed flat indices); one GEMM per expert
    segment of the expert-sorted batch. Best for prefill. Does not touch the hot cache."""
    return _per_expert(x, state, batch, use_cache=False)


def hot_cache(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """Per-expert GEMMs on dense copies from the hot-expert cache (one ``F.linear`` for a
    single-expert batch). Without a cache this is ``per_expert_gather``."""
    return _per_expert(x, state, batch, use_cache=state.cache is not None)


def _per_expert(x: torch.Tensor, state: LayerState, batch: ExpertBatch, use_cache: bool) -> torch.Tensor:
    x2 = _flat2d(x, state)
    cache = state.cache if use_cache else None
    if cache is not None:
        cache.observe(batch)

    def weights(e: int):
        if cache is not None:
            return cache.get(state, e)
        w, b, _ = state.expert_weight(e)
        return w, b

    if batch.num_present <= 1:
        if batch.num_present == 0:
            return x2.new_empty((0, state.out_features))
        w, b = weights(batch.experts[0])
        return F.linear(x2, w, b)
    xs = x2.index_select(0, batch.order)
    ys = x2.new_empty((x2.shape[0], state.out_features))
    for e, s, n in zip(batch.experts, batch.offsets, batch.counts):  # loop over experts only
        w, b = weights(e)
        if b is None:
            torch.mm(xs[s : s + n], w.t(), out=ys[s : s + n])
        else:
            torch.addmm(b, xs[s : s + n], w.t(), out=ys[s : s + n])
    y = torch.empty_like(ys)
    y.index_copy_(0, batch.order, ys)
    return y


def majority_residual(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """Dense GEMM with group 0 for every token, then per expert only its non-group-0 rows.

    Cost ~ (1 + residual fraction) dense layers when the groups are lopsided.
    """
    x2 = _flat2d(x, state)
    y = F.linear(x2, state.weight[0], None if state.bias is None else state.bias[0])
    if state.num_groups == 1 or batch.num_tokens == 0:
        return y
    wf, bf = state.weight_flat, state.bias_flat
    for e, seg in zip(batch.experts, batch.segments):
        rows = state.residual_rows[e]
        if rows.numel() == 0:
            continue
        idx = state.residual_flat[e]
        xe = x2 if batch.num_present == 1 else x2.index_select(0, seg)
        ye = F.linear(xe, wf.index_select(0, idx), None if bf is None else bf.index_select(0, idx))
        if batch.num_present == 1:
            y.index_copy_(1, rows, ye)
        else:
            y[seg.unsqueeze(1), rows.unsqueeze(0)] = ye
    return y


def triton_fused(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """Fused gather-GEMM on CUDA (see ``triton_kernels.fused_gather_linear``)."""
    from . import triton_kernels

    return triton_kernels.fused_gather_linear(_flat2d(x, state), state, batch)


STRATEGIES: dict[str, Callable[[torch.Tensor, LayerState, ExpertBatch], torch.Tensor]] = {
    "dense": dense,
    "all_groups": all_groups,
    "per_expert_gather": per_expert_gather,
    "majority_residual": majority_residual,
    "hot_cache": hot_cache,
    "triton": triton_fused,
}


# --------------------------------------------------------------------------------------------
# Cost rule and dispatch
# --------------------------------------------------------------------------------------------


@dataclass
class CostModel:
    """Costs in units of one pass over the layer's dense ``[out, in]`` weight.

    ``flop_per_token``: extra cost per token per dense weight (compute); ``gather``: cost of
    gathering one dense weight (read + write); ``launch_us``: fixed time of each extra GEMM
    segment (a few framework ops), turned into units with ``bytes_per_us`` (the speed of one
    weight pass), so it weighs more on small layers.
    CPU defaults were measured on a 2-core AVX2 machine with SmolLM2-135M layer shapes and
    weights streaming from DRAM (benchmarks/kernels_cpu.py): a dense layer ~1 + 0.12 T units,
    a gather ~1.6, ~14 GB/s, ~10 us per segment. CUDA defaults are estimates for a
    datacenter GPU (memory-bound up to a few hundred tokens); there the fused Triton kernel
    takes mixed decode batches.
    """

    flop_per_token: float = 0.12
    gather: float = 1.6
    launch_us: float = 10.0
    bytes_per_us: float = 14e3
    triton_max_tokens_per_expert: int = 64

    @classmethod
    def for_device(cls, device: torch.device | str | None) -> "CostModel":
        if device is not None and torch.device(device).type == "cuda":
            return CUDA_COST
        return DEFAULT_COST

    def launch(self, state: "LayerState") -> float:
        """Per-segment overhead in units of one pass over this layer's dense weight."""
        unit_us = max(1.0, state.dense_bytes / self.bytes_per_us)
        return self.launch_us / unit_us


DEFAULT_COST = CostModel()
CUDA_COST = CostModel(flop_per_token=0.004, gather=2.0, launch_us=6.0, bytes_per_us=3e6)


def strategy_costs(
    batch: ExpertBatch, state: LayerState, cost: Optional[CostModel] = None
) -> dict[str, float]:
    """Estimated cost of each applicable strategy (see :class:`CostModel` for the units).

    dense(t)          = 1 + a*t                            (a = flop_per_token, L = launch)
    all_groups        = K * dense(T) + L
    per_expert_gather = sum_e [gather_e + dense(t_e) + L], gather_e = 0 for a one-group expert
    hot_cache         = per_expert_gather with gather_e = 0 for experts already cached
    majority_residual = dense(T) + L + sum_e [r_e * (gather + dense(t_e)) + L]  (experts with r_e > 0)
    """
    cost = cost or CostModel.for_device(batch.device)
    a, k, t = cost.flop_per_token, state.num_groups, batch.num_tokens
    lc = cost.launch(state)

    def d(n: int) -> float:
        return 1.0 + a * n

    costs: dict[str, float] = {"all_groups": k * d(t) + lc}
    pe = hc = mr = 0.0
    for e, n in zip(batch.experts, batch.counts):
        uni = state.uniform_group[e] >= 0
        g = 0.0 if uni else cost.gather
        pe += g + d(n) + lc
        cached = state.cache is not None and state.cache.contains(state, e)
        hc += (0.0 if cached else g) + d(n) + lc
        r = state.residual_fraction[e]
        if r > 0:
            mr += r * (cost.gather + d(n)) + lc
    if state.cache is not None:  # before per_expert_gather: on a tie it also keeps the copies
        costs["hot_cache"] = hc
    costs["per_expert_gather"] = pe
    costs["majority_residual"] = d(t) + lc + mr
    return costs


def choose_strategy(
    batch: ExpertBatch, layer_meta: LayerState, x: Optional[torch.Tensor] = None, cost: Optional[CostModel] = None
) -> str:
    """Pick a strategy from the batch composition (a cheap rule, no timing).

    1. K == 1, or one expert whose channels all sit in one group -> ``dense``.
    2. One expert with a hot cache that holds it or would admit it -> ``hot_cache`` (hits are a
       plain ``F.linear``; a miss gathers once and keeps the copy, so the next steps hit).
    3. CUDA with Triton and a mixed decode batch (<= 64 tokens per expert) -> ``triton``.
    4. Otherwise the cheapest by :func:`strategy_costs` (ties: the earlier in the list).
    """
    st = layer_meta
    cost = cost or CostModel.for_device(batch.device)
    if batch.num_tokens == 0 or st.num_groups == 1:
        return "dense"
    single = batch.single_expert
    if single is not None and st.uniform_group[single] >= 0:
        return "dense"
    if single is not None and st.cache is not None:
        st.cache.observe(batch)
        if st.cache.contains(st, single) or st.cache.would_admit(st, single):
            return "hot_cache"
    if x is not None and x.is_cuda and batch.max_count <= cost.triton_max_tokens_per_expert:
        from . import triton_kernels

        if triton_kernels.is_available():
            return "triton"
    costs = strategy_costs(batch, st, cost)
    return min(costs, key=costs.__getitem__)


def channel_merged_linear(
    x: torch.Tensor, layer_state: LayerState, batch: ExpertBatch, strategy: str = "auto"
) -> torch.Tensor:
    """``y[t] = x[t] @ W_{e(t)}^T (+ b_{e(t)})`` for ``x [..., in]``; rows of x match the batch."""
    st = layer_state
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if rows != batch.num_tokens or x2.shape[1] != st.in_features:
        raise ValueError(
            f"{st.name or 'layer'}: x is {tuple(x.shape)}; expected {batch.num_tokens} rows "
            f"(the expert batch) of {st.in_features} features"
        )
    if x.device != batch.device:
        raise ValueError(f"expert ids on {batch.device}, activations on {x.device}")
    if strategy == "auto":
        strategy = choose_strategy(batch, st, x)
    fn = STRATEGIES.get(strategy)
    if fn is None:
        raise ValueError(f"unknown strategy {strategy!r}; choose from auto, {', '.join(STRATEGIES)}")
    if rows == 0:
        return x.new_empty((*x.shape[:-1], st.out_features))
    y = fn(x2, st, batch)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], st.out_features)


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------


def embedding_lookup(
    token_ids: torch.Tensor,
    weight: torch.Tensor,
    group_index: torch.Tensor,
    expert_ids: torch.Tensor,
) -> torch.Tensor:
    """Per-token embedding with the token's expert: ``weight[group_index[e, tok], tok]``.

    Here the rows (channels) are vocabulary entries, so the lookup is two gathers and never
    touches rows the batch does not use. ``token_ids`` and ``expert_ids`` have the same shape.
    """
    k, v, h = weight.shape
    tok = token_ids.long()
    if k == 1:
        return F.embedding(tok, weight[0])
    g = group_index[expert_ids.long(), tok].long()  # [T]
    return F.embedding(g * v + tok, weight.reshape(k * v, h))
