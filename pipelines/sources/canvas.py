"""How a source fits a decoded image into its fixed-size batch tensor: ``resize`` or ``canvas``.

* ``resize`` (the fine-tuning recipes, MMGL): every image is resized to the batch size ``(H, W)``
  (bilinear, antialiased when shrinking), whatever its aspect ratio.
* ``canvas`` (PASS: crops are cut from the image at its source resolution and aspect ratio):
  ``(H, W)`` is a *canvas*, an upper bound. An image that fits is copied as it is; a larger one
  is shrunk by one factor for both sides, ``s = min(H / h, W / w)``, so its aspect ratio is
  kept; it is never enlarged. The image sits in the top-left corner, the rest of the canvas is
  0, and the batch carries each image's valid size (:attr:`pipelines.batch.Batch.valid`), so the
  views crop inside it. The canvas bounds memory (and the resampling cost of the crops) for the
  rare very large source image.

The valid size of an ``h x w`` image on an ``H x W`` canvas is :func:`fitted_size`: with
``s = min(1, H / h, W / w)``, ``(max(1, floor(h s + 0.5)), max(1, floor(w s + 0.5)))``; every
source (DALI on GPU and CPU, webdataset, the cache filled by them) uses this rule.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

FIT_MODES = ("resize", "canvas")


def fitted_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """The valid ``(h, w)`` of a ``height x width`` image on ``canvas = (H, W)`` (module doc)."""
    scale = min(1.0, canvas[0] / height, canvas[1] / width)
    return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(3, h, w)`` -> uint8 ``(3, *size)``: bilinear, antialiased when shrinking (PIL's
    resampling); the input itself when the size already matches."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]


def place_on_canvas(out: torch.Tensor, image: np.ndarray) -> tuple[int, int]:
    """Put a decoded uint8 ``(h, w, 3)`` image on the canvas ``out`` uint8 ``(3, H, W)`` (shrunk
    to :func:`fitted_size` when it does not fit, top-left, zeros elsewhere); returns its valid
    ``(h, w)`` on the canvas."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # channels-last view: torch's fast uint8 path
    vh, vw = fitted_size(x.shape[1], x.shape[2], tuple(out.shape[1:]))
    out.zero_()
    out[:, :vh, :vw] = resize_uint8(x, (vh, vw))
    return vh, vw


__all__ = ["FIT_MODES", "fitted_size", "place_on_canvas", "resize_uint8"]
