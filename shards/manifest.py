"""``manifest.json``: what a shard folder holds, written last by ``build``, read by everyone.

The manifest is the folder's table of contents and its integrity record: the layout and build
settings, per-split counts, every shard with its sample count, size and sha256, the train
pid -> label map, RegDB's per-trial identities, and every rejected input with its reason.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from common.errors import UserError
from shards.format import FORMAT_VERSION, MANIFEST_NAME, SPLITS, UNKNOWN


@dataclass(frozen=True)
class Rejected:
    """An input that is not in the shards, and why (a corrupt image, a name the layout cannot parse)."""

    source: str
    reason: str


@dataclass(frozen=True)
class ShardInfo:
    """One tar file: ``file`` is relative to the manifest's folder; ``index`` is its DALI index."""

    file: str
    index: str
    split: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Counts:
    """Images, distinct identities and distinct cameras of a set of samples."""

    images: int = 0
    identities: int = 0
    cameras: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SplitCounts:
    """Counts of a split in all and per modality (``rgb``, ``ir``; absent modalities omitted)."""

    total: Counts
    modalities: dict[str, Counts]


class Labelled(Protocol):
    """What counts are made of: a layout's record or a stored sample's JSON."""

    pid: int
    camera: int
    modality: str
    split: str


def _counts(items: list[Labelled]) -> Counts:
    return Counts(
        images=len(items),
        identities=len({r.pid for r in items if r.pid != UNKNOWN}),
        cameras=sorted({r.camera for r in items if r.camera != UNKNOWN}),
    )


def split_counts(items: Iterable[Labelled]) -> dict[str, SplitCounts]:
    """The manifest's ``splits``: counts per split, in all and per modality."""
    by_split: dict[str, list[Labelled]] = defaultdict(list)
    for item in items:
        by_split[item.split].append(item)
    result = {}
    for split in SPLITS:
        if split not in by_split:
            continue
        by_modality: dict[str, list[Labelled]] = defaultdict(list)
        for item in by_split[split]:
            by_modality[item.modality].append(item)
        result[split] = SplitCounts(
            total=_counts(by_split[split]),
            modalities={m: _counts(rs) for m, rs in sorted(by_modality.items())},
        )
    return result


@dataclass(frozen=True)
class Trial:
    """RegDB: the identities (dataset pids) used for training and testing in one trial."""

    trial: int
    train_ids: list[int]
    test_ids: list[int]


@dataclass
class Manifest:
    """The content of ``manifest.json`` (see the module docstring).

    ``root`` is the dataset root the shards were built from; ``fingerprint`` identifies the
    build's inputs and settings (a re-run with the same one has nothing to do); ``dropped``
    counts inputs left out on purpose (Market junk, duplicates); ``converted`` counts images
    re-encoded rather than copied.
    """

    layout: str
    root: str
    fingerprint: str
    seed: int
    shard_size: int
    splits: dict[str, SplitCounts]
    shards: list[ShardInfo]
    pid_to_label: dict[int, int]
    rejected: list[Rejected]
    dropped: dict[str, int]
    converted: int
    trials: list[Trial] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        data = asdict(self)
        data["pid_to_label"] = {str(k): v for k, v in self.pid_to_label.items()}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        return cls(
            layout=data["layout"],
            root=data["root"],
            fingerprint=data["fingerprint"],
            seed=data["seed"],
            shard_size=data["shard_size"],
            splits={
                name: SplitCounts(
                    total=Counts(**s["total"]),
                    modalities={m: Counts(**c) for m, c in s["modalities"].items()},
                )
                for name, s in data["splits"].items()
            },
            shards=[ShardInfo(**s) for s in data["shards"]],
            pid_to_label={int(k): v for k, v in data["pid_to_label"].items()},
            rejected=[Rejected(**r) for r in data["rejected"]],
            dropped=data["dropped"],
            converted=data["converted"],
            trials=[Trial(**t) for t in data.get("trials", [])],
            format_version=data["format_version"],
        )

    def save(self, folder: Path) -> None:
        """Write atomically: a reader never sees a half-written manifest."""
        tmp = folder / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(self.to_json())
        os.replace(tmp, folder / MANIFEST_NAME)


def label_problems(manifest: Manifest) -> list[str]:
    """What is inconsistent in the manifest's ``pid_to_label`` map on its own: training labels
    must be 0..P-1, each given to exactly one pid, for as many pids as the train split has."""
    labels = sorted(manifest.pid_to_label.values())
    problems = []
    if labels != list(range(len(labels))):
        problems.append(f"pid_to_label does not give the labels 0..{len(labels) - 1} once each")
    train = manifest.splits.get("train")
    if train is not None and train.total.identities != len(labels):
        problems.append(f"pid_to_label maps {len(labels)} pids but the train split counts "
                        f"{train.total.identities} identities")
    return problems


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read ``folder/manifest.json``; a missing or unreadable one is a :class:`UserError`."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; a shard folder (the --out of `python -m shards build`) was expected")
    if not folder.is_dir():
        raise UserError(f"shard folder {folder} does not exist")
    if not path.is_file():
        raise UserError(
            f"{folder} is not a shard folder: it has no {MANIFEST_NAME} "
            "(build one with `python -m shards build`, or the build was interrupted: re-run it)"
        )
    try:
        manifest = Manifest.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a valid shard manifest ({err.__class__.__name__}: {err})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise UserError(
            f"{path} has shard format version {manifest.format_version}; this code reads version "
            f"{FORMAT_VERSION}: rebuild the shards"
        )
    return manifest
