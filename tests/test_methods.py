"""The method registry: each method against its formula (written out independently here),
the sparsifiers the merge uses, DARE's statistics, and config/docs generated from the registry."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from merge_tool import methods
from merge_tool.config import ConfigError, parse_config
from merge_tool.methods import METHODS, Block, MergeParams

DOCS = Path(__file__).resolve().parents[1] / "docs" / "merge-config.md"
WEIGHTS = (0.5, 1.0, 2.0, 1.5)


def _deltas(n=4, r=6, i=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, i, generator=g)


def _members(r, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(r, n, generator=g) > 0.4
    m[:, 0] = True  # at least one member per row
    return m


def _sel(m, r):
    return [n for n in range(m.shape[1]) if m[r, n]]


@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_average_formula(weights):
    d, m = _deltas(), _members(6, 4)
    out = METHODS["average"].combine(d, m, MergeParams(weights=weights))
    w = weights or (1.0,) * 4
    for r in range(6):
        sel = _sel(m, r)
        want = sum(w[n] * d[n, r] for n in sel) / sum(w[n] for n in sel)
        assert torch.allclose(out[r], want, atol=1e-6)


def test_average_row_without_members_is_zero():
    d = _deltas()
    m = torch.zeros(6, 4, dtype=torch.bool)
    assert torch.equal(METHODS["average"].combine(d, m, MergeParams()), torch.zeros(6, 10))
    assert torch.equal(METHODS["average"].combine(d, m, MergeParams(weights=WEIGHTS)), torch.zeros(6, 10))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_task_arithmetic_formula(normalize, weights):
    d, m = _deltas(), _members(6, 4)
    out = METHODS["task_arithmetic"].combine(d, m, MergeParams(scale=0.3, normalize=normalize, weights=weights))
    w = weights or (1.0,) * 4
    for r in range(6):
        sel = _sel(m, r)
        want = 0.3 * sum(w[n] * d[n, r] for n in sel)
        if normalize:
            want = want / sum(w[n] for n in sel)  # mergekit divides by the sum of the weights
        assert torch.allclose(out[r], want, atol=1e-6)


@pytest.mark.parametrize("weights", [None, (0.5, 3.0, 1.0)])
def test_ties_formula_elementwise(weights):
    """TIES (Yadav et al.; mergekit): elect the sign of the weighted sum, weighted mean of the
    agreeing non-zero entries."""
    d = _deltas(n=3, r=4, i=5, seed=3)
    d[0, 0, 0] = 0.0  # a trimmed entry never counts
    m = _members(4, 3, seed=4)
    lam = 0.7
    out = METHODS["ties"].combine(d, m, MergeParams(scale=lam, weights=weights))
    w = weights or (1.0,) * 3
    for r in range(4):
        for c in range(5):
            vals = [(w[n], float(d[n, r, c])) for n in range(3) if m[r, n]]
            s = sum(wn * v for wn, v in vals)
            sign = 1.0 if s >= 0 else -1.0
            agree = [(wn, v) for wn, v in vals if v != 0 and (v > 0) == (sign > 0)]
            exp = lam * (sum(wn * v for wn, v in agree) / sum(wn for wn, _ in agree) if agree else 0.0)
            assert abs(float(out[r, c]) - exp) < 1e-5


def test_ties_weight_can_change_the_elected_sign():
    """Two members, +1 (weight 3) and -2 (weight 1): unweighted the sum is -1, weighted +1."""
    d = torch.tensor([[[1.0]], [[-2.0]]])
    m = torch.ones(1, 2, dtype=torch.bool)
    assert float(METHODS["ties"].combine(d, m, MergeParams())[0, 0]) == -2.0
    assert float(METHODS["ties"].combine(d, m, MergeParams(weights=(3.0, 1.0)))[0, 0]) == 1.0


def test_trim_keeps_top_density_like_mergekit():
    """The merge's trim: per expert of a block [R, N, I], its own threshold and density."""
    g = torch.Generator().manual_seed(5)
    d = torch.randn(40, 3, 25, generator=g)
    dens = (0.1, 0.5, 0.9)
    thr = [methods.magnitude_threshold(d[:, n], x) for n, x in enumerate(dens)]
    kept = methods.trim(d, thr)
    for n, density in enumerate(dens):
        # mergekit `magnitude`: keep the top int(density * numel) entries by |x|
        flat = d[:, n].reshape(-1)
        k = int(density * flat.numel())
        top = torch.argsort(flat.abs(), descending=True)[:k]
        ref = torch.zeros(flat.numel())
        ref[top] = flat[top]
        assert torch.equal(kept[:, n].reshape(-1), ref)
    assert methods.magnitude_threshold(d[:, 0], 1.0) == 0.0
    # through the registry, as the merge calls it; density 1 keeps everything
    sp = METHODS["ties"].sparsifier
    assert torch.equal(sp.apply(d, Block("t", 0, 25), thr, MergeParams(densities=dens)), kept)
    assert torch.equal(sp.apply(d, Block("t", 0, 25), [0.0] * 3, MergeParams(density=1.0)), d)


def test_magnitude_threshold_large_tensor_is_exact():
    """Above 65536 entries a sampled band is searched: still the exact k-th magnitude."""
    g = torch.Generator().manual_seed(9)
    delta = torch.randn(300, 400, generator=g)
    for density in (0.01, 0.3, 0.77):
        k = max(1, int(density * delta.numel()))
        want = float(delta.abs().reshape(-1).sort(descending=True).values[k - 1])
        assert methods.magnitude_threshold(delta, density) == want


def test_dare_drop_formula():
    g = torch.Generator().manual_seed(6)
    d = torch.randn(50, 2, 40, generator=g)
    keys = [methods.dare_key(7, "x.weight", n) for n in range(2)]
    flat = torch.arange(50 * 40).reshape(50, 40)
    out = methods.dare_drop(d, keys, flat, (0.3, 0.8))
    for n, dens in enumerate((0.3, 0.8)):
        keep = methods.dare_keep_mask(keys[n], flat, dens)
        assert torch.allclose(out[:, n], torch.where(keep, d[:, n] / dens, torch.zeros_like(d[:, n])))
    assert methods.dare_drop(d, keys, flat, (1.0, 1.0)) is d
    # the registry's sparsifier computes the keys and positions from the block's place
    sp = METHODS["dare"].sparsifier
    p = MergeParams(seed=7, densities=(0.3, 0.8))
    assert torch.equal(sp.apply(d, Block("x.weight", 0, 40), [], p), out)
    part = sp.apply(d[10:20], Block("x.weight", 10 * 40, 40), [], p)
    assert torch.equal(part, out[10:20])  # a block of rows gets the same mask as the whole tensor


def test_dare_keep_rate_and_rescale_statistics():
    """Keep rate ~ Binomial(M, density) per expert, kept entries exactly 1/density, the mean
    preserved (DARE's point), the experts' masks independent; fixed seed: deterministic."""
    r, i = 250, 400
    m = r * i
    dens = (0.1, 0.5, 0.9)
    ones = torch.ones(r, len(dens), i)
    out = METHODS["dare"].sparsifier.apply(ones, Block("model.layers.0.mlp.up_proj.weight", 0, i), [],
                                           MergeParams(seed=1234, densities=dens))
    for n, p in enumerate(dens):
        col = out[:, n]
        kept = col != 0
        rate = float(kept.float().mean())
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / m), (p, rate)
        assert torch.equal(col[kept], torch.full((int(kept.sum()),), 1.0 / p))  # rescaled exactly
        assert abs(float(col.mean()) - 1.0) < 5 * math.sqrt((1 - p) / (p * m))  # unbiased
    both = float(((out[:, 0] != 0) & (out[:, 1] != 0)).float().mean())
    assert abs(both - 0.05) < 5 * math.sqrt(0.05 * 0.95 / m)  # independent masks: 0.1 * 0.5
    again = METHODS["dare"].sparsifier.apply(ones, Block("model.layers.0.mlp.up_proj.weight", 0, i), [],
                                             MergeParams(seed=1234, densities=dens))
    assert torch.equal(out, again)
    other = METHODS["dare"].sparsifier.apply(ones, Block("model.layers.0.mlp.up_proj.weight", 0, i), [],
                                             MergeParams(seed=1235, densities=dens))
    assert not torch.equal(out, other)


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
    # keep mask == uniform < density, and a pinned value: the same masks on every machine
    assert torch.equal(methods.dare_keep_mask(key, torch.arange(1000), 0.3), full < 0.3)
    assert methods.dare_key(0, "t", 1) == methods.dare_key(0, "t", 1)
    assert int(torch.count_nonzero(methods.dare_keep_mask(methods.dare_key(11, "w", 0), torch.arange(10000), 0.6))) \
        == int(torch.count_nonzero(methods.uniform_hash(methods.dare_key(11, "w", 0), torch.arange(10000)) < 0.6))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.linear])
def test_linear_coefficients_equal_combine(name, normalize, weights):
    """The merge's batched-matmul fast path computes exactly what `combine` defines."""
    m = METHODS[name]
    d = _deltas(n=4, r=9, i=7, seed=8)
    assign = torch.randint(0, 3, (9, 4), generator=torch.Generator().manual_seed(9))
    p = MergeParams(scale=0.6, normalize=normalize, weights=weights)
    onehot = torch.nn.functional.one_hot(assign, 3).transpose(1, 2).float()  # [R, K, N]
    fast = torch.bmm(m.coefficients(onehot, p), d.transpose(0, 1))  # [R, K, I]
    for g in range(3):
        assert torch.allclose(fast[:, g], m.combine(d, assign == g, p), atol=1e-6)


def test_registry():
    assert list(METHODS) == ["average", "task_arithmetic", "ties", "dare"]
    assert isinstance(METHODS["ties"].sparsifier, methods.Magnitude)
    assert isinstance(METHODS["dare"].sparsifier, methods.RandomDrop)
    assert METHODS["average"].sparsifier is None and METHODS["task_arithmetic"].sparsifier is None
    assert not METHODS["ties"].linear and METHODS["dare"].linear
    for m in METHODS.values():
        assert set(m.params) | set(m.expert_params) <= set(methods.PARAMS), m.name
        assert all(methods.PARAMS[p].per_expert for p in m.expert_params), m.name
        assert m.uses("weight")  # every method weighs its members
    with pytest.raises(ValueError, match="allowed: average"):
        methods.get_method("slerp")


def _cfg(method, **kw):
    d = {"base_model": "b", "experts": [{"name": "a", "model": "a"}, {"name": "b", "model": "b"}],
         "num_groups": 2, "method": method}
    d.update(kw)
    return d


def test_config_takes_names_and_parameters_from_the_registry(caplog):
    with pytest.raises(ConfigError, match="allowed values: " + ", ".join(METHODS)):
        parse_config(_cfg("slerp"))
    # per-expert parameters, as mergekit spells them; the global value is the default
    c = parse_config(_cfg("ties", parameters={"density": 0.4, "weight": 2.0},
                          experts=[{"name": "a", "model": "a", "parameters": {"weight": 0.7, "density": 0.2}},
                                   {"name": "b", "model": "b"}]))
    p = c.merge_params()
    assert p.weights == (0.7, 2.0) and p.densities == (0.2, 0.4)
    assert parse_config(_cfg("ties")).merge_params().weights is None  # default: the plain path
    # an unused parameter is ignored, with a warning naming the method and the parameter
    with caplog.at_level(logging.WARNING, logger="merge_tool.config"):
        parse_config(_cfg("average", parameters={"seed": 3},
                          experts=[{"name": "a", "model": "a", "parameters": {"density": 0.3}},
                                   {"name": "b", "model": "b"}]))
    assert "method average does not use experts.0.parameters.density, parameters.seed; ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="merge_tool.config"):
        parse_config(_cfg("dare", parameters={"seed": 3, "normalize": True, "density": 0.3, "lambda": 0.5}))
    assert caplog.text == ""


@pytest.mark.parametrize("expert_params,needle", [
    ({"weight": 0}, "experts.0.parameters.weight: weight is 0"),
    ({"weight": -1.0}, "experts.0.parameters.weight: weight is -1.0"),
    ({"weight": True}, "experts.0.parameters.weight: expected a number, got True"),
    ({"density": 1.5}, "experts.0.parameters.density: density must be in (0, 1]"),
    ({"densty": 0.5}, "experts.0.parameters.densty: unknown field; allowed fields: weight, density"),
])
def test_per_expert_parameters_are_validated(expert_params, needle):
    d = _cfg("ties", experts=[{"name": "a", "model": "a", "parameters": expert_params}, {"name": "b", "model": "b"}])
    with pytest.raises(ConfigError) as ei:
        parse_config(d, "merge.yaml")
    assert needle in str(ei.value) and str(ei.value).startswith("merge.yaml: ")


def test_dumped_config_keeps_per_expert_parameters(tmp_path):
    import yaml

    from merge_tool.config import dump_config

    d = _cfg("ties", experts=[{"name": "a", "model": "a", "parameters": {"weight": 0.7}}, {"name": "b", "model": "b"}],
             parameters={"seed": 4})
    c = parse_config(d)
    out = yaml.safe_load(dump_config(c))
    assert out["experts"][0]["parameters"] == {"weight": 0.7} and "parameters" not in out["experts"][1]
    assert "seed" not in out["parameters"]  # not used by ties: not recorded as if it were
    again = parse_config(out)
    assert again.used_parameters() == c.used_parameters() == {"scale": 1.0, "density": 0.5, "weight": 1.0,
                                                              "experts": {"a": {"weight": 0.7}}}
    assert again.merge_params().weights == c.merge_params().weights == (0.7, 1.0)
    assert again.resolved(tmp_path).experts[0].parameters.weight == 0.7  # survives path resolution


def test_docs_tables_come_from_the_registry():
    text = DOCS.read_text()
    assert methods.markdown_tables() in text, "regenerate the tables in docs/merge-config.md: " \
        "python -c 'from merge_tool import methods; print(methods.markdown_tables())'"
    help_text = methods.help_text()
    for name, m in METHODS.items():
        assert f"  {name}: " in help_text
