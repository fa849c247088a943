"""Time the fused Triton gather-GEMM against a dense GEMM on CUDA (torch + Triton only, no vLLM).

On a GPU, decode is memory-bound: a mixed-expert step costs what it reads. This compares, per
linear shape of a 7B Llama layer (4096 -> 4096, 4096 -> 11008, 11008 -> 4096) and N experts
mixed token by token:

* ``dense``        -- one expert's dense weight, ``torch.nn.functional.linear`` (cuBLAS): the floor;
* ``triton_v1``    -- the fused kernel on a format v1 layer, K groups (every channel split);
* ``triton_rows``  -- the fused kernel on a row table (format v2) with a share of split channels;
* ``all_rows``     -- cuBLAS over every stored row of that row table, then the per-token select.

For each: median microseconds (CUDA events), and the bytes of weights it must read at least
(``dense``: one ``[out, in]``; the others: the rows the batch's experts use) per microsecond.

    python -m benchmarks.kernels_gpu                  # under 5 minutes on one GPU
    python -m benchmarks.kernels_gpu --check-only     # correctness only (also on CPU, with
                                                      # TRITON_INTERPRET=1 and tiny shapes)

Results go to stdout as a markdown table and, with ``--out FILE.json``, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from vllm_channelmerge import kernels as kk
from vllm_channelmerge import triton_kernels as tk
from vllm_channelmerge.rowtable import compact_groups

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
SHAPES_TINY = [(48, 32), (70, 40)]


def make_layer(out: int, inp: int, n: int, k: int, dtype: torch.dtype, device: str,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A v1 layer ``[K, out, in]`` with every channel split among the experts, and its index."""
    w = (torch.randn(k, out, inp, generator=gen) / inp**0.5).to(dtype)
    gi = torch.randint(0, k, (n, out), generator=gen, dtype=torch.int32)
    return w.to(device), gi.to(device)


def time_us(fn: Callable[[], torch.Tensor], iters: int) -> float:
    """Median of ``iters`` CUDA-event timings after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0)
    return statistics.median(times)


def cases(out: int, inp: int, n: int, t: int, split: float, dtype: torch.dtype, device: str, seed: int):
    """The four computations of one case, each a zero-argument callable, and the reference."""
    gen = torch.Generator().manual_seed(seed)
    w, gi = make_layer(out, inp, n, 2, dtype, device, gen)  # v1: every channel split
    st_v1 = kk.prepare_layer(w, gi)
    keep = (torch.rand(1, out, generator=gen) < split).to(device)  # the row table: a share split
    rows, ri, _ = compact_groups(w, gi * keep)
    st_rows = kk.prepare_rows(rows, ri, None, out)
    ids = (torch.arange(t) % n).to(device)
    batch = kk.ExpertBatch.build(ids, n)
    x = torch.randn(t, inp, generator=gen).to(dtype).to(device)
    dense_w = w[0]
    run = {
        "dense": lambda: F.linear(x, dense_w),
        "triton_v1": lambda: tk.fused_gather_linear(x, st_v1, batch),
        "triton_rows": lambda: tk.fused_gather_linear(x, st_rows, batch),
        "all_rows": lambda: kk.all_groups(x, st_rows, batch),
    }
    refs = {"triton_v1": (st_v1, ids), "triton_rows": (st_rows, ids), "all_rows": (st_rows, ids)}
    return run, refs, x, rows.shape[0]


def check(device: str, shapes: list[tuple[int, int]], dtype: torch.dtype) -> None:
    """Every timed computation equals the plain-PyTorch reference (raises otherwise)."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for out, inp in shapes:
        for t in (1, 5, 33):
            run, refs, x, _ = cases(out, inp, 4, t, 0.25, dtype, device, seed=out + t)
            for name, (st, ids) in refs.items():
                want = kk.reference_rows_linear(x.float().cpu(), st.rows.float().cpu(), st.row_index.cpu(), ids.cpu())
                got = run[name]().float().cpu()
                torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name} {out}x{inp} T={t}: {m}")


def bench(shapes: list[tuple[int, int]], tokens: list[int], n: int, split: float, dtype: torch.dtype,
          iters: int) -> list[dict]:
    rows_out = []
    esize = torch.finfo(dtype).bits // 8
    for out, inp in shapes:
        for t in tokens:
            run, _, _, r = cases(out, inp, n, t, split, dtype, "cuda", seed=0)
            for name, fn in run.items():
                us = time_us(fn, iters)
                stored = {"dense": out, "triton_v1": 2 * out, "triton_rows": r, "all_rows": r}[name]
                rows_out.append({"shape": f"{out}x{inp}", "tokens": t, "kernel": name, "us": us,
                                 "weight_gb_per_s": stored * inp * esize / us / 1e3})
    return rows_out


def markdown(rows: list[dict]) -> str:
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    lines = ["| shape | T | " + " | ".join(f"{k} µs" for k in kernels) + " | " +
             " | ".join(f"{k}/dense" for k in kernels[1:]) + " |",
             "|---|---|" + "---|" * (2 * len(kernels) - 1)]
    for key in dict.fromkeys((r["shape"], r["tokens"]) for r in rows):
        got = {r["kernel"]: r["us"] for r in rows if (r["shape"], r["tokens"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(f"{got[k]:.1f}" for k in kernels) + " | " +
                     " | ".join(f"{got[k] / got['dense']:.2f}" for k in kernels[1:]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-only", action="store_true", help="correctness only; runs on CPU with TRITON_INTERPRET=1")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--split", type=float, default=0.25, help="share of the row table's channels that are split")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    if a.check_only:
        device = "cuda" if tk.is_available() else "cpu"
        if device == "cpu" and not tk.interpreter_enabled():
            raise SystemExit("no CUDA here: run the check with TRITON_INTERPRET=1 (the Triton CPU interpreter)")
        check(device, SHAPES_TINY if device == "cpu" else SHAPES_7B[:1], dtype if device == "cuda" else torch.float32)
        print(f"check passed on {device}")
        return 0
    if not tk.is_available():
        raise SystemExit("kernels_gpu needs CUDA and Triton (for the correctness check alone on CPU: "
                         "TRITON_INTERPRET=1 python -m benchmarks.kernels_gpu --check-only)")
    check("cuda", SHAPES_7B[:1], dtype)
    rows = bench(SHAPES_7B, a.tokens, a.experts, a.split, dtype, a.iters)
    print(f"{torch.cuda.get_device_name()}, {a.dtype}, N={a.experts}, row table with {a.split:.0%} of channels split")
    print(markdown(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": a.dtype, "split": a.split, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
