"""PASS crops from the image at its source resolution and aspect ratio (issue 12, part A).

- the canvas rule (written out by hand), the three sources yielding it alike, each image's
  valid size in the Batch;
- the property: a crop of an image put on a canvas (shrunk to fit when larger) matches the same
  crop of the original image (PIL, bicubic, box in the original's pixels) within resampling
  error, where resizing first to 2:1 (the old behaviour) does not;
- the PASS views never read the canvas padding, and cut local crops from the image's own stripes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.batch import Batch
from pipelines.sources import make_source
from pipelines.sources.canvas import fitted_size, place_on_canvas, resize_uint8
from pipelines.sources.dali import canvas_graph, dali_available
from pipelines.views.common import IMAGENET_MEAN, IMAGENET_STD
from pipelines.views.pass_views import PASSViews, resized_crops
from shards.build import build
from shards.format import IMAGE_EXT, LABEL_EXT
from train.methods.pass_method import PASS, pass_tiny, pass_vits_lup

CANVAS = (48, 24)
#: (h, w) of the source images: fits, taller than 2:1, wider than 2:1, larger than the canvas.
SOURCE_SIZES = [(40, 20), (46, 12), (20, 22), (96, 40), (30, 60), (48, 24)]


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 ``(h, w, 3)``: a few low-frequency waves in physical units of the image, so any two
    resamplings of the same region agree closely."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = (y + 0.5) / h, (x + 0.5) / w
    out = np.empty((h, w, 3))
    for c in range(3):
        fy, fx, phase = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0, 2 * math.pi)
        out[..., c] = 128 + 90 * np.sin(2 * math.pi * (fy * y + fx * x) + phase)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# -- the canvas rule -------------------------------------------------------------------------------

@pytest.mark.parametrize("source, canvas, expected", [
    ((100, 40), (512, 256), (100, 40)),   # fits: kept at its resolution, never enlarged
    ((600, 200), (512, 256), (512, 171)),  # s = 512/600: 170.67 -> 171
    ((300, 600), (512, 256), (128, 256)),  # s = 256/600
    ((512, 256), (512, 256), (512, 256)),
    ((5, 4000), (512, 256), (1, 256)),     # never a zero side
])
def test_fitted_size_by_hand(source, canvas, expected):
    assert fitted_size(*source, canvas) == expected


def test_place_on_canvas_keeps_the_image_top_left_and_zeros_the_rest():
    image = smooth_image(30, 10)
    out = torch.full((3, 40, 20), 7, dtype=torch.uint8)
    assert place_on_canvas(out, image) == (30, 10)
    assert torch.equal(out[:, :30, :10], torch.from_numpy(image).permute(2, 0, 1))
    assert out[:, 30:].eq(0).all() and out[:, :, 10:].eq(0).all()


# -- the property: a crop of the canvas is a crop of the source ------------------------------------

def pil_crop(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """Crop ``box = (top, left, h, w)`` (in ``image``'s pixels, floats allowed) of the original
    and resize it to ``size`` with PIL's bicubic filter, per channel in float: ``(3, *size)``."""
    top, left, bh, bw = box
    planes = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").resize(
        (size[1], size[0]), Image.BICUBIC, box=(left, top, left + bw, top + bh))) for c in range(3)]
    return np.clip(np.stack(planes), 0, 255)


@pytest.mark.parametrize("source", [(60, 36), (80, 80), (120, 40)])
def test_a_crop_of_the_canvas_matches_the_same_crop_of_the_source(source):
    """Sources larger than the canvas, of 5:3, 1:1 and 3:1: the canvas shrinks them by one factor
    s; a box on the canvas is the box / s on the original. Resampling error only (smooth image):
    a few grey levels. Resizing to the canvas shape first (2:1, the old behaviour) would put the
    box elsewhere on the original, and misses by tens of levels for non-2:1 images."""
    image = smooth_image(*source, seed=sum(source))
    canvas = torch.empty((3, *CANVAS), dtype=torch.uint8)
    vh, vw = place_on_canvas(canvas, image)
    scale = vh / source[0]
    assert abs(vw / source[1] - scale) < 1 / source[1]  # aspect ratio kept up to rounding
    box = torch.tensor([[4.0, 2.0, vh - 10.0, vw - 5.0]])
    out = resized_crops(canvas[None].float() / 255, box, torch.tensor([False]), (16, 8))[0] * 255
    sy, sx = source[0] / vh, source[1] / vw
    t, l, h, w = box[0].tolist()
    ref = pil_crop(image, (t * sy, l * sx, h * sy, w * sx), (16, 8))
    err = (out.numpy() - ref).__abs__()
    assert err.max() < 6 and err.mean() < 1.5, (err.max(), err.mean())
    # The old resize-first behaviour: the same box on the image stretched to the canvas shape.
    stretched = np.array(Image.fromarray(image).resize((CANVAS[1], CANVAS[0]), Image.BILINEAR))
    old = resized_crops(torch.from_numpy(stretched).permute(2, 0, 1)[None].float() / 255, box,
                        torch.tensor([False]), (16, 8))[0] * 255
    if source[0] / source[1] != CANVAS[0] / CANVAS[1]:
        assert (old.numpy() - ref).__abs__().max() > 20


def test_a_source_that_fits_is_cropped_at_its_own_resolution():
    image = smooth_image(40, 14, seed=3)
    canvas = torch.empty((3, *CANVAS), dtype=torch.uint8)
    assert place_on_canvas(canvas, image) == (40, 14)
    box = torch.tensor([[5.0, 1.0, 30.0, 12.0]])
    out = resized_crops(canvas[None].float() / 255, box, torch.tensor([False]), (16, 8))[0] * 255
    # torchvision's resized_crop on the original: crop (integer box), then PIL bicubic resize.
    ref = pil_crop(image[5:35, 1:13], (0.0, 0.0, 30.0, 12.0), (16, 8))
    assert np.abs(out.numpy() - ref).max() < 0.05  # the source is not resampled: the same crop exactly


# -- the views stay inside the valid region --------------------------------------------------------

def unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def no_colour_steps() -> PASSViews:
    return PASSViews(global_size=(32, 16), local_size=(16, 8), jitter_p=0.0, grayscale_p=0.0,
                     global_blur_p=(0.0, 0.0), local_blur_p=0.0, global_solarize_p=(0.0, 0.0))


def test_pass_views_never_read_the_canvas_padding():
    valid = torch.tensor([[40, 20], [46, 12], [20, 22], [48, 24], [13, 5]])
    images = torch.full((len(valid), 3, *CANVAS), 255, dtype=torch.uint8)  # padding: white
    for b, (h, w) in enumerate(valid.tolist()):
        images[b, :, :h, :w] = 0  # the image: black
    for seed in range(4):
        views = no_colour_steps()(images, generator=seed, valid=valid)
        assert unnormalize(views.global_views).abs().max() < 0.05
        assert unnormalize(views.local_views).abs().max() < 0.05
    # Without the valid sizes the padding is read (the check above is not vacuous).
    assert unnormalize(no_colour_steps()(images, generator=0).global_views).max() > 100


def test_pass_local_crops_come_from_the_image_own_stripes():
    """Image b of height h in quarters q = rows [q h/4, (q + 1) h/4); region k = quarters k and
    k + 1 of ITS height. Channel k is 100 on quarters k, k + 1 and 200 elsewhere (padding 255):
    a local crop of region k is exactly 100 in channel k only if it reads nothing outside."""
    valid = torch.tensor([[40, 20], [24, 24], [48, 12], [32, 8]])
    quarter_colours = [(100, 200, 200), (100, 100, 200), (200, 100, 100), (200, 200, 100)]
    images = torch.full((len(valid), 3, *CANVAS), 255, dtype=torch.uint8)
    for b, (h, w) in enumerate(valid.tolist()):
        for q, colour in enumerate(quarter_colours):
            images[b, :, q * h // 4 : (q + 1) * h // 4, :w] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    for seed in range(3):
        views = no_colour_steps()(images, generator=seed, valid=valid)
        local = unnormalize(views.local_views).view(9, len(valid), 3, 16, 8)
        for view, region in enumerate(views.local_region):
            assert torch.allclose(local[view, :, region], torch.tensor(100.0), atol=0.05)


def test_without_valid_sizes_the_views_are_those_of_the_resize_mode():
    images = torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)
    maker = PASSViews(global_size=(32, 16), local_size=(16, 8))
    a = maker(images, generator=5)
    b = maker(images, generator=5, valid=torch.tensor([[64, 32]] * 3))
    assert torch.allclose(a.global_views, b.global_views, atol=1e-5)
    assert torch.allclose(a.local_views, b.local_views, atol=1e-5)


# -- every source yields the canvas and the valid sizes --------------------------------------------

@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """A folder dataset of 12 images of the sizes in SOURCE_SIZES (PNG, re-encoded to JPEG by
    the builder), sample index i of size ``SOURCE_SIZES[i % 6]``."""
    base = tmp_path_factory.mktemp("canvas")
    for i, (h, w) in enumerate(SOURCE_SIZES * 2):
        path = base / "raw" / "d" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(h, w, seed=i)).save(path)
    build("folder", base / "raw", base / "shards", shard_size=5, workers=1)
    return base / "shards"


def stored_jpegs(shards: Path) -> dict[int, np.ndarray]:
    """Sample index -> its JPEG in the shards decoded by PIL at its stored size (read with
    ``tarfile``; the index is the 4th int32 of the binary label member)."""
    members: dict[str, bytes] = {}
    for tar in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar) as f:
            members.update({m.name: f.extractfile(m).read() for m in f.getmembers() if m.isfile()})
    out = {}
    for name, data in members.items():
        key, _, ext = name.partition(".")
        if ext == LABEL_EXT:
            index = int(np.frombuffer(data, dtype="<i4")[3])
            out[index] = np.array(Image.open(io.BytesIO(members[f"{key}.{IMAGE_EXT}"])).convert("RGB"))
    return out


@pytest.mark.parametrize("kind", ["wds", "dali", "cache"])
def test_every_source_yields_the_canvas_and_the_valid_size(mixed_shards, kind):
    if kind == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    source = make_source(mixed_shards, "train", source=kind, batch_size=4, size=CANVAS, device="cpu", shuffle=False,
                         drop_last=False, rank=0, world=1, fit="canvas", num_workers=0 if kind == "wds" else 1)
    batches = list(source)
    valid = torch.cat([b.valid for b in batches])
    images = torch.cat([b.images for b in batches])
    index = torch.cat([b.index for b in batches])
    stored = stored_jpegs(mixed_shards)
    assert valid.dtype == torch.int64 and valid.shape == (len(SOURCE_SIZES) * 2, 2)
    for row, i in enumerate(index.tolist()):
        h, w = SOURCE_SIZES[i % len(SOURCE_SIZES)]
        assert tuple(valid[row].tolist()) == fitted_size(h, w, CANVAS)
        vh, vw = valid[row].tolist()
        assert images[row, :, vh:].eq(0).all() and images[row, :, :, vw:].eq(0).all()
        # The pixels: the stored image at its own resolution (or shrunk to fit) in the corner
        # (DALI's and PIL's JPEG decoders agree to within 2 levels, test_sources).
        expected = torch.zeros((3, *CANVAS), dtype=torch.uint8)
        expected[:, :vh, :vw] = resize_uint8(torch.from_numpy(stored[i]).permute(2, 0, 1), (vh, vw))
        assert (images[row].int() - expected.int()).abs().max() <= 2


def test_the_resize_mode_yields_no_valid_sizes(mixed_shards):
    source = make_source(mixed_shards, "train", source="wds", batch_size=4, size=CANVAS, device="cpu",
                         shuffle=False, drop_last=False, rank=0, world=1, num_workers=0)
    batch = next(iter(source))
    assert batch.valid is None and batch.images.shape == (4, 3, *CANVAS)


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_dali_canvas_graph_follows_the_size_rule():
    """The graph the GPU path runs, here on DALI's CPU backend: sizes, padding, placement."""
    from nvidia.dali import fn, pipeline_def, types

    sizes = [(40, 20), (96, 40), (30, 60)]
    encoded = []
    for h, w in sizes:
        buffer = io.BytesIO()
        Image.fromarray(smooth_image(h, w)).save(buffer, "JPEG", quality=95)
        encoded.append(np.frombuffer(buffer.getvalue(), np.uint8))

    @pipeline_def(batch_size=len(sizes), num_threads=1, device_id=None)
    def pipe():
        jpegs = fn.external_source(source=lambda: encoded, batch=True)
        return canvas_graph(jpegs, fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), CANVAS)

    p = pipe()
    p.build()
    images, valid = p.run()
    for n, (h, w) in enumerate(sizes):
        canvas, (vh, vw) = np.asarray(images[n]), np.asarray(valid[n]).tolist()
        assert (vh, vw) == fitted_size(h, w, CANVAS) and canvas.shape == (*CANVAS, 3)
        assert not canvas[vh:].any() and not canvas[:, vw:].any()
        expected = torch.empty((3, *CANVAS), dtype=torch.uint8)
        place_on_canvas(expected, smooth_image(h, w))
        assert np.abs(canvas.transpose(2, 0, 1).astype(int) - expected.numpy().astype(int)).mean() < 4


# -- the PASS presets default to it ---------------------------------------------------------------

def test_pass_presets_crop_from_the_source_by_default_and_keep_resize_as_an_option():
    assert pass_vits_lup().method_config.input == "source"
    spec = PASS(pass_tiny().method_config).data_spec()
    assert spec.fit == "canvas" and spec.size == (128, 64)
    resized = PASS(dataclasses.replace(pass_tiny().method_config, input="resize")).data_spec()
    assert resized.fit == "resize" and resized.size == (64, 32)


def test_the_method_passes_the_valid_sizes_to_its_views():
    method = PASS(pass_tiny().method_config)
    images = torch.full((2, 3, 128, 64), 255, dtype=torch.uint8)
    images[:, :, :50, :30] = 0
    valid = torch.tensor([[50, 30], [50, 30]])
    ones = torch.ones(2, dtype=torch.int64)
    method.views = no_colour_steps()
    views = method.make_views(Batch(images, ones, ones, ones, ones, valid), torch.Generator().manual_seed(0))
    assert unnormalize(views.global_views).abs().max() < 0.05
