"""Every channel-merged strategy against the plain reference, plus the cache and the cost rule."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernels_cpu import group_index as make_group_index
from vllm_channelmerge import kernels as kk
from vllm_channelmerge.rowtable import compact_groups, from_groups
from vllm_channelmerge.kernels import (
    ExpertBatch,
    HotExpertCache,
    channel_merged_linear,
    choose_strategy,
    embedding_lookup,
    prepare_layer,
    prepare_rows,
    reference_embedding,
    reference_linear,
    reference_rows_linear,
)

GENERAL = ["all_groups", "per_expert_gather", "majority_residual", "hot_cache"]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Draws without a generator are the same in every run, whatever ran before."""
    torch.manual_seed(0)


def make_layer(n, k, out, inp, dtype, bias, seed=0, cache=None):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(k, out, inp, generator=gen) / inp**0.5).to(dtype)
    b = torch.randn(k, out, generator=gen).to(dtype) if bias else None
    gi = make_group_index(n, k, out, gen)
    return w, gi, b, prepare_layer(w, gi, b, cache=cache)


def ids_for(kind: str, n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "mixed":
        return torch.randint(0, n, (t,), generator=gen)
    if kind == "single":
        return torch.full((t,), n - 1, dtype=torch.long)
    if kind == "one_per_expert":
        return torch.randperm(n, generator=gen)
    if kind == "empty":
        return torch.zeros(0, dtype=torch.long)
    raise AssertionError(kind)


def check_all(x, w, gi, b, st, ids, dtype):
    batch = ExpertBatch.build(ids, gi.shape[0])
    ref = reference_linear(x, w, gi, ids, b)
    strategies = GENERAL + ["auto"]
    if st.single_row or (batch.single_expert is not None and st.uniform_offset[batch.single_expert] >= 0):
        strategies.append("dense")
    for s in strategies:
        y = channel_merged_linear(x, st, batch, strategy=s)
        assert y.shape == ref.shape and y.dtype == x.dtype, s
        torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype], msg=lambda m: f"{s}: {m}")


CASES = [
    # (N, K, out, in, T, composition)
    (4, 2, 48, 32, 16, "mixed"),
    (4, 2, 48, 32, 1, "mixed"),
    (4, 2, 48, 32, 9, "single"),
    (4, 2, 48, 32, 0, "empty"),
    (4, 4, 40, 24, 4, "one_per_expert"),
    (4, 4, 40, 24, 33, "mixed"),
    (3, 1, 24, 16, 7, "mixed"),
    (64, 3, 32, 16, 64, "one_per_expert"),
    (64, 8, 32, 16, 200, "mixed"),
    (2, 2, 17, 13, 5, "mixed"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}K{}o{}i{}T{}-{}".format(*c))
def test_strategies_match_reference(case, bias, dtype):
    n, k, out, inp, t, kind = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) % 1000)  # hash() varies per process
    cache = HotExpertCache(budget_bytes=1 << 20)
    w, gi, b, st = make_layer(n, k, out, inp, dtype, bias, seed=t, cache=cache)
    ids = ids_for(kind, n, t, gen)
    x = torch.randn(ids.numel(), inp, generator=gen).to(dtype)
    check_all(x, w, gi, b, st, ids, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}K{}o{}i{}T{}-{}".format(*c))
def test_strategies_match_reference_on_row_tables(case, bias, dtype):
    """Format v2: a row table where about a quarter of the channels have extra rows (the
    layer's other channels one row each); every strategy against the reference."""
    n, k, out, inp, t, kind = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) % 1000 + 7)
    w, gi, b, _ = make_layer(n, k, out, inp, dtype, bias, seed=t)
    gi = (gi * (torch.rand(1, out, generator=gen) < 0.25)).to(torch.int32)  # the rest: group 0 only
    rows, ri, rb = compact_groups(w, gi, b)
    split = int((gi != 0).any(0).sum())
    assert out + split <= rows.shape[0] <= out + (k - 1) * split
    st = prepare_rows(rows, ri, rb, out, cache=HotExpertCache(budget_bytes=1 << 20))
    assert st.groups is None and st.row_ratio == rows.shape[0] / out
    ids = ids_for(kind, n, t, gen)
    x = torch.randn(ids.numel(), inp, generator=gen).to(dtype)
    check_all(x, w, gi, b, st, ids, dtype)
    if ids.numel():
        torch.testing.assert_close(channel_merged_linear(x, st, ExpertBatch.build(ids, n), "all_groups").float(),
                                   reference_rows_linear(x, rows, ri, ids, rb).float(), **TOL[dtype])


def test_row_table_of_unsplit_layer_is_one_dense_gemm():
    """No extra rows: every expert is the primary rows, and even a mixed batch is `dense`."""
    w, gi, _, _ = make_layer(4, 2, 16, 8, torch.float32, False)
    rows, ri, _ = compact_groups(w, torch.zeros_like(gi))
    st = prepare_rows(rows, ri, None, 16)
    assert st.single_row and st.uniform_offset == [0, 0, 0, 0]
    assert choose_strategy(ExpertBatch.build(torch.tensor([0, 1, 2, 3]), 4), st) == "dense"


def test_prepare_rows_refuses_bad_tables():
    rows, ri = torch.randn(10, 4), torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"row_index values must be in \[0, 10\)"):
        prepare_rows(rows, ri + 10, None, 8, name="m")
    with pytest.raises(ValueError, match=r"bias must be \[10\]"):
        prepare_rows(rows, ri, torch.zeros(8), 8, name="m")
    with pytest.raises(ValueError, match=r"rows must be \[R >= 8, in\]"):
        prepare_rows(rows[:6], ri, None, 8, name="m")


def test_randomised_shapes():
    gen = torch.Generator().manual_seed(1234)
    for i in range(12):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        out, inp = (int(v) for v in torch.randint(1, 40, (2,), generator=gen))
        t = int(torch.randint(0, 40, (1,), generator=gen))
        dtype = torch.float32 if i % 2 else torch.bfloat16
        cache = HotExpertCache(budget_bytes=int(torch.randint(0, 4000, (1,), generator=gen)))
        w, gi, b, st = make_layer(n, k, out, inp, dtype, bias=bool(i % 3), seed=i, cache=cache)
        ids = torch.randint(0, n, (t,), generator=gen)
        x = torch.randn(t, inp, generator=gen).to(dtype)
        check_all(x, w, gi, b, st, ids, dtype)


def test_unordered_groups_and_no_cache():
    """Correctness never relies on group 0 being the largest, nor on a cache being present."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 20, 12, generator=gen)
    gi = torch.randint(0, 3, (5, 20), generator=gen, dtype=torch.int32)
    st = prepare_layer(w, gi)
    ids = torch.randint(0, 5, (23,), generator=gen)
    x = torch.randn(23, 12, generator=gen)
    check_all(x, w, gi, None, st, ids, torch.float32)


def test_non_contiguous_and_3d_input():
    w, gi, b, st = make_layer(4, 2, 24, 16, torch.float32, bias=True)
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(10, 32, generator=gen)
    x = big[:, ::2]  # non-contiguous [10, 16]
    assert not x.is_contiguous()
    ids = torch.randint(0, 4, (10,), generator=gen)
    check_all(x, w, gi, b, st, ids, torch.float32)
    xt = torch.randn(16, 10, generator=gen).t()  # transposed
    check_all(xt, w, gi, b, st, ids, torch.float32)
    x3 = torch.randn(2, 5, 16, generator=gen)
    y = channel_merged_linear(x3, st, ExpertBatch.build(ids, 4))
    torch.testing.assert_close(y, reference_linear(x3, w, gi, ids, b), atol=1e-4, rtol=1e-4)


def test_expert_batch_structure():
    ids = torch.tensor([2, 0, 2, 1, 0, 2])
    bt = ExpertBatch.build(ids, 4)
    assert bt.experts == [0, 1, 2] and bt.counts == [2, 1, 3] and bt.offsets == [0, 2, 3]
    assert bt.order.tolist() == [1, 4, 3, 0, 2, 5]
    assert [s.tolist() for s in bt.segments] == [[1, 4], [3], [0, 2, 5]]
    assert bt.single_expert is None and bt.max_count == 3 and bt.num_tokens == 6
    one = ExpertBatch.single(3, 5, 4)
    assert one.single_expert == 3 and one.counts == [5]
    empty = ExpertBatch.build([], 4)
    assert empty.num_tokens == 0 and empty.single_expert is None
    with pytest.raises(ValueError):
        ExpertBatch.build(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError):
        ExpertBatch.build(torch.tensor([-1, 0]), 4)


def test_bad_inputs_rejected():
    w = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="group_index"):
        prepare_layer(w, torch.zeros(3, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="group_index values"):
        prepare_layer(w, torch.full((3, 8), 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="bias"):
        prepare_layer(w, torch.zeros(3, 8, dtype=torch.int32), torch.zeros(8))
    st = prepare_layer(w, torch.zeros(3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows"):
        channel_merged_linear(torch.randn(3, 4), st, ExpertBatch.build([0, 1], 3))
    with pytest.raises(ValueError, match="unknown strategy"):
        channel_merged_linear(torch.randn(2, 4), st, ExpertBatch.build([0, 1], 3), strategy="nope")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_embedding_lookup(k):
    gen = torch.Generator().manual_seed(k)
    n, v, h = 4, 50, 8
    w = torch.randn(k, v, h, generator=gen)
    gi = make_group_index(n, k, v, gen)
    tok = torch.randint(0, v, (30,), generator=gen)
    ids = torch.randint(0, n, (30,), generator=gen)
    rows, ri = from_groups(w, gi)
    torch.testing.assert_close(embedding_lookup(tok, rows, ri, ids), reference_embedding(tok, w, gi, ids))
    assert embedding_lookup(tok[:0], rows, ri, ids[:0]).shape == (0, h)
    # an expert whose index says group g for a token gets exactly that group's row
    assert torch.equal(embedding_lookup(tok[:1], rows, ri, ids[:1])[0], w[gi[ids[0], tok[0]], tok[0]])
    # the same table compacted to a row table (format v2): the same rows, bit for bit
    crows, cri, _ = compact_groups(w, gi)
    assert torch.equal(embedding_lookup(tok, crows, cri, ids), reference_embedding(tok, w, gi, ids))


# ---------------------------------------------------------------------------------------------
# Hot-expert cache
# ---------------------------------------------------------------------------------------------


def _mixed_layer(out=16, inp=8, n=4, cache=None, seed=0):
    """K=2 layer where every expert mixes groups (so it needs a gathered copy)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2, out, inp, generator=gen)
    gi = torch.zeros(n, out, dtype=torch.int32)
    for e in range(n):
        gi[e, e % out] = 1
    return prepare_layer(w, gi, cache=cache)


def test_cache_budget_and_stats():
    st = _mixed_layer()
    size = st.dense_bytes  # 16*8*4 = 512
    cache = HotExpertCache(budget_bytes=2 * size)
    st.cache = cache
    for e in range(4):
        cache.observe(ExpertBatch.single(e, 1, 4))
        cache.get(st, e)
        assert cache.stats.bytes_used <= cache.budget_bytes
    assert len(cache) == 2 and cache.stats.misses == 4
    before = cache.stats.hits
    cached = sorted(cache.cached_experts())
    for e in cached:
        w, _ = cache.get(st, e)
        torch.testing.assert_close(w, st.expert_weight(e)[0])
    assert cache.stats.hits == before + 2
    # an entry larger than the whole budget is refused, not stored
    tiny = HotExpertCache(budget_bytes=size - 1)
    tiny.get(st, 0)
    assert len(tiny) == 0 and tiny.stats.rejections == 1 and tiny.stats.bytes_used == 0


def test_cache_eviction_prefers_hot_experts():
    st = _mixed_layer()
    cache = HotExpertCache(budget_bytes=st.dense_bytes, decay=1.0)  # room for one entry
    st.cache = cache
    cache.observe(ExpertBatch.build([0] * 5, 4))  # expert 0 hot (5)
    cache.get(st, 0)
    assert cache.cached_experts() == {0}
    cache.observe(ExpertBatch.build([1] * 2, 4))  # expert 1 colder (2): cannot evict 0
    cache.get(st, 1)
    assert cache.cached_experts() == {0} and cache.stats.rejections == 1
    assert not cache.would_admit(st, 1)
    cache.observe(ExpertBatch.build([2] * 9, 4))  # expert 2 hotter (9): evicts 0
    assert cache.would_admit(st, 2)
    cache.get(st, 2)
    assert cache.cached_experts() == {2} and cache.stats.evictions == 1
    assert cache.stats.bytes_used == st.dense_bytes


def test_cache_global_across_layers_and_uniform_experts_free():
    cache = HotExpertCache(budget_bytes=3 * 512)
    layers = [_mixed_layer(cache=cache, seed=i) for i in range(4)]
    batch = ExpertBatch.single(1, 3, 4)
    x = torch.randn(3, 8)
    for st in layers:
        channel_merged_linear(x, st, batch, strategy="hot_cache")
    assert len(cache) == 3 and cache.stats.bytes_used <= cache.budget_bytes  # budget over all layers
    # an expert using one group everywhere needs no copy: dense view, nothing stored
    w = torch.randn(2, 6, 4)
    gi = torch.tensor([[0] * 6, [1] * 6], dtype=torch.int32)
    st = prepare_layer(w, gi, cache=cache)
    used = cache.stats.bytes_used
    y = channel_merged_linear(torch.randn(2, 4), st, ExpertBatch.single(1, 2, 2), strategy="hot_cache")
    assert y.shape == (2, 6) and cache.stats.bytes_used == used


def test_single_cached_expert_is_plain_linear():
    cache = HotExpertCache(budget_bytes=1 << 20)
    st = _mixed_layer(cache=cache)
    x = torch.randn(5, 8)
    batch = ExpertBatch.single(2, 5, 4)
    assert choose_strategy(batch, st) == "hot_cache"
    channel_merged_linear(x, st, batch)  # miss -> admitted
    assert cache.stats.misses == 1 and len(cache) == 1
    y = channel_merged_linear(x, st, ExpertBatch.single(2, 5, 4))
    assert cache.stats.hits == 1
    w, b = cache.get(st, 2)
    torch.testing.assert_close(y, F.linear(x, w, b))


# ---------------------------------------------------------------------------------------------
# Cost rule
# ---------------------------------------------------------------------------------------------


def _smol_layer(k=2, n=4, out=512, inp=256, lopsided=False, cache=None):
    """A layer big enough (512 KB) that per-call overheads do not dominate the cost rule."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(k, out, inp, generator=gen)
    if lopsided:  # only expert 1 differs, on 5% of channels
        gi = torch.zeros(n, out, dtype=torch.int32)
        gi[1, : max(1, out // 20)] = 1
    else:
        gi = make_group_index(n, k, out, gen)
    return prepare_layer(w, gi, cache=cache)


def test_choose_strategy_decode_prefill_single():
    st = _smol_layer()
    decode = ExpertBatch.build(torch.arange(32) % 4, 4)
    # mixed decode: one pass over the groups (all_groups) or group 0 plus residual rows,
    # never a dense gather per expert
    assert choose_strategy(decode, st) in ("all_groups", "majority_residual")
    assert choose_strategy(ExpertBatch.build([3], 4), st) in ("all_groups", "majority_residual")
    prefill = ExpertBatch.build(torch.arange(512) // 128, 4)
    assert choose_strategy(prefill, st) in ("per_expert_gather", "majority_residual")
    distinct = _smol_layer(k=4)  # K = N: every expert far from group 0
    assert choose_strategy(prefill, distinct) == "per_expert_gather"
    assert choose_strategy(decode, distinct) in ("all_groups", "majority_residual")
    assert choose_strategy(ExpertBatch.build(torch.arange(8) % 4, 4), st) == "all_groups"
    # one expert: dense when it lives in one group, else the hot cache when there is one
    lop = _smol_layer(lopsided=True, cache=HotExpertCache(1 << 20))
    assert choose_strategy(ExpertBatch.single(0, 8, 4), lop) == "dense"
    assert choose_strategy(ExpertBatch.single(1, 8, 4), lop) == "hot_cache"
    assert choose_strategy(ExpertBatch.single(1, 8, 4), _smol_layer(k=1)) == "dense"
    assert choose_strategy(ExpertBatch.build([], 4), st) == "dense"


def test_choose_strategy_lopsided_prefers_majority_residual():
    lop = _smol_layer(lopsided=True)
    assert choose_strategy(ExpertBatch.build(torch.arange(32) % 4, 4), lop) == "majority_residual"
    assert choose_strategy(ExpertBatch.build(torch.arange(512) // 128, 4), lop) == "majority_residual"


def test_choose_strategy_small_layers_prefer_one_gemm():
    """On a tiny layer the per-segment overhead outweighs the weight traffic: one GEMM wins."""
    tiny = _smol_layer(out=32, inp=16)
    assert choose_strategy(ExpertBatch.build(torch.arange(64) % 4, 4), tiny) == "all_groups"
    assert kk.CostModel().launch(tiny) > kk.CostModel().launch(_smol_layer())


def test_choose_strategy_uses_cache_hits():
    cache = HotExpertCache(1 << 22)
    st = _smol_layer(k=4, cache=cache)
    prefill = ExpertBatch.build(torch.arange(256) // 64, 4)
    for e in range(4):
        cache.get(st, e)
    costs = kk.strategy_costs(prefill, st)
    assert costs["hot_cache"] < costs["per_expert_gather"]
    assert choose_strategy(prefill, st) == "hot_cache"


def test_triton_module_imports_without_cuda():
    from vllm_channelmerge import triton_kernels

    if not torch.cuda.is_available():
        assert triton_kernels.is_available() is False
    st = _smol_layer()
    batch = ExpertBatch.build(torch.arange(8) % 4, 4)
    assert choose_strategy(batch, st, torch.randn(8, 64)) != "triton"  # CPU tensors never


def test_prefill_with_cache_keeps_the_hottest_experts():
    st = _smol_layer(k=4)
    st.cache = cache = HotExpertCache(budget_bytes=2 * st.dense_bytes)  # room for two experts
    ids = torch.tensor([0] * 40 + [1] * 30 + [2] * 10 + [3] * 5)[torch.randperm(85)]
    batch = ExpertBatch.build(ids, 4)
    assert choose_strategy(batch, st) == "hot_cache"
    x = torch.randn(85, st.in_features)
    y = channel_merged_linear(x, st, batch)
    torch.testing.assert_close(y, reference_rows_linear(x, st.rows, st.row_index, ids), atol=1e-4, rtol=1e-4)
    assert cache.cached_experts() == {0, 1} and cache.stats.bytes_used <= cache.budget_bytes


def test_cache_budget_from_env(monkeypatch):
    monkeypatch.setenv(HotExpertCache.ENV_BUDGET, "1.5e6")
    assert HotExpertCache.from_env().budget_bytes == 1_500_000
    monkeypatch.delenv(HotExpertCache.ENV_BUDGET)
    assert HotExpertCache.from_env(default_bytes=2048).budget_bytes == 2048
    monkeypatch.setenv(HotExpertCache.ENV_BUDGET, "lots")
    with pytest.raises(ValueError, match="CHANNELMERGE_HOT_CACHE_BYTES"):
        HotExpertCache.from_env()


def test_replaced_state_without_bias_does_not_share_cache_entries():
    """The integration derives a bias-free state with dataclasses.replace (row-parallel ranks > 0)."""
    import dataclasses

    cache = HotExpertCache(1 << 20)
    w, gi, b, st = make_layer(4, 2, 16, 8, torch.float32, bias=True, cache=cache)
    nob = dataclasses.replace(st, bias=None)
    assert nob.uid != st.uid and nob.bias is None
    x = torch.randn(3, 8)
    one = ExpertBatch.single(1, 3, 4)
    with_b = channel_merged_linear(x, st, one, "hot_cache")
    without = channel_merged_linear(x, nob, one, "hot_cache")
    torch.testing.assert_close(with_b, reference_linear(x, w, gi, one.expert_ids, b))
    torch.testing.assert_close(without, reference_linear(x, w, gi, one.expert_ids))


def test_cost_of_all_groups_counts_the_select_it_runs():
    """Row tables select with an int64 gather (every output element), v1 groups with masks
    (per group beyond the first): the cost rule charges each its own constant."""
    w, gi, _, st_v1 = make_layer(4, 2, 32, 16, torch.float32, False)
    rows, ri, _ = compact_groups(w, gi)
    st_rows = prepare_rows(rows, ri, None, 32)
    assert st_v1.lerp_select and not st_rows.lerp_select
    batch = ExpertBatch.build(torch.arange(64) % 4, 4)
    base = kk.CostModel()
    gathered = kk.CostModel(select_gather=5.0)
    masked = kk.CostModel(select=3.0)
    extra = 64 / 16
    assert kk.strategy_costs(batch, st_rows, gathered)["all_groups"] == pytest.approx(
        kk.strategy_costs(batch, st_rows, base)["all_groups"] + 5.0 * extra)
    assert kk.strategy_costs(batch, st_rows, masked)["all_groups"] == kk.strategy_costs(batch, st_rows, base)["all_groups"]
    assert kk.strategy_costs(batch, st_v1, masked)["all_groups"] == pytest.approx(
        kk.strategy_costs(batch, st_v1, base)["all_groups"] + 3.0 * extra)


def _row_table_layer(dtype, out=48, inp=16, seed=3):
    """A compacted row table (format v2) whose experts leave their primary rows unevenly (expert
    0 never: residual fraction 0)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(2, out, inp, generator=gen) / inp**0.5).to(dtype)
    gi = make_group_index(4, 2, out, gen)
    gi[0] = 0
    rows, ri, _ = compact_groups(w, gi)
    return w, gi, prepare_rows(rows, ri, None, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_select_by_runs_is_the_gather_bit_for_bit(dtype):
    """The prefill select (primary columns, then each run's residual channels, on int16 bits for
    2-byte dtypes) picks exactly what the per-element gather picks, including an expert whose
    run appears twice and one that never leaves its primary rows."""
    _, _, st = _row_table_layer(dtype)
    ids = torch.tensor([2] * 20 + [0] * 17 + [3] * 18 + [2] * 16 + [1] * 21)
    batch = ExpertBatch.build(ids, 4)
    assert [e for e, _, _ in batch.runs] == [2, 0, 3, 2, 1] and st.residual_fraction[0] == 0
    y_all = torch.randn(ids.numel(), st.num_rows).to(dtype)
    y_all[0, 0] = float("nan")  # bits are copied, whatever they hold
    want = y_all.gather(1, st.row_index.index_select(0, ids))
    got = kk._select_by_runs(y_all, st, batch)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


def test_row_select_takes_runs_only_where_the_cost_model_says_so():
    """Long runs with few residual channels select by runs; decode-sized runs, a cost model
    that does not model it (AVX2 defaults) and residual-heavy layers keep the gather."""
    _, _, st = _row_table_layer(torch.float32)
    avx512 = kk.CostModel(select_gather=7.0, select_copy=1.2, select_residual=19.0)
    prefill = ExpertBatch.build(torch.arange(4).repeat_interleave(32), 4)
    decode = ExpertBatch.build(torch.arange(32) % 4, 4)
    assert kk.row_select(prefill, st, avx512)[0] == "runs"
    assert kk.row_select(decode, st, avx512)[0] == "gather"
    assert kk.row_select(prefill, st, kk.CostModel())[0] == "gather"
    assert kk.row_select(prefill, st, kk.CostModel(select_gather=7.0, select_copy=1.2, select_residual=40.0))[0] == "gather"
    name, c = kk.row_select(prefill, st, avx512)
    resid = sum(st.residual_fraction[e] * n for e, _, n in prefill.runs)
    assert c == pytest.approx((1.2 * 128 + 19.0 * resid) / st.in_features)
    assert kk.strategy_costs(prefill, st, avx512)["all_groups"] == pytest.approx(
        kk.strategy_costs(prefill, st, kk.CostModel())["all_groups"] + c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_groups_on_a_row_table_selects_by_runs_at_prefill(dtype, monkeypatch):
    """With the AVX-512 constants a prefill batch goes through the runs select, and the output
    is the reference's."""
    w, gi, st = _row_table_layer(dtype)
    st.cost_model = kk.prepacked_cpu_cost(dtype, {"avx512f": True, "avx512_bf16": True})
    ids = torch.arange(4).repeat_interleave(24)
    batch = ExpertBatch.build(ids, 4)
    assert kk.row_select(batch, st, st.cost_model)[0] == "runs"
    calls = []
    real = kk._select_by_runs
    monkeypatch.setattr(kk, "_select_by_runs", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(ids.numel(), 16).to(dtype)
    got = channel_merged_linear(x, st, batch, "all_groups")
    assert calls
    torch.testing.assert_close(got.float(), reference_linear(x, w, gi, ids).float(), **TOL[dtype])
