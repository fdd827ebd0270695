"""PASS views: 2 global and 9 region-bound local crops per image with DINO's augmentations.

What is reproduced (DESIGN.md section 5, from the PASS-reID code and DINO's ``main_dino.py``):

- global crops: RandomResizedCrop to 256x128, scale (0.4, 1); local crops: 128x64, scale
  (0.1, 0.8) of their region, 3 per region. Regions are full-width stripes of half the image
  height starting at 0, 0.25 H and 0.5 H (they overlap); a local crop box lies inside its
  region. Aspect ratio range (3/4, 4/3), torchvision's default, which PASS and DINO keep.
  The crop box is drawn exactly as torchvision's ``RandomResizedCrop.get_params`` does: up to
  10 attempts (area fraction uniform in ``scale``, log-uniform aspect ratio w/h, rounded
  sides), the first that fits is used, else the centre crop of the ratio-clamped full image.
  For 256x128 person images about one global crop in five takes that fallback, as in PASS.
- resampling is bicubic, computed like PIL's bicubic resize of the cropped box (which DINO and
  PASS use on PIL images): PIL's cubic kernel (a = -0.5), widened by the scale factor when
  shrinking (antialiasing), taps clipped to the box. So no pixel outside a crop box contributes
  to the crop: a local view sees nothing outside its region.
- then, per view: horizontal flip p 0.5; color jitter (brightness 0.4, contrast 0.4, saturation
  0.2, hue 0.1) with p 0.8; grayscale p 0.2; Gaussian blur, sigma uniform in (0.1, 2), with p
  1.0 on global view 0, 0.1 on global view 1, 0.5 on local views; solarization (invert values
  >= 0.5, PIL's threshold 128) with p 0.2 on global view 1 only; ImageNet mean/std.

Deviations, all for batching on the device without host synchronization:

- color jitter applies brightness, contrast, saturation, hue in this fixed order (torchvision
  draws a random order per image: following it would need the order on the host, or all four
  ops at every position); each op uses torchvision's definition (Kornia's
  ``adjust_brightness_accumulative``, ``adjust_contrast_with_mean_subtraction``,
  ``adjust_saturation_with_gray_subtraction``; :func:`shift_hue`, equal to Kornia's
  ``adjust_hue`` at half the cost). An image that skips the jitter gets neutral factors
  instead of a branch.
- Gaussian blur uses one 13-tap separable kernel (covers +-3 sigma at the largest sigma, 2)
  with a per-view sigma; an image that skips the blur gets sigma 0, which Kornia turns into the
  unit impulse (an exact identity). DINO used PIL's ``GaussianBlur(radius=sigma)``, PIL's
  box-filter approximation of the same Gaussian.
- views go through float32 and are not re-quantized to 8 bits between steps, as PIL would.

Input at the source resolution. PASS cuts every crop from the original image. With a source
in the ``canvas`` fit mode (:mod:`pipelines.sources.canvas`) each image sits at its own
resolution and aspect ratio in the top-left of a fixed canvas, and its valid size comes with
the batch (``valid``): crop boxes, regions and the fallback centre crop are then computed per
image from its own height and width, and the resampling never reads outside a box, so no crop
sees the padding. Without ``valid`` every image is taken to fill the whole tensor (the
``resize`` mode). Local crops are resampled from the whole canvas with boxes moved into their
region (one matmul for all 9), which costs about twice the column pass of cutting the region's
rows first, but needs no per-image slicing.

Views are grouped by resolution so the model runs one pass per resolution; the ordering is
view-major (see :class:`PASSViewBatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import kornia
import torch

from pipelines.views.common import GeneratorLike, Normalizer, RandomDraws, to_unit_float

#: Taps of the Gaussian blur kernel: 2 * ceil(3 * sigma_max) + 1 for sigma_max = 2.
BLUR_KERNEL_SIZE = 13

#: torchvision's ``RandomResizedCrop`` tries this many boxes before its centre-crop fallback.
CROP_ATTEMPTS = 10


@dataclass
class PASSViewBatch:
    """PASS views of ``B`` images, grouped by resolution, view-major.

    global_views: float32 ``(G * B, 3, 256, 128)``; row ``v * B + b`` is global view ``v`` of
                  image ``b`` (G = 2; view 0 always blurred, view 1 the one that may be solarized).
    local_views:  float32 ``(L * B, 3, 128, 64)``; row ``l * B + b`` is local view ``l`` of
                  image ``b`` (L = 9).
    local_region: ``(L,)`` ints; local view ``l`` was cut from region ``local_region[l]``:
                  ``(0, 0, 0, 1, 1, 1, 2, 2, 2)``, region ``k`` = rows ``[k H / 4, k H / 4 + H / 2)``.
    ``global_views.view(G, B, ...)`` and ``local_views.view(L, B, ...)`` give per-view tensors.
    """

    global_views: torch.Tensor
    local_views: torch.Tensor
    local_region: tuple[int, ...]

    @property
    def num_global(self) -> int:
        return self.global_views.shape[0] // self.batch_size

    @property
    def num_local(self) -> int:
        return len(self.local_region)

    @property
    def batch_size(self) -> int:
        return self.local_views.shape[0] // len(self.local_region)


def sample_resized_crop_boxes(
    draws: RandomDraws,
    count: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> torch.Tensor:
    """Draw ``count`` RandomResizedCrop boxes in a ``height x width`` image.

    ``height`` and ``width`` are ints (every box in the same image size) or float tensors
    ``(count,)`` (box ``n`` in an image of ``height[n] x width[n]``: images of their own sizes on
    a canvas). Same distribution as torchvision's ``RandomResizedCrop.get_params`` (see module
    doc), with the attempts of all boxes drawn at once. Returns float32 ``(count, 4)``:
    ``top, left, h, w`` in pixels (integer-valued).
    """
    device = draws.device
    height = torch.as_tensor(height, dtype=torch.float32, device=device).expand(count)
    width = torch.as_tensor(width, dtype=torch.float32, device=device).expand(count)
    target = (height * width)[:, None] * draws.uniform((count, CROP_ATTEMPTS), *scale)
    aspect = torch.exp(draws.uniform((count, CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.float().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)
    # torchvision's fallback: the largest centred box with the ratio clamped into range.
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
    w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)
    u = draws.rand((count, 2))
    i = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), torch.floor((height - fallback_h) / 2))
    j = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), torch.floor((width - fallback_w) / 2))
    return torch.stack([i, j, h, w], dim=1)


def shift_hue(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of float RGB ``(N, 3, h, w)`` images in [0, 1] by ``turns`` ``(N,)``
    (a fraction of a full turn, torchvision's ``adjust_hue`` factor), keeping saturation and value.

    Equal to Kornia's ``adjust_hue(images, 2 * pi * turns)`` (to ~1e-6) at about half the cost:
    the hue is computed from max/min without building the HSV image, and RGB comes back through
    the closed form ``v - c * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6`` for
    ``n = 5, 3, 1`` (R, G, B).
    """
    # Elementwise max/min of the three planes: much cheaper on CPU than reducing over dim 1.
    r, g, b = images.split(1, dim=1)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, 1.0)
    # Hue in sextants (units of 60 degrees), in [-1, 5]; grey pixels (chroma 0) get any hue, and
    # where two channels tie for the maximum both formulas give the same hue.
    sextant = torch.where(r == value, (g - b) / safe, torch.where(g == value, (b - r) / safe + 2, (r - g) / safe + 4))
    sextant = sextant + 6.0 * turns.view(-1, 1, 1, 1)
    offsets = torch.arange(5.0, 0.0, -2.0, device=images.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + sextant, 6.0)
    return value - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _pil_bicubic(d: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5) at distances ``d`` (in units of the filter's scale)."""
    a = -0.5
    d = d.abs()
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = (((d - 5.0) * d + 8.0) * d - 4.0) * a
    return torch.where(d < 1.0, near, torch.where(d < 2.0, far, torch.zeros_like(d)))


def _axis_weights(
    start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int, flip: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Resampling matrix along one axis: ``(N, out_size, in_size)``, rows sum to 1.

    Output pixel ``u`` of crop ``n`` reads the box ``[start, start + length)`` centred at
    ``start + (u + 0.5) * length / out_size`` (pixel centres at ``k + 0.5``), with the kernel
    widened by the shrink factor and taps outside the box dropped (then renormalized), as PIL's
    ``resize(box=...)`` does. ``flip`` mirrors the output along this axis.

    The kernel is evaluated only on the few taps it covers (at most ``4 * in/out + 1``, bounded
    from the sizes alone) and scattered into the dense matrix that the matmuls use.
    """
    device = start.device
    scale = length / out_size
    filter_scale = scale.clamp(min=1.0)
    taps = math.ceil(4.0 * max(1.0, in_size / out_size)) + 1
    pos = torch.arange(out_size, device=device, dtype=torch.float32) + 0.5
    if flip is not None:
        pos = torch.where(flip[:, None], out_size - pos, pos)
    centres = start[:, None] + pos * scale[:, None]  # (N, out)
    # The kernel is non-zero within 2 * filter_scale of the centre: pixels j with j + 0.5 in there.
    first = torch.floor(centres - 2.0 * filter_scale[:, None] - 0.5) + 1.0
    j = first[:, :, None] + torch.arange(taps, device=device, dtype=torch.float32)  # (N, out, taps)
    weights = _pil_bicubic((j + 0.5 - centres[:, :, None]) / filter_scale[:, None, None])
    inside = (j >= start[:, None, None]) & (j < (start + length)[:, None, None])
    weights = weights * inside
    weights = weights / weights.sum(dim=-1, keepdim=True)
    dense = torch.zeros(start.shape[0], out_size, in_size, device=device)
    return dense.scatter_add_(2, j.clamp(0, in_size - 1).long(), weights)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop ``V`` boxes per image and resize each to ``size``, all in two batched matmuls.

    images: float ``(B, C, H, W)`` in [0, 1]
    boxes:  float ``(V * B, 4)`` ``top, left, h, w``, view-major (row ``v * B + b`` is a box in image ``b``)
    flip:   bool ``(V * B,)``, mirror that crop horizontally
    returns float32 ``(V * B, C, *size)`` in [0, 1], view-major.

    The resampling is separable, ``crop = Wy @ image @ Wx^T`` with per-crop weight matrices
    (:func:`_axis_weights`); columns are resampled first for all ``V`` crops of an image in one
    matmul against the shared image, so the image is never replicated per crop.
    """
    b, c, h, w = images.shape
    n = boxes.shape[0]
    views = n // b
    oh, ow = size
    wy = _axis_weights(boxes[:, 0], boxes[:, 2], oh, h)  # (N, oh, H)
    wx = _axis_weights(boxes[:, 1], boxes[:, 3], ow, w, flip)  # (N, ow, W)
    wx = wx.view(views, b, ow, w).permute(1, 3, 0, 2).reshape(b, w, views * ow)
    cols = torch.bmm(images.reshape(b, c * h, w), wx)  # (B, C*H, V*ow)
    cols = cols.view(b, c, h, views, ow).permute(3, 0, 2, 1, 4).reshape(n, h, c * ow)
    crops = torch.bmm(wy, cols).clamp_(0.0, 1.0)  # (N, oh, C*ow); bicubic overshoots, PIL clips too
    return crops.view(n, oh, c, ow).permute(0, 2, 1, 3).contiguous()


class PASSViews:
    """Make PASS's multi-crop views (see the module doc for what each step reproduces).

    Sizes are ``(H, W)``. ``region_starts`` and ``region_height`` are fractions of the input
    height; ``global_blur_p`` and ``global_solarize_p`` give one probability per global view
    (their length is the number of global views). ``jitter_p``, ``grayscale_p`` and the
    solarize probabilities can be set to 0 to switch those steps off.

    Random draws, in this order, from one generator: global boxes, local boxes (region 0, 1, 2),
    global flips, local flips, then the photometric draws of the globals and of the locals.
    """

    def __init__(
        self,
        global_size: tuple[int, int] = (256, 128),
        local_size: tuple[int, int] = (128, 64),
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.1, 0.8),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        region_starts: Sequence[float] = (0.0, 0.25, 0.5),
        region_height: float = 0.5,
        locals_per_region: int = 3,
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        grayscale_p: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        global_blur_p: Sequence[float] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        global_solarize_p: Sequence[float] = (0.0, 0.2),
    ) -> None:
        if len(global_blur_p) != len(global_solarize_p):
            raise ValueError("global_blur_p and global_solarize_p need one probability per global view each")
        if any(s < 0 or s + region_height > 1 for s in region_starts):
            raise ValueError(f"regions starting at {tuple(region_starts)} of height {region_height} leave the image")
        self.global_size = global_size
        self.local_size = local_size
        self.global_scale = global_scale
        self.local_scale = local_scale
        self.ratio = ratio
        self.region_starts = tuple(region_starts)
        self.region_height = region_height
        self.locals_per_region = locals_per_region
        self.flip_p = flip_p
        self.jitter_p = jitter_p
        self.jitter = jitter
        self.grayscale_p = grayscale_p
        self.blur_sigma = blur_sigma
        self.global_blur_p = tuple(global_blur_p)
        self.local_blur_p = local_blur_p
        self.global_solarize_p = tuple(global_solarize_p)
        self.normalize = Normalizer.named("imagenet")

    @property
    def local_region(self) -> tuple[int, ...]:
        """Region of each local view: ``locals_per_region`` views of region 0, then 1, then 2."""
        return tuple(k for k in range(len(self.region_starts)) for _ in range(self.locals_per_region))

    def __call__(
        self, images: torch.Tensor, generator: GeneratorLike = None, valid: Optional[torch.Tensor] = None
    ) -> PASSViewBatch:
        """images: uint8 ``(B, 3, H, W)`` on any device -> :class:`PASSViewBatch` on that device.

        valid: int64 ``(B, 2)``, the ``(h, w)`` of each image's pixels in the top-left of its
        canvas (:attr:`pipelines.batch.Batch.valid`, the ``canvas`` fit mode): every crop is then
        drawn in, and resampled from, that image alone (its region stripes are fractions of its
        own height). None: every image fills ``H x W``.
        """
        b, _, h, w = images.shape
        draws = RandomDraws(generator, images.device)
        n_global = len(self.global_blur_p)
        n_local = len(self.local_region)
        if valid is None:
            heights = torch.full((b,), float(h), device=images.device)
            widths = torch.full((b,), float(w), device=images.device)
        else:
            heights, widths = valid.to(images.device, torch.float32).unbind(1)
        # Whole rows; a region that rounding would push past the bottom is moved up to fit.
        region_h = torch.floor(self.region_height * heights).clamp_(min=1.0)
        region_tops = [torch.minimum(torch.round(s * heights), heights - region_h) for s in self.region_starts]

        global_boxes = sample_resized_crop_boxes(
            draws, n_global * b, heights.repeat(n_global), widths.repeat(n_global), self.global_scale, self.ratio
        )
        # Local boxes are drawn in their region's coordinates, region by region, then moved to
        # the image's: the resampling drops taps outside a box, so a crop sees only its region.
        reps = self.locals_per_region
        local_boxes = []
        for top in region_tops:
            boxes = sample_resized_crop_boxes(
                draws, reps * b, region_h.repeat(reps), widths.repeat(reps), self.local_scale, self.ratio
            )
            boxes[:, 0] += top.repeat(reps)
            local_boxes.append(boxes)
        global_flip = draws.bernoulli(n_global * b, self.flip_p)
        local_flip = draws.bernoulli(n_local * b, self.flip_p)

        x = to_unit_float(images)
        global_views = self._photometric(
            resized_crops(x, global_boxes, global_flip, self.global_size),
            draws,
            blur=draws.bernoulli_per_view(self.global_blur_p, b),
            solarize=draws.bernoulli_per_view(self.global_solarize_p, b),
        )
        local_views = self._photometric(
            resized_crops(x, torch.cat(local_boxes), local_flip, self.local_size),
            draws,
            blur=draws.bernoulli(n_local * b, self.local_blur_p),
            solarize=None,
        )
        return PASSViewBatch(self.normalize(global_views), self.normalize(local_views), self.local_region)

    def _photometric(
        self, views: torch.Tensor, draws: RandomDraws, blur: torch.Tensor, solarize: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Color jitter, grayscale, blur (where ``blur``), solarize (where ``solarize``) on float
        ``(N, 3, h, w)`` views in [0, 1]; returns the same shape, in [0, 1]."""
        n = views.shape[0]
        jittered = draws.bernoulli(n, self.jitter_p)
        brightness, contrast, saturation, hue = self.jitter

        def factor(low: float, high: float, neutral: float) -> torch.Tensor:
            return torch.where(jittered, draws.uniform((n,), low, high), neutral)

        x = kornia.enhance.adjust_brightness_accumulative(views, factor(max(0.0, 1 - brightness), 1 + brightness, 1.0))
        x = kornia.enhance.adjust_contrast_with_mean_subtraction(x, factor(max(0.0, 1 - contrast), 1 + contrast, 1.0))
        x = kornia.enhance.adjust_saturation_with_gray_subtraction(
            x, factor(max(0.0, 1 - saturation), 1 + saturation, 1.0)
        )
        x = shift_hue(x, factor(-hue, hue, 0.0))

        gray = draws.bernoulli(n, self.grayscale_p)
        x = torch.where(gray[:, None, None, None], kornia.color.rgb_to_grayscale(x).expand_as(x), x)

        sigma = torch.where(blur, draws.uniform((n,), *self.blur_sigma), 0.0)
        kernel = kornia.filters.get_gaussian_kernel1d(BLUR_KERNEL_SIZE, sigma[:, None])
        x = kornia.filters.filter2d_separable(x, kernel, kernel, border_type="reflect")

        if solarize is not None:
            # A threshold above 1 leaves a view as it is.
            x = kornia.enhance.solarize(x, torch.where(solarize, 0.5, 2.0))
        return x
