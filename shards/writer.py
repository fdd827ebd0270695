"""Writing one shard: a deterministic USTAR tar plus its DALI index, never half-written.

Tar headers carry no time, owner or mode that depends on the machine, so the same samples give
the same bytes. Both files are written under a temporary name and renamed into place, so a file
with the final name is always complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shards.format import (
    IMAGE_EXT,
    LABEL_EXT,
    META_EXT,
    TAR_BLOCK,
    IndexEntry,
    format_index,
    index_path,
    tar_path,
)


@dataclass(frozen=True)
class EncodedSample:
    """One sample ready to be written: its key and the bytes of its three members."""

    key: str
    image: bytes
    meta: bytes
    label: bytes

    def members(self) -> list[tuple[str, bytes]]:
        return [(IMAGE_EXT, self.image), (META_EXT, self.meta), (LABEL_EXT, self.label)]


@dataclass(frozen=True)
class WrittenShard:
    """What was written: sample count, tar size in bytes and its sha256 (hex)."""

    samples: int
    bytes: int
    sha256: str


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(folder: Path, stem: str, samples: Iterable[EncodedSample]) -> WrittenShard:
    """Write ``folder/stem.tar`` and ``folder/stem.idx`` from ``samples``, atomically.

    Member data offsets are computed while writing (each USTAR header is one 512-byte block and
    data is padded to whole blocks), so the index needs no second pass over the tar.
    """
    final_tar, final_idx = tar_path(folder, stem), index_path(folder, stem)
    tmp_tar = final_tar.with_name(f".{final_tar.name}.tmp")
    tmp_idx = final_idx.with_name(f".{final_idx.name}.tmp")
    index: list[list[IndexEntry]] = []
    offset = 0
    with open(tmp_tar, "wb") as raw:
        sink = _HashingWriter(raw)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                entries = []
                for ext, data in sample.members():
                    name = f"{sample.key}.{ext}"
                    tar.addfile(_member_info(name, len(data)), io.BytesIO(data))
                    entries.append(IndexEntry(ext, offset + TAR_BLOCK, len(data), name))
                    offset += TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK
                index.append(entries)
        raw.flush()
        os.fsync(raw.fileno())
    tmp_idx.write_text(format_index(index))
    os.replace(tmp_idx, final_idx)
    os.replace(tmp_tar, final_tar)
    return WrittenShard(samples=len(index), bytes=sink.size, sha256=sink.sha.hexdigest())
