"""The shard format: what one sample is, how members are named, and the DALI index file.

This module is the single definition of the on-disk contract (DESIGN.md section 4). Readers
(:mod:`pipelines`), the writer (:mod:`shards.writer`) and ``verify`` all import it.

A shard is a plain USTAR tar file, readable by ``tarfile``, ``webdataset`` and DALI's
``fn.readers.webdataset``. One sample is three consecutive members sharing a key:

==============  =========================================================================
``KEY.jpg``     the image: the source JPEG bytes unchanged, or a re-encoded RGB JPEG
``KEY.json``    :class:`SampleMeta` as UTF-8 JSON (pid, camera, modality, dataset, split,
                source path relative to the dataset root, sample index, train label)
``KEY.lbl``     16 bytes, four little-endian int32: pid, camera, modality code, index
                (what DALI reads with ``dtypes=[types.INT32]``, since it cannot parse JSON)
==============  =========================================================================

Keys are ``{split}_{index:08d}`` and contain no dot: webdataset splits a member name at the
first dot of its base name, so a dotted key would silently change the sample it belongs to.

Beside every ``NAME.tar`` lies ``NAME.idx``, DALI's ``wds2idx`` index (version ``v1.2``): a
header line ``v1.2 <samples>``, then one line per sample listing, for each member,
``<ext> <data offset> <size> <member name>``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.modality import MODALITY_CODE

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

IMAGE_EXT = "jpg"
META_EXT = "json"
LABEL_EXT = "lbl"
MEMBER_EXTS = (IMAGE_EXT, META_EXT, LABEL_EXT)

#: The fields of the binary label member, in order.
LABEL_FIELDS = ("pid", "camera", "modality", "index")
LABEL_DTYPE = np.dtype("<i4")
LABEL_BYTES = LABEL_DTYPE.itemsize * len(LABEL_FIELDS)


#: Split names. ``all`` is used by RegDB, whose train/test identities change per trial.
SPLITS = ("train", "query", "gallery", "all")

#: Stand-in for an unknown pid or camera (unlabeled folders).
UNKNOWN = -1

INDEX_VERSION = "v1.2"
TAR_BLOCK = 512


def sample_key(split: str, index: int) -> str:
    """The key of sample ``index`` of ``split``: ``train_00000042`` (no dot, by construction)."""
    return f"{split}_{index:08d}"


def shard_stem(split: str, number: int) -> str:
    """File stem of shard ``number`` of ``split``: ``train-000003`` (``.tar`` and ``.idx``)."""
    return f"{split}-{number:06d}"


@dataclass(frozen=True)
class SampleMeta:
    """The ``KEY.json`` member: one sample's labels and provenance.

    ``pid`` and ``camera`` are the dataset's own numbers (Market ``c3`` -> 3, SYSU ``cam6`` -> 6;
    -1 when unknown); ``label`` is the contiguous training label from the manifest's
    ``pid_to_label`` map (-1 outside the train split); ``index`` is the sample's position in its
    split, in the order of source paths, so it is stable whatever the shuffle seed.
    """

    pid: int
    camera: int
    modality: str
    dataset: str
    split: str
    source: str
    index: int
    label: int

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SampleMeta":
        return cls(**json.loads(data))


def encode_label(pid: int, camera: int, modality: str, index: int) -> bytes:
    """The 16-byte ``KEY.lbl`` member (four little-endian int32, :data:`LABEL_FIELDS`)."""
    return np.array([pid, camera, MODALITY_CODE[modality], index], dtype=LABEL_DTYPE).tobytes()


def decode_label(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_label`: int32 array ``(4,)`` = pid, camera, modality code, index."""
    if len(data) != LABEL_BYTES:
        raise ValueError(f"label member has {len(data)} bytes, expected {LABEL_BYTES}")
    return np.frombuffer(data, dtype=LABEL_DTYPE)


def split_member_name(name: str) -> tuple[str, str]:
    """``'dir/key.ext.more'`` -> ``('dir/key', 'ext.more')``, splitting at the base name's first dot
    exactly as webdataset and DALI do."""
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


@dataclass(frozen=True)
class IndexEntry:
    """One member in a DALI index line: extension, offset of its data in the tar, size, name."""

    ext: str
    offset: int
    size: int
    name: str


def format_index(samples: list[list[IndexEntry]]) -> str:
    """The text of a ``wds2idx`` v1.2 index for ``samples`` (each a list of its members)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in members))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[list[IndexEntry]]:
    """Parse a ``wds2idx`` v1.2 index; raises ValueError when it is malformed."""
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty index file")
    header = lines[0].split()
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ValueError(f"index header {lines[0]!r} is not '{INDEX_VERSION} <count>'")
    samples = []
    for line in lines[1:]:
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"malformed index line {line!r}")
        samples.append(
            [
                IndexEntry(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            ]
        )
    if len(samples) != int(header[1]):
        raise ValueError(f"index announces {header[1]} samples but lists {len(samples)}")
    return samples


def tar_path(folder: Path, stem: str) -> Path:
    return folder / f"{stem}.tar"


def index_path(folder: Path, stem: str) -> Path:
    return folder / f"{stem}.idx"
