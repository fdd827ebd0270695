"""The stripe shuffle of MMGL's permutation recovery, as a Kornia augmentation.

An image is cut into ``n`` horizontal stripes of equal height, which are put back in a random
order. Convention used everywhere in the project:

- ``perm``: int64 ``(B, n)``; ``perm[b, j]`` is the index of the ORIGINAL stripe that the
  shuffled image shows at position ``j`` (top to bottom), so
  ``shuffled_stripe[b, j] = original_stripe[b, perm[b, j]]`` and un-shuffling is
  ``original_stripe[b, perm[b, j]] = shuffled_stripe[b, j]``.
- permutation matrix ``P``: float ``(B, n, n)`` with ``P[b, j, i] = 1`` iff ``perm[b, j] == i``
  (row = position in the shuffled image, column = original stripe), so with stripes as rows,
  ``shuffled = P @ original`` and ``original = P.transpose(1, 2) @ shuffled``. This is the target
  of the Sinkhorn head: row ``j`` of its output says which original stripe sits at position ``j``.

When ``n`` does not divide ``H`` the stripes are ``H // n`` rows high and the last ``H mod n``
rows (fewer than ``n``) stay in place at the bottom. :class:`pipelines.views.mmgl.MMGLViews`
rejects such a size up front, since its model pools the feature map into ``n`` equal stripes.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from kornia.augmentation import AugmentationBase2D
from kornia.augmentation.random_generator import RandomGeneratorBase


def shuffle_stripes(images: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorder horizontal stripes: output stripe ``j`` of image ``b`` is input stripe ``perm[b, j]``.

    images: ``(B, C, H, W)``, any dtype; perm: int64 ``(B, n)`` on the same device.
    returns: ``(B, C, H, W)``, same dtype; rows below ``n * (H // n)`` are left in place.
    """
    b, c, h, w = images.shape
    n = perm.shape[1]
    stripe = h // n
    body = images[:, :, : n * stripe].reshape(b, c, n, stripe * w)
    # One gather along the stripe axis; the index is broadcast (stride 0) over channels and pixels.
    index = perm.view(b, 1, n, 1).expand(b, c, n, stripe * w)
    shuffled = body.gather(2, index).view(b, c, n * stripe, w)
    if n * stripe == h:
        return shuffled
    return torch.cat([shuffled, images[:, :, n * stripe :]], dim=2)


def permutation_matrix(perm: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int64 ``(B, n)`` permutation -> ``(B, n, n)`` matrix with ``P[b, j, i] = (perm[b, j] == i)``."""
    return F.one_hot(perm, perm.shape[1]).to(dtype)


class StripePermutationGenerator(RandomGeneratorBase):
    """Kornia parameter generator of :class:`RandomStripeShuffle`: ``{"perm": int64 (B, n)}``.

    A permutation is the argsort of ``n`` i.i.d. uniform keys, which is uniform over the ``n!``
    permutations (ties have probability zero) and is drawn for the whole batch at once.
    Called by Kornia with ``(batch_shape, same_on_batch)`` it uses torch's default generator,
    like every Kornia generator; :meth:`RandomStripeShuffle.draw_params` passes a
    ``torch.Generator`` for reproducible draws.
    """

    def __init__(self, num_stripes: int) -> None:
        super().__init__()
        if num_stripes < 1:
            raise ValueError(f"num_stripes must be at least 1, got {num_stripes}")
        self.num_stripes = num_stripes

    def __repr__(self) -> str:
        return f"num_stripes={self.num_stripes}"

    def make_samplers(self, device: torch.device, dtype: torch.dtype) -> None:
        # Nothing to build: the keys come from torch.rand, which takes a generator, whereas a
        # torch.distributions sampler (what Kornia's generators keep here) cannot.
        return None

    def forward(
        self,
        batch_shape: Tuple[int, ...],
        same_on_batch: bool = False,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
    ) -> Dict[str, torch.Tensor]:
        batch = batch_shape[0]
        rows = 1 if same_on_batch else batch
        # A generator draws on its own device; without one, on `device` (else Kornia's rng device).
        if generator is not None:
            device = generator.device
        elif device is None:
            device = self.device
        keys = torch.rand(rows, self.num_stripes, generator=generator, device=device)
        return {"perm": keys.argsort(dim=1).expand(batch, self.num_stripes)}


class RandomStripeShuffle(AugmentationBase2D):
    """Cut each image into ``num_stripes`` horizontal stripes and shuffle them (see module doc).

    A Kornia augmentation: ``aug(x)`` draws a permutation per image and keeps it in
    ``aug._params["perm"]``; ``aug(y, params=aug._params)`` replays the same permutations on
    another batch (the paired infrared images in MMGL). Always applied (``p = 1``): an image left
    unshuffled would simply carry the identity permutation.

    input: float ``(B, C, H, W)``; output: same shape, dtype and device.
    params: ``perm`` int64 ``(B, n)`` (``perm[b, j]`` = original stripe shown at position ``j``).
    """

    def __init__(self, num_stripes: int = 6, same_on_batch: bool = False, keepdim: bool = False) -> None:
        super().__init__(p=1.0, same_on_batch=same_on_batch, keepdim=keepdim)
        self._param_generator = StripePermutationGenerator(num_stripes)
        self.num_stripes = num_stripes

    def draw_params(
        self,
        batch_size: int,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
    ) -> Dict[str, torch.Tensor]:
        """Draw replayable parameters from ``generator`` (on its device; torch's default
        generator of ``device`` when ``None``), returned on ``device``.

        The returned dict is what ``aug(x, params=...)`` takes: ``perm`` int64 ``(B, n)`` and
        Kornia's per-sample gate ``batch_prob`` (all true).
        """
        params = self._param_generator((batch_size,), self.same_on_batch, generator=generator, device=device)
        device = device if device is not None else params["perm"].device
        return {
            "perm": params["perm"].to(device, non_blocking=True),
            "batch_prob": torch.ones(batch_size, dtype=torch.bool, device=device),
        }

    def apply_transform(
        self,
        input: torch.Tensor,
        params: Dict[str, torch.Tensor],
        flags: Dict[str, Any],
        transform: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return shuffle_stripes(input, params["perm"].to(input.device, non_blocking=True))
