"""Per-channel partition of N experts into at most K groups, for all channels at once.

Everything works on each channel's N x N Gram matrix of task vectors (`gram`), turned into
squared distances (`sq_distances`; cosine = distances between unit vectors, as in the
paper). The objective is the k-means one: the within-group sum of squared distances to the
group centroid, which depends on the distances only:

    cost(partition) = sum_g 1/(2|g|) * sum_{i,j in g} d2_ij

Small problems are solved exactly: every set partition of N into <= K blocks is one column
of a matrix, and all channels' costs are one matrix product. Larger ones use a batched
kernel k-means over all channels at once with deterministic farthest-first starts. No
library call per channel; the output is deterministic and relabelled (`relabel`) so that
group 0 is each channel's largest group (the runtime relies on it).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

Similarity = Literal["cosine", "euclidean"]


def gram(deltas: torch.Tensor) -> torch.Tensor:
    """[N, R, I] task-vector rows -> [R, N, N] Gram matrices (float64 for stable ties)."""
    d = deltas.to(torch.float64) if deltas.device.type == "cpu" else deltas.float()
    return torch.einsum("nri,mri->rnm", d, d).to(torch.float64)


def sq_distances(g: torch.Tensor, similarity: Similarity = "cosine") -> torch.Tensor:
    """[R, N, N] Gram -> [R, N, N] squared distances (cosine: between unit vectors;
    an all-zero task vector stays the zero vector)."""
    g = g.to(torch.float64)
    diag = torch.diagonal(g, dim1=1, dim2=2)
    if similarity == "cosine":
        norm = diag.clamp_min(0).sqrt()
        inv = torch.where(norm > 0, 1.0 / norm.clamp_min(1e-300), torch.zeros_like(norm))
        g = g * inv.unsqueeze(2) * inv.unsqueeze(1)
        diag = torch.diagonal(g, dim1=1, dim2=2)
    elif similarity != "euclidean":
        raise ValueError(f"unknown similarity {similarity!r}; allowed: cosine, euclidean")
    d2 = diag.unsqueeze(2) + diag.unsqueeze(1) - 2 * g
    return d2.clamp_min(0)


@functools.lru_cache(maxsize=64)
def num_partitions(n: int, k: int) -> int:
    """Number of set partitions of n items into at most k blocks (sum of Stirling numbers)."""
    s = [[0] * (k + 1) for _ in range(n + 1)]
    s[0][0] = 1
    for i in range(1, n + 1):
        for j in range(1, min(i, k) + 1):
            s[i][j] = j * s[i - 1][j] + s[i - 1][j - 1]
    return sum(s[n][1:k + 1])


@functools.lru_cache(maxsize=64)
def _partitions_list(n: int, k: int) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []

    def rec(prefix: list[int], mx: int) -> None:
        if len(prefix) == n:
            out.append(tuple(prefix))
            return
        for lab in range(min(mx + 2, k)):
            rec(prefix + [lab], max(mx, lab))

    rec([0], 0)
    return tuple(out)


def set_partitions(n: int, k: int) -> torch.Tensor:
    """All partitions of n items into <= k blocks as restricted-growth strings [P, n],
    in lexicographic order (so the all-in-one partition comes first)."""
    return torch.tensor(_partitions_list(n, k), dtype=torch.int64).reshape(-1, n)


def partition_cost(d2: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Within-group sum of squares of `assign` [R, N] for distances `d2` [R, N, N] -> [R]."""
    same = (assign.unsqueeze(2) == assign.unsqueeze(1)).to(d2.dtype)
    size = same.sum(2)  # [R, N]: size of i's group
    return (d2 * same / (2 * size.unsqueeze(2))).sum((1, 2))


@functools.lru_cache(maxsize=32)
def _partition_weights(n: int, k: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Partitions [P, n] (canonical labels, `relabel`) and their cost weights [n*n, P]:
    1/(2|g|) where i, j share group g (the cost does not depend on the labels)."""
    parts = relabel(set_partitions(n, k).to(device))
    same = (parts.unsqueeze(2) == parts.unsqueeze(1)).to(dtype)  # [P, n, n]
    weights = same / (2 * same.sum(2, keepdim=True))
    return parts, weights.reshape(len(parts), n * n).t().contiguous()


def exact_partition(d2: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Optimal partition per channel by enumeration: [R, N, N] -> [R, N] labels, already
    canonical (`relabel`): the enumerated partitions are relabelled once, not every channel."""
    r, n, _ = d2.shape
    parts, wflat = _partition_weights(n, k, d2.dtype, str(d2.device))
    best = torch.empty(r, dtype=torch.int64, device=d2.device)
    for s in range(0, r, chunk):
        cost = d2[s:s + chunk].reshape(-1, n * n) @ wflat  # [chunk, P]
        best[s:s + chunk] = cost.argmin(1)  # first minimum: deterministic
    return parts[best]


def _farthest_first(d2: torch.Tensor, k: int, start: int) -> torch.Tensor:
    """Deterministic k-means++-like seeding: [R, N, N] -> [R, k] indices of chosen points."""
    r, n, _ = d2.shape
    ar = torch.arange(r, device=d2.device)
    chosen = torch.full((r, k), start, dtype=torch.int64, device=d2.device)
    mind = d2[ar, start]  # [R, N]
    for j in range(1, k):
        nxt = mind.argmax(1)  # first maximum
        chosen[:, j] = nxt
        mind = torch.minimum(mind, d2[ar, nxt])
    return chosen


def _kmeans_once(d2: torch.Tensor, k: int, start: int, iters: int) -> torch.Tensor:
    r, n, _ = d2.shape
    ar = torch.arange(r, device=d2.device)
    centers = _farthest_first(d2, k, start)  # [R, k]
    dist = d2[ar.unsqueeze(1), centers]  # [R, k, N]
    assign = dist.argmin(1)  # [R, N]
    for _ in range(iters):
        z = torch.nn.functional.one_hot(assign, k).to(d2.dtype)  # [R, N, k]
        size = z.sum(1)  # [R, k]
        s1 = d2 @ z  # [R, N, k]: sum_j d2_ij over members j of g
        s2 = (z * s1).sum(1)  # [R, k]
        safe = size.clamp_min(1)
        to_c = s1 / safe.unsqueeze(1) - (s2 / (2 * safe * safe)).unsqueeze(1)
        to_c = torch.where(size.unsqueeze(1) > 0, to_c, torch.full_like(to_c, float("inf")))
        new = to_c.argmin(2)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def kmeans_partition(d2: torch.Tensor, k: int, n_init: int = 4, iters: int = 50) -> torch.Tensor:
    """Batched kernel k-means on distances, best of `n_init` deterministic starts: [R, N]."""
    r, n, _ = d2.shape
    best = None
    best_cost = None
    for start in range(min(n_init, n)):
        a = _kmeans_once(d2, k, start, iters)
        c = partition_cost(d2, a)
        if best is None:
            best, best_cost = a, c
        else:
            better = c < best_cost - 1e-12 * best_cost.abs().clamp_min(1e-30)
            best = torch.where(better.unsqueeze(1), a, best)
            best_cost = torch.where(better, c, best_cost)
    assert best is not None
    return best


def relabel(assign: torch.Tensor) -> torch.Tensor:
    """Canonical labels per row: group 0 is the largest group (ties: the group holding the
    lowest expert index); the other groups are numbered by first appearance."""
    r, n = assign.shape
    lab = assign.to(torch.int64)
    z = torch.nn.functional.one_hot(lab, n)  # [R, N, L<=N]
    size = z.sum(1)  # [R, L]
    pos = torch.arange(n, device=assign.device).view(1, n, 1).expand_as(z)
    first = torch.where(z.bool(), pos, torch.full_like(pos, n)).amin(1)  # [R, L]
    present = size > 0
    largest = (size * (n + 1) - first).masked_fill(~present, -(n + 2) ** 2).argmax(1)  # [R]
    key = torch.where(present, first + 1, torch.full_like(first, 2 * n + 2))
    key.scatter_(1, largest.unsqueeze(1), 0)
    order = key.argsort(dim=1, stable=True)  # order[j] = old label that becomes j
    new_of_old = torch.empty_like(order)
    new_of_old.scatter_(1, order, torch.arange(order.shape[1], device=assign.device).expand_as(order))
    return new_of_old.gather(1, lab)


def partition_from_gram(
    g: torch.Tensor,
    k: int,
    similarity: Similarity = "cosine",
    exact_limit: int = 4096,
    n_init: int = 4,
) -> torch.Tensor:
    """Group index of every channel from its Gram matrix: [R, N, N] -> [R, N] int64 in [0, K).

    K=1: everyone in group 0. K>=N: every expert alone (label = expert index), so K=N stores
    every expert exactly even where two experts happen to be identical.
    """
    r, n = g.shape[0], g.shape[1]
    if k <= 1:
        return torch.zeros(r, n, dtype=torch.int64, device=g.device)
    if k >= n:
        return torch.arange(n, device=g.device).expand(r, n).clone()
    d2 = sq_distances(g, similarity)
    if num_partitions(n, k) <= exact_limit:
        return exact_partition(d2, k)
    return relabel(kmeans_partition(d2, k, n_init=n_init))


def row_gram(deltas_rni: torch.Tensor) -> torch.Tensor:
    """[R, N, I] (rows-major layout used by the merge) -> [R, N, N] Gram, one batched matmul."""
    d = deltas_rni.float()
    return torch.bmm(d, d.transpose(1, 2)).to(torch.float64)


def partition_channels(
    deltas: torch.Tensor,
    k: int,
    similarity: Similarity = "cosine",
    exact_limit: int = 4096,
    n_init: int = 4,
) -> torch.Tensor:
    """Group index of every channel: deltas [N, R, I] -> [R, N] int64 labels in [0, K)."""
    n, r = deltas.shape[0], deltas.shape[1]
    if k <= 1 or k >= n:
        return partition_from_gram(torch.zeros(r, n, n, device=deltas.device), k, similarity)
    return partition_from_gram(gram(deltas), k, similarity, exact_limit, n_init)
