"""The data the suites run on: a synthetic SYSU-MM01-like set written as loose JPEG files (the
usual way reads those) and built into shards (our sources read those), in a temporary folder.

Both forms hold the same JPEG bytes: the shard builder copies JPEG files as they are, and
:func:`SyntheticSet.train_records` lists the train split in the shards' sample order with the
loose file behind each sample, so every configuration of a suite decodes the same images.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from shards.build import build
from shards.format import IMAGE_EXT, META_EXT, SampleMeta, split_member_name
from shards.manifest import load_manifest
from shards.synthetic import generate

LAYOUT = "sysu-mm01"
SPLIT = "train"


@dataclass(frozen=True)
class Record:
    """One train image: its loose file, its JPEG bytes and its modality (``rgb`` / ``ir``)."""

    path: Path
    jpeg: bytes
    modality: str


@dataclass(frozen=True)
class SyntheticSet:
    """A generated dataset: ``root`` (loose files, SYSU-MM01 layout) and ``shards`` (built)."""

    root: Path
    shards: Path

    @classmethod
    def create(cls, folder: Path, *, ids: int, images_per_id: int, workers: int) -> "SyntheticSet":
        """Generate the tree under ``folder/raw`` and build its shards into ``folder/shards``."""
        root, shards = folder / "raw", folder / "shards"
        generate(LAYOUT, root, ids=ids, images_per_id=images_per_id, seed=0, workers=workers)
        build(LAYOUT, root, shards, workers=workers)
        return cls(root, shards)

    @cached_property
    def train_records(self) -> list[Record]:
        """The train split (SYSU-MM01's train + val ids) in shard order, read from the shards."""
        records = []
        for shard in load_manifest(self.shards).shards_of(SPLIT):
            with tarfile.open(self.shards / shard.file) as tar:
                members: dict[str, dict[str, bytes]] = {}
                for member in tar:
                    key, ext = split_member_name(member.name)
                    members.setdefault(key, {})[ext] = tar.extractfile(member).read()
            for parts in members.values():
                meta = SampleMeta.from_bytes(parts[META_EXT])
                records.append(Record(self.root / meta.source, parts[IMAGE_EXT], meta.modality))
        return records


__all__ = ["Record", "SyntheticSet"]
