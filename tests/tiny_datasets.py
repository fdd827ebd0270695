"""Tiny dataset trees in each public layout, with the quirks the builder must handle.

Every writer returns the expected content as ``{source: (pid, camera, modality, split)}`` for
the images that must end up in the shards, written out independently of the layout code, plus
the sources that must be rejected.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

Expected = dict[str, tuple[int, int, str, str]]


@dataclass
class TinyDataset:
    root: Path
    expected: Expected
    rejected: set[str] = field(default_factory=set)
    converted: set[str] = field(default_factory=set)


def jpeg_bytes(seed: int, size=(32, 64), mode="RGB") -> bytes:
    """A small noisy JPEG (W, H = size), distinct per seed."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def write_image(path: Path, seed: int, fmt: str = "JPEG", mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "JPEG":
        path.write_bytes(jpeg_bytes(seed, mode=mode))
        return
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)


def truncated_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed)[:300])


def market(root: Path, cameras: int = 6, name: str = "market") -> TinyDataset:
    """Market-1501 (or Duke with cameras=8): junk, distractors, a corrupt file, a PNG, Thumbs.db."""
    expected: Expected = {}
    seed = 0
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for split, folder in folders.items():
        pids = [1, 2, 3] if split == "train" else [7, 8]
        for pid in pids:
            for cam in (1, cameras):
                source = f"{folder}/{pid:04d}_c{cam}s1_{seed:06d}_01.jpg"
                write_image(root / source, seed)
                expected[source] = (pid, cam, "rgb", split)
                seed += 1
    write_image(root / "bounding_box_test/-1_c1s1_000000_00.jpg", 900)  # junk: dropped
    write_image(root / "bounding_box_test/0000_c2s1_000000_00.jpg", 901)  # distractor: kept
    expected["bounding_box_test/0000_c2s1_000000_00.jpg"] = (0, 2, "rgb", "gallery")
    write_image(root / "bounding_box_train/0003_c2s1_000777_01.png", 902, fmt="PNG", mode="RGBA")
    expected["bounding_box_train/0003_c2s1_000777_01.png"] = (3, 2, "rgb", "train")
    truncated_jpeg(root / "bounding_box_train/0002_c2s1_000888_01.jpg", 903)
    (root / "bounding_box_train/Thumbs.db").write_bytes(b"not an image, not named by the layout")
    write_image(root / "query/badname.jpg", 904)
    return TinyDataset(
        root,
        expected,
        rejected={"bounding_box_train/0002_c2s1_000888_01.jpg", "query/badname.jpg"},
        converted={"bounding_box_train/0003_c2s1_000777_01.png"},
    )


def msmt17(root: Path) -> TinyDataset:
    expected: Expected = {}
    lists = {"list_train.txt": ("train", "train", [0, 1]), "list_val.txt": ("train", "train", [2]),
             "list_query.txt": ("test", "query", [0, 1]), "list_gallery.txt": ("test", "gallery", [0, 1])}
    seed = 0
    for list_name, (folder, split, pids) in lists.items():
        lines = []
        for pid in pids:
            for cam in (3, 12):
                relpath = f"{pid:04d}/{pid:04d}_{seed:03d}_{cam:02d}_0303morning_0015_0.jpg"
                write_image(root / folder / relpath, seed)
                expected[f"{folder}/{relpath}"] = (pid, cam, "rgb", split)
                lines.append(f"{relpath} {pid}")
                seed += 1
        if list_name == "list_gallery.txt":
            lines.append("0009/0009_000_01_0303morning_0015_0.jpg 9")  # listed but missing
        (root / list_name).write_text("\n".join(lines) + "\n")
    return TinyDataset(root, expected, rejected={"test/0009/0009_000_01_0303morning_0015_0.jpg"})


def sysu(root: Path) -> TinyDataset:
    """SYSU-MM01: train/val/test ids, an id in no list, a BMP-in-disguise-free RGB/IR mix."""
    expected: Expected = {}
    ids = {"train": [1, 2], "val": [3], "test": [4, 5]}
    for name, pids in ids.items():
        (root / "exp").mkdir(parents=True, exist_ok=True)
        (root / "exp" / f"{name}_id.txt").write_text(",".join(map(str, pids)))
    seed = 0
    for cam in range(1, 7):
        (root / f"cam{cam}").mkdir(parents=True, exist_ok=True)
        modality = "ir" if cam in (3, 6) else "rgb"
        for pid in (1, 2, 3, 4, 5, 6):
            if pid == 2 and cam == 5:
                continue  # not every id is seen by every camera
            for n in (1, 2):
                source = f"cam{cam}/{pid:04d}/{n:04d}.jpg"
                write_image(root / source, seed, mode="L" if modality == "ir" and n == 2 else "RGB")
                seed += 1
                if pid == 6:
                    continue  # id 6 is in no exp list: dropped
                split = "train" if pid <= 3 else ("query" if modality == "ir" else "gallery")
                expected[source] = (pid, cam, modality, split)
    return TinyDataset(root, expected)


def regdb(root: Path, trials: int = 2) -> TinyDataset:
    """RegDB: BMP images (converted), two trials with swapped train/test identities."""
    expected: Expected = {}
    seed = 0
    files: dict[tuple[str, int], list[str]] = {}
    for folder, modality, cam, letter in (("Visible", "rgb", 1, "v"), ("Thermal", "ir", 2, "t")):
        for pid in (1, 2, 3, 4):
            for n in (1, 2):
                source = f"{folder}/{pid}/male_back_{letter}_{seed:05d}_{n}.bmp"
                write_image(root / source, seed, fmt="BMP", mode="RGB" if modality == "rgb" else "L")
                expected[source] = (pid, cam, modality, "all")
                files.setdefault((folder, pid), []).append(source)
                seed += 1
    (root / "idx").mkdir()
    for t in range(1, trials + 1):
        train, test = ([1, 2], [3, 4]) if t % 2 else ([3, 4], [1, 2])
        for part, pids in (("train", train), ("test", test)):
            for folder, name in (("Visible", "visible"), ("Thermal", "thermal")):
                lines = [f"{s} {label}" for label, pid in enumerate(pids) for s in files[folder, pid]]
                (root / "idx" / f"{part}_{name}_{t}.txt").write_text("\n".join(lines) + "\n")
    return TinyDataset(root, expected, converted=set(expected))


def folder(root: Path) -> TinyDataset:
    """Unlabeled images in nested folders, one CMYK JPEG (converted), a 16-bit PNG, a text file."""
    expected: Expected = {}
    for i, sub in enumerate(["a", "a/b", "c"]):
        source = f"{sub}/img{i}.jpg"
        write_image(root / source, i)
        expected[source] = (-1, -1, "rgb", "train")
    write_image(root / "c/cmyk.jpg", 50, mode="CMYK")
    expected["c/cmyk.jpg"] = (-1, -1, "rgb", "train")
    (root / "c").mkdir(exist_ok=True)
    sixteen = (np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 31).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "c/deep.png")
    expected["c/deep.png"] = (-1, -1, "rgb", "train")
    (root / "notes.txt").write_text("ignored")
    return TinyDataset(root, expected, converted={"c/cmyk.jpg", "c/deep.png"})


def manifest_csv(root: Path) -> TinyDataset:
    """A CSV list with a bad modality row, a missing file and an absolute-free relative layout."""
    expected: Expected = {}
    rows = ["path,pid,camera,modality,split"]
    for i, (modality, split) in enumerate([("rgb", "train"), ("ir", "train"), ("rgb", "query"), ("ir", "gallery")]):
        source = f"images/{i}.jpg"
        write_image(root / source, i)
        rows.append(f"{source},{10 + i % 2},{i + 1},{modality},{split}")
        expected[source] = (10 + i % 2, i + 1, modality, split)
    write_image(root / "images/bad.jpg", 77)
    rows.append("images/bad.jpg,3,1,thermal,train")
    rows.append("images/missing.jpg,3,1,rgb,train")
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return TinyDataset(root, expected, rejected={"list.csv:6", "images/missing.jpg"})
