"""Heads: the DINO head and one per token type (PASS); the permutation head and the stripe part
projection (MMGL). Losses live in ``train``; these only map features to what the losses take.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Weight-normalized linear layer without bias: ``y = x W^T``, ``W = g * v / ||v||`` per row.

    Written out rather than through ``torch.nn.utils.parametrizations.weight_norm`` so that the
    parameter names are those of DINO / PASS checkpoints (``weight_g`` ``(out, 1)``, ``weight_v``
    ``(out, in)``, from the older ``torch.nn.utils.weight_norm``) and the frozen norm is a plain
    flag. With ``freeze_norm`` (DINO's ``norm_last_layer=True``, the default) ``g`` stays at 1 with
    ``requires_grad=False``: every output is then the cosine between the L2-normalized input and
    a learned direction ``v``.

    ``(..., in_features) -> (..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, freeze_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_norm)

    @property
    def weight(self) -> torch.Tensor:
        """The effective ``(out, in)`` weight."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO projection head: MLP ``in -> hidden -> hidden -> bottleneck`` with GELU, L2-normalize,
    then :class:`WeightNormLinear` ``bottleneck -> out_dim`` (``last_layer``).

    ``(..., in_dim) -> (..., out_dim)``. The training loop freezes ``last_layer.weight_v`` during
    the first epoch (DINO's ``freeze_last_layer``); ``last_layer.weight_g`` is frozen throughout
    when ``norm_last_layer`` is true. Init: truncated normal std 0.02 for the MLP weights, zero
    biases, as DINO.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class TokenHeadsOutput(NamedTuple):
    """cls: ``(B, out_dim)``; parts: ``(B, P, out_dim)`` (P = K for global views, 1 for local)."""

    cls: torch.Tensor
    parts: torch.Tensor


class TokenHeads(nn.Module):
    """One :class:`DINOHead` per token type: ``cls`` for CLS and ``parts[k]`` for PART_k.

    The heads are independent (separately built and initialized), as in PASS. Keyword arguments
    other than ``in_dim`` and ``num_parts`` go to every :class:`DINOHead`.
    """

    def __init__(self, in_dim: int, num_parts: int = 3, **head_kwargs: int | bool) -> None:
        super().__init__()
        self.cls = DINOHead(in_dim, **head_kwargs)
        self.parts = nn.ModuleList(DINOHead(in_dim, **head_kwargs) for _ in range(num_parts))

    def forward(self, cls: torch.Tensor, parts: torch.Tensor, region: int | torch.Tensor | None = None) -> TokenHeadsOutput:
        """Project the backbone's tokens, each through its own token type's head.

        Args:
            cls: ``(B, D)`` CLS tokens.
            parts: ``(B, K, D)`` for global views (``region=None``), ``(B, 1, D)`` for local views.
            region: as in :meth:`models.vit.VisionTransformer.forward`: ``None``, an int k (all
                views from region k) or an int64 ``(B,)`` tensor of per-view regions.
        """
        if region is None:
            out = torch.stack([head(parts[:, k]) for k, head in enumerate(self.parts)], dim=1)
        elif isinstance(region, torch.Tensor):
            # Each head runs once on its region's rows (possibly none: an empty batch still gives
            # every head a zero gradient, which keeps DDP's reducer happy); rows are then put back
            # in input order.
            indices = [torch.nonzero(region == k).squeeze(1) for k in range(len(self.parts))]
            if sum(idx.numel() for idx in indices) != parts.shape[0]:
                raise ValueError(f"region values must be in [0, {len(self.parts)})")
            outs = [head(parts[idx, 0]) for head, idx in zip(self.parts, indices)]
            out = torch.cat(outs)[torch.argsort(torch.cat(indices))].unsqueeze(1)
        else:
            out = self.parts[region](parts[:, 0]).unsqueeze(1)
        return TokenHeadsOutput(self.cls(cls), out)

    def last_layer_parameters(self) -> Iterator[nn.Parameter]:
        """The direction parameters (``weight_v``) of every head's last layer, which the loop
        freezes during the first epoch."""
        for head in (self.cls, *self.parts):
            yield head.last_layer.weight_v


def sinkhorn(log_alpha: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Sinkhorn normalization in log space: ``(..., n, n)`` scores -> doubly stochastic matrices.

    Each iteration normalizes the rows, then the columns, with ``logsumexp`` (stable for large
    scores, where exponentiating first would overflow). The columns sum to 1 exactly after the
    last step; the rows converge to 1 as ``iterations`` grows, more slowly for sharply peaked
    scores that are far from a permutation (unit-scale scores are within 1e-6 after 20).
    """
    for _ in range(iterations):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha.exp()


class PermutationOutput(NamedTuple):
    """matrix: ``(B, n, n)`` doubly stochastic; logits: ``(B, n, n)`` before Sinkhorn. float32."""

    matrix: torch.Tensor
    logits: torch.Tensor


class PermutationHead(nn.Module):
    """MMGL permutation recovery: global average pool -> Linear -> ``n x n`` logits -> Sinkhorn.

    ``(B, in_dim, h, w)`` feature map -> :class:`PermutationOutput`. Rows and columns mean what
    the method's ground-truth permutation matrix means (the head is symmetric in them). Sinkhorn
    runs in float32 even under autocast: 20 log-space iterations in bfloat16 would drift.
    """

    def __init__(self, in_dim: int = 2048, num_stripes: int = 6, iterations: int = 20) -> None:
        super().__init__()
        self.num_stripes = num_stripes
        self.iterations = iterations
        self.fc = nn.Linear(in_dim, num_stripes * num_stripes)

    def forward(self, features: torch.Tensor) -> PermutationOutput:
        n = self.num_stripes
        logits = self.fc(features.mean(dim=(2, 3))).float().reshape(-1, n, n)
        return PermutationOutput(sinkhorn(logits, self.iterations), logits)


class PartProjection(nn.Module):
    """MMGL part features: pool the map into ``num_parts`` horizontal stripes, then one 1x1 conv
    ``in_dim -> out_dim`` (with bias) shared by all stripes, and nothing after it: the paper's
    figure draws "AP -> 1x1 Conv -> 256" straight into the cosine similarities of PCC (no
    normalization layer, no ReLU, which would also zero half of every feature before a cosine).

    ``(B, in_dim, h, w) -> (B, num_parts, out_dim)``, stripes top to bottom. Stripes are average
    pooled (adaptive pooling: with 18 rows and 6 stripes each stripe is exactly 3 rows; when h is
    not a multiple, neighbouring stripes share a row). One conv for all stripes, as the figure;
    the release's fine-tuning loader drops keys named ``local_conv_list``, which hints at one conv
    per stripe in the unpublished code, but in a shuffled image a position holds a random body
    region, so a per-position conv would have nothing position-specific to learn.
    """

    def __init__(self, in_dim: int = 2048, out_dim: int = 256, num_parts: int = 6) -> None:
        super().__init__()
        self.num_parts = num_parts
        self.conv = nn.Conv2d(in_dim, out_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        stripes = F.adaptive_avg_pool2d(features, (self.num_parts, 1))  # (B, in_dim, n, 1)
        return self.conv(stripes).flatten(2).transpose(1, 2)  # (B, n, out_dim)
