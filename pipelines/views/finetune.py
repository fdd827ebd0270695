"""Supervised fine-tuning views (the AGW / TransReID-style ReID recipe) and the evaluation transform.

Training: resize to ``size``, zero-pad ``pad`` and random-crop back, horizontal flip, normalize,
then random erasing (Zhong et al.'s settings used across ReID: p 0.5, erased area 2-40% of the
image, aspect ratio h/w uniform in (0.3, 1/0.3), up to 10 attempts for a box that fits, drawn
for the whole batch at once). The erased box is filled with 0 in normalized space, i.e. the
normalization's mean colour (the ReID reference code writes the raw ImageNet-mean numbers into
the normalized tensor, a near-mean colour as well). Evaluation: resize and normalize only.
"""

from __future__ import annotations

import torch

from pipelines.views.common import GeneratorLike, Normalizer, RandomDraws, pad_crop_flip, resize_to

#: Boxes tried per image before giving up on erasing it (the reference code tries up to 100;
#: for person-shaped images a box fits in most draws, so 10 almost never all fail).
ERASE_ATTEMPTS = 10


def random_erasing(
    images: torch.Tensor,
    draws: RandomDraws,
    p: float,
    area: tuple[float, float],
    aspect: tuple[float, float],
    value: float = 0.0,
) -> torch.Tensor:
    """Erase one random box per image with probability ``p``; float ``(N, C, H, W)`` -> same.

    ``area``: range of the box area as a fraction of the image; ``aspect``: range of its
    height / width (uniform). A box is kept only if it is strictly smaller than the image in both
    directions, as in the reference implementation.
    """
    n, _, h, w = images.shape
    erase = draws.bernoulli(n, p)
    target = h * w * draws.uniform((n, ERASE_ATTEMPTS), *area)
    ratio = draws.uniform((n, ERASE_ATTEMPTS), *aspect)
    box_h = torch.round(torch.sqrt(target * ratio))
    box_w = torch.round(torch.sqrt(target / ratio))
    fits = (box_h < h) & (box_w < w)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first attempt that fits
    erase = erase & fits.any(dim=1)
    box_h = box_h.gather(1, first)
    box_w = box_w.gather(1, first)
    u = draws.rand((n, 2))
    top = torch.floor(u[:, :1] * (h - box_h + 1))
    left = torch.floor(u[:, 1:] * (w - box_w + 1))
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_rows = (rows >= top) & (rows < top + box_h)  # (N, H)
    in_cols = (cols >= left) & (cols < left + box_w)  # (N, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]
    return images.masked_fill(mask[:, None], value)


class FinetuneViews:
    """Training and evaluation views for supervised ReID fine-tuning.

    size: ``(H, W)`` of the views (288x144 for RGB-IR / AGW, 256x128 for PASS fine-tuning).
    pad: zero padding before the random crop back to ``size``.
    flip_p: probability of a horizontal flip.
    erase_p, erase_area, erase_aspect: random erasing (see :func:`random_erasing`); ``erase_p=0``
        switches it off.
    normalization: ``"imagenet"`` (ImageNet mean/std) or ``"half"`` (mean = std = 0.5).

    Random draws, in this order, from one generator: crop offsets, flips, erasing.
    """

    def __init__(
        self,
        size: tuple[int, int] = (288, 144),
        pad: int = 10,
        flip_p: float = 0.5,
        erase_p: float = 0.5,
        erase_area: tuple[float, float] = (0.02, 0.4),
        erase_aspect: tuple[float, float] = (0.3, 1 / 0.3),
        normalization: str = "imagenet",
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.pad = pad
        self.flip_p = flip_p
        self.erase_p = erase_p
        self.erase_area = erase_area
        self.erase_aspect = erase_aspect
        self.normalize = Normalizer.named(normalization)

    def __call__(self, images: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
        """Training views: uint8 ``(B, 3, h, w)`` (any size) -> float32 ``(B, 3, *size)``, same device."""
        draws = RandomDraws(generator, images.device)
        n = images.shape[0]
        offsets = draws.randint((n, 2), 2 * self.pad + 1)
        flip = draws.bernoulli(n, self.flip_p)
        views = self.normalize(pad_crop_flip(resize_to(images, self.size), offsets, flip, self.pad))
        return random_erasing(views, draws, self.erase_p, self.erase_area, self.erase_aspect)

    def eval_views(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation views, deterministic: uint8 ``(B, 3, h, w)`` -> float32 ``(B, 3, *size)``."""
        return self.normalize(resize_to(images, self.size))
