"""Building shards: layout scan -> checked records -> planned shards -> written tars -> manifest.

The build is a pure function of its inputs (the layout's records, the image files and the
settings): sample indices follow the order of source paths, the train split is shuffled with
``seed`` and every other split keeps index order, so the same inputs give byte-identical shards.

It runs in two passes. The first checks every image (a cheap decode; :mod:`shards.images`) so
that rejected inputs are known before any index is assigned, and indices stay contiguous. The
second writes whole shards in parallel. Progress is kept in ``OUT/.build/``: the inputs'
fingerprint, the check results and one record per finished shard, so a killed build re-run
with the same inputs resumes where it stopped and ends with the same shards. The manifest is
written last; ``.build/`` is removed once it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from common.errors import UserError
from shards.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    UNKNOWN,
    SampleMeta,
    encode_label,
    index_path,
    sample_key,
    shard_stem,
    tar_path,
)
from shards.images import ImageCheck, check_image, encode_image
from shards.layouts import LayoutScan, Record, scan
from shards.manifest import Manifest, Rejected, ShardInfo, load_manifest, split_counts
from shards.writer import EncodedSample, WrittenShard, write_shard

STATE_DIR = ".build"
DEFAULT_SHARD_SIZE = 1000
#: Records per task in the check and encode passes: large enough to amortize inter-process
#: overhead, small enough to balance the load between workers.
CHECK_CHUNK = 256
ENCODE_CHUNK = 64


@dataclass(frozen=True)
class PlannedSample:
    record: Record
    index: int
    label: int
    convert: bool


@dataclass(frozen=True)
class PlannedShard:
    stem: str
    split: str
    samples: tuple[PlannedSample, ...]


def build(
    layout: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Manifest:
    """Build the shards of the dataset at ``root`` (read as ``layout``) into ``out``.

    Returns the manifest, also saved as ``out/manifest.json``. Raises :class:`UserError` for a
    bad layout or root, an ``out`` holding something else, and, with ``strict``, any rejected
    input. ``workers`` defaults to all cores.
    """
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must not be negative, got {workers} (0: all cores)")
    workers = workers or os.cpu_count() or 1
    root, out = Path(root).expanduser().resolve(), Path(out).expanduser().resolve()
    say = _messenger(progress)

    layout_scan = scan(layout, root)
    records = _unique_sorted(layout_scan)
    if not records:
        why = ""
        if layout_scan.rejected:
            first = layout_scan.rejected[0]
            why = (f": all {len(layout_scan.rejected)} listed or found input(s) were rejected, "
                   f"the first, {first.source}, as {first.reason}")
        raise UserError(f"found no usable images in {root} for the {layout} layout{why}")
    fingerprint = _fingerprint(layout, seed, shard_size, layout_scan.base, records)

    try:
        return _build_into(layout, layout_scan, records, root, out, fingerprint, seed=seed, shard_size=shard_size,
                           workers=workers, strict=strict, overwrite=overwrite, progress=progress, say=say)
    except OSError as err:  # disk full, permissions: the user's environment, not a bug
        where = f" ({err.filename})" if err.filename else ""
        raise UserError(f"could not write to {out}: {err.strerror or err}{where}; fix it and re-run the same "
                        "command: the build resumes") from None


def _build_into(layout: str, layout_scan: LayoutScan, records: list[Record], root: Path, out: Path, fingerprint: str,
                *, seed: int, shard_size: int, workers: int, strict: bool, overwrite: bool, progress: bool,
                say: Callable[[str], None]) -> Manifest:
    existing = _prepare_out(out, fingerprint, overwrite)
    if existing is not None:
        say(f"{out} is up to date with these inputs and settings: nothing to do")
        return existing
    state = out / STATE_DIR
    (state / "done").mkdir(parents=True, exist_ok=True)
    _write_json(state / "state.json", {"fingerprint": fingerprint})

    checks = _checked(records, layout_scan.base, state, workers, progress)
    rejected = list(layout_scan.rejected) + [
        Rejected(r.source, c.reason) for r, c in zip(records, checks) if c.reason is not None
    ]
    if strict and rejected:
        listing = "; ".join(f"{r.source}: {r.reason}" for r in rejected[:5])
        more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
        raise UserError(f"--strict: {len(rejected)} input(s) rejected: {listing}{more}")

    accepted = [(r, c.convert) for r, c in zip(records, checks) if c.reason is None]
    if not accepted:
        raise UserError(f"every image in {root} was rejected; first reason: {rejected[0].reason}")
    pid_to_label = _train_labels(r for r, _ in accepted)
    plan = plan_shards(accepted, pid_to_label, seed, shard_size)
    written = _write_pending(plan, layout, layout_scan.base, out, workers, progress, say)

    manifest = Manifest(
        layout=layout,
        root=str(root),
        fingerprint=fingerprint,
        seed=seed,
        shard_size=shard_size,
        splits=split_counts(r for r, _ in accepted),
        shards=[_shard_info(out, shard, written[shard.stem]) for shard in plan],
        pid_to_label=pid_to_label,
        rejected=sorted(rejected, key=lambda r: r.source),
        dropped=dict(sorted(layout_scan.dropped.items())),
        converted=sum(convert for _, convert in accepted),
        trials=layout_scan.trials,
    )
    _remove_stale_shards(out, {shard.stem for shard in plan})
    manifest.save(out)
    shutil.rmtree(state)
    return manifest


def _messenger(progress: bool) -> Callable[[str], None]:
    return (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)


def _unique_sorted(layout_scan: LayoutScan) -> list[Record]:
    """Records in (split, source) order, each source once (a duplicate listing is counted)."""
    unique: dict[str, Record] = {}
    for record in layout_scan.records:
        if record.source in unique:
            layout_scan.dropped["listed twice"] += 1
        else:
            unique[record.source] = record
    return sorted(unique.values(), key=lambda r: (SPLITS.index(r.split), r.source))


def _fingerprint(layout: str, seed: int, shard_size: int, base: Path, records: Sequence[Record]) -> str:
    """A hash of everything the shards depend on: settings, labels and each file's size and
    modification time (a changed file changes the fingerprint, so it is not resumed over)."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, layout, seed, shard_size]).encode())
    for record in records:
        try:
            stat = (base / record.source).stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime = -1
        digest.update(json.dumps([*asdict(record).values(), size, mtime]).encode())
    return digest.hexdigest()


def _prepare_out(out: Path, fingerprint: str, overwrite: bool) -> Manifest | None:
    """Make ``out`` ready for this build. Returns the manifest when it is already built.

    ``out`` may be absent, empty, an interrupted build of the same inputs (resumed), or a
    finished one. Anything else is refused unless ``overwrite``, so a typo in ``--out``
    never deletes a user's files.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return None
    state_file = out / STATE_DIR / "state.json"
    if (out / MANIFEST_NAME).is_file():
        previous = load_manifest(out)
        if previous.fingerprint == fingerprint:
            if _intact(out, previous):
                shutil.rmtree(out / STATE_DIR, ignore_errors=True)
                return previous
            _clear_shard_folder(out)  # same build, damaged files: build it again
            return None
        what = "shards of other inputs or settings"
    elif state_file.is_file():
        if json.loads(state_file.read_text()).get("fingerprint") == fingerprint:
            return None
        what = "an interrupted build of other inputs or settings"
    else:
        if not overwrite:
            raise UserError(f"--out {out} is not empty and is not a shard folder; choose an empty or new folder")
        what = ""
    if not overwrite:
        raise UserError(f"--out {out} holds {what}; pass --overwrite to replace them, or choose another folder")
    _clear_shard_folder(out)
    return None


def _intact(out: Path, manifest: Manifest) -> bool:
    """Every listed tar and index present, tars at their listed size (a cheap check; `verify`
    is the thorough one)."""
    return all(
        (out / s.index).is_file() and (out / s.file).is_file() and (out / s.file).stat().st_size == s.bytes
        for s in manifest.shards
    )


def _clear_shard_folder(out: Path) -> None:
    """Remove what a build writes (tars, indexes, manifest, state), and nothing else."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    _remove_stale_shards(out, keep=set())


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    for path in [*out.glob("*.tar"), *out.glob("*.idx"), *out.glob(".*.tmp")]:
        if path.stem not in keep:
            path.unlink()


def _check_chunk(task: tuple[Path, list[str]]) -> list[ImageCheck]:
    base, sources = task
    return [check_image(base / source) for source in sources]


def _checked(records: list[Record], base: Path, state: Path, workers: int, progress: bool) -> list[ImageCheck]:
    """Pass 1: the verdict on every record, in order; cached in the state folder for resuming."""
    cache = state / "checks.json"
    if cache.is_file():
        return [ImageCheck(reason, convert) for reason, convert in json.loads(cache.read_text())]
    sources = [r.source for r in records]
    tasks = [(base, sources[i : i + CHECK_CHUNK]) for i in range(0, len(sources), CHECK_CHUNK)]
    checks: list[ImageCheck] = []
    with tqdm(total=len(records), unit="img", desc="check", disable=not progress, smoothing=0.1) as bar:
        for result in _map(_check_chunk, tasks, workers):
            checks.extend(result)
            bar.update(len(result))
    _write_json(cache, [[c.reason, c.convert] for c in checks])
    return checks


def _train_labels(records: Iterable[Record]) -> dict[int, int]:
    """Contiguous labels 0..P-1 for the known train pids, in pid order."""
    pids = sorted({r.pid for r in records if r.split == "train" and r.pid != UNKNOWN})
    return {pid: label for label, pid in enumerate(pids)}


def plan_shards(
    accepted: Sequence[tuple[Record, bool]], pid_to_label: dict[int, int], seed: int, shard_size: int
) -> list[PlannedShard]:
    """Assign indices (source order within each split) and cut each split into shards.

    ``accepted`` holds (record, convert) pairs in (split, source) order. The train split is
    shuffled with ``seed`` so that every shard holds a random mix of identities and cameras.
    """
    by_split: dict[str, list[PlannedSample]] = defaultdict(list)
    for record, convert in accepted:
        samples = by_split[record.split]
        label = pid_to_label.get(record.pid, UNKNOWN) if record.split == "train" else UNKNOWN
        samples.append(PlannedSample(record, len(samples), label, convert))
    plan = []
    for split in SPLITS:
        samples = by_split.get(split, [])
        if split == "train":
            random.Random(seed).shuffle(samples)
        for number, start in enumerate(range(0, len(samples), shard_size)):
            plan.append(PlannedShard(shard_stem(split, number), split, tuple(samples[start : start + shard_size])))
    return plan


def _encoded(sample: PlannedSample, layout: str, base: Path) -> EncodedSample:
    record = sample.record
    meta = SampleMeta(
        pid=record.pid,
        camera=record.camera,
        modality=record.modality,
        dataset=layout,
        split=record.split,
        source=record.source,
        index=sample.index,
        label=sample.label,
    )
    try:
        image = encode_image(base / record.source, sample.convert)
    except OSError as err:
        raise UserError(f"{record.source} changed or vanished during the build ({err}); re-run the build") from None
    return EncodedSample(
        key=sample_key(record.split, sample.index),
        image=image,
        meta=meta.to_bytes(),
        label=encode_label(record.pid, record.camera, record.modality, sample.index),
    )


def _encode_chunk(task: tuple[tuple[PlannedSample, ...], str, Path]) -> list[EncodedSample]:
    samples, layout, base = task
    return [_encoded(sample, layout, base) for sample in samples]


def _write_pending(
    plan: list[PlannedShard], layout: str, base: Path, out: Path, workers: int, progress: bool, say: Callable[[str], None]
) -> dict[str, WrittenShard]:
    """Pass 2: write every shard not finished by an earlier, interrupted run of the same build.

    Workers read and encode chunks of samples (the costly part); this process writes the tars
    one after the other from the chunks, in plan order. Parallelism so does not depend on the
    number of shards, and a shard is finished (and recorded) before the next one starts.
    """
    done_dir = out / STATE_DIR / "done"
    written: dict[str, WrittenShard] = {}
    pending = []
    for shard in plan:
        record = done_dir / f"{shard.stem}.json"
        if record.is_file() and tar_path(out, shard.stem).is_file() and index_path(out, shard.stem).is_file():
            done = WrittenShard(**json.loads(record.read_text()))
            if tar_path(out, shard.stem).stat().st_size == done.bytes:
                written[shard.stem] = done
                continue
        pending.append(shard)
    if written:
        say(f"resuming: {len(written)} of {len(plan)} shards were written by an earlier run")
    chunks = [[shard.samples[i : i + ENCODE_CHUNK] for i in range(0, len(shard.samples), ENCODE_CHUNK)] for shard in pending]
    encoded = _map(_encode_chunk, [(chunk, layout, base) for shard_chunks in chunks for chunk in shard_chunks],
                   workers)
    with tqdm(total=sum(len(s.samples) for s in pending), unit="img", desc="write", disable=not progress,
              smoothing=0.1) as bar:

        def shard_samples(count: int) -> Iterator[EncodedSample]:
            for _ in range(count):
                samples = next(encoded)
                yield from samples
                bar.update(len(samples))

        for shard, shard_chunks in zip(pending, chunks):
            written[shard.stem] = write_shard(out, shard.stem, shard_samples(len(shard_chunks)))
            _write_json(done_dir / f"{shard.stem}.json", asdict(written[shard.stem]))
    return written


def _map(function, tasks: list, workers: int) -> Iterator:
    """``function`` over ``tasks``, results in task order, in worker processes when that can help."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    with get_context("fork").Pool(min(workers, len(tasks)), initializer=_ignore_interrupts) as pool:
        yield from pool.imap(function, tasks)


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the parent, which stops the pool and reports once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shard_info(out: Path, shard: PlannedShard, written: WrittenShard) -> ShardInfo:
    return ShardInfo(
        file=tar_path(out, shard.stem).name,
        index=index_path(out, shard.stem).name,
        split=shard.split,
        samples=written.samples,
        bytes=written.bytes,
        sha256=written.sha256,
    )


def _write_json(path: Path, data) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


__all__ = ["DEFAULT_SHARD_SIZE", "PlannedShard", "build", "plan_shards"]
