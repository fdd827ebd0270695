"""Device-resident cache: a split decoded once into ONE uint8 tensor ``(N, 3, H, W)`` on the
device plus its label tensors; every epoch after that is indexing (``images[idx]``) with index
batches from a :mod:`pipelines.samplers` sampler.

Filling: one pass of a streaming source over the whole split in stored order (``shuffle=False``,
one process, ``drop_last=False``): DALI when it is installed (nvJPEG on a GPU, its CPU decoder
otherwise), else the webdataset/PIL path with DataLoader workers. Each decoded batch is copied
into its rows of the preallocated tensor. Row ``i`` is the ``i``-th sample of the stored order;
``index`` keeps each row's sample index. Every process holds the whole split (the cache is
small by construction), and samplers split the *batches* between ranks.

Budget: a split is cached when ``N * 3 * H * W`` bytes fit ``budget_bytes``; the default is a
quarter of the free device memory on a GPU, and on the CPU a quarter of the available memory,
at most 4 GiB. Forcing the cache on a split that does not fit is a :class:`UserError`.

Batches: a sampler that yields one index vector gives ``Batch(images[idx], ...)``; the
:class:`pipelines.samplers.PairSampler` yields ``(rgb_idx, ir_idx)`` and the batch holds
``2B`` images, the B RGB images first and then the B IR images: slot ``i`` pairs rows ``i`` and
``B + i`` of the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from pipelines.batch import Batch
from pipelines.samplers import Sampler
from pipelines.sources.base import Source, SplitShards

CPU_BUDGET_CAP = 4 << 30


def default_budget(device: torch.device) -> int:
    """Bytes the cache may take by default on ``device`` (module docstring)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        available = 4 * CPU_BUDGET_CAP
    return min(CPU_BUDGET_CAP, available // 4)


def cache_bytes(samples: int, size: tuple[int, int]) -> int:
    """What a cached split of ``samples`` images at ``size`` takes (images + 4 int64 labels)."""
    return samples * (3 * size[0] * size[1] + 32)


class CachedSplit:
    """The decoded split on the device: ``images`` ``(N, 3, H, W)`` uint8 and int64 ``pid``,
    ``camera``, ``modality``, ``index`` ``(N,)``; ``valid`` int64 ``(N, 2)`` when the filling
    source ran in the ``canvas`` fit mode (:mod:`pipelines.sources.canvas`), else None."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.pid, self.camera, self.modality, self.index = (labels[:, i].contiguous() for i in range(4))
        self.valid = labels[:, 4:6].contiguous() if labels.shape[1] == 6 else None

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def fill(cls, stream: Source, total: int, size: tuple[int, int], device: torch.device) -> "CachedSplit":
        """Copy every batch of one epoch of ``stream`` into preallocated tensors on ``device``."""
        images = torch.empty((total, 3, *size), dtype=torch.uint8, device=device)
        labels = torch.empty((total, 6 if getattr(stream, "fit", "resize") == "canvas" else 4), dtype=torch.int64,
                             device=device)
        row = 0
        for batch in stream:
            n = len(batch)
            images[row : row + n] = batch.images
            labels[row : row + n, :4] = torch.stack([batch.pid, batch.camera, batch.modality, batch.index], 1)
            if batch.valid is not None:  # the canvas fit mode: keep each image's valid size
                labels[row : row + n, 4:] = batch.valid
            row += n
        # samples lost to damage (webdataset path): keep only the rows that were filled
        return cls(images[:row], labels[:row])

    def batch(self, idx: torch.Tensor) -> Batch:
        # index_select copies whole rows (4x faster than advanced indexing on the CPU; the same on CUDA)
        return Batch(self.images.index_select(0, idx), self.pid[idx], self.camera[idx], self.modality[idx],
                     self.index[idx], None if self.valid is None else self.valid[idx])


class CacheSource(Source):
    """Batches indexed out of a :class:`CachedSplit` by a sampler (module docstring).

    ``make_sampler(cached)`` builds the sampler from the cached labels (see
    :func:`pipelines.sources.make_source`); the sampler's seed, rank and world are the source's.
    """

    backend = "cache"

    def __init__(self, split: SplitShards, cached: CachedSplit, sampler: Sampler, *, device, skipped: int = 0,
                 skipped_shards: list[str] | None = None):
        super().__init__(batch_size=sampler.batch_size, seed=sampler.seed, rank=sampler.rank, world=sampler.world,
                         drop_last=True, device=device)
        self.split = split
        self.cached = cached
        self.sampler = sampler
        self.skipped = skipped
        self.skipped_shards = list(skipped_shards or [])

    def __len__(self) -> int:
        return len(self.sampler)

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        self.sampler.seed = self.seed
        table = self.sampler.epoch_table(epoch)
        dev = self.cached.images.device
        if isinstance(table, tuple):
            rgb, ir = (t.to(dev) for t in table)
            for i in range(skip, len(rgb)):
                yield self.cached.batch(torch.cat([rgb[i], ir[i]]))
        else:
            table = table.to(dev)
            for i in range(skip, len(table)):
                yield self.cached.batch(table[i])

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sampler": self.sampler.state_dict()}


SamplerFactory = Callable[[CachedSplit], Sampler]

__all__ = ["CacheSource", "CachedSplit", "cache_bytes", "default_budget"]
