"""Image checks and conversions, against pixels computed independently in the test."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import tiny_datasets
from shards.images import check_image, encode_image


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        return np.asarray(image, dtype=np.float64)


def smooth_rgb() -> np.ndarray:
    """A smooth image (JPEG keeps it within a few levels), (64, 32, 3) uint8."""
    y, x = np.mgrid[0:64, 0:32]
    return np.stack([y * 4, x * 8, np.full_like(y, 100)], axis=-1).astype(np.uint8)


def test_rgb_and_gray_jpegs_are_copied(tmp_path):
    for mode in ("RGB", "L"):
        path = tmp_path / f"{mode}.jpg"
        tiny_datasets.write_image(path, 1, mode=mode)
        check = check_image(path)
        assert check.reason is None and not check.convert
        assert encode_image(path, check.convert) == path.read_bytes()


@pytest.mark.parametrize("fmt, suffix", [("BMP", "bmp"), ("PNG", "png"), ("TIFF", "tif"), ("WEBP", "webp")])
def test_other_formats_become_rgb_jpeg(tmp_path, fmt, suffix):
    path = tmp_path / f"x.{suffix}"
    Image.fromarray(smooth_rgb()).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    check = check_image(path)
    assert check.reason is None and check.convert
    assert np.abs(decoded(encode_image(path, True)) - smooth_rgb()).mean() < 2.0


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((64, 32, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:32, :, 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    pixels = decoded(encode_image(tmp_path / "a.png", True))
    assert abs(pixels[:28].mean() - 200) < 3 and pixels[36:].mean() < 3


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.full((64, 32), 65535, dtype=np.uint16)
    values[32:] = 32896  # 128 * 257
    Image.fromarray(values).save(tmp_path / "d.png")
    pixels = decoded(encode_image(tmp_path / "d.png", True))
    assert abs(pixels[:28].mean() - 255) < 2 and abs(pixels[36:].mean() - 128) < 2


def test_cmyk_jpeg_is_converted(tmp_path):
    tiny_datasets.write_image(tmp_path / "c.jpg", 3, mode="CMYK")
    check = check_image(tmp_path / "c.jpg")
    assert check.reason is None and check.convert


def test_exif_rotated_jpeg_is_re_encoded_upright(tmp_path):
    image = Image.fromarray(smooth_rgb())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    image.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    check = check_image(tmp_path / "r.jpg")
    assert check.convert
    assert decoded(encode_image(tmp_path / "r.jpg", True)).shape == (32, 64, 3)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"this is text", "not an image"), (None, "corrupt")],
)
def test_bad_files_are_rejected_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is None:
        tiny_datasets.truncated_jpeg(path, 5)
    else:
        path.write_bytes(content)
    check = check_image(path)
    assert check.reason is not None and reason in check.reason


@pytest.mark.parametrize("marker, offset", [(b"\xff\xc4", 5), (b"\xff\xda", 4)])
def test_corrupt_tables_are_rejected(tmp_path, marker, offset):
    """A damaged Huffman table or scan header: decoders fail on these, so the builder must too.
    (Damage inside the entropy-coded data only makes libjpeg warn and decode garbage pixels.)"""
    data = bytearray(tiny_datasets.jpeg_bytes(9, size=(64, 128)))
    start = data.index(marker) + offset
    data[start : start + 16] = b"\xff" * 16
    (tmp_path / "x.jpg").write_bytes(bytes(data))
    assert "corrupt" in check_image(tmp_path / "x.jpg").reason
