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

#: Which feature :meth:`ReIDModel.embed` returns.
TestFeature = Literal["bn", "pre_bn"]


def bnneck(dim: int) -> nn.BatchNorm1d:
    """A BNNeck of ``dim`` features: BatchNorm1d with the bias frozen at 0 (no shift)."""
    neck = nn.BatchNorm1d(dim)
    neck.bias.requires_grad_(False)
    return neck


class ReIDModel(nn.Module):
    """Backbone -> global feature -> BNNeck -> classifier.

    Global feature ``(B, D)``, ``D = backbone.feature_dim``: GeM of the ResNet map (D = 2048 for
    ResNet-50), or ``cat(CLS, mean(PART_k))`` of the ViT (D = 2 x embed dim).
    ``forward(images, modality)`` -> ``(features (B, D), logits (B, num_classes))``: features
    before the BNNeck (triplet loss), logits of the BN feature (ID loss).
    ``embed(images, modality, which)`` -> ``(B, D)`` test features, ``bn`` or ``pre_bn``.
    ``modality`` ``(B,)`` (0 rgb, 1 ir) routes the two-stream stems; other backbones ignore it.
    State dict: ``backbone.*``, ``bottleneck.*``, ``classifier.weight``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.feature_dim
        self.feature_dim = dim
        self.bottleneck = bnneck(dim)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def global_features(self, images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.backbone.global_feature(images, modality)

    def forward(self, images: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.global_features(images, modality)
        return features, self.classifier(self.bottleneck(features))

    def embed(self, images: torch.Tensor, modality: torch.Tensor, which: TestFeature = "bn") -> torch.Tensor:
        features = self.global_features(images, modality)
        return self.bottleneck(features) if which == "bn" else features


__all__ = ["ReIDModel", "TestFeature", "bnneck"]
