"""Checking and converting input images for the shards.

JPEG files in RGB or grayscale with no EXIF rotation are stored byte for byte (the project's
decoders, DALI and PIL, read both the same way), once Pillow has decoded them and their marker
structure is one DALI's parser accepts (:mod:`shards.jpeg`; Pillow alone lets through damaged
headers on which DALI can crash). Everything else (BMP, PNG, TIFF, WebP, CMYK
JPEGs, 16-bit, palette and alpha images, rotated JPEGs) is converted to an RGB JPEG, so that
every reader decodes every shard alike.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shards.jpeg import jpeg_structure_problem

#: Quality of re-encoded JPEGs: high enough that re-encoding loses little, and deterministic.
JPEG_QUALITY = 95
#: Copy JPEGs in these modes as they are; other modes (CMYK, YCCK) are converted.
COPYABLE_JPEG_MODES = frozenset({"RGB", "L"})
EXIF_ORIENTATION = 0x0112
#: The draft decode used to validate copied JPEGs: 1/8 scale still entropy-decodes every
#: coefficient, so truncation and corrupt scans are found at a fraction of a full decode.
DRAFT_SCALE = 8


@dataclass(frozen=True)
class ImageCheck:
    """The verdict on one input: ``reason`` is None when usable; ``convert`` says whether it is
    re-encoded (False: its bytes are stored as they are)."""

    reason: str | None
    convert: bool = False


def _needs_conversion(image: Image.Image) -> bool:
    if image.format != "JPEG" or image.mode not in COPYABLE_JPEG_MODES:
        return True
    return image.getexif().get(EXIF_ORIENTATION, 1) != 1


def check_image(path: Path) -> ImageCheck:
    """Decide whether ``path`` can be stored, and how, by decoding it (cheaply for copied JPEGs)."""
    if path.is_symlink() and not path.exists():
        return ImageCheck(f"broken symbolic link: its target {os.readlink(path)} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        return ImageCheck(f"unreadable: {err.strerror or err}")
    if not data:
        return ImageCheck("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            convert = _needs_conversion(image)
            if not convert:
                width, height = image.size
                image.draft(image.mode, (max(1, width // DRAFT_SCALE), max(1, height // DRAFT_SCALE)))
            image.load()
    except Image.DecompressionBombError as err:
        return ImageCheck(f"too large: {err}")
    except UnidentifiedImageError:
        return ImageCheck("not an image in a format Pillow can read")
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return ImageCheck(f"corrupt or not an image: {err}")
    if not convert:  # stored as it is: DALI must be able to parse it (shards.jpeg)
        problem = jpeg_structure_problem(data)
        if problem is not None:
            return ImageCheck(f"corrupt JPEG ({problem})")
    return ImageCheck(None, convert)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16/32-bit integer images are scaled to 8 bits (not clipped, as
    ``convert('RGB')`` would), transparent ones are composited on black."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit sources hold 0..65535; a 32-bit or float image with values <= 255 is already 8-bit.
        scale = 257.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def encode_image(path: Path, convert: bool) -> bytes:
    """The bytes stored for ``path``: the file itself, or its RGB JPEG re-encoding."""
    data = path.read_bytes()
    if not convert:
        return data
    with Image.open(io.BytesIO(data)) as image:
        rgb = _to_rgb(image)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
