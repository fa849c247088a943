"""Fused gather-GEMM for channel-merged layers on CUDA (Triton).

One program computes a ``BLOCK_M x BLOCK_N`` tile of the output for ``BLOCK_M`` rows of ONE
expert (a tile of that expert's segment in the expert-sorted batch) and ``BLOCK_N`` channels.
It loads the expert's row index for those channels once, then streams the selected rows
``rows[row_index[e, c], :]`` straight from the stored row table ``[R, in]`` (a v1 ``[K, out,
in]`` tensor is the table ``R = K*out``): no dense copy, no K-fold GEMM, and each needed row is
read once per tile.

Importable without CUDA or Triton: :func:`is_available` then returns False and the dispatcher in
``kernels.py`` never picks this path. With ``TRITON_INTERPRET=1`` set before import, the kernel
also runs on CPU tensors through Triton's interpreter (slow; used to test it without a GPU).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .kernels import ExpertBatch, LayerState

try:  # guarded: Triton may be missing, or present without a usable backend
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _HAVE_TRITON = False

BLOCK_M = 16  # tl.dot needs >= 16 rows; decode tiles are padded with masks
BLOCK_N = 64
BLOCK_K = 64


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available() -> bool:
    """True when the fused kernel can run on CUDA tensors here."""
    return _HAVE_TRITON and torch.cuda.is_available()


if _HAVE_TRITON:

    @triton.jit
    def _gather_gemm_kernel(
        x_ptr, w_ptr, ri_ptr, b_ptr, y_ptr, order_ptr, tiles_ptr,
        OUT, IN,
        stride_xt, stride_xk,
        stride_wr, stride_wk,
        stride_rn,
        stride_yt,
        HAS_BIAS: tl.constexpr,
        UPCAST: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(tiles_ptr + pid_m * 3)
        start = tl.load(tiles_ptr + pid_m * 3 + 1)
        end = tl.load(tiles_ptr + pid_m * 3 + 2)

        offs_m = start + tl.arange(0, BM)
        mask_m = offs_m < end
        tok = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)

        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < OUT
        row = tl.load(ri_ptr + expert.to(tl.int64) * stride_rn + offs_n, mask=mask_n, other=0).to(tl.int64)
        w_rows = row * stride_wr  # [BN] start of each needed row

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, IN, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < IN
            a = tl.load(
                x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + w_rows[None, :] + offs_k[:, None] * stride_wk,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            if UPCAST:  # the CPU interpreter cannot tl.dot 16-bit floats
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += tl.dot(a, b, input_precision="ieee")
        if HAS_BIAS:
            bias = tl.load(b_ptr + row, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        tl.store(
            y_ptr + tok[:, None] * stride_yt + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )


def tile_table(batch: "ExpertBatch", block_m: int = BLOCK_M) -> torch.Tensor:
    """``[tiles, 3]`` int32 (expert, start, end) in the sorted batch; memoised per step."""

    def make() -> torch.Tensor:
        rows: list[int] = []
        for e, s, n in zip(batch.experts, batch.offsets, batch.counts):
            for t0 in range(s, s + n, block_m):
                rows += [e, t0, min(t0 + block_m, s + n)]
        return torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).to(batch.expert_ids.device)

    return batch.scratch(("triton_tiles", block_m), make)


def fused_gather_linear(x: torch.Tensor, state: "LayerState", batch: "ExpertBatch") -> torch.Tensor:
    """``y[t] = x[t] @ W_{e(t)}^T (+ b)`` for ``x [T, in]`` with one fused Triton kernel."""
    if not _HAVE_TRITON:
        raise RuntimeError("Triton is not installed; use another strategy")
    if not (x.is_cuda or interpreter_enabled()):
        raise RuntimeError("the fused Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    t = x.shape[0]
    out_f, in_f = state.out_features, state.in_features
    y = torch.empty((t, out_f), dtype=x.dtype, device=x.device)
    if t == 0 or out_f == 0:
        return y
    tiles = tile_table(batch)
    w = state.rows  # [R, in], contiguous (prepare_rows)
    ri = state.row_index  # [N, out] int64, contiguous
    b = state.bias  # [R] or None, contiguous
    grid = (tiles.shape[0], triton.cdiv(out_f, BLOCK_N))
    _gather_gemm_kernel[grid](
        x, w, ri, b if b is not None else w, y, batch.order, tiles,
        out_f, in_f,
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1),
        ri.stride(0),
        y.stride(0),
        HAS_BIAS=b is not None,
        UPCAST=interpreter_enabled() and x.dtype != torch.float32,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
    )
    return y
