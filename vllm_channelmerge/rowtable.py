"""Row tables (format v2) in torch: the checks and conversions the plugin and the merge tool share.

A channel-merged tensor as a row table is ``rows [R, ...]`` plus ``row_index [N, out]``: expert
``n``'s channel ``c`` is ``rows[row_index[n, c]]``. Rows ``0..out-1`` are the channels' primary
rows (``row_index[n, c] == c`` where expert ``n`` uses it); rows ``out..R-1`` are extra rows, each
belonging to one channel. Format v1 (``weight [K, out, ...]``, ``group_index [N, out]``) is the
row table ``R = K * out``, ``row_index = group_index * out + c`` (see :func:`from_groups`).
Free of vLLM; names and the layout itself are defined in :mod:`vllm_channelmerge.format`.
"""

from __future__ import annotations

import torch

from vllm_channelmerge.format import FormatError


def from_groups(weight: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A v1 tensor ``[K, out, ...]`` and its ``group_index [N, out]`` as ``(rows, row_index)``:
    a view ``[K*out, ...]`` (no copy) and ``group_index * out + c`` (int64)."""
    out = weight.shape[1]
    rows = weight.reshape(weight.shape[0] * out, *weight.shape[2:])
    chan = torch.arange(out, device=group_index.device)
    return rows, group_index.long() * out + chan


def extra_row_channels(row_index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The channel each extra row belongs to, ``[R - out]`` int64 (-1: no expert uses it)."""
    n, out = row_index.shape
    owner = torch.full((max(0, num_rows - out),), -1, dtype=torch.long, device=row_index.device)
    idx = row_index.long()
    extra = idx >= out
    chan = torch.arange(out, device=idx.device).expand(n, out)
    owner[idx[extra] - out] = chan[extra]
    return owner


def check_row_index(name: str, row_index: torch.Tensor, num_rows: int) -> None:
    """Refuse a row index that could make an expert read another channel's row.

    Every value is in ``[0, R)``; a value below ``out`` is the channel itself (its primary row);
    a value from ``out`` on is an extra row that belongs to that channel alone; and every extra
    row is used by some expert (an unused row is stored for nothing: a writer's bug). ``name``
    is the checkpoint tensor named in the error.
    """
    if row_index.dim() != 2:
        raise FormatError(f"checkpoint tensor {name!r} must be [experts, out], got {tuple(row_index.shape)}")
    n, out = row_index.shape
    if num_rows < out:
        raise FormatError(f"checkpoint tensor {name!r}: {num_rows} stored rows for {out} channels; "
                          f"a row table holds at least one row per channel")
    if row_index.numel() == 0:
        return
    idx = row_index.long()
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_rows:
        raise FormatError(f"checkpoint tensor {name!r} has values in [{lo}, {hi}]; expected [0, {num_rows}) "
                          f"({num_rows} stored rows)")
    chan = torch.arange(out, device=idx.device).expand(n, out)
    primary = idx < out
    bad = primary & (idx != chan)
    if bool(bad.any()):
        e, c = (int(v) for v in torch.nonzero(bad)[0])
        raise FormatError(f"checkpoint tensor {name!r}: expert {e} channel {c} points at row {int(idx[e, c])}, "
                          f"the primary row of channel {int(idx[e, c])}; a channel may use only its own rows")
    if num_rows == out:
        return  # no extra rows: every value is a primary row, checked above
    owner = extra_row_channels(idx, num_rows)
    wrong = ~primary & (owner[(idx - out).clamp(min=0)] != chan)
    if bool(wrong.any()):
        e, c = (int(v) for v in torch.nonzero(wrong)[0])
        r = int(idx[e, c])
        raise FormatError(f"checkpoint tensor {name!r}: extra row {r} is used by channel {c} (expert {e}) "
                          f"and by channel {int(owner[r - out])}; an extra row belongs to one channel")
    unused = torch.nonzero(owner < 0).flatten()
    if unused.numel():
        raise FormatError(f"checkpoint tensor {name!r}: extra row {int(unused[0]) + out} is used by no expert")


def drop_unused_rows(rows: torch.Tensor, row_index: torch.Tensor, bias: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The row table without the extra rows no expert's index points at, renumbered.

    A tensor-parallel rank loads all of a shard's extra rows, also those of the channels other
    ranks hold; this keeps its own. The primary rows ``0..out-1`` are always kept. Returns the
    inputs themselves when every row is used (one rank: every extra row is, see
    :func:`check_row_index`).
    """
    out = row_index.shape[1]
    idx = row_index.long()
    used = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    used[:out] = True
    used[idx.flatten().to(rows.device)] = True
    if bool(used.all()):
        return rows, row_index, bias
    keep = torch.nonzero(used).flatten()
    renumber = torch.full((rows.shape[0],), -1, dtype=torch.long, device=rows.device)
    renumber[keep] = torch.arange(keep.numel(), device=rows.device)
    new_index = renumber[idx.to(rows.device)].to(device=row_index.device, dtype=row_index.dtype)
    return rows.index_select(0, keep), new_index, None if bias is None else bias.index_select(0, keep)


def lookup(rows: torch.Tensor, row_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s dense tensor ``[out, ...]``: its row of every channel."""
    return rows.index_select(0, row_index[expert].long().to(rows.device))


def compact_groups(weight: torch.Tensor, group_index: torch.Tensor, bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A v1 tensor as the smallest row table that gives every expert the same rows: group 0 as
    the primary rows, then, channel by channel, the other groups some expert uses.

    ``weight [K, out, ...]``, ``group_index [N, out]``, ``bias [K, out]`` -> ``rows [R, ...]``,
    ``row_index [N, out]`` (int32), ``bias [R]``.
    """
    k, out = weight.shape[:2]
    gi = group_index.long()
    used = torch.zeros(k, out, dtype=torch.bool, device=gi.device)
    used.scatter_(0, gi, True)
    used[0] = False  # group 0 is the primary row
    c_extra, g_extra = torch.nonzero(used.t(), as_tuple=True)  # ordered by channel, then group
    row_of = torch.arange(out, device=gi.device).repeat(k, 1)  # [K, out]: group g of channel c
    row_of[g_extra, c_extra] = out + torch.arange(c_extra.numel(), device=gi.device)
    row_index = row_of.gather(0, gi).to(torch.int32)
    rows = torch.cat([weight[0], weight[g_extra, c_extra]])
    b = None if bias is None else torch.cat([bias[0], bias[g_extra, c_extra]])
    return rows, row_index, b
