"""Pooling of a feature map into a global feature."""

from __future__ import annotations

import torch

#: AGW's GeM exponent (fixed, not learned).
GEM_P = 3.0


def gem(feature_map: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """Generalized-mean pooling as AGW: ``(B, C, H, W) -> (B, C)``, ``(mean(x^p) + 1e-12)^(1/p)``
    (the input is post-ReLU, non-negative)."""
    return (feature_map.float().pow(p).mean(dim=(2, 3)) + 1e-12).pow(1.0 / p)
