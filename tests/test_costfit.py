"""The cost rule's constants measured on the host (``vllm_channelmerge.costfit``): the fit from
timings, what it changes in the rule's choices, and the measurement itself (how vLLM's backend
uses it: tests/test_gemm_backends.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.kernels_cpu import group_index as make_group_index
from vllm_channelmerge import costfit
from vllm_channelmerge import kernels as kk
from vllm_channelmerge.kernels import ExpertBatch, GemmFactory, prepare_layer

# A host where bf16 compute is slow (no AMX): a pass 1000 us, +85 us a token per call,
# prepacked 0.67 of a pass and +81 us a token, a gather 1.2 passes.
SLOW_BF16 = costfit.Timings(per_call_1=1000.0, per_call_big=1000.0 + 85.0 * 256, packed_1=670.0,
                            packed_big=670.0 + 81.0 * 256, gather=1200.0, big=256, weight_bytes=4 << 20)


def test_fit_turns_timings_into_the_rule_constants():
    base = kk.prepacked_cpu_cost(torch.bfloat16, {"avx512f": True, "avx512_bf16": True})
    c = costfit.fit(SLOW_BF16, base)
    assert c.source == "measured" and base.source == "table"
    assert c.flop_per_token == pytest.approx(0.085)
    assert c.packed == pytest.approx(0.67) and c.packed_per_token == pytest.approx(0.081)
    assert c.gather == pytest.approx(1.2) and c.bytes_per_us == pytest.approx((4 << 20) / 1000.0)
    assert (c.select, c.scatter, c.launch_us) == (base.select, base.scatter, base.launch_us)  # kept
    assert c.packed_gemm(100) == pytest.approx(0.67 + 8.1)
    # without a measured slope the prepacked GEMM scales the per-call one, as before
    assert base.packed_gemm(100) == pytest.approx(base.packed * (1 + base.flop_per_token * 100))
    assert "measured" in c.summary() and "+0.0850 a token" in c.summary()


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0])
def test_fit_refuses_unusable_timings(bad):
    with pytest.raises(ValueError, match="unusable timings"):
        costfit.fit(dataclasses.replace(SLOW_BF16, gather=bad), kk.DEFAULT_COST)


def test_measured_slow_compute_moves_prefill_off_all_groups():
    """On a host whose bf16 compute is slow the flag table (calibrated with AMX) picks all_groups
    for a prefill, K x the FLOPs; the measured constants pick a per-expert GEMM."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 1536, 576, generator=gen).to(torch.bfloat16)
    st = prepare_layer(w, make_group_index(4, 2, 1536, gen))
    prefill = ExpertBatch.build(torch.arange(512) // 128, 4)
    table = kk.prepacked_cpu_cost(torch.bfloat16, {"avx512f": True, "avx512_bf16": True, "amx_bf16": True})
    measured = costfit.fit(SLOW_BF16, table)
    assert kk.choose_strategy(prefill, st, cost=table) == "all_groups"
    assert kk.choose_strategy(prefill, st, cost=measured) in ("per_expert_gather", "majority_residual")
    costs = kk.strategy_costs(prefill, st, measured)
    # all_groups = K prepacked GEMMs over the batch (+ launch and select): slope K * a_p * T
    cheaper = dataclasses.replace(measured, packed_per_token=measured.packed_per_token / 2)
    drop = costs["all_groups"] - kk.strategy_costs(prefill, st, cheaper)["all_groups"]
    assert drop == pytest.approx(2 * 512 * measured.packed_per_token / 2)


class CountingGemm(GemmFactory):
    """Plain F.linear GEMMs; counts the weights prepacked and given per call."""

    def __init__(self):
        self.prepacked = self.per_calls = 0

    def prepack(self, weight):
        self.prepacked += 1
        return kk.torch_linear(weight)

    def per_call(self, weight):
        self.per_calls += 1
        return kk.torch_linear(weight)


def test_measure_times_the_backends_own_gemms():
    gemm = CountingGemm()
    t = costfit.measure(gemm, torch.float32, shape=(64, 32), big=16, pool_bytes=1 << 16, reps=1)
    assert gemm.prepacked == gemm.per_calls >= 2  # every pool weight through both GEMMs
    assert t.big == 16 and t.weight_bytes == 64 * 32 * 4
    assert all(v > 0 for v in dataclasses.astuple(t)[:5])
