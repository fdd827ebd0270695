"""Sources: shards of one split -> :class:`pipelines.batch.Batch` on the training device.

* :class:`~pipelines.sources.dali.DaliSource` -- DALI reader + decode (GPU ``mixed`` or CPU);
* :class:`~pipelines.sources.wds.WdsSource` -- webdataset + PIL in DataLoader workers;
* :class:`~pipelines.sources.cache.CacheSource` -- the split decoded once on the device, indexed
  by a :mod:`pipelines.samplers` sampler.

:func:`make_source` picks one; the epoch plan, the epoch-length rule and the ``state_dict``
semantics shared by all are in :mod:`pipelines.sources.base`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from pipelines.samplers import SAMPLERS, CrossModalSampler, IdentitySampler, PairSampler, RandomSampler, Sampler
from pipelines.sources.base import Source, SplitShards, open_split, resolve_rank
from pipelines.sources.cache import CachedSplit, CacheSource, cache_bytes, default_budget
from pipelines.sources.canvas import FIT_MODES
from pipelines.sources.dali import DaliSource, dali_available
from pipelines.sources.wds import WdsSource
from common.errors import UserError

SOURCES = ("auto", "dali", "wds", "cache")
#: Samplers that put RGB and infrared images in every batch: the split must hold both.
CROSS_MODAL_SAMPLERS = ("cross_modal", "pairs")
CACHE_FILL_BATCH = 128


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def require_modalities(checked: SplitShards, sampler: str) -> None:
    """Refuse a split without RGB or infrared images for a cross-modal sampler, from the
    manifest's counts alone: before any image is decoded."""
    counts = checked.manifest.splits.get(checked.split)
    present = {m for m, c in counts.modalities.items() if c.images} if counts else set()
    missing = [m for m in ("rgb", "ir") if m not in present]
    if missing:
        names = {"rgb": "RGB", "ir": "infrared"}
        raise UserError(
            f"the {sampler} sampler puts RGB and infrared images in every batch, but split {checked.split!r} of "
            f"{checked.folder} has no {' and no '.join(names[m] for m in missing)} image; use a multi-modal "
            "dataset such as SYSU-MM01 (split train), or RegDB (its shards hold one split: --split all)"
        )


def _sampler_for(name: str | Callable[[CachedSplit], Sampler], cached: CachedSplit, *, batch_size: int, instances: int,
                 drop_last: bool, seed: int, rank: int, world: int) -> Sampler:
    if callable(name):
        return name(cached)
    common = dict(seed=seed, rank=rank, world=world)
    if name == "random":
        return RandomSampler(len(cached), batch_size, drop_last=drop_last, **common)
    if name == "identity":
        return IdentitySampler(cached.pid, batch_size, instances, **common)
    if name == "cross_modal":
        return CrossModalSampler(cached.pid, cached.modality, batch_size, instances, **common)
    if name == "pairs":
        return PairSampler(cached.modality, batch_size, **common)
    raise UserError(f"unknown sampler {name!r}; expected one of: {', '.join(SAMPLERS)}")


def make_source(
    shards: str | os.PathLike,
    split: str,
    *,
    batch_size: int,
    size: tuple[int, int],
    device: str | torch.device | None = None,
    source: str = "auto",
    shuffle: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world: int | None = None,
    drop_last: bool = True,
    sampler: str | Callable[[CachedSplit], Sampler] = "random",
    instances: int = 4,
    budget_bytes: int | None = None,
    num_workers: int | None = None,
    shuffle_buffer: int = 1024,
    prefetch: int = 2,
    skip_damaged: bool = False,
    fit: str = "resize",
) -> Source:
    """The source for ``split`` of the shard folder ``shards``.

    source:   ``auto`` takes the device cache when the split fits ``budget_bytes`` (default
              :func:`pipelines.sources.cache.default_budget`) or when ``sampler`` is not
              ``random`` (identity samplers need the cache), else DALI when installed, else the
              webdataset fallback; ``dali`` / ``wds`` / ``cache`` force one.
    size:     ``(H, W)`` of the yielded images.
    fit:      ``resize`` every image to ``size``, or ``canvas``: keep its source resolution and
              aspect ratio on a ``size`` canvas (shrunk only when larger), with the valid size
              per image in :attr:`pipelines.batch.Batch.valid` (:mod:`pipelines.sources.canvas`).
    sampler:  for the cache: ``random``, ``identity`` (P x K, ``batch_size = P * instances``),
              ``cross_modal`` (P x (K RGB + K IR), ``batch_size = 2 * P * instances``), ``pairs``
              (MMGL, ``batch_size`` slots, batches of ``2 * batch_size`` images), or a callable
              ``CachedSplit -> Sampler``.
    rank, world: default from torch.distributed or ``RANK`` / ``WORLD_SIZE``.
    num_workers: webdataset DataLoader workers / DALI threads (default: all cores).
    skip_damaged: a shard whose content differs from the manifest (truncated, a changed byte:
              :mod:`pipelines.integrity`) is refused with a :class:`UserError` naming it; with
              ``skip_damaged`` every source leaves it out with a warning and counts its samples
              in ``skipped``.
    """
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; expected one of: {', '.join(SOURCES)}")
    if fit not in FIT_MODES:
        raise UserError(f"unknown fit mode {fit!r}; expected one of: {', '.join(FIT_MODES)}")
    if len(tuple(size)) != 2 or min(size) < 1:
        raise UserError(f"image size must be (height, width) with positive values, got {size}")
    size = (int(size[0]), int(size[1]))
    rank, world = resolve_rank(rank, world)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} was asked for but CUDA is not available")
    if not callable(sampler) and sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; expected one of: {', '.join(SAMPLERS)}")
    checked = open_split(shards, split, tolerate_damaged=skip_damaged)
    if sampler in CROSS_MODAL_SAMPLERS:
        require_modalities(checked, sampler)
    need = cache_bytes(checked.total, size)
    budget = default_budget(device) if budget_bytes is None else int(budget_bytes)
    needs_cache = sampler != "random"
    if source == "auto":
        if need <= budget:
            source = "cache"
        elif needs_cache:
            raise UserError(
                f"the {sampler if isinstance(sampler, str) else 'given'} sampler needs the device cache, but split "
                f"{split!r} takes {need / 2**30:.2f} GiB decoded at {size[0]}x{size[1]}, over the budget of "
                f"{budget / 2**30:.2f} GiB; raise the budget or use the random sampler"
            )
        else:
            source = "dali" if dali_available() else "wds"
    elif needs_cache and source != "cache":
        raise UserError(f"sampler {sampler!r} works with the device cache only (--source cache or auto), not {source}")
    workers = num_workers
    common = dict(batch_size=batch_size, size=size, device=device, shuffle=shuffle, seed=seed,
                  shuffle_buffer=shuffle_buffer, prefetch=prefetch, fit=fit)
    if source == "dali":
        return DaliSource(checked, rank=rank, world=world, drop_last=drop_last, num_threads=workers, **common)
    if source == "wds":
        return WdsSource(checked, rank=rank, world=world, drop_last=drop_last,
                         num_workers=workers if workers is not None else min(8, os.cpu_count() or 1), **common)
    # cache
    if need > budget:
        raise UserError(
            f"split {split!r} takes {need / 2**30:.2f} GiB decoded at {size[0]}x{size[1]} "
            f"({checked.total} images), over the cache budget of {budget / 2**30:.2f} GiB on {device}; "
            "raise budget_bytes, lower the image size, or use --source dali / wds"
        )
    fill = dict(common, batch_size=CACHE_FILL_BATCH, shuffle=False)
    if dali_available():
        stream: Source = DaliSource(checked, rank=0, world=1, drop_last=False, num_threads=workers, **fill)
    else:
        stream = WdsSource(checked, rank=0, world=1, drop_last=False,
                           num_workers=workers if workers is not None else os.cpu_count() or 1, **fill)
    cached = CachedSplit.fill(stream, checked.total, size, device)
    chosen = _sampler_for(sampler, cached, batch_size=batch_size, instances=instances, drop_last=drop_last,
                          seed=seed, rank=rank, world=world)
    return CacheSource(checked, cached, chosen, device=device, skipped=stream.skipped,
                       skipped_shards=stream.skipped_shards)


__all__ = [
    "CacheSource",
    "CachedSplit",
    "DaliSource",
    "SOURCES",
    "Source",
    "WdsSource",
    "dali_available",
    "make_source",
    "open_split",
]
