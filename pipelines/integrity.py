"""Content integrity of shards: no changed byte is ever trained on or evaluated silently.

Every reader (DALI, the webdataset fallback, the device cache, which is filled by one of them)
opens a split through :func:`pipelines.sources.base.open_split`, which calls
:func:`check_shards` on the split's tars before any of their bytes is read for training.

The guarantee: a tar is read only if its full content (every byte: images, labels, JSON and tar
headers) had the sha256 that the manifest records, and its DALI index described exactly the
tar's members, at a moment when the files had the stat they have now. That is what protects
DALI, which can crash the whole process (exit 139) on some damaged JPEG streams: damaged bytes
written after the build never reach its decoder. (JPEGs that were bad in the source data are
rejected by the builder, :mod:`shards.jpeg`.)

Cost at scale: a full check hashes each tar once (streaming sha256, threads in parallel) and
reads its index; its result is kept as a *verified stamp*: the tar's and index's size,
``mtime_ns``, ``ctime_ns`` and inode plus the sha256 that was confirmed. A later open trusts a
shard whose stamp still matches its files (two ``stat`` calls), and checks it fully again as
soon as anything changed. ``ctime`` cannot be set back by a user (``touch -d`` can only fake
``mtime``), so editing a shard in place always invalidates its stamp.

Stamps live beside the shards in ``.verified/`` (one small JSON per tar, written atomically), or,
where the shard folder is read-only, under ``$XDG_CACHE_HOME/reid-shards/verified/``. A stamp is
written only for files last changed more than :data:`RACY_SECONDS` before the check started:
file times have a coarse clock, and a change landing in the same tick as the check could
otherwise keep a stale stamp valid (git's "racy" index entries, solved the same way).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.cli import run_cli
from common.errors import UserError
from shards.format import parse_index
from shards.manifest import load_manifest

STAMP_DIR = ".verified"
STAMP_VERSION = 1
HASH_BLOCK = 1 << 22
#: Files changed less than this many seconds before a check get no stamp (module docstring).
RACY_SECONDS = 2.0
#: Threads that hash tars in parallel (hashlib releases the GIL on large blocks).
MAX_HASH_THREADS = 8
#: ustar header fields: the member name (NUL-padded) and its size (octal digits)
NAME_FIELD = 100
SIZE_FIELD = slice(124, 136)


class ShardFiles(Protocol):
    """A tar and its index as the manifest lists them (``pipelines.sources.base.ShardRef``)."""

    name: str
    path: Path
    index: Path
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Damage:
    """A shard that must not be read, and why."""

    name: str
    reason: str


def _file_stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reid-shards" / "verified"


def stamp_dirs(folder: Path) -> list[Path]:
    """Where the stamps of ``folder``'s shards may be: beside them, then the user's cache."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return [folder / STAMP_DIR, user_cache_dir() / key]


def _stamp_of(shard: ShardFiles) -> dict:
    return {"version": STAMP_VERSION, "sha256": shard.sha256, "tar": _file_stat(shard.path),
            "index": _file_stat(shard.index)}


def _has_valid_stamp(shard: ShardFiles, dirs: list[Path]) -> bool:
    try:
        current = _stamp_of(shard)
    except OSError:
        return False
    for folder in dirs:
        try:
            if json.loads((folder / f"{shard.name}.json").read_text()) == current:
                return True
        except (OSError, ValueError):
            continue
    return False


def _write_stamp(stamp: dict, name: str, dirs: list[Path]) -> None:
    """Write the stamp to the first writable place; a stamp that cannot be kept anywhere only
    means the next open checks the shard again."""
    for folder in dirs:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(stamp))
            os.replace(tmp, folder / f"{name}.json")
            return
        except OSError:
            continue


def sha256_of(path: Path) -> str:
    """Streaming sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def index_problem(tar: Path, index: Path) -> str | None:
    """What is wrong with ``index`` as a description of ``tar``'s members, or None: every entry
    must point at a tar member of that name and size (its 512-byte header just before it)."""
    try:
        samples = parse_index(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return f"its index {index.name} is malformed: {err}"
    size = tar.stat().st_size
    if size == 0:
        return "empty tar"
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for members in samples:
            for entry in members:
                start = entry.offset - tarfile.BLOCKSIZE
                if start < 0 or entry.offset + entry.size > size or not _header_names(data, start, entry):
                    return f"its index {index.name} does not match the tar's members (at {entry.name})"
    return None


def _header_names(data: mmap.mmap, start: int, entry) -> bool:
    """Whether the ustar header at ``start`` names ``entry`` with its size. Only the name and
    size fields are compared (not a full header parse: 10x faster, and the tar's bytes are the
    ones the manifest's sha256 vouches for, so only the index can be wrong)."""
    name = entry.name.encode("utf-8", "surrogateescape")
    if len(name) >= NAME_FIELD or data[start : start + len(name) + 1] != name + b"\0":
        return False
    field = data[start + SIZE_FIELD.start : start + SIZE_FIELD.stop].strip(b"\0 ")
    try:
        return int(field, 8) == entry.size
    except ValueError:
        return False
    return None


def full_check(shard: ShardFiles) -> str | None:
    """Hash the tar and check its index: the reason it must not be read, or None."""
    try:
        size = shard.path.stat().st_size
        if size != shard.bytes:
            return f"{size} bytes, the manifest says {shard.bytes}: truncated or changed after the build"
        if sha256_of(shard.path) != shard.sha256:
            return "its content differs from the manifest's sha256: bytes changed after the build"
        return index_problem(shard.path, shard.index)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"


def _check_one(shard: ShardFiles, dirs: list[Path], started: float) -> Damage | None:
    if _has_valid_stamp(shard, dirs):
        return None
    try:
        before = _stamp_of(shard)
    except OSError as err:
        return Damage(shard.name, f"unreadable: {err.strerror or err}")
    reason = full_check(shard)
    if reason is not None:
        return Damage(shard.name, reason)
    try:
        after = _stamp_of(shard)
    except OSError:
        return None
    changed_recently = max(before["tar"][1:3] + before["index"][1:3]) / 1e9 > started - RACY_SECONDS
    if after == before and not changed_recently:
        _write_stamp(after, shard.name, dirs)
    return None


def check_shards(folder: Path, shards: list[ShardFiles], *, threads: int | None = None) -> list[Damage]:
    """The shards of ``folder`` that must not be read, each with its reason (module docstring);
    shards with a valid stamp cost two ``stat`` calls, the others a full check."""
    dirs = stamp_dirs(folder)
    started = time.time()
    threads = max(1, min(len(shards), threads or MAX_HASH_THREADS, os.cpu_count() or 1))
    if threads == 1:
        results = [_check_one(s, dirs, started) for s in shards]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda s: _check_one(s, dirs, started), shards))
    return [d for d in results if d is not None]


@dataclass(frozen=True)
class _Listed:
    """A shard as the manifest lists it (the :class:`ShardFiles` fields)."""

    name: str
    path: Path
    index: Path
    bytes: int
    sha256: str


def measure(folder: Path, split: str) -> dict[str, float]:
    """The check's cost on ``split`` of ``folder``: seconds of a full check (what an open pays
    without a valid stamp), then of an open with the stamps that one wrote (one thread each)."""
    manifest = load_manifest(folder)
    listed = [_Listed(s.file, folder / s.file, folder / s.index, s.bytes, s.sha256) for s in manifest.shards_of(split)]
    if not listed:
        raise UserError(f"{folder} has no shards for split {split!r}")
    start = time.perf_counter()
    damage = [reason for s in listed if (reason := full_check(s))]
    full = time.perf_counter() - start
    if damage:
        raise UserError(f"{folder}: {damage[0]}")
    check_shards(folder, listed, threads=1)  # writes the stamps (files older than RACY_SECONDS)
    start = time.perf_counter()
    check_shards(folder, listed, threads=1)
    stamped = time.perf_counter() - start
    return {"shards": len(listed), "samples": sum(s.samples for s in manifest.shards_of(split)),
            "mib": sum(s.bytes for s in listed) / 2**20, "full_s": full, "stamped_s": stamped}


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.integrity SHARDS [--split train]``: print :func:`measure`."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.integrity", description=main.__doc__)
    parser.add_argument("shards", type=Path)
    parser.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    m = measure(args.shards, args.split)
    print(f"split {args.split}: {m['shards']} shards, {m['samples']} samples, {m['mib']:.1f} MiB; full check "
          f"{m['full_s']:.3f} s ({1e6 * m['full_s'] / m['samples']:.0f} us/sample, {m['mib'] / m['full_s']:.0f} MiB/s); "
          f"stamped open {1e3 * m['stamped_s']:.2f} ms")
    return 0


__all__ = ["Damage", "STAMP_DIR", "check_shards", "full_check", "index_problem", "measure", "sha256_of", "stamp_dirs"]

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
