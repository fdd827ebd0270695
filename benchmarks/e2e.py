"""e2e: MMGL over a SYSU-MM01-sized synthetic set and PASS over a stream of LUPerson-like shards,
data path and model step timed apart, projected to the full schedules (100 epochs each).

- MMGL: a synthetic SYSU-MM01 tree sized like the real training split (train + val ids,
  ~34,167 images), built into shards, cached on the device (the fill is timed once: a run pays
  it once), the ``pairs`` sampler, MMGL views, the two-stream ResNet-50 step;
- PASS: synthetic people (Market-1501-like detections, 128x64) read as an unlabeled ``folder``
  layout (LUPerson's), built into shards and streamed by DALI (webdataset without it) at
  256x128, PASS views, the ViT-S/16 step; the set is read round after round (a real run reads
  4.18M images once per epoch).

Every step is cut in two, with the device synchronized at each cut: the data path (next batch
from the source + the method's views) and the model step (:class:`benchmarks.training.TrainStep`).
The synchronization removes the overlap the real loop gets, so the step row is the sum of the
parts (the ``step`` suite measures the overlapped step). A run is a fixed number of steps (a
whole epoch for MMGL on a GPU); the projection multiplies the median time per step by the
schedule's steps: 100 x (steps per epoch) for MMGL plus its cache fill, 100 x 4.18M images for
PASS at the measured images/s on one device (the issue's target assumes 8 GPUs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.record import SuiteResult
from benchmarks.registry import RunContext
from benchmarks.timing import Measurement, cpu_seconds, synchronize
from benchmarks.training import SHARED_CPU_NOTE, TrainStep, Variant, Workload, significant
from pipelines.sources import dali_available, make_source
from shards.build import build
from shards.synthetic import generate
from train.settings import RunConfig
from train.pretrain import endless

EPOCHS = 100
LUPERSON_IMAGES = 4_180_000
PASS_GPUS = 8  # the PASS setting: 8 GPUs x 128 images
PASS_TARGET_PER_GPU = 2400  # images/s per GPU (issue 7)
MMGL_TARGET_MINUTES = 10  # 100 epochs over 34,167 images (issue 7)
FULL_STEP_TARGET = 0.95
CPU_CACHE_BUDGET = 8 << 30  # the SYSU-sized split at 288x144 takes 4.25 GB: over the CPU default of 4 GiB

#: Synthetic sizes (identities, mean images per identity): SYSU-MM01 has 491 ids, 395 of them
#: (train + val) with 34,167 images, ~86.5 each; the LUPerson-like set only needs to span shards.
SYSU_SIZE = (491, 87)
LUP_SIZE, LUP_QUICK_SIZE = (80, 17), (2, 4)
LUP_SHARD_SIZE = 200


@dataclass(frozen=True)
class Sizes:
    """Batch and run length of one device/mode: ``steps`` None means one whole epoch per run."""

    mmgl: Workload
    mmgl_steps: int | None
    pass_: Workload
    pass_steps: int


SIZES = {
    ("cuda", False): Sizes(Workload("mmgl", "mmgl_sysu", ("--batch_size", "64")), None,
                           Workload("pass", "pass_vits_lup", ("--batch_size", "128")), 100),
    ("cpu", False): Sizes(Workload("mmgl", "mmgl_sysu", ("--batch_size", "4")), 3,
                          Workload("pass", "pass_vits_lup", ("--batch_size", "2")), 2),
    ("cuda", True): Sizes(Workload("mmgl", "mmgl_tiny", ("--batch_size", "8")), 2,
                          Workload("pass", "pass_tiny", ("--batch_size", "8")), 2),
    ("cpu", True): Sizes(Workload("mmgl", "mmgl_tiny", ("--batch_size", "4")), 2,
                         Workload("pass", "pass_tiny", ("--batch_size", "4")), 2),
}


@dataclass
class Parts:
    """Timed runs of one workload: the data path, the model step and the whole, per run."""

    data: Measurement
    model: Measurement
    step: Measurement


def preset_variant(config: RunConfig, device: torch.device, quick: bool) -> Variant:
    """The preset's own precision and memory format, compiled on a GPU (not in quick runs)."""
    cfg = config.train
    return Variant(bf16=cfg.precision == "bf16", channels_last=cfg.channels_last,
                   compile=device.type == "cuda" and not quick)


def timed_steps(step: TrainStep, stream, steps: int, images: int, parts: Parts | None) -> None:
    """``steps`` steps, each cut into data path and model step (module docstring); recorded in
    ``parts`` unless None (warm-up)."""
    device = step.device
    data_s = data_cpu = model_s = model_cpu = 0.0
    synchronize(device)
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        t0, c0 = time.perf_counter(), cpu_seconds()
        views = step.views(next(stream))
        synchronize(device)
        t1, c1 = time.perf_counter(), cpu_seconds()
        step(views)
        synchronize(device)
        t2, c2 = time.perf_counter(), cpu_seconds()
        data_s, data_cpu = data_s + t1 - t0, data_cpu + c1 - c0
        model_s, model_cpu = model_s + t2 - t1, model_cpu + c2 - c1
    if parts is not None:
        n = steps * images
        parts.data.add(data_s, data_cpu, n)
        parts.model.add(model_s, model_cpu, n)
        parts.step.add(time.perf_counter() - wall0, cpu_seconds() - cpu0, n)


def measure(ctx: RunContext, step: TrainStep, source, steps: int, images: int) -> Parts:
    """Warm-up runs, then timed runs of ``steps`` steps each."""
    stream = endless(source)
    parts = Parts(Measurement(), Measurement(), Measurement())
    for round_ in range(ctx.warmup + ctx.repeats):
        timed = round_ >= ctx.warmup
        timed_steps(step, stream, steps, images, parts if timed else None)
        if timed:
            data_ms, model_ms = (1e3 * m.seconds[-1] / steps for m in (parts.data, parts.model))
            ctx.say(f"  {step.config.method}: run {round_ + 1 - ctx.warmup}: data {data_ms:.0f} ms/step, "
                    f"model {model_ms:.0f} ms/step")
        else:
            ctx.say(f"  {step.config.method}: warm-up run {round_ + 1} done")
    return parts


def sysu_sized_shards(ctx: RunContext) -> Path:
    """Shards of a SYSU-MM01-sized synthetic set (the shared small set in quick runs)."""
    if ctx.quick:
        return ctx.data.shards
    ids, per_id = SYSU_SIZE
    folder = ctx.workdir / "sysu-full"
    ctx.say(f"generating a SYSU-MM01-sized synthetic set ({ids} ids x ~{per_id} images) in {folder}")
    generate("sysu-mm01", folder / "raw", ids=ids, images_per_id=per_id, seed=0, workers=ctx.cores)
    build("sysu-mm01", folder / "raw", folder / "shards", workers=ctx.cores)
    return folder / "shards"


def luperson_like_shards(ctx: RunContext) -> Path:
    """Synthetic person crops read as an unlabeled folder (LUPerson's layout), built into shards."""
    ids, per_id = LUP_QUICK_SIZE if ctx.quick else LUP_SIZE
    folder = ctx.workdir / "luperson-like"
    ctx.say(f"generating LUPerson-like unlabeled person images ({ids} ids x ~{per_id}) in {folder}")
    generate("market1501", folder / "raw", ids=ids, images_per_id=per_id, seed=0,
             workers=1 if ctx.quick else ctx.cores)
    build("folder", folder / "raw", folder / "shards", shard_size=LUP_SHARD_SIZE,
          workers=1 if ctx.quick else ctx.cores)
    return folder / "shards"


def run_mmgl(ctx: RunContext, sizes: Sizes, result: SuiteResult) -> dict:
    device = torch.device(ctx.device)
    shards = sysu_sized_shards(ctx)
    config = sizes.mmgl.config()
    variant = preset_variant(config, device, ctx.quick)
    size = tuple(config.method_config.image_size)
    start = time.perf_counter()
    source = make_source(shards, "train", batch_size=config.train.batch_size, size=size, device=device,
                         source="cache", sampler="pairs", seed=0, num_workers=ctx.cores,
                         budget_bytes=CPU_CACHE_BUDGET if device.type == "cpu" else None)
    synchronize(device)
    fill_s = time.perf_counter() - start
    step = TrainStep(config, variant, device, len(source))
    steps = sizes.mmgl_steps or len(source)
    images = 2 * config.train.batch_size
    parts = measure(ctx, step, source, steps, images)
    add_rows(result, "mmgl", sizes.mmgl.title, parts, steps,
             lambda seconds_per_step: (EPOCHS * len(source) * seconds_per_step + fill_s) / 3600)
    return {"preset": sizes.mmgl.preset, "variant": variant.key, "batch_slots": config.train.batch_size,
            "images_per_step": images, "image_size": list(size), "train_images": source.split.total,
            "steps_per_epoch": len(source), "steps_per_run": steps, "cache_fill_seconds": round(fill_s, 2)}


def run_pass(ctx: RunContext, sizes: Sizes, result: SuiteResult) -> dict:
    device = torch.device(ctx.device)
    shards = luperson_like_shards(ctx)
    config = sizes.pass_.config()
    variant = preset_variant(config, device, ctx.quick)
    kind = "dali" if dali_available() else "wds"
    batch = config.train.batch_size
    source = make_source(shards, "train", batch_size=batch, size=tuple(config.method_config.image_size),
                         device=device, source=kind, seed=0, num_workers=ctx.cores)
    step = TrainStep(config, variant, device, LUPERSON_IMAGES // batch)
    parts = measure(ctx, step, source, sizes.pass_steps, batch)
    add_rows(result, "pass", sizes.pass_.title, parts, sizes.pass_steps,
             lambda seconds_per_step: EPOCHS * LUPERSON_IMAGES / batch * seconds_per_step / 3600)
    return {"preset": sizes.pass_.preset, "variant": variant.key, "batch": batch,
            "out_dim": config.method_config.out_dim, "source": kind, "stream_images": source.split.total,
            "shards": len(source.split.shards), "steps_per_run": sizes.pass_steps}


def add_rows(result: SuiteResult, key: str, name: str, parts: Parts, steps: int, hours) -> None:
    """Data path, model step and whole-step rows, with ``hours(seconds per step)`` projected."""
    rows = (("data", "data path (source + views)", parts.data), ("model", "model step", parts.model),
            ("step", "whole step (data path + model step)", parts.step))
    for part, label, measurement in rows:
        per_step = measurement.seconds_median / steps
        result.add_row(f"{key}_{part}", f"{name}: {label}", measurement, ms_per_step=round(1e3 * per_step, 2),
                       projected_hours=significant(hours(per_step)), steps_per_run=steps)


def run(ctx: RunContext) -> SuiteResult:
    device = torch.device(ctx.device)
    sizes = SIZES[(device.type, ctx.quick)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = SuiteResult(
        suite="e2e",
        title=f"MMGL epoch and PASS stream, data path vs model step, projected to 100 epochs on {where}",
        primary="images_per_s",
        columns=[("images_per_s", "source images/s"), ("ms_per_step", "ms per step"),
                 ("projected_hours", f"projected {EPOCHS} epochs, h (1 device)")],
        settings={**ctx.base_settings(), "epochs": EPOCHS, "torch_threads": torch.get_num_threads()},
    )
    result.settings["mmgl"] = run_mmgl(ctx, sizes, result)
    result.settings["pass"] = run_pass(ctx, sizes, result)
    target = FULL_STEP_TARGET if device.type == "cuda" else None
    for key, name in (("mmgl", "MMGL"), ("pass", "PASS")):
        result.add_ratio(f"{name}: whole step / model step", f"{key}_step", f"{key}_model", target)
        result.add_ratio(f"{name}: data path share of the step", f"{key}_data", f"{key}_step", metric="ms_per_step")
    mmgl_minutes = 60 * result.row("mmgl_step")["projected_hours"]
    pass_hours_8 = result.row("pass_step")["projected_hours"] / PASS_GPUS
    pass_per_device = result.row("pass_step")["images_per_s"]
    result.settings.update(mmgl_projected_minutes=round(mmgl_minutes, 1),
                           pass_projected_hours_on_8_devices=round(pass_hours_8, 2))
    result.notes += [
        f"Projections are the median measured time per step times the schedule's steps, from "
        f"{sizes.mmgl_steps or 'one epoch of'} MMGL steps and {sizes.pass_steps} PASS steps per run "
        f"({ctx.repeats} timed runs after {ctx.warmup} warm-up); MMGL adds its cache fill once. They assume "
        "the measured steps are typical of the whole run (no slowdown or speed-up later).",
        f"MMGL 100 epochs: {mmgl_minutes:,.1f} min projected here (target on an H200: under "
        f"{MMGL_TARGET_MINUTES} min, {EPOCHS} epochs of the real 34,167 images).",
        f"PASS: {pass_per_device:,.1f} images/s per device measured here; {pass_hours_8:,.1f} h for "
        f"{EPOCHS} epochs of {LUPERSON_IMAGES:,} images on {PASS_GPUS} such devices if it scaled linearly "
        f"(target: >= {PASS_TARGET_PER_GPU} images/s per GPU).",
        "Data path and model step are each timed with the device synchronized at the cut, so their sum is "
        "the step without overlap; the step suite measures the overlapped full step.",
    ]
    if device.type == "cpu":
        result.notes.append(
            "CPU run: small batches (see settings), not the presets' 64 slots / 128 images; views, DALI threads "
            "and the model share the same cores; the presets' precision and memory format, not compiled "
            "(settings: variant).")
        result.notes.append(SHARED_CPU_NOTE)
    return result


__all__ = ["SIZES", "run"]
