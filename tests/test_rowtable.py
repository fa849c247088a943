"""Row tables (format v2): the index check every reader runs, and the v1 conversions."""

from __future__ import annotations

import pytest
import torch

from vllm_channelmerge.format import FormatError
from vllm_channelmerge.rowtable import (check_row_index, compact_groups, drop_unused_rows, extra_row_channels,
                                     from_groups, lookup)


def _table() -> torch.Tensor:
    # 3 experts, 4 channels; channel 1 has one extra row (4), channel 3 two (5, 6)
    return torch.tensor([[0, 1, 2, 3], [0, 4, 2, 5], [0, 1, 2, 6]], dtype=torch.int32)


def test_valid_table_passes_and_names_extra_row_channels():
    check_row_index("m.row_index", _table(), 7)
    assert extra_row_channels(_table(), 7).tolist() == [1, 3, 3]
    check_row_index("m.row_index", torch.arange(4).repeat(2, 1), 4)  # no extra rows at all


@pytest.mark.parametrize("edit,rows,match", [
    (lambda t: t.__setitem__((0, 0), 7), 7, r"values in \[0, 7\]; expected \[0, 7\)"),
    (lambda t: t.__setitem__((0, 0), -1), 7, r"values in \[-1, 6\]"),
    (lambda t: t.__setitem__((1, 0), 2), 7, "expert 1 channel 0 points at row 2, the primary row of channel 2"),
    (lambda t: t.__setitem__((2, 1), 5), 7, r"extra row 5 is used by channel [13] \(expert [12]\) and by channel [13]"),
    (lambda t: None, 8, "extra row 7 is used by no expert"),
    (lambda t: None, 3, "3 stored rows for 4 channels"),
])
def test_bad_tables_are_refused_naming_the_tensor(edit, rows, match):
    t = _table()
    edit(t)
    with pytest.raises(FormatError, match=match) as e:
        check_row_index("model.layers.0.mlp.up_proj.row_index", t, rows)
    assert "'model.layers.0.mlp.up_proj.row_index'" in str(e.value)


def test_from_groups_is_a_view_and_compact_groups_keeps_every_expert():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 6, 5, generator=g)
    b = torch.randn(3, 6, generator=g)
    gi = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 0, 2, 0, 0, 1], [2, 0, 1, 0, 0, 1]], dtype=torch.int32)
    rows, ri = from_groups(w, gi)
    assert rows.data_ptr() == w.data_ptr() and rows.shape == (18, 5)
    crows, cri, cb = compact_groups(w, gi, b)
    assert crows.shape == (6 + 5, 5) and cri.dtype == torch.int32  # channels 0 and 2: 2 extra rows, 5: 1
    check_row_index("t", cri, crows.shape[0])
    assert extra_row_channels(cri, crows.shape[0]).tolist() == [0, 0, 2, 2, 5]  # by channel, then group
    for e in range(3):
        want = w[gi[e].long(), torch.arange(6)]
        assert torch.equal(lookup(rows, ri, e), want) and torch.equal(lookup(crows, cri, e), want)
        assert torch.equal(cb[cri[e].long()], b[gi[e].long(), torch.arange(6)])


def _v2_tensor(g: torch.Generator, n: int, out: int, in_: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random row table: each channel gets 0 to n-1 extra rows, the k-th used by expert k."""
    index = torch.arange(out).repeat(n, 1)
    extra = []
    for c in range(out):
        for k in range(1, 1 + int(torch.randint(0, n, (1,), generator=g))):
            extra.append(c)
            index[k, c] = out + len(extra) - 1
    r = out + len(extra)
    return torch.randn(r, in_, generator=g), index.to(torch.int32), torch.randn(r, generator=g)


def _dense(rows: torch.Tensor, index: torch.Tensor, bias: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    return lookup(rows, index, e), bias[index[e].long()]


@pytest.mark.parametrize("split", ["column", "row"])
def test_a_tensor_parallel_rank_holds_exactly_its_part_of_a_fused_row_table(split):
    """Two ranks of a fused gate/up module: each rank's table, loaded in checkpoint order
    (bias, row_index, weight) and pruned, gives every expert its dense rows for the rank's
    channels (column split) or input features (row split), and keeps no extra row it does not use."""
    from vllm_channelmerge.layers import Geometry, RowLayout, rank_slice

    g = torch.Generator().manual_seed(3)
    n, in_, outs = 3, 6, {0: 8, 1: 4}
    tensors = {s: _v2_tensor(g, n, o, in_) for s, o in outs.items()}
    geom = Geometry("mlp.gate_up_proj", (0, 1), outs, in_)
    extras = [tensors[s][0].shape[0] - outs[s] for s in (0, 1)]
    for rank in range(2):
        if split == "column":
            channels = {s: rank_slice(o, o // 2, rank, 2, "m") for s, o in outs.items()}
            columns = (0, in_)
        else:
            channels, columns = None, rank_slice(in_, in_ // 2, rank, 2, "m")
        lay = RowLayout.of(geom, extras, channels=channels, columns=columns)
        out_here = sum(c for _, c in lay.channels.values())
        rows = torch.zeros(lay.num_rows, columns[1])
        index = torch.zeros(n, out_here, dtype=torch.int32)
        bias = torch.zeros(lay.num_rows)
        for s in (1, 0):
            w, ri, b = tensors[s]
            lay.load(bias, s, "bias", b)
            lay.load(index, s, "row_index", ri)
            lay.load(rows, s, "weight", w)
        rows, index, bias = drop_unused_rows(rows, index, bias)
        check_row_index("m.row_index", index, rows.shape[0])  # no unused row left
        for e in range(n):
            want_w, want_b = [], []
            for s in (0, 1):
                c0, cn = lay.channels[s]
                w, b = _dense(*tensors[s], e)
                want_w.append(w[c0 : c0 + cn, columns[0] : columns[0] + columns[1]])
                want_b.append(b[c0 : c0 + cn])
            got_w, got_b = _dense(rows, index, bias, e)
            assert torch.equal(got_w, torch.cat(want_w)), (rank, e)
            assert torch.equal(got_b, torch.cat(want_b)), (rank, e)


def test_drop_unused_rows_keeps_a_fully_used_table_as_it_is():
    rows, index, bias = _v2_tensor(torch.Generator().manual_seed(1), 3, 5, 2)
    got = drop_unused_rows(rows, index, bias)
    assert got[0] is rows and got[1] is index and got[2] is bias


def test_rank_slice_follows_vllm_splits_and_refuses_an_uneven_one():
    from vllm_channelmerge.layers import rank_slice

    assert [rank_slice(8, 4, r, 2, "q") for r in range(2)] == [(0, 4), (4, 4)]
    assert [rank_slice(4, 2, r, 4, "k") for r in range(4)] == [(0, 2), (0, 2), (2, 2), (2, 2)]  # replicated heads
    assert rank_slice(8, 8, 1, 2, "replicated") == (0, 8)
    with pytest.raises(FormatError, match="model.layers.0.mlp.down_proj: .* 3 of 8"):
        rank_slice(8, 3, 0, 2, "model.layers.0.mlp.down_proj")
