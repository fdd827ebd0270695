"""What the view makers share: seeded random draws, normalization, resize and pad-crop-flip.

Reproducibility. Kornia's augmentations draw from torch's global generator (they take no
``generator``), so a view maker here never lets Kornia draw: every random number is drawn by
:class:`RandomDraws` from one ``torch.Generator`` in a fixed order, and Kornia is called with
those numbers (its functional ops, or an augmentation with ``params=``). The same generator
state and the same input give the same views; a different seed gives different views. Random
numbers differ between devices (CPU and CUDA generators are different algorithms), so a seed
reproduces views on the device it was used on.

No host synchronization: everything is drawn with ``torch.rand``/``torch.randint`` on the
generator's device and stays a tensor; nothing is read back to Python. Constants are built
once per device. Pass a generator on the images' device (or an int seed, which builds one
there) to keep the whole view step on the device.
"""

from __future__ import annotations

from typing import Sequence, Union

import kornia
import torch
import torch.nn.functional as F

#: ImageNet statistics (RGB, images in [0, 1]); used for both RGB and infrared images, as in
#: DINO, PASS and the AGW cross-modal code (infrared images are stored as 3-channel RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Normalizations selectable by name: ``imagenet`` and ``half`` (mean = std = 0.5, mapping
#: [0, 1] to [-1, 1], the choice of some fine-tuning recipes such as TransReID's).
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

#: A ``torch.Generator``, an int seed, or ``None`` for torch's default generator.
GeneratorLike = Union[torch.Generator, int, None]


class RandomDraws:
    """All the random numbers of one view-making call, drawn from one generator.

    ``generator``: a ``torch.Generator`` (numbers are drawn on its device and moved to
    ``device``), an int seed (a fresh generator on ``device`` seeded with it) or ``None``
    (torch's default generator of ``device``: not reproducible unless torch is seeded).
    Every method returns tensors on ``device``.
    """

    def __init__(self, generator: GeneratorLike, device: torch.device) -> None:
        if isinstance(generator, int):
            generator = torch.Generator(device=device).manual_seed(generator)
        self.generator = generator
        self.device = device
        self._draw_device = generator.device if generator is not None else device

    def rand(self, shape: Sequence[int]) -> torch.Tensor:
        """Uniform in [0, 1), float32."""
        u = torch.rand(tuple(shape), generator=self.generator, device=self._draw_device)
        return u.to(self.device, non_blocking=True)

    def uniform(self, shape: Sequence[int], low: float, high: float) -> torch.Tensor:
        """Uniform in [low, high), float32."""
        return low + (high - low) * self.rand(shape)

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal N(0, 1), float32."""
        z = torch.randn(tuple(shape), generator=self.generator, device=self._draw_device)
        return z.to(self.device, non_blocking=True)

    def randint(self, shape: Sequence[int], high: int) -> torch.Tensor:
        """Uniform integers in [0, high), int64."""
        r = torch.randint(high, tuple(shape), generator=self.generator, device=self._draw_device)
        return r.to(self.device, non_blocking=True)

    def bernoulli(self, count: int, p: float) -> torch.Tensor:
        """``count`` independent coin flips with probability ``p``, bool ``(count,)``."""
        return self.rand((count,)) < p

    def bernoulli_per_view(self, probabilities: Sequence[float], batch: int) -> torch.Tensor:
        """Coin flips for ``len(probabilities)`` views of ``batch`` images, view-major: bool
        ``(V * batch,)`` where entry ``v * batch + b`` is drawn with ``probabilities[v]``.

        The probabilities are compared one view at a time (a fixed, small loop) rather than
        turned into a tensor, which on CUDA would be a host-to-device copy that waits.
        """
        u = self.rand((len(probabilities), batch))
        return torch.cat([u[v] < p for v, p in enumerate(probabilities)])


class Normalizer:
    """``(x / 255 - mean) / std`` for uint8 input, ``(x - mean) / std`` for float input in [0, 1].

    Fused into one multiply-add; the per-channel constants are built once per device.
    Output: float32 ``(B, 3, H, W)`` on the input's device.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._constants: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def named(cls, name: str) -> "Normalizer":
        """One of :data:`NORMALIZATIONS` by name (``imagenet`` or ``half``)."""
        if name not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {name!r}: choose one of {sorted(NORMALIZATIONS)}")
        return cls(*NORMALIZATIONS[name])

    def _scale_shift(self, device: torch.device, from_uint8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, from_uint8)
        if key not in self._constants:
            std = torch.tensor(self.std).view(1, 3, 1, 1)
            mean = torch.tensor(self.mean).view(1, 3, 1, 1)
            scale = 1.0 / (std * 255.0) if from_uint8 else 1.0 / std
            self._constants[key] = (scale.to(device), (-mean / std).to(device))
        return self._constants[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift(images.device, images.dtype == torch.uint8)
        return torch.addcmul(shift, images.float(), scale)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]``; a float input is taken to be in [0, 1] already."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def resize_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(B, 3, H, W)`` to ``size = (h, w)`` (bilinear, antialiased when shrinking).

    Sources normally deliver the configured size already; then the input is returned as it is
    (uint8 stays uint8, nothing is computed). Otherwise the output is float32 in [0, 1].
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return kornia.geometry.transform.resize(to_unit_float(images), size, interpolation="bilinear", antialias=True)


def pad_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by ``pad`` on every side, crop back to ``(H, W)``, then flip horizontally.

    The same as torchvision's ``Pad(pad)``, ``RandomCrop((H, W))``, ``RandomHorizontalFlip``
    per image, done for the whole batch as one gather with integer indices (exact, any dtype).

    images:  ``(B, C, H, W)``, any dtype
    offsets: int64 ``(B, 2)``, the crop's top-left corner ``(row, col)`` in the padded image,
             each in ``[0, 2 * pad]``
    flip:    bool ``(B,)``, which crops are mirrored
    returns: ``(B, C, H, W)``, same dtype and device
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    rows = torch.arange(h, device=images.device) + offsets[:, :1]
    cols = torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + offsets[:, 1:]
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w)
    return padded.flatten(2).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)
