"""Each in-group method against its formula, written out independently here."""

from __future__ import annotations

import pytest
import torch

from merge_tool import methods
from merge_tool.config import MethodParams


def _deltas(n=4, r=6, i=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, i, generator=g)


def _members(r, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(r, n, generator=g) > 0.4
    m[:, 0] = True  # at least one member per row
    return m


def test_average_formula():
    d, m = _deltas(), _members(6, 4)
    out = methods.average(d, m, MethodParams())
    for r in range(6):
        sel = [n for n in range(4) if m[r, n]]
        assert torch.allclose(out[r], d[sel, r].mean(0), atol=1e-6)


def test_average_row_without_members_is_zero():
    d = _deltas()
    m = torch.zeros(6, 4, dtype=torch.bool)
    assert torch.equal(methods.average(d, m, MethodParams()), torch.zeros(6, 10))


def test_task_arithmetic_formula():
    d, m = _deltas(), _members(6, 4)
    out = methods.task_arithmetic(d, m, MethodParams(scale=0.3))
    for r in range(6):
        sel = [n for n in range(4) if m[r, n]]
        assert torch.allclose(out[r], 0.3 * d[sel, r].sum(0), atol=1e-6)


def test_ties_formula_elementwise():
    """TIES (Yadav et al.): elect sign of the sum, mean of the agreeing non-zero entries."""
    d = _deltas(n=3, r=4, i=5, seed=3)
    d[0, 0, 0] = 0.0  # a trimmed entry never counts
    m = _members(4, 3, seed=4)
    lam = 0.7
    out = methods.ties(d, m, MethodParams(scale=lam))
    for r in range(4):
        for c in range(5):
            vals = [float(d[n, r, c]) for n in range(3) if m[r, n]]
            s = sum(vals)
            sign = 1.0 if s >= 0 else -1.0
            agree = [v for v in vals if v != 0 and (v > 0) == (sign > 0)]
            exp = lam * (sum(agree) / len(agree) if agree else 0.0)
            assert abs(float(out[r, c]) - exp) < 1e-5


def test_ties_trim_keeps_top_density_like_mergekit():
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(40, 25, generator=g)
    for density in (0.1, 0.5, 0.9):
        thr = methods.magnitude_threshold(delta, density)
        kept = methods.trim(delta, thr, density)
        # mergekit `magnitude`: keep the top int(density * numel) entries by |x|
        k = int(density * delta.numel())
        top = torch.argsort(delta.abs().reshape(-1), descending=True)[:k]
        ref = torch.zeros(delta.numel())
        ref[top] = delta.reshape(-1)[top]
        assert torch.equal(kept.reshape(-1), ref)
    assert torch.equal(methods.trim(delta, methods.magnitude_threshold(delta, 1.0), 1.0), delta)


def test_dare_drop_rescale_formula():
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(50, 40, generator=g)
    key = methods.dare_key(7, "x.weight", 2)
    flat = torch.arange(delta.numel()).reshape(delta.shape)
    out = methods.dare_drop(delta, key, flat, 0.3)
    keep = methods.dare_keep_mask(key, flat, 0.3)
    assert torch.allclose(out, torch.where(keep, delta / 0.3, torch.zeros_like(delta)))
    assert abs(keep.float().mean().item() - 0.3) < 0.03  # Bernoulli(density)
    # dare combine is lambda * sum over members
    d, m = _deltas(), _members(6, 4)
    assert torch.allclose(methods.dare(d, m, MethodParams(scale=0.5)), methods.task_arithmetic(d, m, MethodParams(scale=0.5)))


def test_dare_mask_deterministic_and_block_invariant():
    key = methods.dare_key(0, "t", 1)
    full = methods.uniform_hash(key, torch.arange(1000))
    again = methods.uniform_hash(key, torch.arange(1000))
    assert torch.equal(full, again)
    part = methods.uniform_hash(key, torch.arange(300, 700))
    assert torch.equal(full[300:700], part)  # independent of how a tensor is split into blocks
    assert 0.0 <= float(full.min()) and float(full.max()) < 1.0
    assert abs(float(full.mean()) - 0.5) < 0.05
    other = methods.uniform_hash(methods.dare_key(1, "t", 1), torch.arange(1000))
    assert not torch.equal(full, other)  # the seed matters
    assert methods.dare_key(0, "t", 1) != methods.dare_key(0, "t", 2)


def test_registry_and_unknown_method():
    assert set(methods.METHODS) == {"average", "task_arithmetic", "ties", "dare"}
    assert methods.get_method("ties").sparsify == "magnitude"
    assert methods.get_method("dare").sparsify == "random"
    with pytest.raises(ValueError, match="allowed: average"):
        methods.get_method("slerp")


def test_normalize_divides_by_group_size():
    d, m = _deltas(), _members(6, 4)
    out = methods.task_arithmetic(d, m, MethodParams(scale=0.5, normalize=True))
    for r in range(6):
        sel = [n for n in range(4) if m[r, n]]
        assert torch.allclose(out[r], 0.5 * d[sel, r].sum(0) / len(sel), atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("name", ["average", "task_arithmetic", "dare"])
def test_linear_coefficients_equal_combine(name, normalize):
    """The merge's batched-matmul fast path computes exactly what `combine` defines."""
    m = methods.get_method(name)
    assert m.coefficients is not None
    d = _deltas(n=4, r=9, i=7, seed=8)
    assign = torch.randint(0, 3, (9, 4), generator=torch.Generator().manual_seed(9))
    p = MethodParams(scale=0.6, normalize=normalize)
    onehot = torch.nn.functional.one_hot(assign, 3).transpose(1, 2).float()  # [R, K, N]
    fast = torch.bmm(m.coefficients(onehot, p), d.transpose(0, 1))  # [R, K, I]
    for g in range(3):
        assert torch.allclose(fast[:, g], m.combine(d, assign == g, p), atol=1e-6)
    assert methods.get_method("ties").coefficients is None
