"""``shards inspect``: what a shard folder holds, as a table, and a contact sheet of samples."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from common.errors import UserError
from shards.format import IMAGE_EXT, META_EXT, SPLITS, SampleMeta, parse_index
from shards.manifest import Counts, Manifest

THUMB_SIZE = (64, 128)  # (W, H) of each contact-sheet tile: the usual ReID aspect
CAPTION_HEIGHT = 24


def _cameras(counts: Counts) -> str:
    return ",".join(map(str, counts.cameras)) or "-"


def summary_table(manifest: Manifest) -> str:
    """Per split and modality: images, identities, cameras; then shards, rejects and drops."""
    rows = [("split", "modality", "images", "ids", "cameras", "shards", "MB")]
    for split in (s for s in SPLITS if s in manifest.splits):
        counts = manifest.splits[split]
        shards = manifest.shards_of(split)
        megabytes = f"{sum(s.bytes for s in shards) / 1e6:.1f}"
        rows.append((split, "all", str(counts.total.images), str(counts.total.identities),
                     _cameras(counts.total), str(len(shards)), megabytes))
        for modality, sub in counts.modalities.items():
            rows.append(("", modality, str(sub.images), str(sub.identities), _cameras(sub), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"layout {manifest.layout}, {len(manifest.pid_to_label)} train labels, "
                 f"{manifest.converted} images re-encoded, {len(manifest.rejected)} rejected"
                 + "".join(f", {n} dropped: {why}" for why, n in manifest.dropped.items()))
    if manifest.trials:
        lines.append(f"{len(manifest.trials)} trials with their own train/test identities (RegDB)")
    for rejected in manifest.rejected[:10]:
        lines.append(f"  rejected {rejected.source}: {rejected.reason}")
    if len(manifest.rejected) > 10:
        lines.append(f"  ... {len(manifest.rejected) - 10} more in manifest.json")
    return "\n".join(lines)


def _read_member(tar: Path, offset: int, size: int) -> bytes:
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def random_samples(folder: Path, manifest: Manifest, count: int, split: str | None, seed: int) -> list[tuple[bytes, SampleMeta]]:
    """``count`` random (image bytes, meta) pairs, read by offset through the DALI indexes."""
    shards = [s for s in manifest.shards if split is None or s.split == split]
    if not shards:
        raise UserError(f"no shards of split {split!r}; splits here: {', '.join(manifest.splits)}")
    entries = []
    for shard in shards:
        for members in parse_index((folder / shard.index).read_text()):
            by_ext = {m.ext: m for m in members}
            entries.append((folder / shard.file, by_ext[IMAGE_EXT], by_ext[META_EXT]))
    chosen = random.Random(seed).sample(entries, min(count, len(entries)))
    return [(_read_member(tar, img.offset, img.size), SampleMeta.from_bytes(_read_member(tar, meta.offset, meta.size)))
            for tar, img, meta in chosen]


def contact_sheet(samples: list[tuple[bytes, SampleMeta]], columns: int = 12) -> Image.Image:
    """A grid of thumbnails, each captioned with split, pid, camera and modality."""
    width, height = THUMB_SIZE
    rows = -(-len(samples) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + CAPTION_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (data, meta) in enumerate(samples):
        x, y = (i % columns) * width, (i // columns) * (height + CAPTION_HEIGHT)
        with Image.open(io.BytesIO(data)) as image:
            sheet.paste(image.convert("RGB").resize(THUMB_SIZE, Image.BILINEAR), (x, y))
        draw.text((x + 2, y + height + 1), f"{meta.split[:5]} {meta.modality}", fill="black", font=font)
        draw.text((x + 2, y + height + 12), f"p{meta.pid} c{meta.camera}", fill="black", font=font)
    return sheet
