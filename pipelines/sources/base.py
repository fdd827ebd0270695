"""What every source shares: opening and checking a split's shards, ranks, the epoch plan, and
the position (``state_dict``) that lets a resumed run continue the same sample stream.

The epoch plan (DALI and the webdataset fallback follow it alike)
------------------------------------------------------------------
* Shard order: with ``shuffle=True`` the split's tar files are put in a new order each epoch,
  drawn from ``(seed, epoch)`` only, so every rank agrees on it.
* Rank split: the samples of that ordered concatenation are cut into ``world`` contiguous
  ranges, rank ``r`` reading ``[N*r//world, N*(r+1)//world)`` (DALI's own ``shard_id`` /
  ``num_shards`` rule). The ranges are disjoint and cover the split; because the shard order
  changes per epoch, each rank sees different images every epoch.
* Epoch length: with ``drop_last=True`` (training) every rank yields exactly
  ``batches_per_epoch = N // (world * batch_size)`` full batches and stops; the samples left
  over (fewer than ``world * batch_size`` + ``world``, never more than ``batch_size`` per rank)
  are dropped for this epoch only -- the shard order and the shuffle differ next epoch, so no
  image is dropped systematically. Equal counts mean no rank waits forever at a collective.
  With ``drop_last=False`` (evaluation, filling the cache) a rank yields
  ``ceil(n_rank / batch_size)`` batches, the last one partial: ranks may then differ by one.
* Within a rank samples go through a shuffle buffer seeded from ``(seed, epoch, rank)``.

Position: ``state_dict()`` is ``{"epoch", "batches", "seed", "world", "batch_size", ...}``,
where ``batches`` counts batches already *yielded* in ``epoch``. ``load_state_dict`` restores it
and the next ``iter()`` rebuilds that epoch's stream with the same seeds and skips the consumed
batches, so the rest of the stream is the one an uninterrupted run would have seen.

Warnings: what a run should know about its data (damaged shards left out, samples repeated, a
resumed stream that is not exact) is a :class:`SourceWarning` raised by :func:`warn_source`:
``pytest.warns`` and ``warnings`` filters see it as any ``UserWarning``, and it prints as one
``warning: ...`` line, not as a source-file location with a code line.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.batch import Batch
from common.errors import DataWarning, UserError
from pipelines.integrity import check_shards
from shards.format import IMAGE_EXT, INDEX_VERSION, LABEL_EXT, parse_index
from shards.manifest import Manifest, label_problems, load_manifest

VERIFY_HINT = "run `python -m shards verify {folder}` to see which shards are damaged, then rebuild them"
#: Path prefix of this package's files: warnings are attributed to the first caller outside it.
PACKAGE_PREFIX = os.path.dirname(os.path.abspath(__file__)) + os.sep


class SourceWarning(DataWarning):
    """Something a run should know about its data: damaged data left out or repeated, or a
    resumed stream that differs from the one an uninterrupted run would have seen."""


def warn_source(message: str) -> None:
    """Emit ``message`` as a :class:`SourceWarning` attributed to the first caller outside
    :mod:`pipelines.sources` (the user's line that asked for the data, whatever the depth of the
    source's own calls; Python 3.12's ``skip_file_prefixes`` does the same)."""
    warnings.warn(message, SourceWarning, stacklevel=_stacklevel_outside_package())


def _stacklevel_outside_package() -> int:
    """``stacklevel`` for :func:`warn_source`'s ``warnings.warn``: 1 is warn_source itself, 2
    its caller, and so on to the first frame whose file is not in this package."""
    level, frame = 2, sys._getframe(2)  # frame 1 is warn_source, like stacklevel 1
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_PREFIX):
        level, frame = level + 1, frame.f_back
    return level


@dataclass(frozen=True)
class ShardRef:
    """One tar of a split, as the manifest lists it, with absolute paths."""

    name: str
    path: Path
    index: Path
    samples: int
    bytes: int
    sha256: str


@dataclass
class SplitShards:
    """A checked split: its manifest, the usable shards (in manifest order) and those whose
    content does not match the manifest (only filled when the caller tolerates them)."""

    folder: Path
    split: str
    manifest: Manifest
    shards: list[ShardRef]
    damaged: list[ShardRef]
    #: why each damaged shard is left out, by shard name
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)


def _first_index_lines(path: Path, n: int = 2) -> list[str]:
    lines = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for _ in range(n):
            line = f.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    return lines


def open_split(folder: str | os.PathLike, split: str, *, tolerate_damaged: bool = False) -> SplitShards:
    """Load the manifest of ``folder`` and check that it matches the files of ``split``.

    Refused with :class:`UserError`: an unknown split; a listed tar or index missing; a tar of
    the split in the folder that the manifest does not list; an index whose sample count differs
    from the manifest; shards without the binary label member (built by something else). A tar
    whose content differs from the manifest (:func:`pipelines.integrity.check_shards`: size,
    sha256, index) is refused too, unless ``tolerate_damaged``: then it is returned in
    ``damaged`` (with its reason in ``reasons``) for the caller to skip.
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    listed = manifest.shards_of(split)
    if not listed:
        have = sorted({s.split for s in manifest.shards})
        hint = " (RegDB shards keep every image in split 'all': pass --split all)" if have == ["all"] else ""
        raise UserError(f"{folder} has no shards for split {split!r}; it has: {', '.join(have) or 'none'}{hint}")
    hint = VERIFY_HINT.format(folder=folder)
    inconsistent = label_problems(manifest)
    if inconsistent:
        raise UserError(f"the manifest of {folder} is inconsistent: {inconsistent[0]}; {hint}")
    missing = [s.file for s in listed if not (folder / s.file).is_file()]
    missing += [s.index for s in listed if not (folder / s.index).is_file()]
    if missing:
        raise UserError(
            f"the manifest of {folder} lists files that are not there: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; {hint}"
        )
    listed_names = {s.file for s in listed}
    unlisted = sorted(p.name for p in folder.glob(f"{split}-*.tar") if p.name not in listed_names)
    if unlisted:
        raise UserError(
            f"{folder} holds shards of split {split!r} that its manifest does not list: "
            f"{', '.join(unlisted[:5])}; they were added or the manifest was replaced -- {hint}"
        )
    refs = [ShardRef(s.file, folder / s.file, folder / s.index, s.samples, s.bytes, s.sha256) for s in listed]
    # The content check (pipelines.integrity): no byte that differs from the build is read.
    reasons = {d.name: d.reason for d in check_shards(folder, refs)}
    if reasons and not tolerate_damaged:
        name, reason = next(iter(reasons.items()))
        more = f" (and {len(reasons) - 1} more damaged shard(s))" if len(reasons) > 1 else ""
        raise UserError(f"shard {folder / name} is damaged: {reason}{more}; {hint}, or pass --skip_damaged "
                        "to leave damaged shards out")
    shards = [r for r in refs if r.name not in reasons]
    damaged = [r for r in refs if r.name in reasons]
    if not shards:
        raise UserError(f"no usable shard left for split {split!r} in {folder}; {hint}")
    for ref in shards:
        lines = _first_index_lines(ref.index)
        header = lines[0].split() if lines else []
        if len(header) != 2 or header[0] != INDEX_VERSION or header[1] != str(ref.samples):
            raise UserError(
                f"index {ref.index} does not match its shard (header {lines[:1]}, the manifest "
                f"says {ref.samples} samples); {hint}"
            )
    # Shards built by something else: look at the members of the first sample.
    first = shards[0]
    lines = _first_index_lines(first.index)
    try:
        members = parse_index(f"{INDEX_VERSION} 1\n{lines[1]}\n")[0]
    except (ValueError, IndexError):
        raise UserError(f"index {first.index} is malformed; {hint}") from None
    exts = [m.ext for m in members]
    for needed in (IMAGE_EXT, LABEL_EXT):
        if needed not in exts:
            raise UserError(
                f"shard {first.path}: sample {members[0].name.split('.')[0] if members else '?'} has "
                f"no .{needed} member (members: {', '.join(exts) or 'none'}). These shards were not "
                f"written by `python -m shards build`, which stores the labels DALI reads in KEY.{LABEL_EXT}: "
                "rebuild them with it"
            )
    return SplitShards(folder, split, manifest, shards, damaged, reasons)


def resolve_rank(rank: int | None, world: int | None) -> tuple[int, int]:
    """``(rank, world)``: as given, else from ``torch.distributed``, else from the ``RANK`` /
    ``WORLD_SIZE`` variables that ``accelerate launch`` and ``torchrun`` set, else ``(0, 1)``."""
    if rank is None or world is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world = w if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"rank {rank} is not valid for {world} processes")
    return rank, world


def seed_of(*parts: int) -> int:
    """A 31-bit seed derived from integers (seed, epoch, rank, ...), stable across machines."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order of a split's shards in ``epoch`` (the same on every rank)."""
    if not shuffle:
        return list(range(n))
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n).tolist()


def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part of ``total`` samples (DALI's ``shard_id`` rule)."""
    return total * rank // world, total * (rank + 1) // world


def batches_per_epoch(total: int, rank: int, world: int, batch_size: int, drop_last: bool) -> int:
    """The epoch-length rule of the module docstring."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if drop_last:
        n = total // (world * batch_size)
        if n == 0:
            raise UserError(
                f"the split has {total} samples, fewer than one batch per process "
                f"({world} process(es) x batch {batch_size}); lower the batch size"
            )
        return n
    lo, hi = rank_range(total, rank, world)
    return math.ceil((hi - lo) / batch_size)


class Source:
    """Base of every source: iteration over the current epoch from the saved position.

    ``iter(source)`` yields the rest of the current epoch (``len(source)`` batches in all per
    epoch) and, once the epoch is exhausted, moves to the next one; breaking out of the loop
    keeps the position, so the next ``iter()`` continues where it stopped. ``set_epoch(e)``
    jumps to the start of epoch ``e``.
    """

    backend = "base"

    def __init__(self, *, batch_size: int, seed: int, rank: int, world: int, drop_last: bool, device):
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world = rank, world
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.epoch = 0
        self.batches = 0
        #: samples skipped because their shard or image was damaged (webdataset fallback/cache)
        self.skipped = 0
        self.skipped_shards: list[str] = []

    def _leave_out_damaged(self, split: "SplitShards") -> None:
        """Count and announce the damaged shards that ``open_split`` left out of ``split``."""
        if not split.damaged:
            return
        self.skipped += sum(s.samples for s in split.damaged)
        self.skipped_shards += [s.name for s in split.damaged]
        warn_source(
            f"skipping {len(split.damaged)} damaged shard(s) of split {split.split!r} "
            f"({sum(s.samples for s in split.damaged)} samples): "
            + ", ".join(f"{s.path} ({split.reasons.get(s.name, 'damaged')})" for s in split.damaged)
            + f"; {VERIFY_HINT.format(folder=split.folder)}"
        )

    # subclasses: number of batches of an epoch, and the epoch's stream from a position
    def __len__(self) -> int:
        raise NotImplementedError

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches = int(epoch), 0

    def __iter__(self) -> Iterator[Batch]:
        n = len(self)
        if self.batches >= n:  # the last batch was taken but the loop did not come back for more
            self.epoch, self.batches = self.epoch + 1, 0
        epoch, skip = self.epoch, self.batches
        if skip < n:
            stream = self._epoch_batches(epoch, skip)
            try:
                for batch in stream:
                    self.batches += 1
                    yield batch
                    if self.batches >= n:
                        break
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        if self.batches >= n and self.epoch == epoch:
            self.epoch, self.batches = epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "backend": self.backend,
            "epoch": self.epoch,
            "batches": self.batches,
            "seed": self.seed,
            "world": self.world,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position. The same seed, world size and batch size continue the exact
        stream; another world or batch size continues the same epoch after about the same number
        of samples (with a warning), since the old stream cannot be reproduced."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        batches = int(state["batches"])
        if state["world"] != self.world or state["batch_size"] != self.batch_size:
            seen = batches * state["world"] * state["batch_size"]
            batches = seen // (self.world * self.batch_size)
            warn_source(
                f"resuming with {self.world} process(es) x batch {self.batch_size} instead of "
                f"{state['world']} x {state['batch_size']}: the epoch continues after {batches} "
                "batches, but not with exactly the samples the old run would have seen"
            )
        self.batches = batches

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch={self.batch_size}, rank={self.rank}/{self.world}, "
            f"epoch={self.epoch}, batches={self.batches}/{len(self)}, device={self.device})"
        )


def labels_to_batch(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Batch:
    """A Batch from images already on ``device`` and int32 labels ``(B, 4)`` anywhere; in the
    ``canvas`` fit mode the labels carry two more columns, the valid ``(h, w)``
    (:attr:`Batch.valid`)."""
    lab = labels.to(device=device, dtype=torch.int64, non_blocking=True)
    valid = lab[:, 4:6] if lab.shape[1] == 6 else None
    return Batch(images, lab[:, 0], lab[:, 1], lab[:, 2], lab[:, 3], valid)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
