"""MMGL permutation recovery: the loss on the Sinkhorn head's output and its accuracy.

Convention (:mod:`pipelines.views.stripes`): ``perm[b, j]`` is the original stripe shown at
position ``j`` of the shuffled image ``b``, and the ground-truth matrix is
``P[b, j, i] = 1`` iff ``perm[b, j] == i`` (row = position in the shuffled image, column =
original stripe). The head predicts a doubly stochastic matrix with the same meaning.

Every function works in float32 whatever the input dtype: the differences of a nearly converged
doubly stochastic matrix to a 0/1 target are small, and bfloat16 keeps only ~3 significant digits.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

#: Reductions of :func:`permutation_loss`; ``mean`` is the paper's ("MSE", ``nn.MSELoss``'s default).
PERMUTATION_REDUCTIONS = ("mean", "sum")
PermutationReduction = Literal["mean", "sum"]


def permutation_loss(
    predicted: torch.Tensor, target: torch.Tensor, reduction: PermutationReduction = "mean"
) -> torch.Tensor:
    """Squared error between predicted doubly stochastic matrices and permutation matrices.

    predicted: ``(N, n, n)`` doubly stochastic (the Sinkhorn output), any float dtype
    target:    ``(N, n, n)`` 0/1 permutation matrices (``MMGLViewBatch.permutation_matrix()``)
    reduction: ``mean`` (default, as published: the paper's "MSE" is ``torch.nn.MSELoss``'s
               mean over all ``N n n`` entries; a uniform prediction scores ``(n - 1) / n ** 2``,
               5/36 for 6 stripes) or ``sum`` (this project's earlier choice: summed over each
               matrix's entries, averaged over the ``N`` images, i.e. ``n ** 2 = 36`` times the
               mean; a uniform prediction scores ``n - 1``). The reduction sets what the PCC
               weight lambda means: lambda 0.5 next to the sum acts like lambda 0.014 next to
               the mean.
    returns:   float32 scalar

    MMGL applies it to the RGB and the IR images of every slot alike: the caller stacks both
    modalities into ``N = 2B`` rows.
    """
    if predicted.shape != target.shape or predicted.ndim != 3 or predicted.shape[1] != predicted.shape[2]:
        raise ValueError(f"expected two (N, n, n) tensors of one shape, got {tuple(predicted.shape)} and {tuple(target.shape)}")
    if reduction == "mean":
        return F.mse_loss(predicted.float(), target.float())
    if reduction == "sum":
        return F.mse_loss(predicted.float(), target.float(), reduction="sum") / predicted.shape[0]
    raise ValueError(f"unknown permutation-loss reduction {reduction!r}; expected one of {PERMUTATION_REDUCTIONS}")


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


def stripe_accuracy(predicted: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Per-stripe accuracy: the fraction of rows (positions) whose argmax is the right stripe,
    over all ``N n`` rows; the lenient twin of :func:`permutation_accuracy` (all ``n`` rows right).

    predicted: ``(N, n, n)``; perm: int64 ``(N, n)``; returns a float32 scalar in [0, 1].
    Chance level is ``1 / n``.
    """
    if predicted.ndim != 3 or perm.shape != predicted.shape[:2]:
        raise ValueError(f"expected predicted (N, n, n) and perm (N, n), got {tuple(predicted.shape)} and {tuple(perm.shape)}")
    return (predicted.float().argmax(dim=-1) == perm).float().mean()
