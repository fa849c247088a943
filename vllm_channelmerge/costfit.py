"""The cost rule's CPU constants, measured on this host at start-up (once per dtype).

Hosts differ more than their ISA flags say. Per SmolLM2-135M layer on 1 thread
(benchmarks/kernels_RESULTS.md), bfloat16 costs per token of a batch, in passes over the
dense weight: ~0.007 on an Intel AMX host, ~0.03 on an AMD EPYC with AVX512-BF16, ~0.085 on
an Intel Xeon with AVX512-BF16 and no AMX; float32 ``F.linear`` is MKL, 2.2-2.5x slower than
oneDNN on the AMD host and on par with it on the Intel ones. A table keyed by flags picked
the slowest strategy for bf16 prefill on both non-AMX hosts (1.5-1.7x the best). So the
vLLM backend times the few quantities :class:`~vllm_channelmerge.kernels.CostModel` is made
of, with its own GEMMs, on a pool of weights larger than the caches (decode streams weights
from memory): a pass of the per-call GEMM at 1 token (the unit) and at ``BIG`` tokens, the
same for the prepacked GEMM, and one gather: about 1 s per dtype on 2 cores.

The strategies compute the same result; the measurement only decides which one runs (noise
can cost speed, never correctness). ``CHANNELMERGE_COST_MODEL=table`` uses the flag-keyed
table (:func:`~vllm_channelmerge.kernels.prepacked_cpu_cost`) instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Optional

import torch

from . import kernels

log = logging.getLogger("vllm.channelmerge")

# Reference weight [out, in] (a mid-size LLM linear), tokens of the large batch, weights in
# the pool (their bytes exceed a server CPU's last-level cache), best-of repetitions.
SHAPE = (2048, 1024)
BIG = 256
POOL_BYTES = 96 << 20
REPS = 7


@dataclasses.dataclass(frozen=True)
class Timings:
    """Microseconds per pass over one dense ``[out, in]`` weight."""

    per_call_1: float  # the per-call GEMM (a gathered weight), 1 token: the unit
    per_call_big: float  # the same at ``big`` tokens
    packed_1: float  # the prepacked GEMM, 1 token
    packed_big: float  # the same at ``big`` tokens
    gather: float  # ``index_select`` of the dense rows out of ``[2 * out, in]``
    big: int  # tokens of the large batch
    weight_bytes: int  # bytes of one dense weight


def fit(t: Timings, base: kernels.CostModel) -> kernels.CostModel:
    """The constants from the timings; launch and select costs stay ``base``'s."""
    if not all(0 < v < float("inf") for v in dataclasses.astuple(t)[:5]):
        raise ValueError(f"cost measurement gave unusable timings: {t}")
    unit = t.per_call_1
    return dataclasses.replace(
        base,
        flop_per_token=max(0.0, (t.per_call_big / unit - 1.0) / t.big),
        packed=t.packed_1 / unit,
        packed_per_token=max(0.0, (t.packed_big - t.packed_1) / unit / t.big),
        gather=t.gather / unit,
        bytes_per_us=t.weight_bytes / unit,
        source="measured",
    )


def interleaved_best_us(fns: dict[str, Callable[[], object]], reps: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best-of-``reps`` microseconds of each function, run round-robin so that a load from other
    processes on a shared machine hits every one alike (the minimum is the least noisy)."""
    for fn in fns.values():
        fn()  # warm (first-call set-up, page faults)
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            best[k] = min(best[k], clock() - t0)
    return {k: v * 1e6 for k, v in best.items()}


def measure(gemm: kernels.GemmFactory, dtype: torch.dtype, shape: Optional[tuple[int, int]] = None,
            big: Optional[int] = None, pool_bytes: Optional[int] = None, reps: Optional[int] = None) -> Timings:
    """Time ``gemm``'s per-call and prepacked GEMMs and a gather on this CPU (see the module):
    the 1-token passes and the gather over the whole pool (memory-bound), the ``big``-token
    GEMMs on two of its weights (compute-bound)."""
    out, inp = shape or SHAPE
    big, pool_bytes, reps = big or BIG, pool_bytes or POOL_BYTES, reps or REPS
    esize = torch.empty((), dtype=dtype).element_size()
    n = max(2, min(32, pool_bytes // (2 * out * inp * esize)))
    g = torch.Generator().manual_seed(0)
    rows = [torch.empty(2 * out, inp, dtype=dtype).uniform_(-inp**-0.5, inp**-0.5, generator=g) for _ in range(n)]
    idx = torch.arange(out) + out * torch.randint(0, 2, (out,), generator=g)
    dense = [r.index_select(0, idx) for r in rows]
    per_call = [gemm.per_call(w) for w in dense]
    packed = [gemm.prepack(w) for w in dense]
    x1 = torch.randn(1, inp, generator=g).to(dtype)
    xb = torch.randn(big, inp, generator=g).to(dtype)

    def each(fns: list, arg) -> Callable[[], None]:
        def run() -> None:  # each result is dropped before the next, as in the kernels
            for f in fns:
                arg(f)
        return run

    us = interleaved_best_us({
        "per_call_1": each(per_call, lambda f: f(x1)),
        "packed_1": each(packed, lambda f: f(x1)),
        "gather": each(rows, lambda r: r.index_select(0, idx)),
        "per_call_big": each(per_call[:2], lambda f: f(xb)),
        "packed_big": each(packed[:2], lambda f: f(xb)),
    }, reps)
    per_weight = {k: v / (2 if k.endswith("_big") else n) for k, v in us.items()}
    return Timings(**per_weight, big=big, weight_bytes=out * inp * esize)


def measured_cost(gemm: kernels.GemmFactory, dtype: torch.dtype) -> kernels.CostModel:
    """:func:`measure` then :func:`fit` on the flag table's model for ``dtype`` (logged)."""
    t0 = time.perf_counter()
    t = measure(gemm, dtype)
    cost = fit(t, kernels.prepacked_cpu_cost(dtype))
    log.info("channelmerge: cost rule for %s timed on this CPU in %.2f s (%d threads; a pass over %.1f MB "
             "%.0f us), %s", str(dtype).replace("torch.", ""), time.perf_counter() - t0,
             torch.get_num_threads(), t.weight_bytes / 1e6, t.per_call_1, cost.summary())
    return cost
