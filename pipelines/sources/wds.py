"""webdataset fallback source: tar reading with ``webdataset``, PIL decode in DataLoader workers.

Used where DALI is missing or asked for (``source="wds"``); yields the same :class:`Batch`.

How an epoch is read
--------------------
The epoch plan is DALI's (:mod:`pipelines.sources.base`): shard order per epoch, rank ``r``
reads the contiguous sample range ``[N*r//world, N*(r+1)//world)`` of that order (node
splitting at sample level, so ranks get equal shares whatever the shard count). The rank's
range is cut again into ``max(1, num_workers)`` contiguous parts, one per DataLoader worker
(worker splitting); a part starts reading in the middle of a tar by seeking to the offset that
the DALI index gives, so no worker reads bytes it does not use (except a few at a part's end).

In a worker, raw samples (undecoded bytes) pass a shuffle buffer of ``shuffle_buffer`` samples
seeded from ``(seed, epoch, rank, worker)``, are grouped into chunks of ``batch_size`` and each
chunk is decoded with PIL (``convert("RGB")``; ``resize((W, H), BILINEAR)`` when the image is
not already ``H x W``) into a uint8 ``(n, 3, H, W)`` array. Every worker yields the same number
of chunks (empty ones at its end), so the DataLoader's round robin delivers a fixed,
reproducible order; the main process concatenates chunks and cuts exact batches, moving them to
the device. ``len(source)`` follows the epoch-length rule of :mod:`pipelines.sources.base`.

Host memory: a chunk that is exactly the next batch (the usual case: workers cut their chunks at
the batch size) is passed on as it came, without a copy; batches that span chunks are joined into
a reused buffer (:class:`pipelines.sources.buffers.HostBuffers`) on the CPU, or into page-locked
memory when the batch goes to a GPU, so that ``.to(cuda, non_blocking=True)`` really is
asynchronous (the DataLoader pins the chunks themselves; a join into ordinary memory would make
the copy synchronous again).

Resuming: chunks that lie wholly inside the consumed batches are not decoded (only read through
the shuffle buffer), so skipping a resumed epoch's first batches costs little. The resumed stream
is exact as long as no sample was lost to damage in the skipped part.

Damage: a tar whose size differs from the manifest is left out of every epoch on every rank
(a warning names it; ``skipped`` counts its samples once); a tar that fails while being read,
a sample without its label member or an image PIL cannot decode is skipped with a warning naming
the shard, and counted in ``skipped`` each time. A rank that lost samples this way would run
short; it repeats samples of its last batch to keep the epoch length all ranks agreed on
(a warning says so), so collectives never hang.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.batch import Batch
from pipelines.sources.buffers import HostBuffers, pinned_empty
from pipelines.sources.base import (
    VERIFY_HINT,
    ShardRef,
    Source,
    SplitShards,
    batches_per_epoch,
    labels_to_batch,
    rank_range,
    seed_of,
    shard_order,
    warn_source,
)
from pipelines.sources.canvas import place_on_canvas
from shards.format import IMAGE_EXT, LABEL_BYTES, LABEL_EXT, TAR_BLOCK, parse_index, split_member_name

Segment = tuple[ShardRef, int, int]  # shard, first sample, end sample (in the shard)


def segments_of(shards: list[ShardRef], lo: int, hi: int) -> list[Segment]:
    """The pieces of shards covering positions ``[lo, hi)`` of their concatenation."""
    out, start = [], 0
    for ref in shards:
        end = start + ref.samples
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.append((ref, a - start, b - start))
        start = end
    return out


@lru_cache(maxsize=256)
def _sample_offsets(index_path: str) -> tuple[int, ...]:
    """Offset of the tar header of each sample's first member, from the DALI index."""
    with open(index_path, encoding="utf-8") as f:
        return tuple(min(m.offset for m in members) - TAR_BLOCK for members in parse_index(f.read()))


def _read_segment(ref: ShardRef, start: int, stop: int, events: list) -> Iterator[dict]:
    """Raw samples ``start..stop-1`` of a shard (dicts of member bytes), via webdataset's tar
    iterator; a read failure ends the segment with an event naming the shard."""
    from webdataset.tariterators import tar_file_iterator

    want, count, current = stop - start, 0, None
    try:
        with open(ref.path, "rb") as f:
            f.seek(_sample_offsets(str(ref.index))[start])
            for member in tar_file_iterator(f):
                key, ext = split_member_name(member["fname"])
                if current is not None and key != current["__key__"]:
                    yield current
                    count += 1
                    current = None
                    if count == want:
                        return
                if current is None:
                    current = {"__key__": key, "__shard__": ref.name}
                current[ext] = member["data"]
        if current is not None and count < want:
            yield current
            count += 1
    except Exception as err:  # a damaged tar: tarfile.ReadError, EOFError, OSError, ...
        events.append(("shard", ref.name, want - count, f"{type(err).__name__}: {err}"))
        return
    if count < want:
        events.append(("shard", ref.name, want - count, "the tar ends early"))


def _shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(len(buffer)))
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer


def decode_image(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """JPEG bytes -> uint8 ``(H, W, 3)`` RGB at ``size``, PIL bilinear when resizing."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        h, w = size
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        return np.asarray(im)


def decode_to_canvas(data: bytes, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """The ``canvas`` fit step (:mod:`pipelines.sources.canvas`): image bytes -> uint8 ``(H, W, 3)``
    canvas holding the image at its source resolution (shrunk only to fit), and its valid ``(h, w)``."""
    with Image.open(io.BytesIO(data)) as im:
        decoded = np.array(im.convert("RGB"))  # writable: torch.from_numpy warns on a read-only array
    canvas = torch.empty((3, *size), dtype=torch.uint8)
    valid = place_on_canvas(canvas, decoded)
    return canvas.permute(1, 2, 0).numpy(), valid


def _decode_chunk(raw: list[dict], size: tuple[int, int], events: list, fit: str = "resize") -> tuple[np.ndarray, np.ndarray]:
    h, w = size
    images = np.empty((len(raw), h, w, 3), dtype=np.uint8)
    # canvas mode: two more label columns, the valid (h, w) (pipelines.sources.base.labels_to_batch)
    labels = np.empty((len(raw), 6 if fit == "canvas" else 4), dtype=np.int32)
    n = 0
    for sample in raw:
        try:
            if LABEL_EXT not in sample or len(sample[LABEL_EXT]) != LABEL_BYTES:
                raise ValueError(f"no valid .{LABEL_EXT} member")
            labels[n, :4] = np.frombuffer(sample[LABEL_EXT], dtype="<i4")
            if fit == "canvas":
                images[n], labels[n, 4:] = decode_to_canvas(sample[IMAGE_EXT], size)
            else:
                images[n] = decode_image(sample[IMAGE_EXT], size)
        except Exception as err:
            events.append(("sample", sample["__shard__"], 1, f"{sample['__key__']}: {type(err).__name__}: {err}"))
            continue
        n += 1
    return np.ascontiguousarray(images[:n].transpose(0, 3, 1, 2)), labels[:n]


class _EpochStream(IterableDataset):
    """One rank's epoch, cut into ``parts`` worker parts; yields dict chunks (see module doc)."""

    def __init__(self, parts: list[list[Segment]], counts: list[int], *, batch: int, size, shuffle: bool,
                 buffer: int, seeds: list[int], skip_samples: int, fit: str = "resize"):
        self.parts, self.counts = parts, counts
        self.fit = fit
        self.batch, self.size = batch, size
        self.shuffle, self.buffer, self.seeds = shuffle, buffer, seeds
        self.skip_samples = skip_samples
        self.chunks = max(-(-c // batch) for c in counts) if counts else 0

    def chunk_start(self, part: int, k: int) -> int:
        """Position (in delivered raw samples) where chunk ``k`` of ``part`` starts."""
        nparts, b = len(self.parts), self.batch
        pos = 0
        for j in range(k * nparts + part):  # chunks delivered before it, round robin
            p, kk = j % nparts, j // nparts
            pos += max(0, min(b, self.counts[p] - kk * b))
        return pos

    def _part(self, p: int) -> Iterator[dict]:
        events: list = []
        samples = (s for seg in self.parts[p] for s in _read_segment(*seg, events))
        if self.shuffle:
            samples = _shuffled(samples, self.buffer, np.random.default_rng(self.seeds[p]))
        chunk: list[dict] = []
        k = 0
        start = self.chunk_start(p, 0)
        h, w = self.size

        def emit(raw: list[dict]):
            nonlocal k, start
            n = len(raw)
            # a chunk wholly inside the consumed batches of a resumed epoch is not decoded
            if n and start + n <= self.skip_samples:
                out = {"raw": n, "decoded": False, "events": list(events)}
            else:
                imgs, labs = _decode_chunk(raw, self.size, events, self.fit)
                out = {"raw": n, "decoded": True, "images": imgs, "labels": labs, "events": list(events)}
            events.clear()
            k += 1
            start = self.chunk_start(p, k)
            return out

        for sample in samples:
            chunk.append(sample)
            if len(chunk) == self.batch:
                yield emit(chunk)
                chunk = []
        if chunk:
            yield emit(chunk)
        while k < self.chunks:  # equal chunk counts per part keep the round robin fixed
            yield emit([])
        if events:  # damage found after the last chunk: report it in the main process
            warn_source("; ".join(f"{e[1]}: {e[3]}" for e in events))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            yield from self._part(info.id)
            return
        # In the main process: the same round robin the DataLoader workers would give.
        streams = [self._part(p) for p in range(len(self.parts))]
        for _ in range(self.chunks):
            for s in streams:
                yield next(s)


class WdsSource(Source):
    """Batches of a split read with webdataset and decoded with PIL in DataLoader workers.

    Same parameters as :class:`pipelines.sources.dali.DaliSource`, plus ``num_workers``
    (DataLoader processes; 0 decodes in the calling process). ``skipped`` / ``skipped_shards``
    report damage (module docstring).
    """

    backend = "wds"

    def __init__(
        self,
        split: SplitShards,
        *,
        batch_size: int,
        size: tuple[int, int],
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = True,
        shuffle_buffer: int = 1024,
        prefetch: int = 2,
        num_workers: int = 2,
        fit: str = "resize",
    ):
        super().__init__(batch_size=batch_size, seed=seed, rank=rank, world=world, drop_last=drop_last, device=device)
        self.split = split
        self.size = (int(size[0]), int(size[1]))
        self.fit = fit  # pipelines.sources.canvas: resize to size, or keep the source resolution on a size canvas
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.prefetch = max(1, int(prefetch))
        self.num_workers = max(0, int(num_workers))
        self.total = split.total
        lo, hi = rank_range(self.total, rank, world)
        self.rank_samples = hi - lo
        self._len = batches_per_epoch(self.total, rank, world, self.batch_size, drop_last)
        self._warned_pad = False
        self._host = HostBuffers((self.batch_size, 3, *self.size))
        self._leave_out_damaged(split)

    def __len__(self) -> int:
        return self._len

    def _stream(self, epoch: int, skip: int) -> _EpochStream:
        order = shard_order(len(self.split.shards), self.seed, epoch, self.shuffle)
        shards = [self.split.shards[i] for i in order]
        lo, hi = rank_range(self.total, self.rank, self.world)
        nparts = max(1, self.num_workers)
        bounds = [lo + (hi - lo) * p // nparts for p in range(nparts + 1)]
        parts = [segments_of(shards, bounds[p], bounds[p + 1]) for p in range(nparts)]
        counts = [bounds[p + 1] - bounds[p] for p in range(nparts)]
        seeds = [seed_of(self.seed, epoch, self.rank, p, 3) for p in range(nparts)]
        return _EpochStream(parts, counts, batch=self.batch_size, size=self.size, shuffle=self.shuffle,
                            buffer=self.shuffle_buffer, seeds=seeds, skip_samples=skip * self.batch_size,
                            fit=self.fit)

    def _note(self, events: list) -> None:
        for kind, shard, n, reason in events:
            self.skipped += n
            if shard not in self.skipped_shards:
                self.skipped_shards.append(shard)
            what = "a sample" if kind == "sample" else f"{n} sample(s)"
            warn_source(
                f"skipped {what} of shard {self.split.folder / shard} ({reason}); "
                f"{VERIFY_HINT.format(folder=self.split.folder)}"
            )

    def _join(self, chunks: list[torch.Tensor], n: int) -> torch.Tensor:
        """The first ``n`` images of ``chunks`` (uint8 ``(k, 3, H, W)`` each) in one batch tensor:
        page-locked when it goes to a GPU, else a reused host buffer (module docstring)."""
        shape = (n, 3, *self.size)
        out = pinned_empty(shape) if self.device.type == "cuda" else self._host.take()[:n]
        filled = 0
        for chunk in chunks:
            k = min(len(chunk), n - filled)
            out[filled:filled + k].copy_(chunk[:k])
            filled += k
            if filled == n:
                break
        return out

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        stream = self._stream(epoch, skip)
        workers = self.num_workers
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if workers else None,
            persistent_workers=False,
        )
        b = self.batch_size
        to_drop = skip * b
        done = skip
        pending_i: list[torch.Tensor] = []
        pending_l: list[torch.Tensor] = []
        have = 0
        last: tuple[torch.Tensor, torch.Tensor] | None = None

        def cut(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            """The next ``n`` pending samples; the rest stay pending (module docstring: copies)."""
            nonlocal have, pending_i, pending_l
            have -= n
            if len(pending_i[0]) == n:  # exactly one chunk: no copy
                imgs, labs = pending_i.pop(0), pending_l.pop(0)
                return imgs, labs
            imgs, labs = self._join(pending_i, n), torch.cat(pending_l)[:n]
            rest_i, rest_l, taken = [], [], 0
            for chunk_i, chunk_l in zip(pending_i, pending_l):
                skip = min(len(chunk_i), max(0, n - taken))
                taken += len(chunk_i)
                if skip < len(chunk_i):
                    rest_i.append(chunk_i[skip:])
                    rest_l.append(chunk_l[skip:])
            pending_i, pending_l = rest_i, rest_l
            return imgs, labs

        def to_batch(imgs: torch.Tensor, labs: torch.Tensor) -> Batch:
            imgs = imgs.to(self.device, non_blocking=True)
            return labels_to_batch(imgs, labs, self.device)

        for chunk in loader:
            self._note(chunk["events"])
            if not chunk["decoded"]:
                to_drop -= chunk["raw"]
                continue
            imgs, labs = chunk["images"], chunk["labels"]
            if to_drop > 0:
                d = min(to_drop, chunk["raw"])
                to_drop -= d
                imgs, labs = imgs[d:], labs[d:]
            if len(imgs) == 0:
                continue
            pending_i.append(imgs)
            pending_l.append(labs)
            have += len(imgs)
            while have >= b and done < self._len:
                last = cut(b)
                done += 1
                yield to_batch(*last)
            if done >= self._len:
                return
        if have and done < self._len and not self.drop_last:
            done += 1
            yield to_batch(*cut(have))
        if done < self._len and self.drop_last:
            # Samples were lost to damage: keep the agreed epoch length (module docstring).
            if not self._warned_pad:
                warn_source(
                    f"rank {self.rank} lost samples to damaged data and repeats samples to fill "
                    f"its epoch of {self._len} batches"
                )
                self._warned_pad = True
            while done < self._len:
                if have:
                    imgs, labs = cut(have)
                else:
                    imgs, labs = last if last is not None else (None, None)
                if imgs is None:
                    raise RuntimeError("no sample could be read for this rank")
                reps = -(-b // len(imgs))
                done += 1
                last = (imgs.repeat(reps, 1, 1, 1)[:b], labs.repeat(reps, 1)[:b])
                yield to_batch(*last)


__all__ = ["WdsSource", "decode_image", "decode_to_canvas", "segments_of"]
