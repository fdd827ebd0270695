"""What every layout returns, and the small readers they share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from shards.manifest import Rejected, Trial

#: File endings read as images; anything else in a dataset folder (Thumbs.db, .txt) is ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"})


@dataclass(frozen=True)
class Record:
    """One input image as a layout names it.

    ``source`` is the path relative to the dataset root (POSIX separators, or absolute for a
    manifest that lists absolute paths); ``pid`` and ``camera`` are the dataset's own numbers.
    """

    source: str
    pid: int
    camera: int
    modality: str
    split: str


@dataclass
class LayoutScan:
    """A layout's reading of a dataset root.

    base:     the folder that record sources are relative to (the dataset root, or a list
              file's folder)
    records:  every image to shard, in no particular order (the builder sorts)
    rejected: inputs named by the layout that cannot be used (a file name it cannot parse,
              a listed file that is missing), each with its reason
    dropped:  inputs left out on purpose, counted by reason (Market junk, pid -1)
    trials:   RegDB's per-trial train/test identities; empty for other layouts
    """

    base: Path
    records: list[Record] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    trials: list[Trial] = field(default_factory=list)


def require_dir(root: Path, name: str, layout: str) -> Path:
    """``root/name`` as a folder, or a user error naming it and the layout that needs it."""
    path = root / name
    if not path.is_dir():
        raise UserError(f"{layout} layout expects a folder {name}/ in {root}, but {path} is missing")
    return path


def require_file(root: Path, name: str, layout: str) -> Path:
    path = root / name
    if not path.is_file():
        raise UserError(f"{layout} layout expects the file {name} in {root}, but {path} is missing")
    return path


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (by ending, case-insensitive), sorted; other files are ignored.
    A broken symbolic link with an image ending is kept: the builder rejects it with its reason."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES
                  and (p.is_file() or (p.is_symlink() and not p.exists())))


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def images_in_pid_folders(folder: Path, scan: LayoutScan, expected: str) -> Iterator[tuple[str, int]]:
    """``(source, pid)`` of every image under ``folder`` that lies in a folder named by its pid
    (SYSU-MM01's ``cam3/0012/``, RegDB's ``Thermal/12/``); any other image is rejected as not
    in ``expected``."""
    for path in image_files(folder, recursive=True):
        source = relative(path, scan.base)
        try:
            yield source, int(path.parent.name)
        except ValueError:
            scan.rejected.append(Rejected(source, f"not in a {expected} folder"))
