"""Clustering: exact enumeration vs brute force, k-means vs scikit-learn, relabel invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from merge_tool import clustering as cl


def _brute_partitions(n: int, k: int):
    """Independent enumeration: every labelling, deduplicated up to renaming."""
    seen = set()
    for labels in itertools.product(range(k), repeat=n):
        canon, mp = [], {}
        for lab in labels:
            mp.setdefault(lab, len(mp))
            canon.append(mp[lab])
        seen.add(tuple(canon))
    return sorted(seen)


def _inertia(x: np.ndarray, labels) -> float:
    """k-means objective of points x [N, D] under `labels`."""
    total = 0.0
    for g in set(labels):
        pts = x[[i for i, lab in enumerate(labels) if lab == g]]
        total += float(((pts - pts.mean(0)) ** 2).sum())
    return total


@pytest.mark.parametrize("n,k", [(2, 1), (3, 2), (4, 2), (4, 3), (5, 3), (6, 4)])
def test_set_partitions_complete(n, k):
    parts = cl.set_partitions(n, k)
    assert len(parts) == cl.num_partitions(n, k) == len(_brute_partitions(n, k))
    assert sorted(map(tuple, parts.tolist())) == _brute_partitions(n, k)
    assert parts[0].tolist() == [0] * n
    assert cl.num_partitions(4, 2) == 8  # DESIGN §2


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
@pytest.mark.parametrize("n,k", [(4, 2), (5, 2), (5, 3)])
def test_exact_equals_brute_force(similarity, n, k):
    g = torch.Generator().manual_seed(n * 10 + k)
    deltas = torch.randn(n, 40, 7, generator=g, dtype=torch.float64)
    got = cl.partition_channels(deltas, k, similarity)
    for r in range(deltas.shape[1]):
        x = deltas[:, r].numpy()
        if similarity == "cosine":
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
        best = min(_inertia(x, p) for p in _brute_partitions(n, k))
        assert _inertia(x, got[r].tolist()) == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert len(set(got[r].tolist())) <= k


def test_kmeans_vs_sklearn_and_exact():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    n, k, rows = 7, 3, 6
    # Well-separated clusters: sklearn, the batched k-means and the exact answer agree.
    centers = torch.randn(k, rows, 8, generator=g, dtype=torch.float64) * 5
    truth = torch.stack([torch.randperm(n, generator=g) % k for _ in range(rows)])  # [R, N]
    deltas = centers[truth.t(), torch.arange(rows)] + 0.05 * torch.randn(n, rows, 8, generator=g, dtype=torch.float64)
    d2 = cl.sq_distances(cl.gram(deltas), "euclidean")
    km = cl.relabel(cl.kmeans_partition(d2, k))
    ex = cl.relabel(cl.exact_partition(d2, k))
    assert torch.equal(km, ex)
    assert torch.equal(ex, cl.relabel(truth))
    for r in range(rows):
        x = deltas[:, r].numpy()
        sk = KMeans(n_clusters=k, n_init=3, random_state=0).fit(x)
        assert torch.equal(cl.relabel(torch.tensor(sk.labels_).unsqueeze(0))[0], km[r])
    # Random (not separated) data: batched k-means is never worse than sklearn by more than a hair
    # on average, and never better than the exact optimum.
    rnd = torch.randn(n, 12, 5, generator=g, dtype=torch.float64)
    d2 = cl.sq_distances(cl.gram(rnd), "euclidean")
    ours = cl.partition_cost(d2, cl.kmeans_partition(d2, k))
    best = cl.partition_cost(d2, cl.exact_partition(d2, k))
    skl = torch.tensor([KMeans(n_clusters=k, n_init=4, random_state=0).fit(rnd[:, r].numpy()).inertia_
                        for r in range(12)], dtype=torch.float64)
    assert bool((ours >= best - 1e-9).all())
    assert float(ours.mean()) <= float(skl.mean()) * 1.05
    assert float((ours / best).mean()) < 1.1


def test_kmeans_used_when_enumeration_too_large():
    g = torch.Generator().manual_seed(1)
    deltas = torch.randn(12, 20, 4, generator=g)
    assert cl.num_partitions(12, 4) > 4096
    a = cl.partition_channels(deltas, 4, "cosine", exact_limit=4096)
    b = cl.partition_channels(deltas, 4, "cosine", exact_limit=4096)
    assert torch.equal(a, b)  # deterministic
    assert int(a.max()) <= 3
    _check_relabelled(a)


def _check_relabelled(a: torch.Tensor) -> None:
    for row in a.tolist():
        sizes = {lab: row.count(lab) for lab in set(row)}
        assert sizes[0] == max(sizes.values()), row
        largest = [lab for lab, s in sizes.items() if s == sizes[0]]
        firsts = {lab: row.index(lab) for lab in sizes}
        assert firsts[0] == min(firsts[lab] for lab in largest), row  # ties: lowest expert index
        others = sorted((lab for lab in sizes if lab != 0), key=lambda lab: firsts[lab])
        assert others == list(range(1, len(sizes))), row  # then by first appearance
        assert sorted(sizes) == list(range(len(sizes)))


def test_relabel_group0_largest_invariant():
    g = torch.Generator().manual_seed(2)
    raw = torch.randint(0, 4, (500, 6), generator=g)
    out = cl.relabel(raw)
    _check_relabelled(out)
    # same partition: i and j together before iff together after
    assert torch.equal(raw.unsqueeze(2) == raw.unsqueeze(1), out.unsqueeze(2) == out.unsqueeze(1))
    assert cl.relabel(torch.tensor([[1, 1, 0, 0]])).tolist() == [[0, 0, 1, 1]]
    assert cl.relabel(torch.tensor([[2, 0, 0, 1]])).tolist() == [[1, 0, 0, 2]]
    assert cl.relabel(torch.tensor([[3, 2, 1, 0]])).tolist() == [[0, 1, 2, 3]]


def test_k1_and_kn_special_cases():
    d = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cl.partition_channels(d, 1), torch.zeros(5, 3, dtype=torch.int64))
    same = torch.ones(3, 5, 4)  # identical experts still each get their own group at K=N
    assert torch.equal(cl.partition_channels(same, 3), torch.arange(3).expand(5, 3))


def test_cosine_is_scale_invariant_euclidean_is_not():
    # expert 0 and 1 point the same way at very different scales; 2 points elsewhere
    base = torch.tensor([[1.0, 0.0, 0.0]])
    d = torch.stack([base, 10 * base, torch.tensor([[0.0, 0.9, 0.0]])])  # [3, 1, 3]
    assert cl.partition_channels(d, 2, "cosine").tolist() == [[0, 0, 1]]
    assert cl.partition_channels(d, 2, "euclidean").tolist() == [[0, 1, 0]]


def test_zero_task_vectors_do_not_crash():
    d = torch.zeros(4, 3, 5)
    d[1] = 1.0
    a = cl.partition_channels(d, 2, "cosine")
    assert a.tolist() == [[0, 1, 0, 0]] * 3
