"""The dense-GEMM backend of the kernels (``kernels.GemmFactory``): every strategy against the
plain reference with a fake prepacking backend and, where vLLM's CPU ops import, with the one
the adapter gives the engine (``compat.cpu_gemm_factory``: vLLM's own CPU GEMM dispatch)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernels_cpu import group_index as make_group_index
from vllm_channelmerge import costfit
from vllm_channelmerge import kernels as kk
from vllm_channelmerge.kernels import (
    ExpertBatch,
    GemmFactory,
    HotExpertCache,
    channel_merged_linear,
    prepare_layer,
    reference_linear,
)

STRATEGIES = ["all_groups", "per_expert_gather", "majority_residual", "hot_cache", "auto"]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}


class FakePacked(GemmFactory):
    """Prepacks into its own copy (as oneDNN does) and counts packs and calls per weight."""

    name = "fake"

    def __init__(self):
        self.packed: list[tuple[int, ...]] = []
        self.per_calls: list[tuple[int, ...]] = []  # weights of one call (gathers): never packed
        self.calls = 0

    def prepack(self, weight):
        own = weight.clone()  # a copy: later writes to the stored weight must not matter
        self.packed.append(tuple(weight.shape))

        def fn(x, bias=None, out=None):
            self.calls += 1
            y = F.linear(x, own, bias)
            return y if out is None else out.copy_(y)

        fn.path = "fake"
        fn.copies = True
        return fn

    def per_call(self, weight):
        self.per_calls.append(tuple(weight.shape))
        return kk.torch_linear(weight)


def make(n, k, out, inp, dtype, bias, gemm, seed=0, cache=None, uniform_expert=None):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(k, out, inp, generator=gen) / inp**0.5).to(dtype)
    b = torch.randn(k, out, generator=gen).to(dtype) if bias else None
    gi = make_group_index(n, k, out, gen)
    if uniform_expert is not None:  # one expert entirely in group 1: a view, never gathered
        gi[uniform_expert] = min(1, k - 1)
    return w, gi, b, prepare_layer(w, gi, b, cache=cache, gemm=gemm)


def compositions(n, gen):
    return {
        "mixed": torch.randint(0, n, (19,), generator=gen),
        "decode": torch.randperm(n, generator=gen),
        "prefill": torch.arange(4 * n) // 4,
        # long runs of one expert, as vLLM lays out prefills: computed in place, run by run
        "prefill_runs": torch.tensor([1] * 20 + [0] * 17 + [1] * 18 + [n - 1] * 25),
        "single": torch.full((6,), n - 1, dtype=torch.long),
        "uniform_single": torch.full((3,), 0, dtype=torch.long),
    }


def check_strategies(gemm, dtype, bias, k=2, n=4, out=48, inp=32, cache_bytes=1 << 20):
    cache = HotExpertCache(cache_bytes) if cache_bytes else None
    w, gi, b, st = make(n, k, out, inp, dtype, bias, gemm, cache=cache, uniform_expert=0)
    gen = torch.Generator().manual_seed(1)
    for kind, ids in compositions(n, gen).items():
        batch = ExpertBatch.build(ids, n)
        x = torch.randn(ids.numel(), inp, generator=gen).to(dtype)
        ref = reference_linear(x, w, gi, ids, b)
        strategies = list(STRATEGIES)
        if batch.single_expert is not None and st.uniform_offset[batch.single_expert] >= 0:
            strategies.append("dense")
        for s in strategies:
            for _ in range(2):  # the second call hits what the first admitted to the cache
                y = channel_merged_linear(x, st, batch, strategy=s)
                assert y.shape == ref.shape and y.dtype == dtype, (kind, s)
                torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype],
                                           msg=lambda m: f"{gemm.name} {kind} {s}: {m}")
    return st


# ---------------------------------------------------------------------------------------------
# Fake backend: what goes through the prepacked GEMM, and that the answers stay the reference's
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_strategies_match_reference_with_fake_backend(dtype, bias, k):
    check_strategies(FakePacked(), dtype, bias, k=k)


def test_prepacked_once_at_load_and_used_by_the_strategies():
    gemm = FakePacked()
    w, gi, b, st = make(4, 2, 16, 8, torch.float32, True, gemm)
    assert sorted(gemm.packed) == [(16, 8), (32, 8)]  # group 0 and all groups, at load
    x = torch.randn(5, 8)
    mixed = ExpertBatch.build([0, 1, 2, 3, 1], 4)
    for s in ("all_groups", "majority_residual"):
        before = gemm.calls
        channel_merged_linear(x, st, mixed, s)
        assert gemm.calls == before + 1, s  # one prepacked GEMM, residual rows per call
    assert sorted(gemm.packed) == [(16, 8), (32, 8)]  # nothing packed per call
    # per-call gathers go through the backend's per-call GEMM: no pack, no prepacked call
    before = gemm.calls
    channel_merged_linear(x, st, mixed, "per_expert_gather")
    assert gemm.calls == before and len(gemm.packed) == 2


def test_gathered_weights_go_through_the_per_call_gemm():
    """Every GEMM on a weight that exists for one call (per-expert gathers, majority_residual's
    residual rows, a hot-cache miss it does not keep) goes through ``GemmFactory.per_call``."""
    gemm = FakePacked()
    w, gi, b, st = make(4, 2, 16, 8, torch.float32, True, gemm)
    x = torch.randn(5, 8)
    ids = torch.tensor([0, 1, 2, 3, 1])
    mixed = ExpertBatch.build(ids, 4)
    ref = reference_linear(x, w, gi, ids, b)
    torch.testing.assert_close(channel_merged_linear(x, st, mixed, "per_expert_gather"), ref)
    gathered = [e for e in range(4) if st.uniform_offset[e] < 0]
    assert gemm.per_calls == [(16, 8)] * len(gathered)
    gemm.per_calls.clear()
    torch.testing.assert_close(channel_merged_linear(x, st, mixed, "majority_residual"), ref)
    assert gemm.per_calls == [(len(st.residual_rows[e]), 8) for e in mixed.experts if len(st.residual_rows[e])]
    gemm.per_calls.clear()
    full = HotExpertCache(0)  # admits nothing: every expert is a fresh gather
    st2 = prepare_layer(w, gi, b, cache=full, gemm=gemm)
    torch.testing.assert_close(channel_merged_linear(x, st2, mixed, "hot_cache"), ref)
    assert gemm.per_calls == [(16, 8)] * len(gathered)


def test_group_views_packed_lazily_and_shared_with_the_bias_free_state():
    gemm = FakePacked()
    w, gi, b, st = make(3, 3, 16, 8, torch.float32, True, gemm)
    gi2 = gi.clone()
    gi2[1] = 2  # expert 1 lives in group 2 only
    st = prepare_layer(w, gi2, b, gemm=gemm)
    n_load = len(gemm.packed)
    nob = dataclasses.replace(st, bias=None)  # row-parallel ranks > 0
    x = torch.randn(4, 8)
    one = ExpertBatch.single(1, 4, 3)
    y = channel_merged_linear(x, st, one, "dense")
    y0 = channel_merged_linear(x, nob, one, "dense")
    assert len(gemm.packed) == n_load + 1  # group 2 packed once, for both states
    torch.testing.assert_close(y, reference_linear(x, w, gi2, one.expert_ids, b))
    torch.testing.assert_close(y0, reference_linear(x, w, gi2, one.expert_ids))
    assert nob.packs is st.packs


def test_hot_cache_keeps_only_the_packed_copy():
    gemm = FakePacked()
    cache = HotExpertCache(1 << 20)
    w, gi, b, st = make(4, 2, 16, 8, torch.float32, True, gemm, cache=cache)
    x = torch.randn(6, 8)
    one = ExpertBatch.single(2, 6, 4)
    ref = reference_linear(x, w, gi, one.expert_ids, b)
    n_load = len(gemm.packed)
    torch.testing.assert_close(channel_merged_linear(x, st, one, "hot_cache"), ref)  # miss: admitted
    assert len(gemm.packed) == n_load + 1 and len(cache) == 1
    (plain, _, size, fn), = cache._entries.values()
    assert plain is None and size == st.dense_bytes  # the backend holds the copy
    calls = gemm.calls
    torch.testing.assert_close(channel_merged_linear(x, st, one, "hot_cache"), ref)  # hit
    assert gemm.calls == calls + 1 and cache.stats.hits >= 1
    wd, bd = cache.get(st, 2)  # still answers with the dense weight
    torch.testing.assert_close(F.linear(x, wd, bd), ref)
    # a mixed batch: cached and uniform experts through their packed GEMMs, the rest gathered
    ids = torch.tensor([2, 0, 1, 2, 3, 0])
    mixed = ExpertBatch.build(ids, 4)
    torch.testing.assert_close(channel_merged_linear(x, st, mixed, "hot_cache"),
                               reference_linear(x, w, gi, ids, b), atol=1e-5, rtol=1e-5)


def test_plain_backend_keeps_a_view_not_a_copy():
    cache = HotExpertCache(1 << 20)
    w, gi, b, st = make(4, 2, 16, 8, torch.float32, False, None, cache=cache)
    assert st.gemm is kk.TORCH_GEMM and st.slice_gemm(0).copies is False
    channel_merged_linear(torch.randn(3, 8), st, ExpertBatch.single(1, 3, 4), "hot_cache")
    (plain, _, _, fn), = cache._entries.values()
    assert plain is not None and fn.path == "torch"


def test_cost_rule_counts_prepacked_gemms_cheaper():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 512, 256, generator=gen)
    gi = make_group_index(4, 2, 512, gen)
    st = prepare_layer(w, gi)
    prefill = ExpertBatch.build(torch.arange(512) // 128, 4)
    plain = kk.strategy_costs(prefill, st)
    fast = kk.strategy_costs(prefill, st, dataclasses.replace(st.cost_model, packed=0.5))
    assert fast["all_groups"] == pytest.approx(0.5 * plain["all_groups"] + 0.5 * st.cost_model.launch(st))
    assert fast["per_expert_gather"] == plain["per_expert_gather"]  # gathers stay plain
    assert fast["majority_residual"] < plain["majority_residual"]


def test_prepacked_cpu_cost_by_host_kind():
    avx2 = {"avx2": True}
    avx512 = {"avx2": True, "avx512f": True}
    bf16 = {**avx512, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}
    assert kk.prepacked_cpu_cost(torch.float32, avx2) is kk.DEFAULT_COST  # AVX2: nothing changes
    assert kk.prepacked_cpu_cost(torch.bfloat16, avx512) is kk.DEFAULT_COST
    assert kk.prepacked_cpu_cost(torch.bfloat16, bf16).packed < 1
    assert kk.prepacked_cpu_cost(torch.float16, bf16) is kk.DEFAULT_COST  # not calibrated
    assert kk.DEFAULT_COST.select == kk.DEFAULT_COST.scatter == 0  # the AVX2 rule is unchanged
    intel, amd = "GenuineIntel", "AuthenticAMD"
    assert kk.host_kind(avx2, intel) == "AVX2" and kk.host_kind(bf16, intel) == "AVX-512 + AVX512-BF16 + AMX"
    assert kk.host_kind({}, "") == "no AVX2"
    # MKL's F.linear is slower on AMD: its figures are kept apart from an Intel host's of the same ISA
    no_amx = {**avx512, "avx512_bf16": True}
    assert kk.host_kind(no_amx, amd) == "AVX-512 + AVX512-BF16 (AMD)" != kk.host_kind(no_amx, intel)
    flags = kk.cpu_flags()
    assert set(flags) == set(kk.CPU_FLAGS) and kk.host_kind(flags) in kk.cpu_isa_summary()


def test_engine_context_carries_the_backend_to_prepared_layers():
    from vllm_channelmerge import format as fmt
    from vllm_channelmerge import layers
    from vllm_channelmerge.context import EngineContext

    cm = fmt.ChannelMergedConfig.from_dict({"quant_method": fmt.QUANT_METHOD, "format_version": 1,
                                            "experts": ["a", "b"], "num_groups": 2})
    assert EngineContext(cm, from_env=False).gemm is kk.TORCH_GEMM
    gemm = FakePacked()
    ctx = EngineContext(cm, from_env=False, gemm=gemm)
    w = torch.randn(2, 8, 4)
    gi = torch.tensor([[0] * 8, [1] * 4 + [0] * 4], dtype=torch.int32)
    prepared = layers.prepare(ctx, "model.layers.0.mlp.down_proj", w, gi, torch.randn(2, 8))
    assert prepared.with_bias.gemm is gemm and prepared.without_bias.packs is prepared.with_bias.packs
    assert sorted(gemm.packed) == [(8, 4), (16, 4)]


# ---------------------------------------------------------------------------------------------
# vLLM's CPU GEMM (where vllm imports): the backend the engine gets on CPU
# ---------------------------------------------------------------------------------------------


def _vllm_factory():
    try:
        from vllm_channelmerge import compat

        f = compat.cpu_gemm_factory()
    except Exception as e:  # noqa: BLE001  vLLM missing or not a CPU build
        pytest.skip(f"vLLM's CPU GEMM is not available here: {type(e).__name__}: {e}")
    if f is kk.TORCH_GEMM:
        pytest.skip("vLLM's CPU GEMM dispatch is not in use on this platform")
    return f


def _dtype_runs(dtype):
    x = torch.randn(2, 64).to(dtype)
    w = torch.randn(96, 64).to(dtype)
    try:
        _vllm_factory().prepack(w)(x)
    except RuntimeError as e:
        pytest.skip(f"vLLM's CPU GEMM has no {dtype} on this host: {e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_strategies_match_reference_with_vllm_cpu_gemm(dtype, bias):
    gemm = _vllm_factory()
    _dtype_runs(dtype)
    # 48x32 weights: small enough that bf16 on an AMX host takes vLLM's sgl-kernel path
    check_strategies(gemm, dtype, bias)
    # and a shape past vLLM's small-weight threshold (oneDNN everywhere), K=3
    check_strategies(gemm, dtype, bias, k=3, n=5, out=640, inp=576)


def test_vllm_cpu_gemm_hot_cache_and_paths():
    gemm = _vllm_factory()
    cache = HotExpertCache(1 << 24)
    w, gi, b, st = make(4, 2, 640, 576, torch.float32, True, gemm, cache=cache)
    assert {fn.path for fn in st.packs.values()} <= set(gemm.paths)
    assert "oneDNN onednn_mm" in gemm.describe() or "F.linear" in gemm.describe()
    x = torch.randn(7, 576)
    one = ExpertBatch.single(3, 7, 4)
    ref = reference_linear(x, w, gi, one.expert_ids, b)
    for _ in range(2):
        torch.testing.assert_close(channel_merged_linear(x, st, one), ref, **TOL[torch.float32])
    (plain, _, _, fn), = cache._entries.values()
    assert (plain is None) == fn.copies


def test_vllm_cpu_gemm_outlives_its_dispatch_shell():
    """The prepacked GEMM keeps vLLM's handler alive (it frees the primitive when collected)."""
    import gc

    gemm = _vllm_factory()
    w = torch.randn(640, 576)
    fns = [gemm.prepack(w) for _ in range(3)]
    gc.collect()
    x = torch.randn(5, 576)
    for fn in fns:
        torch.testing.assert_close(fn(x), F.linear(x, w), **TOL[torch.float32])
    out = torch.zeros(9, 640)
    fns[0](x, None, out=out[2:7])  # written in place, into a row slice
    torch.testing.assert_close(out[2:7], F.linear(x, w), **TOL[torch.float32])
    assert out[:2].abs().sum() == 0 and out[7:].abs().sum() == 0


def test_vllm_cpu_gemm_per_call_path():
    """Gathered weights through oneDNN's unpacked inner product where this torch runs it (from
    ONEDNN_PER_CALL_MIN_TOKENS rows; F.linear below), equal to F.linear, into a row slice too."""
    gemm = _vllm_factory()
    from vllm_channelmerge import compat

    dtypes = compat.onednn_per_call_dtypes()
    w, bias = torch.randn(96, 64), torch.randn(96)
    fn = gemm.per_call(w)
    assert fn.path == ("oneDNN inner product (unpacked)" if torch.float32 in dtypes else "torch")
    for rows in (3, compat.ONEDNN_PER_CALL_MIN_TOKENS, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(fn(x, bias), F.linear(x, w, bias), **TOL[torch.float32])
        out = torch.zeros(rows + 4, 96)
        fn(x, None, out=out[2 : 2 + rows])
        torch.testing.assert_close(out[2 : 2 + rows], F.linear(x, w), **TOL[torch.float32])
        assert out[:2].abs().sum() == 0 and out[2 + rows :].abs().sum() == 0
    xt = torch.randn(64, 40).t()  # not contiguous
    torch.testing.assert_close(fn(xt), F.linear(xt, w), **TOL[torch.float32])
    half = gemm.per_call(w.half())  # where oneDNN has no float16 primitive: F.linear
    assert half.path == ("oneDNN inner product (unpacked)" if torch.float16 in dtypes else "torch")
    assert gemm.per_call(w.to("meta")).path == "torch"


def test_cpu_gemm_factory_env_and_log(monkeypatch, caplog):
    _vllm_factory()
    from vllm_channelmerge import compat

    monkeypatch.setenv(compat.CPU_GEMM_ENV, "torch")
    with caplog.at_level(logging.INFO, logger="vllm.channelmerge"):
        assert compat.cpu_gemm_factory() is kk.TORCH_GEMM
    assert "F.linear" in caplog.text and kk.host_kind() in caplog.text
    monkeypatch.setenv(compat.CPU_GEMM_ENV, "fast")
    with pytest.raises(ValueError, match=compat.CPU_GEMM_ENV):
        compat.cpu_gemm_factory()
    monkeypatch.delenv(compat.CPU_GEMM_ENV)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vllm.channelmerge"):
        f = compat.cpu_gemm_factory()
        f.prepack(torch.randn(640, 576))
    assert "vLLM's CPU dispatch" in caplog.text and "dense GEMM on a [640, 576] float32 weight" in caplog.text


def test_dispatch_path_names():
    from vllm_channelmerge import compat

    class ops:  # stand-ins: only the names the lambdas call matter
        onednn_mm = weight_packed_linear_cpu = staticmethod(lambda *a: None)

    assert compat._dispatch_path(lambda x, w, b: ops.onednn_mm(None, x, b)) == "oneDNN onednn_mm"
    assert compat._dispatch_path(lambda x, w, b: ops.weight_packed_linear_cpu(x, None, 1, b)).startswith("sgl")
    assert compat._dispatch_path(lambda x, w, b: torch.nn.functional.linear(x, w, b)) == "torch F.linear"
    assert compat._dispatch_path(torch.nn.functional.linear) == "torch F.linear"
    assert compat._dispatch_path(lambda x, w, b: x) == "other"


def test_runs_of_one_expert():
    bt = ExpertBatch.build(torch.tensor([2, 2, 0, 0, 0, 2, 1]), 4)
    assert bt.runs == [(2, 0, 2), (0, 2, 3), (2, 5, 1), (1, 6, 1)]
    assert ExpertBatch.single(3, 5, 4).runs == [(3, 0, 5)] and ExpertBatch.build([], 4).runs == []


def test_all_groups_select_is_exact():
    """The lerp select picks each (token, channel)'s group bit for bit, as the gather does."""
    for dtype in (torch.float32, torch.bfloat16):
        for k in (2, 3):
            w, gi, b, st = make(5, k, 40, 24, dtype, True, None)
            ids = torch.randint(0, 5, (33,), generator=torch.Generator().manual_seed(k))
            batch = ExpertBatch.build(ids, 5)
            x = torch.randn(33, 24).to(dtype)
            y_all = F.linear(x, st.rows, st.bias)
            want = y_all.gather(1, st.row_index.index_select(0, batch.expert_ids))
            assert torch.equal(channel_merged_linear(x, st, batch, "all_groups"), want)


def test_all_groups_shared_buffer_does_not_leak_between_layers():
    """Layers of one step share all_groups' [T, K*out] buffer; each output stays its own."""
    a = make(4, 2, 16, 8, torch.float32, True, None, seed=1)
    b = make(4, 2, 16, 8, torch.float32, True, None, seed=2)
    ids = torch.tensor([0, 3, 1, 2, 2])
    batch = ExpertBatch.build(ids, 4)
    x = torch.randn(5, 8)
    ya = channel_merged_linear(x, a[3], batch, "all_groups")
    yb = channel_merged_linear(x, b[3], batch, "all_groups")
    torch.testing.assert_close(ya, reference_linear(x, a[0], a[1], ids, a[2]))
    torch.testing.assert_close(yb, reference_linear(x, b[0], b[1], ids, b[2]))


@pytest.fixture
def fresh_cost_cache():
    """The per-process measured cost rule, emptied before and after (a fake must not leak)."""
    from vllm_channelmerge import compat

    compat.measured_cpu_cost.cache_clear()
    yield
    compat.measured_cpu_cost.cache_clear()


# A host where bf16 compute is slow (no AMX); see tests/test_costfit.py
SLOW_BF16_TIMINGS = costfit.Timings(per_call_1=1000.0, per_call_big=1000.0 + 85.0 * 256, packed_1=670.0,
                                     packed_big=670.0 + 81.0 * 256, gather=1200.0, big=256, weight_bytes=4 << 20)


def test_vllm_backend_measures_once_per_dtype_and_logs(monkeypatch, caplog, fresh_cost_cache):
    gemm = _vllm_factory()
    from vllm_channelmerge import compat

    calls = []

    def fake_measure(g, dtype):
        calls.append(dtype)
        return SLOW_BF16_TIMINGS

    monkeypatch.setattr(costfit, "measure", fake_measure)
    monkeypatch.delenv(compat.COST_MODEL_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="vllm.channelmerge"):
        c = gemm.cost_model(torch.bfloat16)
        assert compat.cpu_gemm_factory().cost_model(torch.bfloat16) is c  # once per process
    assert calls == [torch.bfloat16] and c.source == "measured" and c.packed == pytest.approx(0.67)
    assert "cost rule for bfloat16 timed on this CPU" in caplog.text
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 8, 4, generator=gen).to(torch.bfloat16)
    assert prepare_layer(w, make_group_index(4, 2, 8, gen), gemm=gemm).cost_model is c  # layers use it
    assert gemm.cost_model(torch.float32, "cuda") is kk.CUDA_COST  # CUDA: never timed here


def test_vllm_backend_cost_model_env(monkeypatch, fresh_cost_cache):
    gemm = _vllm_factory()
    from vllm_channelmerge import compat

    monkeypatch.setattr(costfit, "measure", lambda *a: pytest.fail("the table must not time anything"))
    monkeypatch.setenv(compat.COST_MODEL_ENV, "table")
    assert gemm.cost_model(torch.float32) is kk.prepacked_cpu_cost(torch.float32)
    monkeypatch.setenv(compat.COST_MODEL_ENV, "guess")
    with pytest.raises(ValueError, match="CHANNELMERGE_COST_MODEL='guess'; expected measure or table"):
        gemm.cost_model(torch.float32)


def test_vllm_backend_measures_this_host_for_real(monkeypatch, fresh_cost_cache):
    """One real measurement: every constant finite and positive, the log counts untouched."""
    gemm = _vllm_factory()
    from vllm_channelmerge import compat

    monkeypatch.setattr(costfit, "SHAPE", (256, 128))
    monkeypatch.setattr(costfit, "BIG", 32)
    monkeypatch.setattr(costfit, "POOL_BYTES", 1 << 20)
    monkeypatch.delenv(compat.COST_MODEL_ENV, raising=False)
    before = dict(gemm.paths)
    c = gemm.cost_model(torch.float32)
    assert c.source == "measured" and gemm.paths == before
    assert c.packed > 0 and c.gather > 0 and c.flop_per_token >= 0 and c.packed_per_token >= 0
