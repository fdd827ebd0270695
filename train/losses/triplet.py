"""Triplet losses of the ReID fine-tuning recipes, on a batch of features with identity labels.

* :func:`batch_hard_triplet` (Hermans et al., "In Defense of the Triplet Loss"): for every anchor
  the farthest positive and the closest negative in the batch; hinge with a margin
  (``relu(d_ap - d_an + margin)``, the AGW "base" triplet with margin 0.3) or, with
  ``margin=None``, the soft margin ``log(1 + exp(d_ap - d_an))`` (TransReID / PASS fine-tuning:
  ``NO_MARGIN: True``).
* :func:`weighted_regularized_triplet` (AGW, Ye et al. 2021): instead of the hardest pair, a
  softmax-weighted mean over all positives (weights ``softmax(d)`` over the anchor's positives)
  and over all negatives (weights ``softmax(-d)`` over its negatives), then the soft margin.
  No margin to tune. The AGW code adds 1e-6 to the softmax normalizer; here the softmax is exact.

Distances are Euclidean, ``sqrt(max(|a|^2 + |b|^2 - 2ab, 1e-12))`` as in the reference code (the
clamp keeps the gradient of the anchor-to-itself distance finite). Positives include the anchor
itself (distance ~1e-6), as there. Both losses average over the anchors.

The ID loss of both recipes is plain cross-entropy on the BNNeck logits: AGW uses
``nn.CrossEntropyLoss()``, the PASS TransReID configs set ``IF_LABELSMOOTH: 'off'``; fine-tuning
keeps a ``label_smoothing`` setting at 0 by default (``F.cross_entropy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Floor of the squared distance before the square root (reference code: 1e-12).
MIN_SQUARED_DISTANCE = 1e-12


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of the rows of ``features (N, D)`` -> ``(N, N)`` (float32 or wider)."""
    x = features.float()
    squared = x.pow(2).sum(1)
    dist = squared[:, None] + squared[None, :] - 2.0 * (x @ x.T)
    return dist.clamp(min=MIN_SQUARED_DISTANCE).sqrt()


def _masks(labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    positive = labels[:, None] == labels[None, :]
    # Checked on the CPU only: on an accelerator this would be a host synchronization every
    # training step. There the identity samplers guarantee two identities (fine-tuning refuses
    # --ids_per_batch < 2), and a one-identity batch would give a loss the finite check stops.
    if labels.device.type == "cpu" and bool(positive.all()):
        raise ValueError("a triplet loss needs at least two identities in the batch")
    return positive, ~positive


def _ranking(d_ap: torch.Tensor, d_an: torch.Tensor, margin: float | None) -> torch.Tensor:
    if margin is None:
        return F.softplus(d_ap - d_an).mean()  # = SoftMarginLoss(d_an - d_ap, 1)
    return F.relu(d_ap - d_an + margin).mean()  # = MarginRankingLoss(d_an, d_ap, 1, margin)


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float | None = 0.3,
                       normalize: bool = False) -> torch.Tensor:
    """Batch-hard triplet loss.

    features: ``(N, D)``; labels: int ``(N,)`` with at least two identities.
    margin: hinge margin, or ``None`` for the soft margin.
    normalize: L2-normalize the features first (off in AGW and TransReID).
    Returns a scalar.
    """
    if normalize:
        features = F.normalize(features, dim=1)
    dist = pairwise_distances(features)
    positive, negative = _masks(labels, dist.shape[0])
    d_ap = dist.masked_fill(~positive, float("-inf")).amax(1)
    d_an = dist.masked_fill(~negative, float("inf")).amin(1)
    return _ranking(d_ap, d_an, margin)


def weighted_regularized_triplet(features: torch.Tensor, labels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """AGW's weighted regularization triplet.

    features: ``(N, D)``; labels: int ``(N,)`` with at least two identities.
    ``d_ap[i] = sum_j softmax_{j in P(i)}(d_ij) d_ij``, ``d_an[i] = sum_k softmax_{k in N(i)}(-d_ik) d_ik``,
    loss = mean ``log(1 + exp(d_ap - d_an))``. Returns a scalar.
    """
    if normalize:
        features = F.normalize(features, dim=1)
    dist = pairwise_distances(features)
    positive, negative = _masks(labels, dist.shape[0])
    w_ap = torch.softmax(dist.masked_fill(~positive, float("-inf")), dim=1)
    w_an = torch.softmax((-dist).masked_fill(~negative, float("-inf")), dim=1)
    d_ap = (w_ap * dist).sum(1)
    d_an = (w_an * dist).sum(1)
    return _ranking(d_ap, d_an, None)


__all__ = ["batch_hard_triplet", "pairwise_distances", "weighted_regularized_triplet"]
