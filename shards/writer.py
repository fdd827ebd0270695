"""Writing one shard: a deterministic USTAR tar plus its DALI index, never half-written.

Tar headers carry no time, owner or mode that depends on the machine, so the same samples give
the same bytes; the output is byte for byte what ``tarfile`` writes in USTAR format for members
with mtime 0, mode 0644 and no owner. Both files are written under a temporary name and renamed into place, so a file
with the final name is always complete.
"""

from __future__ import annotations

import hashlib
import os
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


#: tarfile pads an archive to whole records of 20 blocks; so do we, to match it byte for byte.
TAR_RECORD = 20 * TAR_BLOCK


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file with no time, owner or group (mode 0644).

    Written by hand rather than through ``tarfile``, whose header code costs ~50 us a member
    and would be the builder's bottleneck; the test suite checks it against ``tarfile``.
    """
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"member name {name!r} is longer than USTAR's 100 bytes")
    header = bytearray(TAR_BLOCK)
    header[0 : len(encoded)] = encoded
    header[100:108] = b"0000644\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # checksum placeholder: spaces while summing
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"  # magic and version; device numbers stay NUL, as tarfile leaves them
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def _padding(size: int) -> bytes:
    return bytes(-size % TAR_BLOCK)


def write_shard(folder: Path, stem: str, samples: Iterable[EncodedSample]) -> WrittenShard:
    """Write ``folder/stem.tar`` and ``folder/stem.idx`` from ``samples``, atomically.

    Member data offsets are computed while writing (each USTAR header is one 512-byte block and
    data is padded to whole blocks), so the index needs no second pass over the tar; the sha256
    is computed on the way too.
    """
    final_tar, final_idx = tar_path(folder, stem), index_path(folder, stem)
    tmp_tar = final_tar.with_name(f".{final_tar.name}.tmp")
    tmp_idx = final_idx.with_name(f".{final_idx.name}.tmp")
    index: list[list[IndexEntry]] = []
    sha = hashlib.sha256()
    offset = 0
    with open(tmp_tar, "wb") as f:
        for sample in samples:
            entries = []
            parts = []
            for ext, data in sample.members():
                name = f"{sample.key}.{ext}"
                parts += [ustar_header(name, len(data)), data, _padding(len(data))]
                entries.append(IndexEntry(ext, offset + TAR_BLOCK, len(data), name))
                offset += TAR_BLOCK + len(data) + -len(data) % TAR_BLOCK
            chunk = b"".join(parts)
            f.write(chunk)
            sha.update(chunk)
            index.append(entries)
        end = bytes(2 * TAR_BLOCK)  # end-of-archive marker, then padding to a whole record
        end += bytes(-(offset + len(end)) % TAR_RECORD)
        f.write(end)
        sha.update(end)
        size = offset + len(end)
        f.flush()
        os.fsync(f.fileno())
    tmp_idx.write_text(format_index(index))
    os.replace(tmp_idx, final_idx)
    os.replace(tmp_tar, final_tar)
    return WrittenShard(samples=len(index), bytes=size, sha256=sha.hexdigest())
