"""Row tables (format v2): the index check every reader runs, and the v1 conversions."""

from __future__ import annotations

import pytest
import torch

from vllm_channelmerge.format import FormatError
from vllm_channelmerge.rowtable import check_row_index, compact_groups, extra_row_channels, from_groups, lookup


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
