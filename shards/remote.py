"""Shards from anywhere: a shard folder (``manifest.json``, the tars, their DALI indexes) at an
``http(s)://``, ``s3://`` or ``gs://`` location, or behind a ``pipe:`` command.

Reading
-------
Files are streamed with webdataset's ``gopen``: ``http(s)://`` through ``curl`` (as webdataset
streams tars), ``pipe:COMMAND`` through a shell command in which ``{}`` stands for the file name
(``pipe:aws s3 cp s3://bucket/shards/{} -``, ``pipe:cat /mnt/shards/{}``), and ``s3://`` /
``gs://`` through fsspec (the ``remote`` extra: s3fs, gcsfs).

Staging
-------
Training, fine-tuning and evaluation read shards by offset (DALI's readers, the webdataset
source's seeks, the device cache), so a remote folder is *staged*: every tar is streamed once to
local disk with its size and sha256 checked against the manifest on the fly, the indexes are
copied, and the copy is verified as ``shards verify`` verifies a local folder (every sample's
members and labels, the index against the tar). Only then is ``manifest.json`` written, so an
interrupted fetch never leaves a folder that looks complete; a re-run fetches what is missing.
After that every source (DALI included) reads the local files, with the rules of local shards.

:func:`fetch` stages into a folder you name (``shards fetch URL DIR``); :func:`local_shards`
stages into a cache folder (``$REID_SHARDS_CACHE``, default ``~/.cache/reid-pretrain/shards``,
one sub-folder per location) and re-uses it while the remote manifest is unchanged. Several
processes of one launch stage once: they take a lock on the folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from common.errors import UserError
from shards.format import MANIFEST_NAME
from shards.manifest import Manifest, ShardInfo, label_problems, load_manifest
from shards.verify import Problem, check_tar_stream, content_problems, verify

SCHEMES = ("http://", "https://", "s3://", "gs://", "pipe:")
CACHE_ENV = "REID_SHARDS_CACHE"
DONE_MARK = ".fetched"  # written last: its url and the manifest's sha256
CHUNK = 1 << 20


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a remote shard folder (one of :data:`SCHEMES`)."""
    return isinstance(location, str) and location.startswith(SCHEMES)


def file_url(location: str, name: str) -> str:
    """The location of file ``name`` of the remote folder ``location``."""
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise UserError(f"a pipe: shard location needs {{}} where the file name goes, e.g. "
                            f"'pipe:aws s3 cp s3://bucket/shards/{{}} -'; got {location!r}")
        return location.replace("{}", name)
    return location.rstrip("/") + "/" + name


@contextmanager
def open_remote(url: str) -> Iterator[BinaryIO]:
    """A binary stream of one remote file (module doc); a failure is a one-line :class:`UserError`."""
    if url.startswith(("s3://", "gs://")):
        try:
            import fsspec  # lazy import: optional (the remote extra), needed for s3:// and gs:// only

            with fsspec.open(url, "rb") as stream:
                yield stream
            return
        except UserError:
            raise
        except ImportError as err:
            raise UserError(f"reading {url} needs {err.name or 's3fs/gcsfs'}: pip install 'reid-pretrain[remote]' "
                            "(or give a pipe: location)") from None
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {url}: {err}") from None
    from webdataset.gopen import gopen  # lazy import: webdataset is heavy; curl and pipe: streams as it reads tars

    try:
        stream = gopen(url, "rb")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {url}: {err}") from None
    try:
        yield stream
        stream.close()  # a Pipe checks the command's exit status here
    except UserError:
        raise
    except Exception as err:  # curl / the command failed (webdataset raises a bare Exception)
        raise UserError(f"cannot read {url}: {err}") from None


def read_remote(url: str) -> bytes:
    with open_remote(url) as stream:
        data = stream.read()
    if not data and url.startswith(("http://", "https://")):
        raise UserError(f"cannot read {url}: empty response")
    return data


def remote_manifest(location: str) -> tuple[Manifest, bytes]:
    """The manifest of a remote folder, checked as a local one is, and its bytes."""
    data = read_remote(file_url(location, MANIFEST_NAME))
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f".reid-manifest-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        (scratch / MANIFEST_NAME).write_bytes(data)
        manifest = load_manifest(scratch)  # the same checks and messages as for a local folder
    except UserError as err:
        raise UserError(f"{file_url(location, MANIFEST_NAME)}: {err}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest, data


def _stream_tar(location: str, shard: ShardInfo, target: Path) -> None:
    """Copy one tar to ``target``, its size and sha256 checked against the manifest on the way."""
    url = file_url(location, shard.file)
    partial = target.with_name(f".{target.name}.part")
    digest, size = hashlib.sha256(), 0
    with open_remote(url) as stream, open(partial, "wb") as out:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != shard.bytes or digest.hexdigest() != shard.sha256:
        partial.unlink(missing_ok=True)
        what = f"{size} bytes, the manifest says {shard.bytes}" if size != shard.bytes else "sha256 differs from the manifest"
        raise UserError(f"{url}: {what}: changed on the server or damaged in transfer")
    os.replace(partial, target)


def _intact(folder: Path, shard: ShardInfo) -> bool:
    path = folder / shard.file
    return path.is_file() and path.stat().st_size == shard.bytes and (folder / shard.index).is_file()


def fetch(location: str, folder: str | Path, progress: bool = False) -> Manifest:
    """Copy the remote shard folder ``location`` into ``folder`` and verify it (module doc).
    ``folder`` must be empty, absent, or a partial or complete fetch of the same manifest."""
    folder = Path(folder)
    manifest, manifest_bytes = remote_manifest(location)
    mark = folder / DONE_MARK
    stamp = f"{location}\n{hashlib.sha256(manifest_bytes).hexdigest()}\n"
    if mark.is_file() and mark.read_text() == stamp and (folder / MANIFEST_NAME).read_bytes() == manifest_bytes:
        return manifest  # fetched and verified before, the remote manifest unchanged
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; give a folder to fetch the shards into")
    if (folder / MANIFEST_NAME).is_file() and (folder / MANIFEST_NAME).read_bytes() != manifest_bytes:
        raise UserError(f"{folder} holds other shards (its manifest.json differs from {location}'s); "
                        "give an empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {folder}: {err.strerror or err}") from None
    mark.unlink(missing_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)  # written back last: only a complete copy has one
    for number, shard in enumerate(manifest.shards, 1):
        if not _intact(folder, shard):
            _stream_tar(location, shard, folder / shard.file)
            (folder / shard.index).write_bytes(read_remote(file_url(location, shard.index)))
        if progress:
            print(f"\rfetched {number}/{len(manifest.shards)} shards", end="", flush=True)
    if progress:
        print()
    (folder / MANIFEST_NAME).write_bytes(manifest_bytes)
    problems = verify(folder)
    if problems:
        first = problems[0]
        raise UserError(f"the copy of {location} in {folder} is damaged: {first.file}: {first.reason} "
                        f"({len(problems)} problem(s)); delete it and fetch again")
    mark.write_text(stamp)
    return manifest


def verify_remote(location: str) -> list[Problem]:
    """``shards verify`` of a remote folder: every tar streamed once (nothing written to disk) and
    checked as a local one is (:func:`shards.verify.check_tar_stream`)."""
    manifest, _ = remote_manifest(location)
    problems = []
    metas: list = []
    for shard in manifest.shards:
        try:
            index = read_remote(file_url(location, shard.index)).decode("utf-8", errors="replace")
        except UserError:
            index = None
        try:
            with open_remote(file_url(location, shard.file)) as stream:
                reason = check_tar_stream(stream, shard, index, metas)
        except UserError as err:
            reason = f"unreadable: {err}"
        if reason:
            problems.append(Problem(shard.file, reason))
    checks = label_problems(manifest)
    if not problems:  # as for a local folder: counts are only meaningful over intact shards
        checks += content_problems(manifest, [m for m in metas if m is not None])
    return problems + [Problem(MANIFEST_NAME, reason) for reason in checks]


def cache_folder(location: str) -> Path:
    """Where :func:`local_shards` stages ``location``."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reid-pretrain" / "shards")
    return root / hashlib.sha256(location.encode()).hexdigest()[:16]


def local_shards(location: str | os.PathLike) -> str | os.PathLike:
    """``location`` itself when it is a local folder; a remote one staged (and verified) in the
    cache folder, whose path is returned. Processes staging the same location wait for each other."""
    if not is_remote(location):
        return location
    folder = cache_folder(str(location))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        fetch(str(location), folder)
    return str(folder)


__all__ = ["CACHE_ENV", "SCHEMES", "cache_folder", "fetch", "file_url", "is_remote", "local_shards", "open_remote",
           "verify_remote"]
