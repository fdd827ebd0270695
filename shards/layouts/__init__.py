"""Dataset layouts: each is a pure function ``root -> LayoutScan`` (records, rejects, counts).

A layout reads folder and file names (and list files) only; it never opens images. Checking and
converting images is the builder's job (:mod:`shards.images`). A layout that finds a missing
folder or list raises :class:`common.errors.UserError` naming what it expected and where.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from common.errors import UserError
from shards.layouts.common import LayoutScan, Record
from shards.layouts.folder import scan_folder
from shards.layouts.manifest_file import scan_manifest_file
from shards.layouts.market import scan_dukemtmc, scan_market1501
from shards.layouts.msmt17 import scan_msmt17
from shards.layouts.regdb import scan_regdb
from shards.layouts.sysu import scan_sysu

LAYOUTS: dict[str, Callable[[Path], LayoutScan]] = {
    "market1501": scan_market1501,
    "dukemtmc": scan_dukemtmc,
    "msmt17": scan_msmt17,
    "sysu-mm01": scan_sysu,
    "regdb": scan_regdb,
    "folder": scan_folder,
    "manifest": scan_manifest_file,
}


def scan(layout: str, root: Path) -> LayoutScan:
    """Read ``root`` as ``layout``; unknown layouts and missing roots are user errors."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    if not root.exists():
        raise UserError(f"dataset root {root} does not exist")
    if layout != "manifest" and not root.is_dir():
        raise UserError(f"dataset root {root} is a file; the {layout} layout expects a folder")
    return LAYOUTS[layout](root)


__all__ = ["LAYOUTS", "LayoutScan", "Record", "scan"]
