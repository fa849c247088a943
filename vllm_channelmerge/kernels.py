"""Compute kernels for channel-merged linear layers (pure PyTorch, no vLLM import).

A channel-merged layer is a row table: ``rows[R, in]``, ``row_index[N, out]`` (expert ``n``'s
output channel ``c`` uses ``rows[row_index[n, c]]``; rows ``0..out-1`` are the channels'
primary rows) and optionally ``bias[R]`` (format v2). A format v1 layer (``weight[K, out, in]``,
``group_index[N, out]``, ``bias[K, out]``) is the row table ``R = K*out``, ``row_index =
group_index*out + c``, taken without a copy (:func:`prepare_layer`). A batch mixes experts token
by token (``expert_ids[T]``). Every function here computes ``y[t] = x[t] @ W_{e(t)}^T (+ b)``
with ``W_e[c] = rows[row_index[e, c]]`` without materialising the N dense weights.

Per forward step the integration builds one :class:`ExpertBatch` from the per-token expert ids
(and one more from the per-request ids for lm_head); every layer reuses it. Per layer, once at
load time, it builds a :class:`LayerState` with :func:`prepare_layer`, which also prepacks the
weights the strategies run dense GEMMs on (all groups at once, group 0) with a
:class:`GemmFactory`: plain ``F.linear`` by default, vLLM's own CPU GEMM (prepacked oneDNN)
when the adapter passes it. Then each layer call is ``channel_merged_linear(x, state, batch)``,
which picks a strategy with :func:`choose_strategy`.

Strategies (all return exactly what :func:`reference_linear` returns, up to float rounding):

* ``dense``             -- K == 1, or the batch is one expert whose rows are contiguous (one
                           group; the primary rows): one prepacked GEMM on them.
* ``all_groups``        -- one prepacked GEMM against every stored row (``[T, R]``), then a
                           per-(token, channel) select. R/out x the FLOPs of a dense layer (K
                           for v1, 1 + extra/out for a row table), one pass over the weights:
                           best for small mixed (decode) batches.
* ``per_expert_gather`` -- gather each present expert's dense rows, one (plain) GEMM per expert
                           segment: best when there are many tokens per expert (prefill).
                           Long runs of one expert (vLLM's prefills) are computed in place.
* ``majority_residual`` -- prepacked GEMM with the primary rows (each channel's largest group)
                           for all tokens, then per expert only its other rows, on its own
                           tokens: cost ~ 1 + the fraction of differing rows.
* ``hot_cache``         -- per-expert GEMMs on dense copies kept by a :class:`HotExpertCache`
                           (a global byte budget across layers), prepacked when admitted; a
                           batch of one cached expert is a single prepacked GEMM, as in stock vLLM.
* ``triton``            -- CUDA only: fused gather-GEMM (see ``triton_kernels``).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .rowtable import from_groups

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
    "prepare_rows",
    "reference_embedding",
    "reference_linear",
    "reference_rows_linear",
    "strategy_costs",
    "triton_fused",
]

_ids = itertools.count()


# --------------------------------------------------------------------------------------------
# Dense GEMM backend (vLLM-free interface; the adapter plugs in vLLM's CPU GEMM)
# --------------------------------------------------------------------------------------------

#: A prepacked dense GEMM: ``fn(x [T, in], bias [out] | None, out [T, out] | None) -> [T, out]``
#: (``x @ W^T + bias``, written into ``out`` when given).
GemmFn = Callable[..., torch.Tensor]


def torch_linear(weight: torch.Tensor) -> GemmFn:
    """The plain path: ``F.linear`` / ``torch.addmm`` on ``weight [out, in]`` (no copy)."""

    def fn(x: torch.Tensor, bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None):
        if out is None:
            return F.linear(x, weight, bias)
        if bias is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(bias, x, weight.t(), out=out)

    fn.path = "torch"  # type: ignore[attr-defined]
    fn.copies = False  # type: ignore[attr-defined]  (it reads `weight` itself: no copy)
    return fn


class GemmFactory:
    """How the kernels run a dense GEMM on a weight they hold: ``prepack(weight [out, in])``
    once (at load, or when the hot cache admits a dense copy), then call the result per step.

    This default is plain PyTorch (``F.linear``; ``prepack`` copies nothing). The vLLM adapter
    (:func:`vllm_channelmerge.compat.cpu_gemm_factory`) returns one that prepacks into vLLM's
    own CPU GEMM (oneDNN). Weights that exist only for one call (a per-expert gather) are never
    packed (packing them would cost more than it saves): they go through ``per_call``, plain
    ``F.linear`` here, oneDNN's unpacked inner product in the adapter where the host has it.

    A GEMM carries ``fn.path`` (which kernel runs it) and ``fn.copies`` (whether it holds its
    own copy of the weight: then the hot cache keeps only that copy).
    """

    name = "torch"

    def prepack(self, weight: torch.Tensor) -> GemmFn:
        return torch_linear(weight)

    def per_call(self, weight: torch.Tensor) -> GemmFn:
        """A GEMM on a weight that exists for one call only (a per-expert gather, the residual
        rows of ``majority_residual``): never prepacked. Plain ``F.linear`` here; the vLLM
        adapter may give a faster unpacked kernel where the host has one."""
        return torch_linear(weight)

    def cost_model(self, dtype: torch.dtype, device: torch.device | str | None = None) -> "CostModel":
        """The cost rule's constants for layers of this dtype on this device."""
        return CostModel.for_device(device)

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


TORCH_GEMM = GemmFactory()


# The ISA features that decide which CPU GEMM is fast (recorded with every benchmark figure).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpuinfo_field(name: str) -> str:
    """The first ``name : value`` of ``/proc/cpuinfo`` (``vendor_id``, ``model name``), or ``""``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> dict[str, bool]:
    """This host's vector ISA features (``/proc/cpuinfo``; torch's own checks elsewhere)."""
    found = set(cpuinfo_field("flags").split())
    if not found:  # not Linux: ask torch
        caps = getattr(torch.cpu, "get_capabilities", lambda: {})() or {}
        found = {k.replace("avx512_f", "avx512f") for k, v in caps.items() if v is True}
    return {k: k in found for k in CPU_FLAGS}


def host_kind(flags: Optional[dict[str, bool]] = None, vendor: Optional[str] = None) -> str:
    """``AVX-512 + AVX512-BF16 + AMX``, ``AVX-512``, ``AVX2`` or ``no AVX2``, with `` (AMD)`` on
    AMD CPUs: the kind of CPU a speed figure comes from (results of different kinds are kept
    apart). The vendor counts because torch's float32 ``F.linear`` is MKL, which takes a slower
    path on AMD CPUs (2.2-2.5x slower than oneDNN on an AVX-512 EPYC; on Intel they match)."""
    f = flags if flags is not None else cpu_flags()
    v = vendor if vendor is not None else cpuinfo_field("vendor_id")
    if f.get("avx512f"):
        kind = "AVX-512"
        if f.get("avx512_bf16"):
            kind += " + AVX512-BF16"
        if f.get("amx_bf16") or f.get("amx_tile"):
            kind += " + AMX"
    else:
        kind = "AVX2" if f.get("avx2") else "no AVX2"
    return kind + (" (AMD)" if v == "AuthenticAMD" else "")


def cpu_isa_summary() -> str:
    """One line for logs: the host kind and its flags."""
    f = cpu_flags()
    return f"{host_kind(f)} ({' '.join(k for k, v in f.items() if v) or 'none of ' + ' '.join(CPU_FLAGS)})"


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
    """Obviously-right oracle (format v1: ``weight [K, out, in]``, ``group_index``, ``bias
    [K, out]``): materialise each token's own weight rows, then a batched matvec.

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


def reference_rows_linear(
    x: torch.Tensor,
    rows: torch.Tensor,
    row_index: torch.Tensor,
    expert_ids: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The oracle for a row table (format v2: ``rows [R, in]``, ``row_index [N, out]``, ``bias
    [R]``): each token's own rows, then a batched matvec. For tests only."""
    out, inp = row_index.shape[1], rows.shape[1]
    x2 = x.reshape(-1, inp)
    eid = expert_ids.reshape(-1).long().to(rows.device)
    sel = row_index.long().to(rows.device)[eid]  # [T, out]: row of (token, channel)
    y = torch.einsum("ti,toi->to", x2.to(torch.float32), rows[sel].to(torch.float32))
    if bias is not None:
        y = y + bias[sel].to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


def reference_embedding(
    token_ids: torch.Tensor,
    weight: torch.Tensor,
    group_index: torch.Tensor,
    expert_ids: torch.Tensor,
) -> torch.Tensor:
    """Oracle for :func:`embedding_lookup` on a v1 table ``[K, V, H]``: build each expert's
    dense table, then index it."""
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

    @property
    def inverse_order(self) -> torch.Tensor:
        """``inverse_order[order[i]] = i``: where each row went in the expert-sorted batch."""
        inv = self._scratch.get("inverse_order")
        if inv is None:
            inv = torch.empty_like(self.order)
            inv[self.order] = torch.arange(self.order.numel(), device=self.order.device)
            self._scratch["inverse_order"] = inv
        return inv

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        """Maximal runs of consecutive rows of one expert, ``(expert, start, length)`` in row
        order (computed on first use, once per step). vLLM lays each request's tokens out
        contiguously, so a prefill is a few long runs: GEMMs on row slices, no sorting."""
        r = self._scratch.get("runs")
        if r is None:
            ids = self.expert_ids
            t = ids.numel()
            if t == 0:
                r = []
            elif self.num_present == 1:
                r = [(self.experts[0], 0, t)]
            else:
                starts = [0] + (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
                firsts = ids.index_select(0, torch.tensor(starts, device=ids.device)).tolist()
                ends = starts[1:] + [t]
                r = [(e, a, b - a) for e, a, b in zip(firsts, starts, ends)]
            self._scratch["runs"] = r
        return r

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

    The layer is a row table (format v2; a v1 layer is converted without copying, see
    :func:`prepare_layer`): ``rows [R, in]``, ``row_index [N, out]`` (expert ``e``'s channel ``c``
    is ``rows[row_index[e, c]]``; rows ``0..out-1`` are the channels' primary rows, v1's group 0)
    and ``bias [R]`` or None. Holds references to (not copies of) the stored tensors, plus tables:
    ``uniform_offset[e]`` (``s`` when expert ``e``'s rows are the contiguous slice
    ``rows[s:s+out]``, else -1), ``residual_rows[e]`` / ``residual_flat[e]`` (channels where ``e``
    leaves its primary row, and the rows it uses there) and ``residual_fraction[e]``.
    ``groups`` is K when the rows are v1's K whole groups (``row_index = g*out + c``), else None.
    """

    rows: torch.Tensor  # [R, in]
    row_index: torch.Tensor  # [N, out] int64
    bias: Optional[torch.Tensor]  # [R]
    out_features: int
    groups: Optional[int]
    uniform_offset: list[int]
    residual_rows: list[torch.Tensor]
    residual_flat: list[torch.Tensor]
    residual_fraction: list[float]
    cache: Optional["HotExpertCache"] = None
    name: str = ""
    gemm: GemmFactory = field(default=TORCH_GEMM, repr=False)
    # Prepacked GEMMs of the stored rows (no bias: it is passed per call), keyed by what they
    # hold; shared with the states dataclasses.replace derives (same rows, other bias).
    packs: dict = field(default_factory=dict, repr=False)
    uid: int = field(default_factory=lambda: next(_ids), init=False)  # fresh on dataclasses.replace

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def num_experts(self) -> int:
        return self.row_index.shape[0]

    @property
    def in_features(self) -> int:
        return self.rows.shape[1]

    @property
    def row_ratio(self) -> float:
        """Stored rows per channel (K for v1 groups; 1 + extra/out for a row table)."""
        return self.num_rows / max(1, self.out_features)

    @property
    def single_row(self) -> bool:
        """Every channel has one row (K == 1): every expert computes the same dense layer."""
        return self.num_rows == self.out_features

    def __post_init__(self) -> None:
        self.cost_model = self.gemm.cost_model(self.rows.dtype, self.rows.device)

    @property
    def dense_bytes(self) -> int:
        """Bytes of one expert's dense copy (weight + bias)."""
        b = self.out_features * self.in_features
        if self.bias is not None:
            b += self.out_features
        return b * self.rows.element_size()

    def slice_bias(self, s: int) -> Optional[torch.Tensor]:
        return None if self.bias is None else self.bias[s : s + self.out_features]

    def expert_weight(self, e: int) -> tuple[torch.Tensor, Optional[torch.Tensor], bool]:
        """Expert ``e``'s dense ``(weight [out,in], bias [out])`` and whether it is a copy.

        A view of a contiguous slice of rows (v1: one group) when ``e`` uses one, else a gather.
        """
        s = self.uniform_offset[e]
        if s >= 0:
            return self.rows[s : s + self.out_features], self.slice_bias(s), False
        idx = self.row_index[e]
        w = self.rows.index_select(0, idx)
        b = None if self.bias is None else self.bias.index_select(0, idx)
        return w, b, True

    # -- prepacked GEMMs on the stored rows -----------------------------------------------------
    def slice_gemm(self, s: int) -> GemmFn:
        """GEMM on the contiguous rows ``rows[s:s+out]`` (prepacked on first use; the primary
        rows, ``s = 0``, at load)."""
        fn = self.packs.get(s)
        if fn is None:
            fn = self.packs[s] = self.gemm.prepack(self.rows[s : s + self.out_features])
        return fn

    def rows_gemm(self) -> GemmFn:
        """GEMM on every stored row at once, ``rows [R, in]`` (prepacked at load)."""
        if self.single_row:
            return self.slice_gemm(0)
        fn = self.packs.get("all")
        if fn is None:
            fn = self.packs["all"] = self.gemm.prepack(self.rows)
        return fn

    def select_masks(self) -> Optional[list[torch.Tensor]]:
        """For v1 groups only: per group g >= 1, ``[N, out]`` 1.0 where expert e's channel c is in
        group g, in the rows' dtype (``all_groups`` selects with them); None for a row table, or
        where a stray Inf from a group a token does not use could turn into NaN (float16): then
        the int64 gather is used."""
        if not self.lerp_select:
            return None
        m = self.packs.get("masks")
        if m is None:
            gi = self.row_index // max(1, self.out_features)
            m = self.packs["masks"] = [(gi == g).to(self.rows.dtype) for g in range(1, self.groups)]
        return m

    @property
    def lerp_select(self) -> bool:
        """Whether ``all_groups`` selects with masks (v1 groups, a dtype where that is exact and
        safe) rather than with an int64 gather (row tables; float16)."""
        return self.groups is not None and self.rows.dtype in (torch.float32, torch.bfloat16, torch.float64)

    def prepack(self) -> "LayerState":
        """Pack what every strategy may need, once, at load: all rows and the primary rows."""
        self.slice_gemm(0)
        self.rows_gemm()
        return self


def prepare_layer(
    weight: torch.Tensor,
    group_index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    cache: Optional["HotExpertCache"] = None,
    name: str = "",
    gemm: Optional[GemmFactory] = None,
) -> LayerState:
    """A format v1 layer (``weight [K, out, in]``, ``group_index [N, out]`` in ``[0, K)``,
    ``bias [K, out]``) as the row table it is (``R = K*out``, no copy): :func:`prepare_rows`."""
    if weight.dim() != 3:
        raise ValueError(f"{name or 'layer'}: weight must be [K, out, in], got {tuple(weight.shape)}")
    k, out, _ = weight.shape
    if group_index.dim() != 2 or group_index.shape[1] != out:
        raise ValueError(
            f"{name or 'layer'}: group_index must be [N, {out}], got {tuple(group_index.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (k, out):
        raise ValueError(f"{name or 'layer'}: bias must be [{k}, {out}], got {tuple(bias.shape)}")
    gi = group_index.to(device=weight.device, dtype=torch.long)
    if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= k):
        raise ValueError(f"{name or 'layer'}: group_index values must be in [0, {k})")
    weight = weight.contiguous()
    rows, row_index = from_groups(weight, gi)
    return prepare_rows(rows, row_index, None if bias is None else bias.contiguous().reshape(-1), out,
                        cache=cache, name=name, gemm=gemm, groups=k)


def prepare_rows(
    rows: torch.Tensor,
    row_index: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    *,
    cache: Optional["HotExpertCache"] = None,
    name: str = "",
    gemm: Optional[GemmFactory] = None,
    groups: Optional[int] = None,
) -> LayerState:
    """Validate a row-table layer and precompute its index tables (call once, at load).

    ``rows [R, in]``, ``row_index [N, out]`` with values in ``[0, R)``, ``bias [R]`` (optional).
    ``groups``: K when the rows are K whole groups of ``out`` rows (v1), for the mask select.
    Index tables go to the rows' device. ``gemm`` (default: plain ``F.linear``) prepacks the
    all-rows and primary-rows weights here, once; other slices when a strategy first needs
    them, hot-cache copies when admitted.
    """
    where = name or "layer"
    if rows.dim() != 2 or rows.shape[0] < out_features:
        raise ValueError(f"{where}: rows must be [R >= {out_features}, in], got {tuple(rows.shape)}")
    if row_index.dim() != 2 or row_index.shape[1] != out_features:
        raise ValueError(f"{where}: row_index must be [N, {out_features}], got {tuple(row_index.shape)}")
    r = rows.shape[0]
    if bias is not None and tuple(bias.shape) != (r,):
        raise ValueError(f"{where}: bias must be [{r}], got {tuple(bias.shape)}")
    rows = rows.contiguous()
    bias = None if bias is None else bias.contiguous()
    dev = rows.device
    idx = row_index.to(device=dev, dtype=torch.long).contiguous()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= r):
        raise ValueError(f"{where}: row_index values must be in [0, {r})")
    out = out_features
    chan = torch.arange(out, device=dev)
    n = idx.shape[0]
    offs = idx - chan  # constant s per expert iff it uses the contiguous rows [s, s+out)
    omin = offs.min(dim=1).values.tolist() if out else [0] * n
    omax = offs.max(dim=1).values.tolist() if out else [0] * n
    uniform = [a if a == b else -1 for a, b in zip(omin, omax)]
    res_rows, res_flat, res_frac = [], [], []
    for e in range(n):  # once per layer at load, over experts (not tokens)
        rr = torch.nonzero(idx[e] != chan).flatten()
        res_rows.append(rr)
        res_flat.append(idx[e].index_select(0, rr))
        res_frac.append(rr.numel() / out if out else 0.0)
    st = LayerState(rows, idx, bias, out, groups, uniform, res_rows, res_flat, res_frac, cache, name,
                    gemm=gemm or TORCH_GEMM)
    return st.prepack()


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
    An admitted copy is prepacked once with the layer's :class:`GemmFactory`; when that holds
    its own copy of the weight (vLLM's oneDNN on CPU), only the packed one is kept, so an entry
    costs one dense layer's bytes either way.
    """

    def __init__(self, budget_bytes: int, decay: float = 0.9) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = int(budget_bytes)
        self.decay = float(decay)
        self.hotness: dict[int, float] = {}
        # (layer uid, expert) -> (plain weight or None, bias, bytes, prepacked GEMM)
        self._entries: dict[tuple[int, int], tuple[Optional[torch.Tensor], Optional[torch.Tensor], int, GemmFn]] = {}
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
        return state.uniform_offset[expert] >= 0 or (state.uid, expert) in self._entries

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
        fn, b, w = self._lookup(state, expert, admit)
        return (w if w is not None else state.expert_weight(expert)[0]), b

    def get_gemm(self, state: LayerState, expert: int, admit: bool = True) -> tuple[GemmFn, Optional[torch.Tensor]]:
        """Expert's dense GEMM and bias: a cached copy's prepacked GEMM (hit), one group's
        prepacked GEMM (an expert in one group), else the per-call GEMM on a fresh gather (miss),
        which is kept and prepacked if ``admit`` and the budget allows."""
        fn, b, _ = self._lookup(state, expert, admit)
        return fn, b

    def _lookup(self, state: LayerState, expert: int, admit: bool):
        self._tick += 1
        key = (state.uid, expert)
        ent = self._entries.get(key)
        if ent is not None:
            self.stats.hits += 1
            self._last_use[key] = self._tick
            return ent[3], ent[1], ent[0]
        s = state.uniform_offset[expert]
        if s >= 0:  # a view of contiguous rows (v1: one group): as good as a hit, costs nothing
            self.stats.hits += 1
            return state.slice_gemm(s), state.slice_bias(s), state.rows[s : s + state.out_features]
        w, b, _ = state.expert_weight(expert)
        self.stats.misses += 1
        if admit:
            ent = self._admit(key, w, b, state.dense_bytes, state.gemm)
            if ent is not None:
                return ent[3], ent[1], w
        return state.gemm.per_call(w), b, w

    def _admit(self, key: tuple[int, int], w: torch.Tensor, b: Optional[torch.Tensor], size: int,
               gemm: GemmFactory = TORCH_GEMM):
        """Keep (and prepack) a gathered copy if the budget allows; returns the entry or None."""
        if size > self.budget_bytes:
            self.stats.rejections += 1
            return None
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
                return None
            for v in chosen:
                self.stats.bytes_used -= self._entries.pop(v)[2]
                self._last_use.pop(v, None)
                self.stats.evictions += 1
        fn = gemm.prepack(w)
        ent = self._entries[key] = (None if getattr(fn, "copies", False) else w, b, size, fn)
        self._last_use[key] = self._tick
        self.stats.bytes_used += size
        self.stats.admissions += 1
        return ent


# --------------------------------------------------------------------------------------------
# Strategies: all take (x [T, in], state, batch) and return [T, out]
# --------------------------------------------------------------------------------------------


def _flat2d(x: torch.Tensor, state: LayerState) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, state.in_features)


def dense(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """One prepacked GEMM for K == 1 or a one-expert batch whose rows are contiguous (v1: one
    group; v2: the primary rows)."""
    e = batch.single_expert if batch.single_expert is not None else 0
    if not state.single_row and batch.num_present > 1:
        raise ValueError("dense strategy needs K == 1 or a single-expert batch")
    s = 0 if state.single_row else state.uniform_offset[e]
    if s < 0:
        raise ValueError(f"dense strategy: expert {e} mixes groups; use hot_cache or a gather")
    return state.slice_gemm(s)(_flat2d(x, state), state.slice_bias(s))


def all_groups(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """One GEMM against every stored row (prepacked ``[R, in]``: v1's K groups, or v2's primary
    rows followed by the extra rows), then pick each (token, channel)'s row.

    Reads the weights once; R/out x the FLOPs and output of a dense layer (1 + extra/out for a
    row table: it pays only for the rows that exist). Best for decode.
    """
    x2 = _flat2d(x, state)
    if state.single_row:
        return state.rows_gemm()(x2, state.bias)
    # [T, R], bias folded in, into a buffer the step's layers share (read only below): a
    # fresh allocation per layer costs as much as the select on decode-sized batches
    shape = (x2.shape[0], state.num_rows)
    y_all = batch.scratch(("all_groups", shape, x2.dtype), lambda: x2.new_empty(shape))
    state.rows_gemm()(x2, state.bias, out=y_all)
    masks = state.select_masks()
    if masks is None:
        if row_select(batch, state, state.cost_model)[0] == "runs":
            return _select_by_runs(y_all, state, batch)
        sel = state.row_index.index_select(0, batch.expert_ids)  # [T, out] columns of y_all
        return _bits(y_all).gather(1, sel).view(y_all.dtype)
    k = state.groups
    # lerp(a, b, w) is exactly a at w = 0 and exactly b at w = 1 (torch computes b - (b-a)*(1-w)
    # for w >= 0.5), and reads a [T, out] mask in the activations' dtype instead of an int64
    # index: 1.5-3x cheaper than the gather at prefill sizes.
    y3 = y_all.view(-1, k, state.out_features)
    y = y3[:, 0]
    for g in range(1, k):
        y = torch.lerp(y, y3[:, g], masks[g - 1].index_select(0, batch.expert_ids))
    return y


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A 2-byte float tensor as int16 (the same bytes): a select only copies bits, and torch's
    gather / scatter are 1.3-1.5x faster on int16 than on bfloat16 / float16 on CPU."""
    return t.view(torch.int16) if t.is_floating_point() and t.element_size() == 2 else t


def row_select(batch: ExpertBatch, state: LayerState, cost: "CostModel") -> tuple[str, float]:
    """How ``all_groups`` picks each (token, channel)'s row when it cannot use masks (row tables,
    float16), and that select's cost (in dense weight passes, see :class:`CostModel`):

    - ``gather``: one gather of every output element by a ``[T, out]`` int64 index;
    - ``runs``: copy every token's primary columns, then per run of one expert gather only the
      channels where that expert leaves its primary row (``residual_fraction``): far fewer
      elements through the slow indexed path when runs are long (prefill) and residuals few.
    The cheaper by the cost model; ``gather`` on a tie (the AVX2 calibration models neither).
    """
    t = batch.num_tokens
    per_in = 1.0 / max(1, state.in_features)
    gather = cost.select_gather * t * per_in
    if t < RUN_MIN_MEAN_LENGTH * len(batch.runs):
        return "gather", gather
    resid = sum(state.residual_fraction[e] * n for e, _, n in batch.runs)
    runs = (cost.select_copy * t + cost.select_residual * resid) * per_in
    return ("runs", runs) if runs < gather else ("gather", gather)


def _select_by_runs(y_all: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """``row_select``'s ``runs``: the primary columns ``y_all[:, :out]`` for every token, then for
    each run of expert ``e`` its residual channels from the rows it uses there."""
    y = y_all[:, : state.out_features].contiguous()  # a fresh tensor: y_all is step scratch
    yb, ab = _bits(y), _bits(y_all)
    for e, s, n in batch.runs:
        cols = state.residual_rows[e]
        k = cols.numel()
        if k:
            got = ab[s : s + n].gather(1, state.residual_flat[e].expand(n, k))
            yb[s : s + n].scatter_(1, cols.expand(n, k), got)
    return y


def per_expert_gather(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """Gather each present expert's dense rows (precomputed flat indices); one GEMM per expert
    segment of the expert-sorted batch. Best for prefill. Does not touch the hot cache.
    An expert whose channels all sit in one group uses that group's prepacked GEMM; a gathered
    weight exists for this call only and takes the factory's per-call GEMM."""
    return _per_expert(x, state, batch, use_cache=False)


def hot_cache(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """Per-expert GEMMs on dense copies from the hot-expert cache, prepacked when admitted (one
    GEMM for a single-expert batch). Without a cache this is ``per_expert_gather``."""
    return _per_expert(x, state, batch, use_cache=state.cache is not None)


# Mean rows per run of one expert from which the per-expert strategies compute each run in
# place instead of sorting the rows by expert and back (two copies of the activations).
RUN_MIN_MEAN_LENGTH = 16


def _per_expert(x: torch.Tensor, state: LayerState, batch: ExpertBatch, use_cache: bool) -> torch.Tensor:
    x2 = _flat2d(x, state)
    cache = state.cache if use_cache else None
    if cache is not None:
        cache.observe(batch)

    def gemm(e: int) -> tuple[GemmFn, Optional[torch.Tensor]]:
        if cache is not None:
            return cache.get_gemm(state, e)
        s = state.uniform_offset[e]
        if s >= 0:
            return state.slice_gemm(s), state.slice_bias(s)
        w, b, _ = state.expert_weight(e)
        return state.gemm.per_call(w), b

    if batch.num_present <= 1:
        if batch.num_present == 0:
            return x2.new_empty((0, state.out_features))
        fn, b = gemm(batch.experts[0])
        return fn(x2, b)
    if batch.num_tokens >= RUN_MIN_MEAN_LENGTH * len(batch.runs):
        # long runs of one expert (prefill): GEMMs on row slices, in place, no sorting
        y = x2.new_empty((x2.shape[0], state.out_features))
        got: dict[int, tuple[GemmFn, Optional[torch.Tensor]]] = {}
        for e, s, n in batch.runs:
            fb = got.get(e)
            if fb is None:
                fb = got[e] = gemm(e)
            fb[0](x2[s : s + n], fb[1], out=y[s : s + n])
        return y
    xs = x2.index_select(0, batch.order)
    ys = x2.new_empty((x2.shape[0], state.out_features))
    for e, s, n in zip(batch.experts, batch.offsets, batch.counts):  # loop over experts only
        fn, b = gemm(e)
        fn(xs[s : s + n], b, out=ys[s : s + n])
    # back to row order: a gather of rows by the inverse permutation (several times faster
    # than index_copy_ on CPU, which scatters element by element)
    return ys.index_select(0, batch.inverse_order)


def majority_residual(x: torch.Tensor, state: LayerState, batch: ExpertBatch) -> torch.Tensor:
    """Dense GEMM with the primary rows (v1's group 0; prepacked) for every token, then per
    expert only its other rows (gathered per call: the factory's ``per_call`` GEMM).

    Cost ~ (1 + residual fraction) dense layers when the groups are lopsided.
    """
    x2 = _flat2d(x, state)
    y = state.slice_gemm(0)(x2, state.slice_bias(0))
    if state.single_row or batch.num_tokens == 0:
        return y
    wf, bf = state.rows, state.bias
    for e, seg in zip(batch.experts, batch.segments):
        rows = state.residual_rows[e]
        if rows.numel() == 0:
            continue
        idx = state.residual_flat[e]
        xe = x2 if batch.num_present == 1 else x2.index_select(0, seg)
        ye = state.gemm.per_call(wf.index_select(0, idx))(xe, None if bf is None else bf.index_select(0, idx))
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

    ``packed``: cost of a GEMM on a prepacked weight (the all-groups and group weights, hot-cache
    copies: :class:`GemmFactory`) relative to the plain ``F.linear`` a per-call gather gets; 1
    where both are the same kernel (the plain factory, AVX2 hosts), below 1 where vLLM's
    prepacked CPU GEMM is faster (see :func:`prepacked_cpu_cost`); ``packed_per_token``: its own
    slope where measured (:meth:`packed_gemm`). ``source``: ``table`` or ``measured``
    (:mod:`~vllm_channelmerge.costfit`, the vLLM backend's default on CPU).
    ``select`` / ``scatter``: cost of picking one output element of ``all_groups`` (per group
    beyond the first, with masks) / writing one residual element of ``majority_residual``, in
    units of one weight element's pass (0: not modelled, as in the AVX2 calibration); they weigh
    at prefill sizes. ``select_gather``: the same for ``all_groups``' int64 gather (row tables,
    float16), per output element; ``select_copy`` / ``select_residual``: its select by runs
    (:func:`row_select`), per output element copied / per residual element gathered.
    """

    flop_per_token: float = 0.12
    gather: float = 1.6
    launch_us: float = 10.0
    bytes_per_us: float = 14e3
    triton_max_tokens_per_expert: int = 64
    packed: float = 1.0
    select: float = 0.0
    scatter: float = 0.0
    select_gather: float = 0.0
    select_copy: float = 0.0
    select_residual: float = 0.0
    packed_per_token: Optional[float] = None
    source: str = "table"

    def packed_gemm(self, n: int) -> float:
        """A prepacked GEMM of ``n`` tokens: ``packed * (1 + flop_per_token * n)``, or
        ``packed + packed_per_token * n`` where the slope was measured on its own
        (:mod:`~vllm_channelmerge.costfit`: where the prepacked kernel computes faster or
        slower per token than the per-call one)."""
        if self.packed_per_token is None:
            return self.packed * (1.0 + self.flop_per_token * n)
        return self.packed + self.packed_per_token * n

    def summary(self) -> str:
        """One line for logs and benchmark tables."""
        slope = self.packed * self.flop_per_token if self.packed_per_token is None else self.packed_per_token
        return (f"{self.source}: +{self.flop_per_token:.4f} a token; prepacked {self.packed:.2f}x a pass, "
                f"+{slope:.4f} a token; a gather {self.gather:.2f} passes")

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


def prepacked_cpu_cost(dtype: torch.dtype, flags: Optional[dict[str, bool]] = None) -> CostModel:
    """Cost constants when the prepacked GEMMs run vLLM's CPU GEMM (oneDNN), by host kind.

    AVX2 hosts: oneDNN matched ``F.linear`` there, so the defaults hold. AVX-512 hosts: float32,
    and bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX), as measured with
    benchmarks/kernels_cpu.py (SmolLM2-135M layer shapes, 1 thread; units: one plain
    ``F.linear`` pass over the dense weight). float16 keeps the defaults: without AMX-FP16
    it is compute-bound like the AVX2 float32 they were measured on, and oneDNN was no faster
    than ``F.linear`` for it there.
    """
    f = flags if flags is not None else cpu_flags()
    if not f.get("avx512f"):
        return DEFAULT_COST
    if dtype == torch.bfloat16 and not (f.get("avx512_bf16") or f.get("amx_bf16")):
        return DEFAULT_COST
    return _AVX512_COST.get(dtype, DEFAULT_COST)


_AVX512_COST = {
    # F.linear T=1 ~1.0 ms per SmolLM2 layer (4 linears); +3.6% a token; oneDNN ~0.9x of it;
    # a gather ~2.2 passes; the lerp select ~2.9, a residual scatter ~22 weight elements each.
    # The gather select of a row table (kernels_cpu.py --split 0.5): ~7 weight elements' time;
    # by runs (T=512, 4 runs, residual fraction 0.19; relative to the gather in the same run):
    # a copied element ~1.2, a residual element ~19.
    torch.float32: CostModel(flop_per_token=0.036, gather=2.2, launch_us=10.0, bytes_per_us=14e3, packed=0.9,
                             select=2.9, scatter=22.0, select_gather=7.0, select_copy=1.2, select_residual=19.0),
    # bf16: F.linear T=1 ~1.0 ms too (no faster than float32 at decode), +0.74% a token;
    # vLLM's oneDNN / AMX GEMM ~0.72x of it; a gather ~0.84 passes. Selects on int16 bits:
    # the gather ~7.7 weight elements' time, by runs a copied element ~0.7, a residual one ~12.5.
    torch.bfloat16: CostModel(flop_per_token=0.0074, gather=0.84, launch_us=10.0, bytes_per_us=7.2e3, packed=0.72,
                              select=2.0, scatter=23.0, select_gather=7.7, select_copy=0.7, select_residual=12.5),
}


def strategy_costs(
    batch: ExpertBatch, state: LayerState, cost: Optional[CostModel] = None
) -> dict[str, float]:
    """Estimated cost of each applicable strategy (see :class:`CostModel` for the units).

    dense(t)          = 1 + a*t      (the per-call GEMM; a = flop_per_token, L = launch)
    packed(t)         = p * dense(t), or p + a_p*t          (p = packed: a prepacked weight;
                                                            a_p = packed_per_token, measured)
    all_groups        = K * packed(T) + L + (K - 1) * select * T / in   (K = rows / out; masks)
                        K * packed(T) + L + select_gather * T / in       (an int64 gather)
                        K * packed(T) + L + (select_copy * T + select_residual * sum_e r_e * t_e) / in
                                                                         (by runs: row_select)
    per_expert_gather = sum_e [gather_e + dense(t_e) + L]; a one-group expert: packed(t_e) + L
    hot_cache         = per_expert_gather with packed(t_e) + L for experts already cached
    majority_residual = packed(T) + L + sum_e [r_e * (gather + dense(t_e) + scatter * t_e / in) + L]
                        (experts with r_e > 0)
    """
    cost = cost or state.cost_model
    a, k, t = cost.flop_per_token, state.row_ratio, batch.num_tokens
    lc = cost.launch(state)
    per_in = 1.0 / max(1, state.in_features)

    def d(n: int) -> float:
        return 1.0 + a * n

    select = (k - 1) * cost.select * t * per_in if state.lerp_select else row_select(batch, state, cost)[1]
    pk = cost.packed_gemm
    costs: dict[str, float] = {"all_groups": k * pk(t) + lc + select}
    pe = hc = mr = 0.0
    for e, n in zip(batch.experts, batch.counts):
        plain = cost.gather + d(n) + lc
        packed = pk(n) + lc
        uni = state.uniform_offset[e] >= 0
        pe += packed if uni else plain
        cached = uni or (state.cache is not None and state.cache.contains(state, e))
        hc += packed if cached else plain
        r = state.residual_fraction[e]
        if r > 0:
            mr += r * (cost.gather + d(n) + cost.scatter * n * per_in) + lc
    if state.cache is not None:  # before per_expert_gather: on a tie it also keeps the copies
        costs["hot_cache"] = hc
    costs["per_expert_gather"] = pe
    costs["majority_residual"] = pk(t) + lc + mr
    return costs


def choose_strategy(
    batch: ExpertBatch, layer_meta: LayerState, x: Optional[torch.Tensor] = None, cost: Optional[CostModel] = None
) -> str:
    """Pick a strategy from the batch composition (a cheap rule, no timing).

    1. K == 1, or one expert whose rows are contiguous (one group; the primary rows) -> ``dense``.
    2. One expert with a hot cache that holds it or would admit it -> ``hot_cache`` (hits are
       one prepacked GEMM; a miss gathers once and keeps the copy, so the next steps hit).
    3. CUDA with Triton and a mixed decode batch (<= 64 tokens per expert) -> ``triton``.
    4. Otherwise the cheapest by :func:`strategy_costs` (ties: the earlier in the list).
    """
    st = layer_meta
    cost = cost or st.cost_model
    if batch.num_tokens == 0 or st.single_row:
        return "dense"
    single = batch.single_expert
    if single is not None and st.uniform_offset[single] >= 0:
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
    rows: torch.Tensor,
    row_index: torch.Tensor,
    expert_ids: torch.Tensor,
) -> torch.Tensor:
    """Per-token embedding with the token's expert: ``rows[row_index[e, tok]]``.

    Here the channels are vocabulary entries (``rows [R, H]``, ``row_index [N, V]``; a v1
    table ``[K, V, H]`` is the row table :func:`~vllm_channelmerge.rowtable.from_groups` makes of
    it), so the lookup is two gathers and never touches rows the batch does not use.
    ``token_ids`` and ``expert_ids`` have the same shape.
    """
    tok = token_ids.long()
    if rows.shape[0] == row_index.shape[1]:  # one row per token: every expert's table is rows
        return F.embedding(tok, rows)
    return F.embedding(row_index[expert_ids.long(), tok], rows)
