"""MMGL views: augmented RGB and infrared images whose stripes are shuffled by a shared permutation.

Per image: resize to ``size`` (288x144), zero-pad ``pad`` (10) and random-crop back to
``size``, horizontal flip with probability ``flip_p``, ImageNet normalization (for RGB and
infrared alike, as the AGW cross-modal code does), then the stripe shuffle of
:class:`pipelines.views.stripes.RandomStripeShuffle`.

Crop and flip are drawn independently for every image, the RGB and the infrared image of a
slot included: the two are unrelated images (unpaired identities), so tying their crops would
add nothing, and the flip does not move stripes. The permutation is the one thing a slot's
two images share: it is drawn for the RGB batch and replayed on the infrared batch through
Kornia's ``params`` mechanism, because the permutation-recovery head and the part-aware
cycle-contrastive loss compare RGB and IR parts position by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.views.common import GeneratorLike, Normalizer, RandomDraws, pad_crop_flip, resize_to
from pipelines.views.stripes import RandomStripeShuffle, permutation_matrix


@dataclass
class MMGLViewBatch:
    """MMGL views of ``B`` slots, each holding one RGB and one infrared image.

    rgb:  float32 ``(B, 3, H, W)``, normalized, stripes shuffled
    ir:   float32 ``(B, 3, H, W)``, normalized, stripes shuffled with the same ``perm`` row
    perm: int64 ``(B, n)``; ``perm[b, j]`` = index of the original stripe shown at position ``j``
          in both ``rgb[b]`` and ``ir[b]``
    """

    rgb: torch.Tensor
    ir: torch.Tensor
    perm: torch.Tensor

    def permutation_matrix(self) -> torch.Tensor:
        """float32 ``(B, n, n)`` with ``P[b, j, i] = 1`` iff ``perm[b, j] == i`` (see :mod:`.stripes`)."""
        return permutation_matrix(self.perm)


class MMGLViews:
    """Make MMGL views from an RGB batch and an infrared batch of the same shape.

    size: ``(H, W)`` of the views; ``H`` must be a multiple of ``num_stripes`` (288 / 6 = 48).
    pad: zero padding before the random crop back to ``size``.
    flip_p: probability of a horizontal flip, per image.
    num_stripes: number of horizontal stripes that are shuffled.

    Random draws, in this order, from one generator: crop offsets and flips of the stacked batch
    ``cat([rgb, ir])`` (as :meth:`augment` draws them), then the permutations.
    """

    def __init__(
        self,
        size: tuple[int, int] = (288, 144),
        pad: int = 10,
        flip_p: float = 0.5,
        num_stripes: int = 6,
    ) -> None:
        if size[0] % num_stripes:
            raise ValueError(
                f"MMGL view height {size[0]} is not a multiple of num_stripes={num_stripes}: "
                f"the stripes would differ in height; choose a height like {size[0] // num_stripes * num_stripes}"
            )
        self.size = (int(size[0]), int(size[1]))
        self.pad = pad
        self.flip_p = flip_p
        self.normalize = Normalizer.named("imagenet")
        self.shuffle = RandomStripeShuffle(num_stripes)

    def augment(self, images: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
        """Resize, pad-crop, flip and normalize, without the stripe shuffle.

        images: uint8 ``(N, 3, h, w)`` (any size) -> float32 ``(N, 3, *size)``, same device.
        """
        return self._augment(images, RandomDraws(generator, images.device))

    def _augment(self, images: torch.Tensor, draws: RandomDraws) -> torch.Tensor:
        n = images.shape[0]
        offsets = draws.randint((n, 2), 2 * self.pad + 1)
        flip = draws.bernoulli(n, self.flip_p)
        return self.normalize(pad_crop_flip(resize_to(images, self.size), offsets, flip, self.pad))

    def __call__(self, rgb: torch.Tensor, ir: torch.Tensor, generator: GeneratorLike = None) -> MMGLViewBatch:
        """rgb, ir: uint8 ``(B, 3, h, w)`` of the same shape on the same device (slot ``b`` pairs
        ``rgb[b]`` with ``ir[b]``). Returns :class:`MMGLViewBatch` on that device."""
        if rgb.shape != ir.shape:
            raise ValueError(f"MMGL needs RGB and IR batches of one shape, got {tuple(rgb.shape)} and {tuple(ir.shape)}")
        batch = rgb.shape[0]
        draws = RandomDraws(generator, rgb.device)
        # One pass over both modalities: the two batches are augmented independently anyway.
        views = self._augment(torch.cat([rgb, ir]), draws)
        params = self.shuffle.draw_params(batch, draws.generator, rgb.device)
        rgb_views = self.shuffle(views[:batch], params=params)
        ir_views = self.shuffle(views[batch:], params=params)
        return MMGLViewBatch(rgb=rgb_views, ir=ir_views, perm=params["perm"])
