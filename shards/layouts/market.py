"""Market-1501 and DukeMTMC-reID: ``bounding_box_train/``, ``query/``, ``bounding_box_test/``.

Names: Market ``PPPP_cCsS_FFFFFF_NN.jpg``, Duke ``PPPP_cC_fFFFFFFF.jpg``; both parse with
``([-\\d]+)_c(\\d)``. pid -1 (Market junk) is dropped and counted; pid 0 (distractors) is kept.
"""

from __future__ import annotations

import re
from pathlib import Path

from shards.layouts.common import LayoutScan, Record, image_files, relative, require_dir
from shards.manifest import Rejected

NAME_PATTERN = re.compile(r"^([-\d]+)_c(\d+)")
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
JUNK_PID = -1


def _scan_bounding_boxes(root: Path, layout: str, cameras: range) -> LayoutScan:
    folders = {split: require_dir(root, name, layout) for split, name in SPLIT_FOLDERS.items()}
    scan = LayoutScan(base=root)
    for split, folder in folders.items():
        for path in image_files(folder):
            source = relative(path, root)
            match = NAME_PATTERN.match(path.name)
            if match is None:
                scan.rejected.append(Rejected(source, f"file name does not match {layout}'s PPPP_cC... naming"))
                continue
            pid, camera = int(match.group(1)), int(match.group(2))
            if pid == JUNK_PID:
                scan.dropped["junk (pid -1)"] += 1
                continue
            if camera not in cameras:
                scan.rejected.append(Rejected(source, f"camera {camera} outside {layout}'s cameras {cameras.start}..{cameras.stop - 1}"))
                continue
            scan.records.append(Record(source, pid, camera, "rgb", split))
    return scan


def scan_market1501(root: Path) -> LayoutScan:
    return _scan_bounding_boxes(root, "market1501", range(1, 7))


def scan_dukemtmc(root: Path) -> LayoutScan:
    return _scan_bounding_boxes(root, "dukemtmc", range(1, 9))
