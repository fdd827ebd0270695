"""Triplet losses against per-anchor loops written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses.triplet import batch_hard_triplet, pairwise_distances, weighted_regularized_triplet


def naive_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(max(float(((a.double() - b.double()) ** 2).sum()), 1e-12))


def naive_batch_hard(x, labels, margin):
    losses = []
    for i in range(len(x)):
        pos = [naive_distance(x[i], x[j]) for j in range(len(x)) if labels[j] == labels[i]]
        neg = [naive_distance(x[i], x[j]) for j in range(len(x)) if labels[j] != labels[i]]
        gap = max(pos) - min(neg)
        losses.append(math.log1p(math.exp(gap)) if margin is None else max(0.0, gap + margin))
    return sum(losses) / len(losses)


def naive_weighted(x, labels):
    losses = []
    for i in range(len(x)):
        pos = [naive_distance(x[i], x[j]) for j in range(len(x)) if labels[j] == labels[i]]
        neg = [naive_distance(x[i], x[j]) for j in range(len(x)) if labels[j] != labels[i]]
        wp = [math.exp(d) for d in pos]
        wn = [math.exp(-d) for d in neg]
        d_ap = sum(w * d for w, d in zip(wp, pos)) / sum(wp)
        d_an = sum(w * d for w, d in zip(wn, neg)) / sum(wn)
        losses.append(math.log1p(math.exp(d_ap - d_an)))
    return sum(losses) / len(losses)


def batch(seed: int, ids: int = 4, per_id: int = 4, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ids).repeat_interleave(per_id)[torch.randperm(ids * per_id, generator=g)]
    centers = torch.randn(ids, dim, generator=g)
    return centers[labels] * 0.5 + torch.randn(ids * per_id, dim, generator=g), labels


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("margin", [0.3, None])
def test_batch_hard_matches_loop(seed, margin):
    x, labels = batch(seed)
    got = batch_hard_triplet(x, labels, margin=margin)
    assert float(got) == pytest.approx(naive_batch_hard(x, labels.tolist(), margin), rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_weighted_regularized_matches_loop(seed):
    x, labels = batch(seed)
    got = weighted_regularized_triplet(x, labels)
    assert float(got) == pytest.approx(naive_weighted(x, labels.tolist()), rel=1e-5)


def test_normalize_option_and_gradients_are_finite():
    x, labels = batch(0)
    x.requires_grad_(True)
    for loss in (batch_hard_triplet(x, labels, normalize=True), weighted_regularized_triplet(x, labels, normalize=True)):
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    unit = torch.nn.functional.normalize(x.detach(), dim=1)
    assert float(batch_hard_triplet(x.detach(), labels, normalize=True)) == pytest.approx(
        float(batch_hard_triplet(unit, labels)), rel=1e-6)


def test_pairwise_distances_shape_and_diagonal():
    x, _ = batch(1)
    d = pairwise_distances(x)
    assert d.shape == (16, 16)
    assert d.diagonal().max() < 1e-2  # float32 cancellation of the expanded formula, as in the reference
    assert torch.allclose(d, torch.cdist(x, x), atol=1e-2)


def test_single_identity_is_refused():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="at least two identities"):
        batch_hard_triplet(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        weighted_regularized_triplet(x, torch.zeros(3, dtype=torch.long))


def test_no_host_synchronization_off_the_cpu():
    # A meta tensor has no value: reading one (bool(), .item()) raises, as a host sync would stall
    # an accelerator every step. Both losses must build without reading any.
    x = torch.randn(8, 16, device="meta", requires_grad=True)
    labels = torch.zeros(8, dtype=torch.long, device="meta")
    for loss in (batch_hard_triplet(x, labels), batch_hard_triplet(x, labels, margin=None),
                 weighted_regularized_triplet(x, labels)):
        assert loss.shape == () and loss.device.type == "meta"
