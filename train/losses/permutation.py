"""MMGL permutation recovery: the loss on the Sinkhorn head's output and its accuracy.

Convention (:mod:`pipelines.views.stripes`): ``perm[b, j]`` is the original stripe shown at
position ``j`` of the shuffled image ``b``, and the ground-truth matrix is
``P[b, j, i] = 1`` iff ``perm[b, j] == i`` (row = position in the shuffled image, column =
original stripe). The head predicts a doubly stochastic matrix with the same meaning.

Both functions work in float32 whatever the input dtype: the differences of a nearly converged
doubly stochastic matrix to a 0/1 target are small, and bfloat16 keeps only ~3 significant digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def permutation_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error between predicted doubly stochastic matrices and permutation matrices.

    predicted: ``(N, n, n)`` doubly stochastic (the Sinkhorn output), any float dtype
    target:    ``(N, n, n)`` 0/1 permutation matrices (``MMGLViewBatch.permutation_matrix()``)
    returns:   float32 scalar, ``mean over the N images of sum over the n x n entries of
               (predicted - target) ** 2`` (the squared Frobenius distance per image)

    Reduction (the paper says "MSE" and no more): summed over each matrix's entries, averaged
    over images. The mean over entries (``torch.nn.MSELoss``'s default) is the same loss divided
    by ``n ** 2 = 36``; next to the PCC InfoNCE term (a few nats) at the paper's weights
    (lambda 0.3-0.5) it is then drowned: in our CPU measurement (tiny two-stream ResNet, 96x48,
    lambda 0.5, AdamW 2e-3, 600 steps) permutation accuracy stayed at 0.000 with the mean and
    rose with the sum, while the paper reports 98.6% after pre-training. A uniform prediction
    scores ``n - 1 = 5``; a perfect one 0. MMGL applies it to the RGB and the IR images of every
    slot alike: the caller stacks both modalities into ``N = 2B`` rows.
    """
    if predicted.shape != target.shape or predicted.ndim != 3 or predicted.shape[1] != predicted.shape[2]:
        raise ValueError(f"expected two (N, n, n) tensors of one shape, got {tuple(predicted.shape)} and {tuple(target.shape)}")
    return F.mse_loss(predicted.float(), target.float(), reduction="sum") / predicted.shape[0]


def permutation_correct(predicted: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Which images have their permutation recovered: the argmax of EVERY row is the right stripe.

    predicted: ``(N, n, n)`` scores or doubly stochastic matrices (row ``j`` scores the original
               stripes for position ``j``)
    perm:      int64 ``(N, n)``, ``perm[b, j]`` = original stripe at position ``j``
    returns:   bool ``(N,)``

    Rows are decoded independently (no assignment step), so a prediction that puts two positions
    on the same stripe is wrong even if one of them is right: the image counts only when all
    ``n`` rows are right, which by itself makes the decoded rows a permutation.
    """
    if predicted.ndim != 3 or perm.shape != predicted.shape[:2]:
        raise ValueError(f"expected predicted (N, n, n) and perm (N, n), got {tuple(predicted.shape)} and {tuple(perm.shape)}")
    return (predicted.float().argmax(dim=-1) == perm).all(dim=-1)


def permutation_accuracy(predicted: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Fraction of images whose permutation is recovered (:func:`permutation_correct`).

    predicted: ``(N, n, n)``; perm: int64 ``(N, n)``; returns a float32 scalar in [0, 1].
    Chance level is ``1 / n!`` (1/720 for 6 stripes).
    """
    return permutation_correct(predicted, perm).float().mean()
