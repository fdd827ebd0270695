"""The non-local blocks of the AGW cross-modal baseline (``--method agw``), which MMGL's
fine-tuning runs with.

Facts from the AGW code (mangye16/Cross-Modal-Re-ID-baseline ``model.py``, class ``Non_local``
and ``embed_net``; the same in hansonchen1996/MMGL ``AGW/model.py``):

- Block (embedded-Gaussian form without the softmax, "dot product" normalization by ``N``)::

      theta, phi, g: 1x1 convs C -> C' (with bias);  W: 1x1 conv C' -> C (with bias) + BatchNorm2d(C)
      f = theta(x)^T phi(x) / N        (N = H W positions)
      z = W(f g(x)) + x

  ``C' = 1``: the AGW code computes ``reduc_ratio // reduc_ratio`` (a ratio of 2 was evidently
  meant, giving ``C / 2``), and the published numbers come from that code, so 1 is the default
  here; ``inter_channels`` changes it.
- Init: the W BatchNorm's weight and bias are 0, so the block starts as the identity; the convs
  keep PyTorch's default init (``embed_net`` applies no init of its own to them).
- Placement (ResNet-50, blocks 3-4-6-3, ``non_layers = [0, 2, 3, 0]``): after the last 2 blocks
  of ``layer2`` (indices 2 and 3) and after the last 3 blocks of ``layer3`` (indices 3, 4, 5).
- Key names: ``NL_2.{0,1}.*`` and ``NL_3.{0,1,2}.*`` at the top of ``embed_net``, each block with
  ``g.0.*``, ``theta.*``, ``phi.*``, ``W.0.*`` (conv) and ``W.1.*`` (BN). The backbone here uses
  the same names, so they export to the AGW layout unchanged.

For the test-size ResNets (one block per layer) the same rule "after the last k blocks" keeps as
many blocks as the layer has: one after ``layer2`` and one after ``layer3``.
"""

from __future__ import annotations

import torch
from torch import nn

#: Non-local blocks per layer in AGW's ``embed_net`` (``non_layers``): none in layer1 and layer4.
AGW_NON_LOCAL_PER_LAYER = (0, 2, 3, 0)


class NonLocal(nn.Module):
    """AGW's non-local block (module docstring): ``(B, C, H, W) -> (B, C, H, W)``, the identity at
    init. Parameter names are AGW's (``g.0``, ``theta``, ``phi``, ``W.0``, ``W.1``)."""

    def __init__(self, in_channels: int, inter_channels: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = inter_channels
        self.g = nn.Sequential(nn.Conv2d(in_channels, inter_channels, 1))
        self.W = nn.Sequential(nn.Conv2d(inter_channels, in_channels, 1), nn.BatchNorm2d(in_channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)
        self.theta = nn.Conv2d(in_channels, inter_channels, 1)
        self.phi = nn.Conv2d(in_channels, inter_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        positions = height * width
        g_x = self.g(x).flatten(2).transpose(1, 2)  # (B, N, C')
        theta_x = self.theta(x).flatten(2).transpose(1, 2)  # (B, N, C')
        phi_x = self.phi(x).flatten(2)  # (B, C', N)
        # No softmax: f = theta^T phi / N is linear, so (theta phi) g = theta (phi g) and the
        # (N, N) matrix is never formed.
        y = torch.matmul(theta_x, torch.matmul(phi_x, g_x)) / positions  # (B, N, C')
        y = y.transpose(1, 2).reshape(batch, self.inter_channels, height, width)
        return self.W(y) + x


def run_layer_with_non_local(layer: nn.Sequential, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s blocks in order, each of the last ``len(blocks)`` followed by its non-local
    block (AGW: after blocks ``sorted(len(layer) - (k + 1) for k in range(len(blocks)))``).

    ``(B, C_in, H, W) -> (B, C_out, H', W')``, as ``layer(x)``.
    """
    first = len(layer) - len(blocks)
    for i, block in enumerate(layer):
        x = block(x)
        if i >= first:
            x = blocks[i - first](x)
    return x


__all__ = ["AGW_NON_LOCAL_PER_LAYER", "NonLocal", "run_layer_with_non_local"]
