"""SYSU-MM01: ``cam{1..6}/{pid:04d}/{nnnn}.jpg`` and ``exp/{train,val,test}_id.txt``.

RGB cameras 1, 2, 4, 5; infrared cameras 3, 6. Splits: train = train + val ids, all cameras;
query = infrared images of the test ids; gallery = every RGB image of the test ids (evaluation
samples its per-trial galleries from it). Images of ids in no list are dropped and counted.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError
from common.textfiles import read_user_text
from shards.layouts.common import LayoutScan, Record, images_in_pid_folders, require_dir, require_file

RGB_CAMERAS = (1, 2, 4, 5)
IR_CAMERAS = (3, 6)
ID_LISTS = ("train_id.txt", "val_id.txt", "test_id.txt")


def _read_ids(path: Path) -> set[int]:
    """An exp list: comma-separated ids, on one line (or several)."""
    text = read_user_text(path).replace("\n", ",")
    try:
        return {int(token) for token in text.split(",") if token.strip()}
    except ValueError:
        raise UserError(f"{path} should hold comma-separated identity numbers") from None


def scan_sysu(root: Path) -> LayoutScan:
    cameras = {cam: require_dir(root, f"cam{cam}", "sysu-mm01") for cam in RGB_CAMERAS + IR_CAMERAS}
    require_dir(root, "exp", "sysu-mm01")
    train_ids, val_ids, test_ids = (_read_ids(require_file(root, f"exp/{name}", "sysu-mm01")) for name in ID_LISTS)
    for name, ids in (("train_id.txt", train_ids), ("val_id.txt", val_ids)):
        both = sorted(ids & test_ids)
        if both:
            raise UserError(f"identities {', '.join(map(str, both[:10]))}{' ...' if len(both) > 10 else ''} are in both "
                            f"exp/{name} and exp/test_id.txt of {root}; an identity is either trained on or tested")
    scan = LayoutScan(base=root)
    for cam, folder in sorted(cameras.items()):
        modality = "ir" if cam in IR_CAMERAS else "rgb"
        for source, pid in images_in_pid_folders(folder, scan, "cam*/<pid>/"):
            if pid in train_ids or pid in val_ids:
                split = "train"
            elif pid in test_ids:
                split = "query" if modality == "ir" else "gallery"
            else:
                scan.dropped["identity in no exp/*_id.txt list"] += 1
                continue
            scan.records.append(Record(source, pid, cam, modality, split))
    return scan
