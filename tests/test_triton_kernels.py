"""The fused Triton gather-GEMM against the reference: on CUDA when present, else through
Triton's CPU interpreter (in a subprocess, since TRITON_INTERPRET is read at import)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_channelmerge import triton_kernels
from vllm_channelmerge.kernels import (
    ExpertBatch,
    channel_merged_linear,
    choose_strategy,
    prepare_layer,
    reference_linear,
)

HAVE_TRITON = importlib.util.find_spec("triton") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASE_CODE = textwrap.dedent(
    """
    import torch
    from vllm_channelmerge import triton_kernels as tk
    from vllm_channelmerge.kernels import ExpertBatch, prepare_layer, prepare_rows, reference_linear
    from vllm_channelmerge.rowtable import compact_groups

    def run_cases(device):
        g = torch.Generator().manual_seed(0)
        # (N, K, out, in, T): decode mixes, one token, K=1, odd sizes, N=64, > BLOCK_M per expert
        for n, k, out, inp, t in [(4, 2, 70, 40, 37), (4, 2, 64, 64, 1), (3, 1, 33, 17, 5),
                                  (64, 4, 48, 32, 40), (4, 4, 130, 72, 20), (2, 2, 16, 16, 0)]:
            for dt, bias in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, True)):
                w = (torch.randn(k, out, inp, generator=g) / inp ** 0.5).to(dt)
                gi = torch.randint(0, k, (n, out), generator=g, dtype=torch.int32)
                b = torch.randn(k, out, generator=g).to(dt) if bias else None
                ids = torch.randint(0, n, (t,), generator=g)
                x = torch.randn(t, inp, generator=g).to(dt)
                ref = reference_linear(x, w, gi, ids, b)
                st = prepare_layer(w.to(device), gi.to(device), None if b is None else b.to(device))
                y = tk.fused_gather_linear(x.to(device), st, ExpertBatch.build(ids.to(device), n))
                tol = 1e-4 if dt == torch.float32 else 3e-2
                torch.testing.assert_close(y.cpu().float(), ref.float(), atol=tol, rtol=tol)
                # the same layer as a row table (format v2): most channels one row, a few split
                gi_sparse = gi * (torch.rand(1, out, generator=g) < 0.25)
                rows, ri, rb = compact_groups(w, gi_sparse, b)
                st = prepare_rows(rows.to(device), ri.to(device), None if rb is None else rb.to(device), out)
                y = tk.fused_gather_linear(x.to(device), st, ExpertBatch.build(ids.to(device), n))
                ref = reference_linear(x, w, gi_sparse, ids, b)
                torch.testing.assert_close(y.cpu().float(), ref.float(), atol=tol, rtol=tol)
        # non-contiguous activations
        w = torch.randn(2, 40, 24, generator=g); gi = torch.randint(0, 2, (4, 40), generator=g)
        x = torch.randn(24, 9, generator=g).t(); ids = torch.randint(0, 4, (9,), generator=g)
        st = prepare_layer(w.to(device), gi.to(device))
        y = tk.fused_gather_linear(x.to(device), st, ExpertBatch.build(ids.to(device), 4))
        torch.testing.assert_close(y.cpu(), reference_linear(x, w, gi, ids), atol=1e-4, rtol=1e-4)
    """
)


def test_imports_and_reports_unavailable_without_cuda():
    if not torch.cuda.is_available():
        assert triton_kernels.is_available() is False
        st = prepare_layer(torch.randn(2, 8, 4), torch.zeros(3, 8, dtype=torch.int32))
        assert choose_strategy(ExpertBatch.build([0, 1], 3), st, torch.randn(2, 4)) != "triton"


def test_tile_table_covers_each_expert_segment():
    batch = ExpertBatch.build(torch.tensor([1] * 20 + [3] * 3 + [0]), 4)
    tiles = triton_kernels.tile_table(batch, block_m=16).tolist()
    assert tiles == [[0, 0, 1], [1, 1, 17], [1, 17, 21], [3, 21, 24]]
    assert triton_kernels.tile_table(batch, block_m=16) is triton_kernels.tile_table(batch, block_m=16)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_kernel_in_cpu_interpreter():
    code = CASE_CODE + "\nrun_cases('cpu')\nprint('OK')\n"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_kernel_on_cuda():
    assert triton_kernels.is_available()
    ns: dict = {}
    exec(CASE_CODE, ns)
    ns["run_cases"]("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_dispatch_picks_triton_for_cuda_decode():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 256, 128, generator=g)
    gi = torch.randint(0, 2, (4, 256), generator=g, dtype=torch.int32)
    ids = torch.arange(16) % 4
    x = torch.randn(16, 128, generator=g)
    st = prepare_layer(w.cuda(), gi.cuda())
    batch = ExpertBatch.build(ids.cuda(), 4)
    assert choose_strategy(batch, st, x.cuda()) == "triton"
    y = channel_merged_linear(x.cuda(), st, batch)
    torch.testing.assert_close(y.cpu(), reference_linear(x, w, gi, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_gpu_benchmark_checks_its_kernels_in_the_interpreter():
    """benchmarks/kernels_gpu.py times only what it has checked against the reference; its check
    runs here through Triton's CPU interpreter (the timing itself needs CUDA)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "benchmarks.kernels_gpu", "--check-only"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "check passed on cpu" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
