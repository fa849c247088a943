"""Merging under a memory budget: how many rows (1..K) each output channel gets.

A merge with `budget` (stored parameters / the ensemble's) or `budget_bytes` writes format v2,
a row table (docs/format.md): channel `c` of a tensor stores as many rows as the groups of its
chosen partition, and the rows beyond the first go where they remove the most error.

1. A first streaming pass (`merge_tool.merge.measure_rows`) gives, per channel-merged tensor,
   a `Curve`: for every channel and every k in 1..K, the error of the best k-group partition
   (the same partition the write pass then uses) and the groups it really uses (identical
   experts may leave fewer than k). The error is the criterion's measure: `weight` (the
   squared weight error of the in-group average against each expert, summed over experts),
   `method` (the same after the configured in-group method: TIES' trimmed rows, say) or
   `activation` (the method's rows again, their error measured on the layer's output over
   calibration inputs, ||(m - w_n) X^T||², `merge_tool.calibration`).
   A `_relative` criterion divides each tensor's errors by its total error with one row per
   channel, so that tensors of different scale (norms folded into q/k/v and gate/up, say)
   compete on the share of their own error a row removes.
2. `allocate` turns the curves into a per-channel choice of k under the budget. Each channel's
   curve (rows, error) is reduced to its lower convex hull, so that its steps (one or more
   rows) have non-increasing error removed per stored parameter; all steps of all tensors are
   then taken greedily by that ratio (a stable sort: a channel's k-th row always after its
   (k-1)-th) while the budget allows, and the last few that still fit are added. A
   `_per_tensor` criterion instead gives every tensor the same share of its possible extra rows,
   spent inside the tensor by the same ratio.

The module is pure arithmetic on the curves (unit-tested against brute force); the plan
(`merge_tool.plan`) turns the choice into output shapes.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

# A criterion is what an extra row must reduce (the measure) and how rows are shared out:
# `weight` (squared weight error of the in-group average), `method` (the same after the
# configured in-group method), `activation` (the method's output error on calibration inputs,
# `merge_tool.calibration`); then globally (no suffix), `_relative` or `_per_tensor`.
MEASURES = ("weight", "method", "activation")
SHARING = ("", "_relative", "_per_tensor")
CRITERIA = tuple(m + s for m in MEASURES for s in SHARING)


def measure_of(criterion: str) -> str:
    """The error a criterion measures: weight, method or activation."""
    return criterion.removesuffix("_per_tensor").removesuffix("_relative")


@dataclass
class Curve:
    """One channel tensor's options: k = 1..K per channel, from the measuring pass."""

    name: str
    error: torch.Tensor  # [out, K] float64: the criterion's error of the best k-group partition
    groups: torch.Tensor  # [out, K] int64: groups that partition really uses (rows stored), <= k
    row_cost: float  # budget units per stored row (params: in (+1 bias); bytes: that x dtype size)
    partitions: Optional[torch.Tensor] = None  # [out, K, N] int8: the partitions (for the write pass)

    @property
    def channels(self) -> int:
        return int(self.error.shape[0])


@dataclass
class TensorRows:
    """The outcome for one channel tensor: each channel's partition (k) and its rows."""

    name: str
    k: torch.Tensor  # [out] int64: the k whose best partition the channel uses (1..K)
    rows: torch.Tensor  # [out] int64: rows stored for the channel (its partition's groups)
    cap: int  # K of the tensor (the most rows a channel may get)
    err_one: float = 0.0  # the criterion's error with one row per channel
    err_chosen: float = 0.0  # ... with the chosen rows
    err_full: float = 0.0  # ... with K rows everywhere (the v1 merge)
    partition: Optional[torch.Tensor] = None  # [out, N] int8: each channel's chosen partition, if measured

    @property
    def extra_rows(self) -> int:
        return int(self.rows.sum()) - int(self.rows.numel())

    def histogram(self) -> list[int]:
        """Channels with 1, 2, ..., cap rows."""
        return torch.bincount(self.rows, minlength=self.cap + 1)[1:self.cap + 1].tolist()

    @classmethod
    def single(cls, name: str, out: int, cap: int = 1) -> "TensorRows":
        """Every channel one row (stored once, excluded, or K=1)."""
        one = torch.ones(out, dtype=torch.int64)
        return cls(name, one, one.clone(), cap)


@dataclass
class Allocation:
    """The per-channel rows of every channel tensor and what the budget asked for."""

    tensors: dict[str, TensorRows]
    criterion: str
    requested: dict[str, Any]  # {"params_ratio": 0.35} or {"bytes": 24000000000}
    stats: dict[str, Any] = field(default_factory=dict)  # filled by the plan (achieved ratio, bytes)
    calibration: Optional[dict[str, Any]] = None  # activation criteria: {"file", "texts", "tokens"}

    @property
    def error_removed(self) -> Optional[float]:
        """Share of the error between one row everywhere and K rows everywhere that the chosen
        rows remove (None: nothing to remove)."""
        return removed_share(self.tensors.values())


def removed_share(tensors: Any) -> Optional[float]:
    e1 = sum(t.err_one for t in tensors)
    ec = sum(t.err_chosen for t in tensors)
    ek = sum(t.err_full for t in tensors)
    return (e1 - ec) / (e1 - ek) if e1 - ek > 0 else None


# -- per-channel steps: the lower convex hull of (rows, error) -------------------------------------


@dataclass
class Steps:
    """A tensor's hull steps, [out, S] each: from one chosen k to the next along the hull."""

    target: torch.Tensor  # int64: option index (k - 1) reached by the step; -1: no step
    rows: torch.Tensor  # int64: extra rows the step adds
    gain: torch.Tensor  # float64: error it removes

    @property
    def valid(self) -> torch.Tensor:
        return self.target >= 0


def hull_steps(error: torch.Tensor, groups: torch.Tensor) -> Steps:
    """Steps along each channel's lower convex hull of its options (rows = groups, error).

    From the current option (k=1 first) the next is the one with more rows and less error that
    removes the most error per row (ties: fewer rows), so the steps' gain per row never grows
    along a channel. Options that remove nothing are never reached.
    """
    c, kk = error.shape
    e, g = error.to(torch.float64), groups.to(torch.int64)
    ar = torch.arange(c)
    cur = torch.zeros(c, dtype=torch.int64)
    target = torch.full((c, max(1, kk - 1)), -1, dtype=torch.int64)
    rows = torch.zeros_like(target)
    gain = torch.zeros(target.shape, dtype=torch.float64)
    for s in range(kk - 1):
        e_cur, g_cur = e[ar, cur].unsqueeze(1), g[ar, cur].unsqueeze(1)
        dr = g - g_cur
        de = e_cur - e
        ok = (dr > 0) & (de > 0)
        slope = torch.where(ok, de / dr.clamp_min(1), torch.full_like(de, -math.inf))
        best = slope.max(1, keepdim=True).values
        # ties: fewest rows (then lowest k)
        cand = ok & (slope == best)
        key = torch.where(cand, g * kk + torch.arange(kk), torch.full_like(g, 1 << 40))
        nxt = key.argmin(1)
        has = cand.any(1)
        if not bool(has.any()):
            break
        target[has, s] = nxt[has]
        rows[has, s] = (g[ar, nxt] - g[ar, cur])[has]
        gain[has, s] = (e[ar, cur] - e[ar, nxt])[has]
        cur = torch.where(has, nxt, cur)
    return Steps(target, rows, gain)


# -- the greedy allocation --------------------------------------------------------------------------


def allocate(curves: list[Curve], available: float, criterion: str = "weight") -> dict[str, torch.Tensor]:
    """Chosen k per channel ([out] int64, 1..K) for every curve, adding at most `available`
    budget units (on top of one row per channel)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown budget criterion {criterion!r}; allowed: {', '.join(CRITERIA)}")
    if criterion.endswith("_relative"):
        curves = [relative(cv) for cv in curves]
    steps = [hull_steps(cv.error, cv.groups) for cv in curves]
    if criterion.endswith("_per_tensor"):
        taken = _per_tensor_share(curves, steps, available)
    else:
        taken = _global_greedy(curves, steps, available)
    return {cv.name: _choice(st, tk) for cv, st, tk in zip(curves, steps, taken)}


def relative(cv: Curve) -> Curve:
    """The curve with its errors divided by the tensor's total error at one row per channel."""
    total = float(cv.error[:, 0].sum())
    return Curve(cv.name, cv.error / total if total > 0 else cv.error, cv.groups, cv.row_cost)


def _choice(st: Steps, taken: torch.Tensor) -> torch.Tensor:
    """k per channel from its taken steps [out, S] (a prefix of each channel's steps)."""
    n_taken = taken.sum(1)
    last = (n_taken - 1).clamp_min(0)
    opt = st.target.gather(1, last.unsqueeze(1)).squeeze(1)
    return torch.where(n_taken > 0, opt, torch.zeros_like(opt)) + 1


def _flat(curves: list[Curve], steps: list[Steps]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All valid steps of all tensors in (tensor, channel, step) order: (ratio, cost, flat
    position in the concatenated [out*S] grids, first step of its channel?)."""
    ratios, costs, pos, first = [], [], [], []
    offset = 0
    for cv, st in zip(curves, steps):
        v = st.valid.reshape(-1)
        cost = (st.rows.to(torch.float64) * cv.row_cost).reshape(-1)
        ratio = st.gain.reshape(-1) / cost.clamp_min(1e-300)
        idx = torch.nonzero(v).flatten()
        ratios.append(ratio[idx])
        costs.append(cost[idx])
        pos.append(idx + offset)
        first.append(idx % st.target.shape[1] == 0)
        offset += v.numel()
    cat = (lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt))
    return cat(ratios, torch.float64), cat(costs, torch.float64), cat(pos, torch.int64), cat(first, torch.bool)


def _split_taken(curves: list[Curve], steps: list[Steps], taken_flat: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for st in steps:
        n = st.target.numel()
        out.append(taken_flat[offset:offset + n].view(st.target.shape))
        offset += n
    return out


def _global_greedy(curves: list[Curve], steps: list[Steps], available: float) -> list[torch.Tensor]:
    """The steps by error removed per budget unit, best first, while they fit; then those of
    the rest that still fit (in the same order, a channel's steps in order)."""
    ratio, cost, pos, first = _flat(curves, steps)
    total = sum(st.target.numel() for st in steps)
    taken = torch.zeros(total, dtype=torch.bool)
    if ratio.numel() == 0 or available <= 0:
        return _split_taken(curves, steps, taken)
    order = torch.sort(ratio, descending=True, stable=True).indices
    cum = torch.cumsum(cost[order], 0)
    n = int(torch.searchsorted(cum, torch.tensor([available], dtype=torch.float64), right=True))
    taken[pos[order[:n]]] = True
    left = available - (float(cum[n - 1]) if n else 0.0)
    rest = order[n:]
    while rest.numel():
        # a step fits if it costs at most what is left and its channel's previous step is taken
        prev_ok = first[rest] | taken[(pos[rest] - 1).clamp_min(0)]
        fits = (cost[rest] <= left) & prev_ok
        hit = torch.nonzero(fits).flatten()
        if hit.numel() == 0:
            break
        i = rest[int(hit[0])]
        taken[pos[i]] = True
        left -= float(cost[i])
        rest = rest[int(hit[0]) + 1:]
    return _split_taken(curves, steps, taken)


def _per_tensor_share(curves: list[Curve], steps: list[Steps], available: float) -> list[torch.Tensor]:
    """The same share s of its possible extra rows in every tensor (the largest s whose cost
    fits), spent inside each tensor by error removed per row."""
    per: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (flat pos in order, cum rows, total rows)
    for st in steps:
        v = st.valid.reshape(-1)
        idx = torch.nonzero(v).flatten()
        r = st.rows.reshape(-1)[idx]
        ratio = st.gain.reshape(-1)[idx] / r.to(torch.float64)
        order = torch.sort(ratio, descending=True, stable=True).indices
        per.append((idx[order], torch.cumsum(r[order], 0), r.sum()))

    def counts(s: float) -> list[int]:
        out = []
        for _, cum, tot in per:
            allowed = math.floor(s * int(tot) + 1e-9)
            out.append(int(torch.searchsorted(cum, torch.tensor([allowed]), right=True)) if cum.numel() else 0)
        return out

    def cost(ns: list[int]) -> float:
        return sum(float(cum[n - 1]) * cv.row_cost for (_, cum, _), cv, n in zip(per, curves, ns) if n)

    lo, hi = 0.0, 1.0
    if cost(counts(1.0)) <= available:
        lo = 1.0
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if cost(counts(mid)) <= available:
                lo = mid
            else:
                hi = mid
    out = []
    for (idx, _, _), st, n in zip(per, steps, counts(lo)):
        t = torch.zeros(st.target.numel(), dtype=torch.bool)
        t[idx[:n]] = True
        out.append(t.view(st.target.shape))
    return out


def tensor_rows(curve: Curve, k: torch.Tensor, cap: int) -> TensorRows:
    """The outcome of one tensor: its chosen k, the rows they store and the errors."""
    ar = torch.arange(curve.channels)
    sel = (k - 1).clamp(0, curve.error.shape[1] - 1)
    return TensorRows(curve.name, k.clone(), curve.groups[ar, sel].to(torch.int64), cap,
                      float(curve.error[:, 0].sum()), float(curve.error[ar, sel].sum()),
                      float(curve.error[:, -1].sum()),
                      None if curve.partitions is None else curve.partitions[ar, sel])


# -- describing it: per tensor kind and per layer ----------------------------------------------------


def kind_of(tensor_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `q_proj`; `lm_head.weight` -> `lm_head`."""
    return tensor_name.rsplit(".", 2)[-2] if tensor_name.count(".") >= 1 else tensor_name


def layer_of(tensor_name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `model.layers.3`; other tensors -> their module."""
    if tensor_name.startswith("model.layers."):
        return ".".join(tensor_name.split(".")[:3])
    return tensor_name.rsplit(".", 1)[0]


def layer_key(layer: str) -> tuple[int, list[Any]]:
    """Model order: embeddings, layers by number (10 after 9), other modules, lm_head."""
    rank = (0 if layer.startswith("model.embed_tokens") else 1 if layer.startswith("model.layers.")
            else 3 if layer.startswith("lm_head") else 2)
    return rank, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", layer)]


_KIND_ORDER = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def summary(alloc: Allocation, key: str) -> list[dict[str, Any]]:
    """One row per tensor kind (`key="kind"`) or layer (`"layer"`), in model order: channels,
    channels with 1..K rows, extra rows, and the share of the error removed."""
    cap = max([t.cap for t in alloc.tensors.values()] + [1])
    groups: dict[str, list[TensorRows]] = {}
    for name, t in alloc.tensors.items():
        groups.setdefault(kind_of(name) if key == "kind" else layer_of(name), []).append(t)
    if key == "kind":
        order = sorted(groups, key=lambda g: (_KIND_ORDER.index(g) if g in _KIND_ORDER else len(_KIND_ORDER), g))
    else:
        order = sorted(groups, key=layer_key)
    rows = []
    for g in order:
        ts = groups[g]
        hist = [0] * cap
        for t in ts:
            for i, v in enumerate(t.histogram()):
                hist[i] += v
        rows.append({key: g, "channels": sum(int(t.rows.numel()) for t in ts), "rows": hist,
                     "extra_rows": sum(t.extra_rows for t in ts), "error_removed": removed_share(ts)})
    return rows


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(rows: list[dict[str, Any]], key: str, cap: int) -> list[str]:
    """The table of `summary` rows (with a total row)."""
    width = max([len(key)] + [len(r[key]) for r in rows] + [5])
    heads = [f"{i} row{'s' if i > 1 else ''}" for i in range(1, cap + 1)]
    head = (f"{key:<{width}}  {'channels':>9}  " + "  ".join(f"{h:>8}" for h in heads)
            + f"  {'extra rows':>10}  {'error removed':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r[key]:<{width}}  {r['channels']:>9,}  " + "  ".join(f"{v:>8,}" for v in r["rows"])
                     + f"  {r['extra_rows']:>10,}  {pct(r['error_removed']):>13}")
    return lines


def format_allocation(alloc: Allocation, human_bytes: Any) -> list[str]:
    """The allocation as printed by `channelmerge merge` (and `--dry-run`), the model card's
    source: the request, per kind and per layer tables, and the totals."""
    st = alloc.stats
    req = (f"params_ratio {alloc.requested['params_ratio']}" if "params_ratio" in alloc.requested
           else f"{alloc.requested['bytes']:,} bytes")
    cap = max([t.cap for t in alloc.tensors.values()] + [1])
    lines = [f"row allocation (format v2): budget {req}, criterion {alloc.criterion}", ""]
    lines += format_summary(summary(alloc, "kind"), "kind", cap) + [""]
    lines += format_summary(summary(alloc, "layer"), "layer", cap) + [""]
    lines.append(f"error removed: {pct(alloc.error_removed)} of the error between 1 row and K rows per channel "
                 f"(criterion {alloc.criterion})")
    if alloc.calibration:
        c = alloc.calibration
        lines.append(f"calibration: {c['texts']} texts, {c['tokens']:,} tokens from {c['file']} through the base model")
    if st:
        lines.append(f"stored: {st['stored_params']:,} parameters = {st['achieved_ratio']:.4f} of the ensemble "
                     f"(one row per channel: {st['min_ratio']:.4f}; K rows everywhere: {st['max_ratio']:.4f}); "
                     f"{st['bytes']:,} bytes ({human_bytes(st['bytes'])})")
    return lines
