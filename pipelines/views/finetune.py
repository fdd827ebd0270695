"""Supervised fine-tuning views (the AGW / TransReID-style ReID recipe) and the evaluation transform.

Training: resize to ``size``, zero-pad ``pad`` and random-crop back, horizontal flip, normalize,
then random erasing, drawn for the whole batch at once, in one of two modes:

- ``const`` (Zhong et al.'s settings used across ReID: p 0.5, erased area 2-40% of the image,
  aspect ratio h/w uniform in (0.3, 1/0.3), up to 10 attempts for a box that fits). The erased
  box is filled with 0 in normalized space, i.e. the normalization's mean colour (the ReID
  reference code writes the raw ImageNet-mean numbers into the normalized tensor, a near-mean
  colour as well).
- ``pixel`` (timm's ``RandomErasing(mode="pixel")``, which TransReID and PASS_transreid use:
  :func:`transreid_views`): area 2%-1/3, aspect ratio h/w log-uniform in (0.3, 1/0.3), 10
  attempts, every erased pixel and channel an independent N(0, 1) draw in normalized space.

Evaluation: resize and normalize only.
"""

from __future__ import annotations

import math

import torch

from pipelines.views.common import GeneratorLike, Normalizer, RandomDraws, pad_crop_flip, resize_to

#: Boxes tried per image before giving up on erasing it (Zhong et al.'s code tries up to 100,
#: timm 10; for person-shaped images a box fits in most draws, so 10 almost never all fail).
ERASE_ATTEMPTS = 10
#: ``const``: a constant fill; ``pixel``: per-pixel N(0, 1) noise (timm's ``mode="pixel"``).
ERASE_MODES = ("const", "pixel")


def random_erasing(
    images: torch.Tensor,
    draws: RandomDraws,
    p: float,
    area: tuple[float, float],
    aspect: tuple[float, float],
    value: float = 0.0,
    mode: str = "const",
    log_aspect: bool = False,
) -> torch.Tensor:
    """Erase one random box per image with probability ``p``; float ``(N, C, H, W)`` -> same.

    ``area``: range of the box area as a fraction of the image; ``aspect``: range of its
    height / width, uniform or (``log_aspect``, timm) log-uniform. A box is kept only if it is
    strictly smaller than the image in both directions, as in the reference implementations.
    ``mode``: ``const`` fills the box with ``value``; ``pixel`` with independent N(0, 1) noise
    per pixel and channel (drawn for the whole batch after the boxes, used only inside them).
    """
    if mode not in ERASE_MODES:
        raise ValueError(f"unknown random erasing mode {mode!r}; expected one of {ERASE_MODES}")
    n, c, h, w = images.shape
    erase = draws.bernoulli(n, p)
    target = h * w * draws.uniform((n, ERASE_ATTEMPTS), *area)
    if log_aspect:
        ratio = torch.exp(draws.uniform((n, ERASE_ATTEMPTS), math.log(aspect[0]), math.log(aspect[1])))
    else:
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
    if mode == "pixel":
        return torch.where(mask[:, None], draws.normal((n, c, h, w)), images)
    return images.masked_fill(mask[:, None], value)


class FinetuneViews:
    """Training and evaluation views for supervised ReID fine-tuning.

    size: ``(H, W)`` of the views (288x144 for RGB-IR / AGW, 256x128 for PASS fine-tuning).
    pad: zero padding before the random crop back to ``size``.
    flip_p: probability of a horizontal flip.
    erase_p, erase_area, erase_aspect, erase_mode, erase_log_aspect: random erasing (see
        :func:`random_erasing`); ``erase_p=0`` switches it off.
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
        erase_mode: str = "const",
        erase_log_aspect: bool = False,
    ) -> None:
        if erase_mode not in ERASE_MODES:
            raise ValueError(f"unknown random erasing mode {erase_mode!r}; expected one of {ERASE_MODES}")
        self.size = (int(size[0]), int(size[1]))
        self.erase_mode = erase_mode
        self.erase_log_aspect = erase_log_aspect
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
        return random_erasing(views, draws, self.erase_p, self.erase_area, self.erase_aspect,
                              mode=self.erase_mode, log_aspect=self.erase_log_aspect)

    def eval_views(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation views, deterministic: uint8 ``(B, 3, h, w)`` -> float32 ``(B, 3, *size)``."""
        return self.normalize(resize_to(images, self.size))


def transreid_views(size: tuple[int, int] = (256, 128)) -> FinetuneViews:
    """The training views of TransReID / PASS_transreid (``datasets/make_dataloader.py`` and the
    ViT configs): resize, flip p 0.5, pad 10 + random crop, mean = std = 0.5, then timm's
    ``RandomErasing(probability=0.5, mode="pixel")`` with its defaults (area 0.02-1/3, aspect
    log-uniform in (0.3, 1/0.3)). The reference flips before padding; flip and crop commute in
    distribution (a mirrored crop offset is as likely), so the order here is immaterial."""
    return FinetuneViews(size=size, pad=10, flip_p=0.5, erase_p=0.5, erase_area=(0.02, 1 / 3),
                         erase_aspect=(0.3, 1 / 0.3), normalization="half", erase_mode="pixel",
                         erase_log_aspect=True)
