"""``shards verify``: check every shard of a folder against its manifest.

Each tar is read once, streaming: its sha256 and size must match the manifest, every sample
must have its three members (image, JSON, label) with consistent labels, the sample count must
match, and the DALI index must describe the tar's members exactly. Tars in the folder that the
manifest does not list are reported too.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

from common.modality import MODALITY_CODE
from shards.format import (
    IMAGE_EXT,
    MANIFEST_NAME,
    UNKNOWN,
    LABEL_EXT,
    META_EXT,
    MEMBER_EXTS,
    IndexEntry,
    SampleMeta,
    decode_label,
    parse_index,
    split_member_name,
)
from shards.manifest import Manifest, ShardInfo, SplitCounts, label_problems, load_manifest, split_counts


@dataclass(frozen=True)
class Problem:
    """A bad shard file and what is wrong with it."""

    file: str
    reason: str


class _HashingReader:
    """A read-only stream that hashes and counts what is read through it."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def _sample_problem(key: str, members: dict[str, bytes], split: str) -> str | None:
    """What is wrong with one sample's members, or None."""
    missing = [ext for ext in MEMBER_EXTS if ext not in members]
    if missing:
        return f"sample {key} lacks member(s) {', '.join('.' + m for m in missing)}"
    try:
        meta = SampleMeta.from_bytes(members[META_EXT])
        label = decode_label(members[LABEL_EXT])
    except (ValueError, TypeError) as err:
        return f"sample {key} has an unreadable label: {err}"
    expected = [meta.pid, meta.camera, MODALITY_CODE.get(meta.modality, -99), meta.index]
    if label.tolist() != expected or meta.split != split:
        return f"sample {key}: binary label {label.tolist()} disagrees with its JSON {meta}"
    if not members[IMAGE_EXT]:
        return f"sample {key} has an empty image"
    return None


def _meta_or_none(members: dict[str, bytes]) -> SampleMeta | None:
    try:
        return SampleMeta.from_bytes(members[META_EXT])
    except (KeyError, ValueError, TypeError):
        return None


def _read_tar(path: Path, split: str, metas: list[SampleMeta] | None = None
              ) -> tuple[list[list[IndexEntry]], _HashingReader, str | None]:
    """Stream through a tar: the index it implies, the hashing reader, and the first problem;
    each sample's JSON is appended to ``metas`` when given."""
    metas = [] if metas is None else metas
    samples: list[list[IndexEntry]] = []
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        problem = None
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                key, members = None, {}
                for info in tar:
                    if not info.isfile():
                        continue
                    member_key, ext = split_member_name(info.name)
                    if member_key != key:
                        if key is not None:
                            problem = problem or _sample_problem(key, members, split)
                            metas.append(_meta_or_none(members))
                        key, members = member_key, {}
                        samples.append([])
                    members[ext] = tar.extractfile(info).read()
                    samples[-1].append(IndexEntry(ext, info.offset_data, info.size, info.name))
                if key is not None:
                    problem = problem or _sample_problem(key, members, split)
                    metas.append(_meta_or_none(members))
            reader.read()  # hash the end-of-archive padding too
        except (tarfile.TarError, EOFError, OSError) as err:
            problem = f"unreadable tar ({err}): truncated or corrupt"
    return samples, reader, problem


def verify_shard(folder: Path, shard: ShardInfo, metas: list[SampleMeta] | None = None) -> str | None:
    """The first thing wrong with ``shard`` (a problem message), or None when it is intact;
    the samples' JSON members are appended to ``metas`` when given."""
    path = folder / shard.file
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != shard.bytes:
        return f"{size} bytes, the manifest says {shard.bytes}: truncated or changed"
    samples, reader, problem = _read_tar(path, shard.split, metas)
    if problem:
        return problem
    if reader.sha.hexdigest() != shard.sha256:
        return "sha256 differs from the manifest: the file was changed"
    if len(samples) != shard.samples:
        return f"{len(samples)} samples, the manifest says {shard.samples}"
    index = folder / shard.index
    if not index.is_file():
        return f"its index {shard.index} is missing"
    try:
        if parse_index(index.read_text()) != samples:
            return f"its index {shard.index} does not match the tar's members"
    except ValueError as err:
        return f"its index {shard.index} is malformed: {err}"
    return None


def content_problems(manifest: Manifest, metas: list[SampleMeta]) -> list[str]:
    """What the manifest says that the stored samples contradict: counts per split and
    modality, and each train sample's label against ``pid_to_label``."""
    problems = []
    wrong = [m for m in metas
             if m.split == "train" and m.pid != UNKNOWN and manifest.pid_to_label.get(m.pid, UNKNOWN) != m.label]
    if wrong:
        m = wrong[0]
        problems.append(f"pid_to_label gives pid {m.pid} label {manifest.pid_to_label.get(m.pid)} but its samples "
                        f"were stored with label {m.label} ({len(wrong)} sample(s) disagree)")
    actual = split_counts(metas)
    for split in sorted(set(actual) | set(manifest.splits)):
        if actual.get(split) != manifest.splits.get(split):
            problems.append(f"the counts of split {split!r} differ from its samples "
                            f"(manifest: {_brief(manifest.splits.get(split))}, shards: {_brief(actual.get(split))})")
    return problems


def _brief(counts: SplitCounts | None) -> str:
    if counts is None:
        return "none"
    return f"{counts.total.images} images, {counts.total.identities} ids, cameras {counts.total.cameras}"


def verify(folder: str | Path) -> list[Problem]:
    """Every problem found in the shard folder (empty when all is well): each shard against the
    manifest, then the manifest against itself and against the samples it describes."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    problems = []
    metas: list[SampleMeta | None] = []
    for shard in manifest.shards:
        reason = verify_shard(folder, shard, metas)
        if reason:
            problems.append(Problem(shard.file, reason))
    listed = {shard.file for shard in manifest.shards}
    for path in sorted(folder.glob("*.tar")):
        if path.name not in listed:
            problems.append(Problem(path.name, "not listed in the manifest (left from another build?)"))
    checks = label_problems(manifest)
    if not problems:  # counts are only meaningful over intact shards
        checks += content_problems(manifest, [m for m in metas if m is not None])
    problems += [Problem(MANIFEST_NAME, reason) for reason in checks]
    return problems
