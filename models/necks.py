"""The fine-tuning neck of PASS_transreid: CLS and [PART] tokens fused into one ReID feature.

PASS_transreid (``model/make_model.py``, ``build_transformer_pass``; defaults
``MODEL.MULTI_NECK = True``, ``MODEL.FEAT_FUSION = 'cat'`` in ``config/defaults.py``) takes the
final-normed CLS token ``c`` and the K = 3 [PART] tokens ``p_k`` of the ViT (dim D) and builds:

- the feature before the neck, for the triplet loss and (``TEST.NECK_FEAT = 'before'``,
  L2-normalised by the evaluator) for testing: ``cat(c, mean_k p_k)``, ``(B, 2D)``;
- multi-neck (the recipe): one BatchNorm1d per token type, and the classifier's input
  ``cat(BN(c), mean_k BN_k(p_k))``; single neck (the option): one BatchNorm1d over the fused
  ``(B, 2D)`` feature;
- an ID classifier ``Linear(2D, classes, bias=False)``.

Initialisation as the reference: BatchNorm weight 1, bias 0 with the bias frozen
(``requires_grad_(False)``, the BNNeck convention); classifier weights N(0, 0.001).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class NeckOutput(NamedTuple):
    """before: ``(B, 2D)`` ``cat(cls, mean parts)`` (triplet loss, test feature);
    after: ``(B, 2D)`` the BN'd feature the classifier reads; logits: ``(B, classes)`` or None."""

    before: torch.Tensor
    after: torch.Tensor
    logits: torch.Tensor | None


def _bnneck(width: int) -> nn.BatchNorm1d:
    """BatchNorm1d with weight 1, bias 0, bias frozen (BNNeck)."""
    bn = nn.BatchNorm1d(width)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


class PartTokenNeck(nn.Module):
    """CLS + [PART] token fusion with a multi-neck (default) or a single neck (module docstring).

    Args:
        dim: D, the token width (384 for ViT-S, 768 for ViT-B).
        num_parts: K, the number of [PART] tokens.
        num_classes: identities of the ID classifier (0: no classifier, ``logits`` is None).
        multi_neck: one BN per token type (True, PASS_transreid's default) or one BN over the
            fused feature (False).

    Forward: ``cls (B, D)``, ``parts (B, K, D)`` -> :class:`NeckOutput`.
    Parameter names: ``cls_bn``, ``part_bns.{k}`` (multi-neck) or ``fused_bn`` (single neck),
    ``classifier``.
    """

    def __init__(self, dim: int, num_parts: int = 3, num_classes: int = 0, multi_neck: bool = True) -> None:
        super().__init__()
        if num_parts < 1:
            raise ValueError(f"num_parts must be positive, got {num_parts}")
        self.dim, self.num_parts, self.multi_neck = dim, num_parts, multi_neck
        if multi_neck:
            self.cls_bn = _bnneck(dim)
            self.part_bns = nn.ModuleList(_bnneck(dim) for _ in range(num_parts))
        else:
            self.fused_bn = _bnneck(2 * dim)
        self.classifier = nn.Linear(2 * dim, num_classes, bias=False) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, cls: torch.Tensor, parts: torch.Tensor) -> NeckOutput:
        if parts.shape[1] != self.num_parts:
            raise ValueError(f"expected {self.num_parts} part tokens, got {parts.shape[1]}")
        before = torch.cat([cls, parts.mean(dim=1)], dim=1)
        if self.multi_neck:
            normed = torch.stack([bn(parts[:, k]) for k, bn in enumerate(self.part_bns)], dim=1)
            after = torch.cat([self.cls_bn(cls), normed.mean(dim=1)], dim=1)
        else:
            after = self.fused_bn(before)
        logits = self.classifier(after) if self.classifier is not None else None
        return NeckOutput(before, after, logits)


__all__ = ["NeckOutput", "PartTokenNeck"]
