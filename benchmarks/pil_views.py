"""The usual way of making views: one sample at a time with PIL, in DataLoader workers, as the
AGW cross-modal code (MMGL's fine-tuning base) and PASS / DINO do with torchvision transforms.

torchvision is not a dependency, so its transforms are written here on PIL, following its
definitions: ``RandomResizedCrop`` (10 attempts, then a ratio-clamped centre crop; bicubic
resize of the box), ``RandomHorizontalFlip``, ``ColorJitter`` (brightness, contrast, saturation
with ``ImageEnhance``, hue by shifting the HSV hue channel; a random order per image),
``RandomGrayscale``, DINO's ``GaussianBlur`` (PIL's filter, radius uniform in (0.1, 2)) and
``Solarization`` (``ImageOps.solarize``, threshold 128), ``Pad`` + ``RandomCrop``, then
``ToTensor`` + ``Normalize``. Randomness comes from Python's ``random``, which the DataLoader
seeds per worker, as in those codebases. These are the baseline of the views suite only.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import Dataset

from pipelines.views.common import IMAGENET_MEAN, IMAGENET_STD

CROP_ATTEMPTS = 10
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """``ToTensor`` + ``Normalize`` (ImageNet): PIL RGB -> float32 ``(3, H, W)``."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
    return (x - MEAN) / STD


def resized_crop_box(width: int, height: int, scale: tuple[float, float],
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` as a PIL box ``(left, top, right, bottom)``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = random.randint(0, width - w), random.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_resized_crop(image: Image.Image, size: tuple[int, int], scale: tuple[float, float]) -> Image.Image:
    """``RandomResizedCrop(size=(H, W), scale, interpolation=BICUBIC)``."""
    box = resized_crop_box(*image.size, scale)
    return image.resize((size[1], size[0]), Image.BICUBIC, box=box)


def shift_hue(image: Image.Image, factor: float) -> Image.Image:
    """torchvision's PIL ``adjust_hue``: rotate the HSV hue channel by ``factor`` turns."""
    h, s, v = image.convert("HSV").split()
    hue = np.array(h, dtype=np.uint8)
    hue += np.uint8(round(factor * 255) % 256)  # uint8 arithmetic wraps around, as intended
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


def color_jitter(image: Image.Image, brightness: float, contrast: float, saturation: float, hue: float) -> Image.Image:
    """``ColorJitter``: the four adjustments in a random order, each factor drawn uniformly."""
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(random.uniform(1 - brightness, 1 + brightness)),
        lambda im: ImageEnhance.Contrast(im).enhance(random.uniform(1 - contrast, 1 + contrast)),
        lambda im: ImageEnhance.Color(im).enhance(random.uniform(1 - saturation, 1 + saturation)),
        lambda im: shift_hue(im, random.uniform(-hue, hue)),
    ]
    random.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


def flip_jitter_gray(image: Image.Image) -> Image.Image:
    """DINO's ``flip_and_color_jitter``: flip 0.5, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray p 0.2."""
    if random.random() < 0.5:
        image = ImageOps.mirror(image)
    if random.random() < 0.8:
        image = color_jitter(image, 0.4, 0.4, 0.2, 0.1)
    if random.random() < 0.2:
        image = image.convert("L").convert("RGB")
    return image


def maybe_blur(image: Image.Image, p: float) -> Image.Image:
    """DINO's ``GaussianBlur(p)``: radius uniform in (0.1, 2)."""
    if random.random() <= p:
        image = image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
    return image


def stripes_in_order(image: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``(3, H, W)`` cut into ``len(order)`` horizontal stripes; position ``j`` shows stripe ``order[j]``."""
    stripes = image.chunk(len(order), dim=1)
    return torch.cat([stripes[k] for k in order], dim=1)


class PASSPilViews(Dataset):
    """PASS views of in-memory source images, per sample: 2 global crops 256x128 (scale
    (0.4, 1)), 9 local crops 128x64 (scale (0.1, 0.8) of their region: full-width stripes of
    half the height at 0, 1/4 and 1/2 of it, 3 each), DINO's augmentations (DESIGN.md 5).
    An item is the list of 11 normalized tensors, as DINO's ``DataAugmentationDINO`` returns."""

    GLOBAL, LOCAL = (256, 128), (128, 64)
    REGION_STARTS = (0.0, 0.25, 0.5)
    LOCALS_PER_REGION = 3

    def __init__(self, images: list[np.ndarray], length: int):
        self.images = [Image.fromarray(a) for a in images]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        image = self.images[i % len(self.images)]
        g1 = maybe_blur(flip_jitter_gray(random_resized_crop(image, self.GLOBAL, (0.4, 1.0))), 1.0)
        g2 = maybe_blur(flip_jitter_gray(random_resized_crop(image, self.GLOBAL, (0.4, 1.0))), 0.1)
        if random.random() < 0.2:
            g2 = ImageOps.solarize(g2, 128)
        views = [g1, g2]
        width, height = image.size
        region_h = height // 2
        for start in self.REGION_STARTS:
            top = min(round(start * height), height - region_h)
            region = image.crop((0, top, width, top + region_h))
            for _ in range(self.LOCALS_PER_REGION):
                crop = random_resized_crop(region, self.LOCAL, (0.1, 0.8))
                views.append(maybe_blur(flip_jitter_gray(crop), 0.5))
        return [to_normalized_tensor(v) for v in views]


class MMGLPilViews(Dataset):
    """MMGL views of in-memory (RGB, IR) pairs, per sample, AGW-style: ``Pad(10)``,
    ``RandomCrop(H, W)``, flip 0.5, ``ToTensor`` + ``Normalize``, then the image cut into 6
    horizontal stripes put in a random order shared by the pair. An item is
    ``(rgb, ir, perm)``."""

    def __init__(self, rgb: list[np.ndarray], ir: list[np.ndarray], length: int, pad: int = 10, stripes: int = 6):
        self.rgb = [Image.fromarray(a) for a in rgb]
        self.ir = [Image.fromarray(a) for a in ir]
        self.length, self.pad, self.stripes = length, pad, stripes

    def __len__(self) -> int:
        return self.length

    def _augment(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        padded = ImageOps.expand(image, border=self.pad, fill=0)
        left, top = random.randint(0, 2 * self.pad), random.randint(0, 2 * self.pad)
        image = padded.crop((left, top, left + width, top + height))
        if random.random() < 0.5:
            image = ImageOps.mirror(image)
        return to_normalized_tensor(image)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rgb = self._augment(self.rgb[i % len(self.rgb)])
        ir = self._augment(self.ir[i % len(self.ir)])
        order = random.sample(range(self.stripes), self.stripes)
        return stripes_in_order(rgb, order), stripes_in_order(ir, order), torch.tensor(order)


__all__ = ["MMGLPilViews", "PASSPilViews", "random_resized_crop", "resized_crop_box"]
