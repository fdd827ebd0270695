"""Unlabeled folders (LUPerson-style): every image under the root, recursively, split ``train``,
pid and camera unknown (-1), modality ``rgb``."""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError
from shards.format import UNKNOWN
from shards.layouts.common import LayoutScan, Record, image_files, relative


def scan_folder(root: Path) -> LayoutScan:
    scan = LayoutScan(base=root)
    for path in image_files(root, recursive=True):
        scan.records.append(Record(relative(path, root), UNKNOWN, UNKNOWN, "rgb", "train"))
    if not scan.records:
        raise UserError(f"no image files (.jpg, .png, .bmp, ...) found under {root}")
    return scan
