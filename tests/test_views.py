"""Views: MMGL stripe shuffle, PASS multi-crop, fine-tuning; checked against independent computations."""

from __future__ import annotations

import math
import random

import kornia
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FinetuneViews,
    MMGLViews,
    PASSViews,
    RandomStripeShuffle,
    permutation_matrix,
    shuffle_stripes,
)
from pipelines.views.common import RandomDraws, pad_crop_flip
from pipelines.views.finetune import transreid_views
from pipelines.views.pass_views import resized_crops, sample_resized_crop_boxes, shift_hue

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def random_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalized views back to [0, 1] (ImageNet statistics)."""
    return x * STD.to(x.device) + MEAN.to(x.device)


def painted_stripes(b: int, h: int, w: int, n: int, values: list[int]) -> torch.Tensor:
    """uint8 images whose stripe k (of n equal stripes) is the constant values[k]."""
    rows = torch.tensor(values, dtype=torch.uint8).repeat_interleave(h // n)
    return rows.view(1, 1, h, 1).expand(b, 3, h, w).contiguous()


def unshuffle(views: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Put every stripe back where it came from, with plain indexing: original[perm[b, j]] = shuffled[j]."""
    b, c, h, w = views.shape
    n = perm.shape[1]
    stripes = views.view(b, c, n, h // n, w)
    original = torch.empty_like(stripes)
    original[torch.arange(b)[:, None], :, perm] = stripes.transpose(1, 2)
    return original.view(b, c, h, w)


# ---------------------------------------------------------------- MMGL


def test_mmgl_unshuffling_recovers_the_augmented_views_exactly():
    mmgl = MMGLViews()
    rgb, ir = random_images(4, 288, 144, seed=1), random_images(4, 288, 144, seed=2)
    views = mmgl(rgb, ir, generator=7)
    # The documented draw order: crop/flip of cat([rgb, ir]) as augment() draws them, then perm.
    plain = mmgl.augment(torch.cat([rgb, ir]), generator=7)
    assert views.rgb.shape == views.ir.shape == (4, 3, 288, 144)
    assert views.rgb.dtype == torch.float32 and views.perm.dtype == torch.int64
    assert torch.equal(torch.sort(views.perm, dim=1).values, torch.arange(6).expand(4, 6))
    assert not torch.equal(views.perm, torch.arange(6).expand(4, 6))
    assert torch.equal(unshuffle(views.rgb, views.perm), plain[:4])
    assert torch.equal(unshuffle(views.ir, views.perm), plain[4:])


def test_mmgl_rgb_and_ir_of_a_slot_share_the_permutation():
    # No padding, so a crop cannot move rows across stripes: each output stripe stays one colour.
    mmgl = MMGLViews(pad=0)
    b, n = 16, 6
    rgb = painted_stripes(b, 288, 144, n, [10 * k + 5 for k in range(n)])
    ir = painted_stripes(b, 288, 144, n, [250 - 20 * k for k in range(n)])
    views = mmgl(rgb, ir, generator=3)

    def stripe_ids(x: torch.Tensor, decode) -> torch.Tensor:
        value = unnormalize(x)[:, 0].view(b, n, -1) * 255  # (B, n, pixels)
        assert torch.allclose(value, value[:, :, :1].expand_as(value), atol=1e-3)
        return decode(value[:, :, 0].round().long())

    assert torch.equal(stripe_ids(views.rgb, lambda v: (v - 5) // 10), views.perm)
    assert torch.equal(stripe_ids(views.ir, lambda v: (250 - v) // 20), views.perm)
    assert len({tuple(p) for p in views.perm.tolist()}) > 1  # slots get different permutations


def test_mmgl_rejects_a_height_that_stripes_cannot_divide():
    with pytest.raises(ValueError, match="multiple of num_stripes"):
        MMGLViews(size=(256, 128), num_stripes=6)


def test_stripe_shuffle_params_replay_through_kornia():
    aug = RandomStripeShuffle(num_stripes=4)
    x = torch.arange(8.0).view(1, 1, 8, 1).expand(5, 3, 8, 2).contiguous()
    torch.manual_seed(0)
    shuffled = aug(x)  # Kornia draws (torch's global RNG) and keeps the params
    perm = aug._params["perm"].clone()
    replayed = aug(x + 100, params=aug._params)
    first_row = 2 * perm  # stripe k of x holds rows 2k, 2k+1 with values 2k, 2k+1
    assert torch.equal(shuffled[:, 0, ::2, 0], first_row.float())
    assert torch.equal(replayed[:, 0, ::2, 0], first_row.float() + 100)
    # Seeded draws through draw_params are reproducible and replayable the same way.
    p1 = aug.draw_params(5, torch.Generator().manual_seed(4))
    p2 = aug.draw_params(5, torch.Generator().manual_seed(4))
    assert torch.equal(p1["perm"], p2["perm"])
    assert torch.equal(aug(x, params=p1)[:, 0, ::2, 0], 2 * p1["perm"].float())


def test_permutations_cover_every_stripe_at_every_position_evenly():
    aug = RandomStripeShuffle(num_stripes=6)
    perm = aug.draw_params(6000, torch.Generator().manual_seed(0))["perm"]
    assert torch.equal(torch.sort(perm, dim=1).values, torch.arange(6).expand(6000, 6))
    counts = F.one_hot(perm, 6).sum(dim=0)  # counts[j, i]: stripe i at position j
    assert counts.min() > 800 and counts.max() < 1200  # expected 1000, sd ~29


def test_permutation_matrix_maps_original_stripes_to_shuffled():
    x = torch.rand(3, 2, 12, 5)
    perm = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    shuffled = shuffle_stripes(x, perm)
    as_rows = lambda t: t.view(3, 2, 4, 3 * 5).transpose(1, 2).reshape(3, 4, -1)  # noqa: E731
    matrix = permutation_matrix(perm)
    assert matrix.shape == (3, 4, 4)
    assert torch.allclose(matrix @ as_rows(x), as_rows(shuffled))
    assert torch.allclose(matrix.transpose(1, 2) @ as_rows(shuffled), as_rows(x))


def test_shuffle_leaves_remainder_rows_in_place():
    x = torch.arange(14.0).view(1, 1, 14, 1)
    out = shuffle_stripes(x, torch.tensor([[3, 1, 0, 2]]))  # stripes of 3 rows, 2 rows left over
    expected = torch.tensor([9, 10, 11, 3, 4, 5, 0, 1, 2, 6, 7, 8, 12, 13], dtype=torch.float32)
    assert torch.equal(out.flatten(), expected)


# ---------------------------------------------------------------- PASS

# Four quarter-height bands whose colours make each region recognisable by two channels that are
# constant over exactly that region's two bands (an affine mix of them keeps those channels).
LO, HI = 51, 204
BANDS = [(LO, LO, HI), (LO, HI, HI), (HI, HI, HI), (HI, HI, LO)]
REGION_CONSTANT = {0: {0: LO, 2: HI}, 1: {1: HI, 2: HI}, 2: {0: HI, 1: HI}}


def test_pass_views_shapes_and_grouping():
    views = PASSViews()(random_images(3, 256, 128), generator=0)
    assert views.global_views.shape == (6, 3, 256, 128)
    assert views.local_views.shape == (27, 3, 128, 64)
    assert views.global_views.dtype == views.local_views.dtype == torch.float32
    assert views.local_region == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert (views.num_global, views.num_local, views.batch_size) == (2, 9, 3)


def test_pass_local_crops_come_from_inside_their_region():
    h, w, b = 256, 128, 4
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    for k, colour in enumerate(BANDS):
        image[:, k * h // 4 : (k + 1) * h // 4] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    # Colour steps off (they change colours); crops, flips and blur stay on.
    maker = PASSViews(jitter_p=0.0, grayscale_p=0.0, global_solarize_p=(0.0, 0.0))
    for seed in range(3):
        views = maker(image.expand(b, 3, h, w), generator=seed)
        local = unnormalize(views.local_views).view(9, b, 3, 128, 64) * 255
        for view, region in enumerate(views.local_region):
            for channel, value in REGION_CONSTANT[region].items():
                assert torch.allclose(local[view, :, channel], torch.full_like(local[view, :, channel], value), atol=0.05)


def test_resized_crops_match_pil_bicubic_resize_of_the_cropped_box():
    images = random_images(2, 40, 24, seed=5)
    boxes = torch.tensor([[3.0, 2.0, 30.0, 17.0], [0.0, 0.0, 40.0, 24.0], [10.0, 5.0, 7.0, 9.0], [1.0, 1.0, 25.0, 12.0]])
    flip = torch.tensor([False, True, False, True])
    out = resized_crops(images.float() / 255, boxes, flip, (16, 8)) * 255  # shrinking and enlarging boxes
    for n, (top, left, bh, bw) in enumerate(boxes.int().tolist()):
        for c in range(3):
            # PIL in float mode ("F"): the same bicubic filter without 8-bit rounding between passes.
            pil = Image.fromarray(images[n % 2, c].float().numpy(), mode="F")
            # torchvision's resized_crop crops first, so the resize sees nothing outside the box.
            ref = pil.crop((left, top, left + bw, top + bh)).resize((8, 16), Image.BICUBIC)
            if flip[n]:
                ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
            ref = torch.from_numpy(np.array(ref)).clamp(0, 255)
            assert torch.allclose(out[n, c], ref, atol=1e-2)


def test_crop_boxes_follow_torchvision_random_resized_crop():
    def torchvision_like(height: int, width: int, rng: random.Random) -> tuple[int, int]:
        """The algorithm of torchvision's RandomResizedCrop.get_params, written out in Python."""
        for _ in range(10):
            target = height * width * rng.uniform(0.4, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return h, w
        return int(round(width / (3 / 4))), width

    rng = random.Random(0)
    ref = np.array([torchvision_like(256, 128, rng) for _ in range(4000)])
    boxes = sample_resized_crop_boxes(RandomDraws(0, torch.device("cpu")), 4000, 256, 128, (0.4, 1.0), (3 / 4, 4 / 3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 256).all() and (left + w <= 128).all()
    fallback = ((h == 171) & (w == 128)).float().mean().item()
    ref_fallback = ((ref[:, 0] == 171) & (ref[:, 1] == 128)).mean()
    assert abs(fallback - ref_fallback) < 0.04
    assert abs((h * w).mean().item() - (ref[:, 0] * ref[:, 1]).mean()) < 0.03 * 256 * 128


def test_pass_blur_and_solarize_probabilities_per_view(monkeypatch):
    sigmas = []
    kernel1d = kornia.filters.get_gaussian_kernel1d

    def recording_kernel(size, sigma, *args, **kwargs):
        sigmas.append(sigma.flatten().clone())
        return kernel1d(size, sigma, *args, **kwargs)

    monkeypatch.setattr(kornia.filters, "get_gaussian_kernel1d", recording_kernel)
    b = 400
    maker = PASSViews(global_size=(32, 16), local_size=(16, 8), jitter_p=0.0, grayscale_p=0.0)
    # A constant 0.8 image: solarization turns it into 0.2, nothing else changes it.
    views = maker(torch.full((b, 3, 32, 16), 204, dtype=torch.uint8), generator=11)
    global_sigma, local_sigma = sigmas[0].view(2, b), sigmas[1]
    blurred = lambda s: (s > 0).float().mean().item()  # noqa: E731
    assert blurred(global_sigma[0]) == 1.0
    assert abs(blurred(global_sigma[1]) - 0.1) < 0.05
    assert abs(blurred(local_sigma) - 0.5) < 0.05
    on = torch.cat([global_sigma.flatten(), local_sigma])
    on = on[on > 0]
    assert on.min() >= 0.1 and on.max() <= 2.0

    solarized = lambda x: (unnormalize(x).mean(dim=(1, 2, 3)) < 0.5).float().view(-1, b).mean(dim=1)  # noqa: E731
    per_global = solarized(views.global_views)
    assert per_global[0] == 0.0 and abs(per_global[1] - 0.2) < 0.06
    assert (solarized(views.local_views) == 0.0).all()


def test_shift_hue_matches_kornia_adjust_hue():
    x = torch.rand(6, 3, 10, 7)
    turns = torch.linspace(-0.5, 0.5, 6)
    assert torch.allclose(shift_hue(x, turns), kornia.enhance.adjust_hue(x, turns * 2 * math.pi), atol=1e-4)


# ---------------------------------------------------------------- fine-tuning


def test_finetune_shapes_and_eval_is_deterministic():
    views = FinetuneViews(size=(64, 32))
    images = random_images(4, 80, 40)
    assert views(images, generator=0).shape == (4, 3, 64, 32)
    first = views.eval_views(images)
    torch.manual_seed(123)
    assert first.shape == (4, 3, 64, 32)
    assert torch.equal(first, views.eval_views(images))


@pytest.mark.parametrize(
    "normalization, mean, std",
    [("imagenet", IMAGENET_MEAN, IMAGENET_STD), ("half", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
)
def test_finetune_normalization_constants(normalization, mean, std):
    constant = torch.full((2, 3, 32, 16), 128, dtype=torch.uint8)
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1).expand(2, 3, 32, 16)
    maker = FinetuneViews(size=(32, 16), pad=0, erase_p=0.0, normalization=normalization)
    assert torch.allclose(maker.eval_views(constant), expected, atol=1e-6)
    assert torch.allclose(maker(constant, generator=1), expected, atol=1e-6)


def test_pad_crop_flip_matches_per_image_reference():
    images = random_images(5, 12, 7)
    offsets = torch.tensor([[0, 0], [4, 4], [1, 3], [4, 0], [2, 2]])
    flip = torch.tensor([False, True, True, False, True])
    out = pad_crop_flip(images, offsets, flip, pad=2)
    for i in range(5):
        ref = F.pad(images[i], (2, 2, 2, 2))[:, offsets[i, 0] : offsets[i, 0] + 12, offsets[i, 1] : offsets[i, 1] + 7]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)


def test_random_erasing_erases_one_box_of_the_configured_size():
    b = 300
    maker = FinetuneViews(size=(64, 32), pad=0, flip_p=0.0, erase_p=0.5)
    views = maker(torch.full((b, 3, 64, 32), 255, dtype=torch.uint8), generator=2)
    erased = views[:, 0] == 0.0  # the fill is 0 in normalized space; white is far from it
    fraction = erased.float().mean(dim=(1, 2))
    assert 0.35 < (fraction > 0).float().mean() < 0.65
    for mask in erased[fraction > 0]:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and box.numel() == mask.sum()  # one solid rectangle
        assert 0.015 < box.numel() / (64 * 32) < 0.43


# ---------------------------------------------------------------- reproducibility


def all_views(seed, device="cpu"):
    rgb, ir = random_images(2, 288, 144, seed=1).to(device), random_images(2, 288, 144, seed=2).to(device)
    person = random_images(2, 256, 128, seed=3).to(device)
    mmgl = MMGLViews()(rgb, ir, generator=seed)
    pass_views = PASSViews()(person, generator=seed)
    finetune = FinetuneViews(size=(256, 128))(person, generator=seed)
    return [mmgl.rgb, mmgl.ir, mmgl.perm, pass_views.global_views, pass_views.local_views, finetune]


def test_same_seed_same_views_different_seed_different_views():
    first, again, other = all_views(5), all_views(5), all_views(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_a_generator_and_its_seed_give_the_same_views():
    person = random_images(2, 256, 128)
    by_seed = PASSViews()(person, generator=9)
    by_generator = PASSViews()(person, generator=torch.Generator().manual_seed(9))
    assert torch.equal(by_seed.global_views, by_generator.global_views)
    assert torch.equal(by_seed.local_views, by_generator.local_views)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_on_cuda_stay_on_the_device_and_are_reproducible():
    first, again = all_views(5, "cuda"), all_views(5, "cuda")
    for a, b in zip(first, again):
        assert a.is_cuda and torch.equal(a, b)
        assert a.dtype == torch.int64 or torch.isfinite(a).all()


def test_transreid_views_erase_like_timm_pixel_mode():
    """timm's RandomErasing(p=0.5, mode="pixel"), its defaults written out: one box per erased
    image, area 2% to 1/3 of the image, h/w log-uniform in (0.3, 1/0.3) (so log(h/w) is symmetric
    around 0 on a square image), filled with N(0, 1) noise per pixel and channel."""
    maker = transreid_views(size=(64, 64))
    assert (maker.pad, maker.flip_p, maker.erase_p) == (10, 0.5, 0.5)
    assert maker.normalize.mean == (0.5, 0.5, 0.5) and maker.normalize.std == (0.5, 0.5, 0.5)
    n = 2000
    views = maker(torch.full((n, 3, 64, 64), 255, dtype=torch.uint8), generator=4)
    # White is 1.0 after mean = std = 0.5; the zero padding is -1.0; noise is anything else.
    erased = ((views - 1.0).abs() > 1e-5) & ((views + 1.0).abs() > 1e-5)
    box_any = erased.any(dim=1)  # (n, 64, 64)
    hit = box_any.flatten(1).any(dim=1)
    assert 0.45 < hit.float().mean() < 0.55
    log_ratios, noise = [], []
    for i in hit.nonzero().flatten()[:600].tolist():
        rows = box_any[i].any(dim=1).nonzero().flatten()
        cols = box_any[i].any(dim=0).nonzero().flatten()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 0.02 * 64 * 64 * 0.8 < h * w < 64 * 64 / 3 * 1.2  # rounding of the sides
        assert 0.3 * 0.7 < h / w < 1 / 0.3 / 0.7
        log_ratios.append(math.log(h / w))
        noise.append(views[i][:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].flatten())
    assert abs(sum(log_ratios) / len(log_ratios)) < 0.1  # uniform h/w in (0.3, 3.33) gives about 0.5
    values = torch.cat(noise)
    values = values[((values - 1.0).abs() > 1e-5) & ((values + 1.0).abs() > 1e-5)]
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1.0) < 0.02


def test_random_erasing_pixel_mode_is_batched_and_reproducible():
    images = random_images(8, 64, 32, seed=9)
    a = transreid_views(size=(64, 32))(images, generator=3)
    b = transreid_views(size=(64, 32))(images, generator=3)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="erasing mode"):
        FinetuneViews(erase_mode="noise")
