"""The ReID model of fine-tuning and evaluation: backbone -> global feature -> BNNeck -> classifier.

The global feature is the backbone's own (``global_feature``: GeM of a ResNet map, ``cat(CLS,
mean PART)`` of a ViT; :mod:`models.registry`). The BNNeck (Luo et al., "Bag of Tricks"; AGW,
TransReID) is a BatchNorm1d whose shift is frozen at 0; the classifier is a bias-free linear
layer initialised N(0, 0.001). The test feature is the BN feature (``bn``) or the feature before
it (``pre_bn``), as the recipe says.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from models.necks import PartTokenNeck

#: Which feature :meth:`ReIDModel.embed` returns.
TestFeature = Literal["bn", "pre_bn"]


def bnneck(dim: int) -> nn.BatchNorm1d:
    """A BNNeck of ``dim`` features: BatchNorm1d with the bias frozen at 0 (no shift)."""
    neck = nn.BatchNorm1d(dim)
    neck.bias.requires_grad_(False)
    return neck


class ReIDModel(nn.Module):
    """Backbone -> global feature -> BNNeck (or the multi-neck) -> classifier.

    Global feature ``(B, D)``, ``D = backbone.feature_dim``: GeM of the ResNet map (D = 2048 for
    ResNet-50), or ``cat(CLS, mean(PART_k))`` of the ViT (D = 2 x embed dim).
    ``forward(images, modality)`` -> ``(features (B, D), logits (B, num_classes))``: features
    before the neck (triplet loss), logits of the BN feature (ID loss).
    ``embed(images, modality, which)`` -> ``(B, D)`` test features, ``bn`` or ``pre_bn``.
    ``modality`` ``(B,)`` (0 rgb, 1 ir) routes the two-stream stems; other backbones ignore it.
    State dict: ``backbone.*``, then ``bottleneck.*``, ``classifier.weight`` (single neck) or
    ``neck.cls_bn.*``, ``neck.part_bns.{k}.*``, ``neck.classifier.weight`` (``multi_neck``).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, multi_neck: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.feature_dim
        self.feature_dim = dim
        self.multi_neck = multi_neck
        if multi_neck:
            if not hasattr(backbone, "num_parts"):
                raise ValueError("the multi-neck needs a backbone with [PART] tokens (a ViT)")
            self.neck = PartTokenNeck(backbone.embed_dim, backbone.num_parts, num_classes, multi_neck=True)
            return
        self.bottleneck = bnneck(dim)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def global_features(self, images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.backbone.global_feature(images, modality)

    def _neck(self, images: torch.Tensor, modality: torch.Tensor, logits: bool) -> tuple[torch.Tensor, ...]:
        """``(before (B, D), after (B, D), logits (B, classes) or None)``."""
        if self.multi_neck:
            out = self.backbone(images)
            return tuple(self.neck(out.cls, out.parts))  # the classifier is cheap next to the ViT
        features = self.global_features(images, modality)
        after = self.bottleneck(features)
        return features, after, self.classifier(after) if logits else None

    def forward(self, images: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before, _, logits = self._neck(images, modality, logits=True)
        return before, logits

    def embed(self, images: torch.Tensor, modality: torch.Tensor, which: TestFeature = "bn") -> torch.Tensor:
        before, after, _ = self._neck(images, modality, logits=False)
        return after if which == "bn" else before


__all__ = ["ReIDModel", "TestFeature", "bnneck"]
