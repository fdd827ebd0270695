"""Shared by the PASS / pre-training tests: tiny unlabeled shards (built once per session) and
the command line of a tiny PASS run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from shards.build import build

IMAGES = 48  # 6 steps per epoch at batch 8
H, W = 64, 32


def tiny_shards(tmp_path_factory) -> Path:
    """48 noisy 64x32 JPEGs in a LUPerson-style folder, built into 3 shards; reused by every test
    of the session (the folder lives in the session's base temp directory)."""
    base = tmp_path_factory.getbasetemp() / "pass-tiny"
    out = base / "shards"
    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        path = base / "raw" / f"d{i % 3}" / f"img{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.integers(-60, 60, (H, W, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    build("folder", base / "raw", out, shard_size=16, workers=1)
    return out


def tiny_args(shards: Path, run: Path, *extra: str) -> list[str]:
    """Arguments of ``train.pretrain`` for a quiet tiny PASS run."""
    return ["--preset", "pass_tiny", "--shards", str(shards), "--output_dir", str(run),
            "--progress_bar", "false", *extra]
