"""RegDB: ``Visible/<pid>/*.bmp``, ``Thermal/<pid>/*.bmp`` and the trial lists in ``idx/``.

Every image is stored once, in split ``all``: the 10 trials use different train/test
identities, recorded in the manifest (``trials``) from ``idx/{train,test}_{visible,thermal}_{t}.txt``
(lines ``relpath label``). Camera: 1 visible, 2 thermal (RegDB has one camera of each).
"""

from __future__ import annotations

import re
from pathlib import Path

from common.errors import UserError
from common.textfiles import read_user_text
from shards.layouts.common import LayoutScan, Record, images_in_pid_folders, require_dir
from shards.manifest import Trial

MODALITY_FOLDERS = (("Visible", "rgb", 1), ("Thermal", "ir", 2))
TRIAL_LIST = re.compile(r"^train_visible_(\d+)\.txt$")


def _list_pids(path: Path, root: Path) -> set[int]:
    """The identities (folder numbers) of the images a trial list names."""
    pids = set()
    for line in read_user_text(path).splitlines():
        if not line.strip():
            continue
        relpath = Path(line.split()[0])
        try:
            pids.add(int(relpath.parent.name))
        except ValueError:
            raise UserError(f"{path}: line {line.strip()!r} does not name a <Modality>/<pid>/ image") from None
    return pids


def _scan_trials(root: Path) -> list[Trial]:
    idx = require_dir(root, "idx", "regdb")
    numbers = sorted(int(m.group(1)) for p in idx.iterdir() if (m := TRIAL_LIST.match(p.name)))
    if not numbers:
        raise UserError(f"regdb layout expects trial lists idx/train_visible_<t>.txt in {root}, found none")
    trials = []
    for t in numbers:
        lists = {}
        for part in ("train", "test"):
            for modality in ("visible", "thermal"):
                path = idx / f"{part}_{modality}_{t}.txt"
                if not path.is_file():
                    raise UserError(f"regdb trial {t} needs {path}, which is missing")
                lists[part, modality] = _list_pids(path, root)
        trials.append(Trial(
            trial=t,
            train_ids=sorted(lists["train", "visible"] | lists["train", "thermal"]),
            test_ids=sorted(lists["test", "visible"] | lists["test", "thermal"]),
        ))
    return trials


def scan_regdb(root: Path) -> LayoutScan:
    folders = [(require_dir(root, name, "regdb"), modality, cam) for name, modality, cam in MODALITY_FOLDERS]
    scan = LayoutScan(base=root, trials=_scan_trials(root))
    for folder, modality, camera in folders:
        for source, pid in images_in_pid_folders(folder, scan, "<Modality>/<pid>/"):
            scan.records.append(Record(source, pid, camera, modality, "all"))
    return scan
