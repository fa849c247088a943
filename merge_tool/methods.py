"""In-group merge methods: small pure functions over batched task vectors.

A method has two steps, so that grouping never changes what a method means:

1. `sparsify` acts on each expert's task vector of a *whole tensor* (TIES trims each task
   vector to its top-`density` magnitudes; DARE drops entries at random and rescales by
   1/density). It does not depend on the grouping, exactly as in mergekit, so K=1 is the
   classic whole-model merge.
2. `combine` merges, for every channel (row) at once, the rows of the experts that are in
   one group: `deltas` is `[N, R, I]`, `members` is `[R, N]` bool, the result `[R, I]` is
   the merged task vector of that group (added to the base by the caller).

Formulas (tau_n = W_n - B, lambda = `scale`):
- average:          mean_n tau_n                       (= plain weight averaging)
- task_arithmetic:  lambda * sum_n tau_n               (Ilharco et al. 2023); with
                    `normalize`, divided by the number of members (mergekit's option)
- ties:             trim to top-density |tau_n| per tensor; gamma = sign(sum_n trimmed_n)
                    (0 counts as +); disjoint mean over entries whose sign equals gamma;
                    times lambda                       (Yadav et al. 2023; mergekit `ties`)
- dare:             tau_n * Bernoulli(density) / density, then lambda * sum_n
                    (Yu et al. 2024, DARE + task arithmetic; mergekit `dare_linear`
                    without normalisation)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from merge_tool.config import MethodParams

CombineFn = Callable[[torch.Tensor, torch.Tensor, MethodParams], torch.Tensor]


def _mask(members: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, N] bool -> [N, R, 1] float, broadcastable against deltas [N, R, I]."""
    return members.t().unsqueeze(-1).to(dtype)


def average(deltas: torch.Tensor, members: torch.Tensor, params: MethodParams) -> torch.Tensor:
    """Mean of the members' task vectors (rows with no member give 0)."""
    m = _mask(members, deltas.dtype)
    count = m.sum(0).clamp_min(1.0)
    return (deltas * m).sum(0) / count


def task_arithmetic(deltas: torch.Tensor, members: torch.Tensor, params: MethodParams) -> torch.Tensor:
    """lambda * sum of the members' task vectors (divided by their number if `normalize`)."""
    m = _mask(members, deltas.dtype)
    out = (deltas * m).sum(0) * params.scale
    return out / m.sum(0).clamp_min(1.0) if params.normalize else out


def ties(deltas: torch.Tensor, members: torch.Tensor, params: MethodParams) -> torch.Tensor:
    """Elect a sign per entry, then average only the (trimmed) entries that agree with it.

    `deltas` must already be trimmed (see `magnitude_threshold`/`trim`).
    """
    d = deltas * _mask(members, deltas.dtype)  # non-members and trimmed entries are 0
    sign = torch.where(d.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)  # elected; 0 -> +, as mergekit
    signed = d.mul_(sign)  # > 0 exactly where an entry agrees with the elected sign
    agree = signed > 0
    total = signed.clamp_min_(0).sum(0)  # sum of |agreeing entries|
    return total * sign / torch.count_nonzero(agree, dim=0).clamp_min(1).to(deltas.dtype) * params.scale


def dare(deltas: torch.Tensor, members: torch.Tensor, params: MethodParams) -> torch.Tensor:
    """lambda * sum of the members' (already dropped and rescaled) task vectors."""
    return task_arithmetic(deltas, members, params)


# -- sparsification (whole-tensor, per expert; independent of the grouping) -------------------

def magnitude_threshold(delta: torch.Tensor, density: float) -> float:
    """|x| threshold keeping the top `density` fraction of one expert's task vector.

    k = int(density * numel) entries are kept, as in mergekit's `magnitude` (at least 1).
    Entries equal to the threshold are all kept (only matters for exact ties). Exact: a
    strided sample brackets the k-th largest value, and only the entries inside that band
    are selected from (a full selection over the whole tensor is ~10x slower).
    """
    if density >= 1.0:
        return 0.0
    flat = delta.reshape(-1).abs().float()
    n = flat.numel()
    k = max(1, int(density * n))
    pos = n - k + 1  # 1-based rank from the smallest
    if n > 1 << 16:
        sample = flat[:: max(1, n // 16384)].sort().values
        q = pos / n
        m = sample.numel() - 1
        lo = float(sample[max(0, int((q - 0.02) * m))])
        hi = float(sample[min(m, int((q + 0.02) * m) + 1)])
        below = int(torch.count_nonzero(flat < lo))
        band = flat[(flat >= lo) & (flat <= hi)]
        if below < pos <= below + band.numel():
            return float(torch.kthvalue(band.cpu(), pos - below).values)
    return float(torch.kthvalue(flat.cpu(), pos).values)


def trim(delta: torch.Tensor, threshold: float, density: float) -> torch.Tensor:
    """Zero the entries below the magnitude threshold (TIES 'trim')."""
    if density >= 1.0:
        return delta
    return delta * (delta.abs() >= threshold).to(delta.dtype)


def dare_key(seed: int, tensor_name: str, expert_index: int) -> int:
    """A 63-bit key for one (seed, tensor, expert): DARE masks are reproducible anywhere."""
    h = hashlib.blake2b(f"{seed}/{tensor_name}/{expert_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


_M64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix_(z: torch.Tensor, s: int, mult: Optional[int]) -> torch.Tensor:
    """In place: z ^= z >>> s, then z *= mult (wrapping int64)."""
    z.bitwise_xor_(torch.bitwise_right_shift(z, s).bitwise_and_((1 << (64 - s)) - 1))
    if mult is not None:
        z.mul_(mult)
    return z


def _splitmix(key: int, flat_index: torch.Tensor) -> torch.Tensor:
    """splitmix64(key + (index + 1) * golden) as int64 bits, computed in place."""
    z = flat_index.to(torch.int64) * _i64(0x9E3779B97F4A7C15)
    z.add_(_i64(key + 0x9E3779B97F4A7C15))
    _mix_(z, 30, _i64(0xBF58476D1CE4E5B9))
    _mix_(z, 27, _i64(0x94D049BB133111EB))
    return _mix_(z, 31, None)


def uniform_hash(key: int, flat_index: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): splitmix64(key + index). Same on CPU and CUDA, and
    independent of how a tensor is split into blocks."""
    return _srl(_splitmix(key, flat_index), 11).to(torch.float64) * (1.0 / (1 << 53))


def dare_keep_mask(key: int, flat_index: torch.Tensor, density: float) -> torch.Tensor:
    """Bernoulli(density) keep-mask of the entries at `flat_index` of one expert's tensor.

    Equal to `uniform_hash(key, flat_index) < density`, compared on the 53-bit integers.
    """
    return _srl(_splitmix(key, flat_index), 11) < math.ceil(density * (1 << 53))


def dare_drop(delta: torch.Tensor, key: int, flat_index: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: drop entries with probability 1-density, rescale the rest by 1/density."""
    if density >= 1.0:
        return delta
    keep = dare_keep_mask(key, flat_index, density).to(delta.dtype)
    return delta * keep / density


def average_coefficients(membership: torch.Tensor, params: MethodParams) -> torch.Tensor:
    """`average` as weights: membership [R, K, N] (0/1) -> 1/|group| for members."""
    return membership / membership.sum(2, keepdim=True).clamp_min(1.0)


def sum_coefficients(membership: torch.Tensor, params: MethodParams) -> torch.Tensor:
    """`task_arithmetic` / `dare` as weights: lambda for members (/ |group| if `normalize`)."""
    if params.normalize:
        return membership * params.scale / membership.sum(2, keepdim=True).clamp_min(1.0)
    return membership * params.scale


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: how to combine a group, and which sparsification it needs.

    `coefficients`, when set, says the method is a weighted sum of the members' (sparsified)
    task vectors; the merge then computes every group of every channel in one batched matmul
    (same result as `combine`, which stays the reference).
    """

    name: str
    combine: CombineFn
    sparsify: Optional[str] = None  # None | "magnitude" | "random"
    coefficients: Optional[Callable[[torch.Tensor, MethodParams], torch.Tensor]] = None


METHODS: dict[str, MergeMethod] = {
    "average": MergeMethod("average", average, None, average_coefficients),
    "task_arithmetic": MergeMethod("task_arithmetic", task_arithmetic, None, sum_coefficients),
    "ties": MergeMethod("ties", ties, "magnitude"),
    "dare": MergeMethod("dare", dare, "random", sum_coefficients),
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; allowed: {', '.join(METHODS)}") from None
