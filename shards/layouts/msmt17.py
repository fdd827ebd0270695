"""MSMT17 (V1): ``train/``, ``test/`` and ``list_{train,val,query,gallery}.txt``.

List lines are ``relpath pid`` with paths relative to ``train/`` (train, val lists) or
``test/`` (query, gallery lists). The camera is the third ``_`` field of the file name
(``0000_000_01_0303morning_0015_0.jpg`` -> camera 1). Train = list_train + list_val.
"""

from __future__ import annotations

from pathlib import Path

from common.textfiles import read_user_text
from shards.layouts.common import LayoutScan, Record, require_dir, require_file
from shards.manifest import Rejected

LISTS = (("list_train.txt", "train", "train"), ("list_val.txt", "train", "train"),
         ("list_query.txt", "test", "query"), ("list_gallery.txt", "test", "gallery"))


def _camera_from_name(name: str) -> int:
    return int(name.split("_")[2])


def scan_msmt17(root: Path) -> LayoutScan:
    for folder in ("train", "test"):
        require_dir(root, folder, "msmt17")
    lists = [(require_file(root, name, "msmt17"), folder, split) for name, folder, split in LISTS]
    scan = LayoutScan(base=root)
    seen: set[str] = set()
    for list_path, folder, split in lists:
        for number, line in enumerate(read_user_text(list_path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{list_path.name}:{number}"
            fields = line.split()
            try:
                relpath, pid = fields[0], int(fields[1])
                camera = _camera_from_name(Path(relpath).name)
            except (IndexError, ValueError):
                scan.rejected.append(Rejected(where, f"malformed list line {line.strip()!r} (expected 'relpath pid' with a PPPP_SSS_CC_... file name)"))
                continue
            source = f"{folder}/{relpath}"
            if source in seen:
                scan.dropped["listed twice"] += 1
                continue
            seen.add(source)
            if not (root / source).is_file():
                scan.rejected.append(Rejected(source, f"listed in {list_path.name} but missing"))
                continue
            scan.records.append(Record(source, pid, camera, "rgb", split))
    return scan
