"""decode: the train split of a synthetic SYSU-MM01-like set -> uint8 ``(B, 3, 288, 144)`` batches
on the device, every way the project can do it, side by side.

- usual way: the loose JPEG files, PIL decode + ``convert("RGB")`` + bilinear resize per
  sample in a torch DataLoader with one worker per core (as the AGW and PASS code read their
  images; kept at uint8, which spares the usual way the float ``ToTensor``);
- training batches, the usual way (torchreid-style): what torchreid's ``train_loader`` does per
  sample in its DataLoader workers -- PIL open + ``convert("RGB")``, resize, random horizontal
  flip, to a float tensor in [0, 1], ImageNet normalization -- written out here (PIL and torch,
  no torchvision), batches collated by the DataLoader; beside it the same training batches
  (flip p 0.5 + normalization, float32) made from the project's sources: the uint8 batch
  flipped and normalized in batch into buffers allocated once (``flip_normalize``);
- webdataset + PIL: :class:`pipelines.sources.WdsSource` over the shards, a worker per core;
- DALI CPU: :class:`pipelines.sources.DaliSource` on the CPU (DALI decode, torch resize);
- DALI GPU (``--device cuda``): the same on the GPU (nvJPEG ``mixed`` decode, DALI resize);
- device cache: an epoch of :class:`pipelines.sources.CacheSource` (filled once, beforehand);
- the limit: the same JPEG bytes decoded from memory in a tight loop, one process per core
  (``Image.open(BytesIO).load()``, a full decode), and the same plus the bilinear resize.

Each run of a configuration is one epoch (or one pass of the limit) with its own worker
processes, which it ends before returning (so their CPU time is counted). Every row also reports
the minor page faults and the system CPU time per image (:mod:`benchmarks.timing`).
"""

from __future__ import annotations

import io
import multiprocessing
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.record import SuiteResult
from benchmarks.registry import RunContext
from benchmarks.timing import side_by_side, synchronize
from pipelines.sources import make_source

SIZE = (288, 144)  # (H, W): MMGL / AGW input
BATCH, QUICK_BATCH = 64, 8
DALI_TARGET_VS_USUAL, DALI_TARGET_VS_LIMIT = 1.5, 0.7


class LooseJpegs(Dataset):
    """The usual way: a list of JPEG files, PIL decode and bilinear resize per sample."""

    def __init__(self, paths: list, size: tuple[int, int]):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TorchreidStyle(Dataset):
    """torchreid's training transform per sample: open, RGB, resize (bilinear), random
    horizontal flip (p 0.5), to float in [0, 1] ``(3, H, W)``, ImageNet normalization."""

    def __init__(self, paths: list, size: tuple[int, int]):
        self.paths, self.size = paths, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
        if torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255.0)
        return (tensor - self.mean) / self.std


def torchreid_style(paths: list, *, batch: int, workers: int, device: torch.device):
    def case() -> int:
        loader = DataLoader(TorchreidStyle(paths, SIZE), batch_size=batch, shuffle=True, drop_last=True,
                            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
        return drain(loader, device)
    return case


class FlipNormalize:
    """uint8 ``(B, 3, H, W)`` -> float32 normalized, each image flipped with p 0.5, written into
    buffers allocated once (the consumer side of a training batch, with no allocation per batch)."""

    def __init__(self, batch: int, size: tuple[int, int], seed: int = 0):
        self.out = torch.empty((batch, 3, *size))
        self.row = torch.empty((3, *size), dtype=torch.uint8)
        self.reverse = torch.arange(size[1] - 1, -1, -1)
        self.scale = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        out = self.out[:n]
        flips = (torch.rand(n, generator=self.generator) < 0.5).tolist()
        for i, flip in enumerate(flips):
            if flip:
                torch.index_select(images[i], 2, self.reverse, out=self.row)
                out[i].copy_(self.row)
            else:
                out[i].copy_(images[i])
        return out.mul_(self.scale).add_(self.shift)


def flip_normalize(source, device: torch.device):
    """An epoch of a source's uint8 batches made into training batches (:class:`FlipNormalize`)."""
    make = FlipNormalize(source.batch_size, source.size)

    def case() -> int:
        n = 0
        for batch in source:
            n += make(batch.images).to(device, non_blocking=True).shape[0]
        return n
    return case


def drain(batches, device: torch.device) -> int:
    """Consume an epoch of image batches (moved to ``device``); the number of images."""
    n = 0
    for batch in batches:
        images = batch.images if hasattr(batch, "images") else batch
        images = images.to(device, non_blocking=True)
        n += images.shape[0]
    return n


def usual_way(paths: list, *, batch: int, workers: int, device: torch.device):
    def case() -> int:
        loader = DataLoader(LooseJpegs(paths, SIZE), batch_size=batch, shuffle=True, drop_last=True,
                            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
        return drain(loader, device)
    return case


def source_epoch(source, device: torch.device):
    """One epoch of a :mod:`pipelines.sources` source (its own workers end with the epoch)."""
    return lambda: drain(source, device)


# -- the limit: a process per core, decoding its share of the bytes in a tight loop --------------

def _decode_share(jpegs: list[bytes], resize: bool, barrier) -> None:
    barrier.wait()  # start together: the run's wall time is the slowest share
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if resize:
                image.convert("RGB").resize((SIZE[1], SIZE[0]), Image.BILINEAR)


def decode_limit(jpegs: list[bytes], *, workers: int, resize: bool):
    """Forked processes (the bytes are inherited, not sent), joined before the case returns."""
    context = multiprocessing.get_context("fork")

    def case() -> int:
        barrier = context.Barrier(workers)
        procs = [context.Process(target=_decode_share, args=(jpegs[k::workers], resize, barrier))
                 for k in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError("a decode-limit worker failed")
        return len(jpegs)
    return case


def run(ctx: RunContext) -> SuiteResult:
    device = torch.device(ctx.device)
    data = ctx.data
    records = data.train_records
    paths, jpegs = [r.path for r in records], [r.jpeg for r in records]
    batch = QUICK_BATCH if ctx.quick else BATCH
    workers = ctx.cores
    common = dict(batch_size=batch, size=SIZE, seed=0)
    sources = {
        "wds": make_source(data.shards, "train", source="wds", device=device, num_workers=workers, **common),
        "dali_cpu": make_source(data.shards, "train", source="dali", device="cpu", **common),
    }
    if device.type == "cuda":
        sources["dali_gpu"] = make_source(data.shards, "train", source="dali", device=device, **common)
    start = time.perf_counter()
    sources["cache"] = make_source(data.shards, "train", source="cache", device=device, **common)
    synchronize(device)
    fill_seconds = time.perf_counter() - start

    cases = {
        "limit_decode": decode_limit(jpegs, workers=workers, resize=False),
        "limit_decode_resize": decode_limit(jpegs, workers=workers, resize=True),
        "usual": usual_way(paths, batch=batch, workers=workers, device=device),
        "wds": source_epoch(sources["wds"], device),
        "dali_cpu": source_epoch(sources["dali_cpu"], device),
        "torchreid_train": torchreid_style(paths, batch=batch, workers=workers, device=device),
        "wds_train": flip_normalize(sources["wds"], device),
        "dali_cpu_train": flip_normalize(sources["dali_cpu"], device),
    }
    if "dali_gpu" in sources:
        cases["dali_gpu"] = source_epoch(sources["dali_gpu"], device)
    cases["cache"] = source_epoch(sources["cache"], device)
    measured = side_by_side(cases, warmup=ctx.warmup, repeats=ctx.repeats, device=device, say=ctx.say)

    sizes = [Image.open(io.BytesIO(b)).size for b in jpegs]
    result = SuiteResult(
        suite="decode",
        title=f"train split -> uint8 batches {SIZE[0]}x{SIZE[1]} on {device.type}",
        primary="images_per_s",
        columns=[("images_per_s", "images/s"), ("cpu_ms_per_image", "CPU ms/image"),
                 ("images_per_cpu_s", "images per CPU-second"), ("system_ms_per_image", "system ms/image"),
                 ("minor_faults_per_image", "minor faults/image")],
        settings={**ctx.base_settings(), "images": len(jpegs), "size": list(SIZE), "batch": batch,
                  "dataloader_workers": workers, "dali_cpu_threads": sources["dali_cpu"].num_threads,
                  "source_width_mean": round(statistics.mean(w for w, _ in sizes), 1),
                  "source_height_mean": round(statistics.mean(h for _, h in sizes), 1),
                  "jpeg_kib_mean": round(statistics.mean(len(b) for b in jpegs) / 1024, 2),
                  "cache_fill_seconds": round(fill_seconds, 3), "torch_threads": torch.get_num_threads()},
    )
    names = {
        "usual": "usual way: loose JPEGs, PIL in DataLoader workers",
        "wds": "webdataset + PIL (WdsSource)",
        "dali_cpu": "DALI CPU (DaliSource)",
        "dali_gpu": "DALI GPU (DaliSource, mixed)",
        "cache": f"device cache epoch (CacheSource, {device.type})",
        "limit_decode": "limit: decode from memory, all cores",
        "limit_decode_resize": "limit: decode + resize from memory, all cores",
        "torchreid_train": "training batches, usual way: torchreid-style per-sample PIL + flip + normalize",
        "wds_train": "training batches: webdataset + PIL, flip + normalize in batch",
        "dali_cpu_train": "training batches: DALI CPU, flip + normalize in batch",
    }
    for key in ("usual", "wds", "dali_cpu", "dali_gpu", "cache", "limit_decode", "limit_decode_resize",
                "torchreid_train", "wds_train", "dali_cpu_train"):
        if key in measured:
            result.add_row(key, names[key], measured[key])
    result.add_ratio("DALI CPU / usual way", "dali_cpu", "usual", DALI_TARGET_VS_USUAL)
    result.add_ratio("DALI CPU / limit (decode)", "dali_cpu", "limit_decode", DALI_TARGET_VS_LIMIT)
    result.add_ratio("DALI CPU / usual way", "dali_cpu", "usual", DALI_TARGET_VS_USUAL,
                     metric="images_per_cpu_s")
    result.add_ratio("DALI CPU / limit (decode)", "dali_cpu", "limit_decode", DALI_TARGET_VS_LIMIT,
                     metric="images_per_cpu_s")
    result.add_ratio("DALI CPU / limit (decode + resize)", "dali_cpu", "limit_decode_resize")
    result.add_ratio("webdataset + PIL / usual way", "wds", "usual")
    result.add_ratio("training batches: DALI CPU / torchreid-style", "dali_cpu_train", "torchreid_train")
    result.add_ratio("training batches: webdataset + PIL / torchreid-style", "wds_train", "torchreid_train", 1.0)
    if "dali_gpu" in measured:
        result.add_ratio("DALI GPU / usual way", "dali_gpu", "usual")
    result.add_ratio("device cache / usual way", "cache", "usual")
    result.add_ratio("usual way / limit (decode + resize)", "usual", "limit_decode_resize")
    result.notes += [
        "Each run is one epoch of the train split (or one pass of the limit over its JPEG bytes), "
        "starting and ending its own worker processes; rows ran round-robin in one process.",
        "CPU ms/image: this process (DALI's threads included) plus its exited worker processes. "
        "Images per CPU-second (1000 / CPU ms) does not depend on how much of the cores other jobs "
        "took, so on a shared machine its ratios are the steadier comparison.",
        "DALI CPU decodes with DALI and resizes with torch (uint8 bilinear, antialiased) in the "
        "iterating thread: see pipelines/sources/dali.py for why.",
        "The device cache was filled once before the timed epochs "
        f"({fill_seconds:.2f} s); its epoch is indexing only.",
    ]
    return result


__all__ = ["FlipNormalize", "LooseJpegs", "TorchreidStyle", "decode_limit", "flip_normalize", "run",
           "torchreid_style", "usual_way"]
