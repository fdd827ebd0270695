"""k-reciprocal re-ranking against a naive version of the published algorithm written out here:
the full (Q+G)^2 matrix, per-row Python loops, dense V, as the reference code computes it
(with a stable argsort so that ties have one defined order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.rerank import dense_re_rank
from common.errors import UserError
from train.evaluation import rerank as rerank_module
from train.evaluation.rerank import re_rank


def naive_re_rank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    q = q_g.shape[0]
    full = np.block([[q_q, q_g], [q_g.T, g_g]])
    full = (full ** 2).astype(np.float32)
    d = (full / full.max(axis=0)).T  # column i over its max, as row i
    n = d.shape[0]
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        return [j for j in forward if i in rank[j, :k + 1]]

    v = np.zeros((n, n), dtype=np.float32)
    half = int(np.around(k1 / 2))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        members = sorted(expanded)
        w = np.exp(-d[i, members])
        v[i, members] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    final = np.zeros((q, n - q), dtype=np.float32)
    for i in range(q):
        for g in range(n - q):
            m = np.minimum(v[i], v[q + g]).sum()
            jaccard = 1 - m / (2 - m)
            final[i, g] = jaccard * (1 - lambda_value) + d[i, q + g] * lambda_value
    return final


def euclidean(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).astype(np.float32)


def features_case(seed, queries, gallery, dim=8, ids=5, duplicates=False):
    """Clustered features (identities), optionally with exact duplicates (tied distances)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids, dim))
    qf = centers[rng.integers(0, ids, queries)] + 0.5 * rng.normal(size=(queries, dim))
    gf = centers[rng.integers(0, ids, gallery)] + 0.5 * rng.normal(size=(gallery, dim))
    if duplicates:
        gf[1::3] = gf[0:-1:3][: len(gf[1::3])]
        qf[0] = gf[0]
    return euclidean(qf, gf), euclidean(qf, qf), euclidean(gf, gf)


@pytest.mark.parametrize("seed,queries,gallery,k1,k2,lam", [
    (0, 6, 25, 20, 6, 0.3),   # the paper's setting; k1 + 1 > Q + G / 2
    (1, 10, 40, 5, 3, 0.3),   # odd k1: round(2.5) = 2
    (2, 7, 30, 3, 1, 0.5),    # k2 = 1: no query expansion
    (3, 4, 12, 1, 2, 0.0),    # smallest k1, lambda 0
    (4, 5, 8, 20, 6, 1.0),    # k1 beyond the number of images
    (5, 12, 50, 6, 4, 0.3),
])
def test_matches_naive(seed, queries, gallery, k1, k2, lam):
    q_g, q_q, g_g = features_case(seed, queries, gallery)
    got = re_rank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    assert isinstance(got, np.ndarray) and got.shape == (queries, gallery) and got.dtype == np.float32
    np.testing.assert_allclose(got, naive_re_rank(q_g, q_q, g_g, k1, k2, lam), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed,k1,k2", [(10, 4, 3), (11, 20, 6), (12, 2, 2)])
def test_ties_follow_index_order(seed, k1, k2):
    """Exact duplicate images make equal distances, also across the top-k cut."""
    q_g, q_q, g_g = features_case(seed, 6, 30, duplicates=True)
    assert (q_g[0] == 0).sum() >= 2  # the query ties with two gallery copies
    got = re_rank(q_g, q_q, g_g, k1=k1, k2=k2)
    np.testing.assert_allclose(got, naive_re_rank(q_g, q_q, g_g, k1, k2), rtol=1e-5, atol=1e-6)


def test_integer_valued_distances_many_ties():
    rng = np.random.default_rng(7)
    pts_q, pts_g = rng.integers(0, 3, (5, 2)), rng.integers(0, 3, (20, 2))
    manhattan = lambda a, b: np.abs(a[:, None] - b[None]).sum(-1).astype(np.float32) + 1  # noqa: E731
    q_g, q_q, g_g = manhattan(pts_q, pts_g), manhattan(pts_q, pts_q), manhattan(pts_g, pts_g)
    got = re_rank(q_g, q_q, g_g, k1=3, k2=2)
    np.testing.assert_allclose(got, naive_re_rank(q_g, q_q, g_g, 3, 2), rtol=1e-5, atol=1e-6)


def test_asymmetric_inputs_read_as_the_reference_does():
    """The reference divides columns by their max and transposes: for a q_q / g_g that is not
    symmetric, row i of D is column i of the input."""
    q_g, q_q, g_g = features_case(3, 5, 20)
    rng = np.random.default_rng(0)
    q_q = q_q + rng.uniform(0, 0.2, q_q.shape).astype(np.float32)
    g_g = g_g + rng.uniform(0, 0.2, g_g.shape).astype(np.float32)
    np.testing.assert_allclose(re_rank(q_g, q_q, g_g, k1=6, k2=3), naive_re_rank(q_g, q_q, g_g, 6, 3),
                               rtol=1e-5, atol=1e-6)


def test_small_blocks_and_chunks_give_the_same(monkeypatch):
    """Blocks that do not divide the sizes, and a join split into many chunks."""
    q_g, q_q, g_g = features_case(5, 13, 47)
    whole = re_rank(q_g, q_q, g_g, k1=7, k2=3)
    monkeypatch.setattr(rerank_module, "ROW_BLOCK", 5)
    monkeypatch.setattr(rerank_module, "JOIN_CHUNK", 17)
    np.testing.assert_array_equal(re_rank(q_g, q_q, g_g, k1=7, k2=3), whole)
    np.testing.assert_allclose(whole, naive_re_rank(q_g, q_q, g_g, 7, 3), rtol=1e-5, atol=1e-6)


def test_tensor_in_tensor_out():
    q_g, q_q, g_g = features_case(8, 6, 20)
    got = re_rank(torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g).double(), k1=5, k2=2)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), naive_re_rank(q_g, q_q, g_g, 5, 2), rtol=1e-5, atol=1e-6)


def test_reranking_helps_on_clustered_data():
    """A property, not a parity: on well-clustered data the re-ranked top-1 is right at least as
    often as the plain one (the paper's point)."""
    rng = np.random.default_rng(1)
    ids, dim = 8, 16
    centers = rng.normal(size=(ids, dim)) * 1.5
    q_ids, g_ids = rng.integers(0, ids, 20), np.repeat(np.arange(ids), 8)
    qf = centers[q_ids] + rng.normal(size=(20, dim))
    gf = centers[g_ids] + rng.normal(size=(len(g_ids), dim))
    q_g = euclidean(qf, gf)
    plain = (g_ids[q_g.argmin(1)] == q_ids).mean()
    reranked = (g_ids[re_rank(q_g, euclidean(qf, qf), euclidean(gf, gf)).argmin(1)] == q_ids).mean()
    assert reranked >= plain


@pytest.mark.parametrize("args,message", [
    ((np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((4, 4))), "g_g_dist 3 x 3"),
    ((np.zeros((0, 3)), np.zeros((0, 0)), np.zeros((3, 3))), "at least one query"),
    ((np.zeros(3), np.zeros((1, 1)), np.zeros((3, 3))), "2-D"),
    ((np.full((2, 3), np.nan), np.ones((2, 2)), np.ones((3, 3))), "NaN"),
    (([[1.0]], np.ones((1, 1)), np.ones((1, 1))), "numpy array or a torch tensor"),
])
def test_bad_input_is_a_user_error(args, message):
    with pytest.raises(UserError, match=message):
        re_rank(*args)


def test_bad_parameters_are_user_errors():
    q_g, q_q, g_g = features_case(0, 3, 5)
    with pytest.raises(UserError, match="k1 and k2"):
        re_rank(q_g, q_q, g_g, k1=0)
    with pytest.raises(UserError, match="lambda_value"):
        re_rank(q_g, q_q, g_g, lambda_value=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_naive():
    q_g, q_q, g_g = features_case(6, 10, 40)
    got = re_rank(*(torch.from_numpy(x).cuda() for x in (q_g, q_q, g_g)), k1=6, k2=3)
    assert got.is_cuda
    np.testing.assert_allclose(got.cpu().numpy(), naive_re_rank(q_g, q_q, g_g, 6, 3), rtol=1e-4, atol=1e-5)


def test_benchmark_usual_way_computes_the_same():
    """The benchmark's dense baseline (the toolboxes' structure) agrees with the naive loops, so
    the suite compares two computations of one result."""
    q_g, q_q, g_g = features_case(9, 8, 30)
    np.testing.assert_allclose(dense_re_rank(q_g, q_q, g_g, 6, 3), naive_re_rank(q_g, q_q, g_g, 6, 3),
                               rtol=1e-5, atol=1e-6)
