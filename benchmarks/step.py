"""step: the model step alone on views already in device memory vs the full pipeline step
(source -> views -> step), for ViT-S/16 PASS and the two-stream ResNet-50 MMGL, side by side.

- model alone: :class:`benchmarks.training.TrainStep` (the loop's step: forward, backward,
  clipping, optimizer, EMA teacher) on one batch of views made beforehand and kept on the device;
- full pipeline: the same step object on fresh batches: the source the method trains from at
  full scale (MMGL: the device cache with the ``pairs`` sampler, SYSU-MM01 fits; PASS: DALI
  streaming the shards, LUPerson's 4.18M images do not fit a cache), then the method's views
  (Kornia, on the device), then the step; nothing synchronizes inside a run.

Variants: fp32 eager, bf16 autocast, channels-last (MMGL only: a ViT's only convolution is its
patch embedding) alone and with bf16, then the "tuned" variant: every switch that applies plus
``torch.compile`` where this run compiles (see ``compile_skipped``). The full pipeline runs with
fp32 eager and with the last variant. Figures: source images/s (an MMGL slot counts its RGB and IR image),
median step time, model TFLOP/s (FLOPs counted once per workload, :func:`benchmarks.training.count_flops`,
over wall time) and, on a GPU with a known peak, model FLOP utilization (MFU).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, field

import torch

from benchmarks.record import SuiteResult
from benchmarks.registry import RunContext
from benchmarks.timing import Case, Measurement, side_by_side
from benchmarks.training import (SHARED_CPU_NOTE, StepClock, TrainStep, Variant, Workload, count_flops,
                                 peak_tflops, significant)
from pipelines.sources import Source, dali_available, make_source
from train.methods import METHODS
from train.methods.base import DataSpec
from train.pretrain import endless

FULL_STEP_TARGET = 0.95  # DESIGN.md section 9: on a GPU, the full step at >= 95% of the model alone

#: Per (device type, quick): the workloads and the steps per timed run. The GPU sizes are the
#: presets' (PASS 128 images per GPU with out_dim 65536; MMGL 64 slots = 128 images); on the CPU
#: the same models with small batches (a ViT-S PASS step on 2 images takes seconds there); the
#: quick run uses the tiny test presets (same code path, milliseconds).
WORKLOADS = {
    ("cuda", False): ((Workload("pass", "pass_vits_lup", ("--batch_size", "128")),
                       Workload("mmgl", "mmgl_sysu", ("--batch_size", "64"))), 20),
    ("cpu", False): ((Workload("pass", "pass_vits_lup", ("--batch_size", "2")),
                      Workload("mmgl", "mmgl_sysu", ("--batch_size", "4"))), 1),
    ("cuda", True): ((Workload("pass", "pass_tiny", ("--batch_size", "8")),
                      Workload("mmgl", "mmgl_tiny", ("--batch_size", "8"))), 2),
    ("cpu", True): ((Workload("pass", "pass_tiny", ("--batch_size", "4")),
                     Workload("mmgl", "mmgl_tiny", ("--batch_size", "4"))), 1),
}
#: Why a workload runs without a compiled variant on the CPU (none: it compiles). Measured here
#: (2 shared cores, load ~4): inductor's first step took ~90 s for the ResNet-50 MMGL step and
#: ~260 s for the ViT-S PASS step (twelve blocks at two resolutions, four 65536-wide heads).
CPU_COMPILE_SKIPPED = {"pass": "torch.compile skipped for PASS on the CPU: inductor's first step (forward + "
                               "backward graphs) took ~260 s on these shared cores; it runs on CUDA"}


@dataclass
class StepLog:
    """Per-step seconds of every run of one case (warm-up runs first)."""

    runs: list[list[float]] = field(default_factory=list)

    def timed_median(self, repeats: int) -> float:
        return statistics.median(s for run in self.runs[-repeats:] for s in run)


def data_spec(workload: Workload) -> DataSpec:
    """The method's data spec, read from a method built on the meta device (no weights made)."""
    config = workload.config()
    with torch.device("meta"):
        return METHODS[config.method].method(config.method_config).data_spec()


def variants(method: str, compile_ok: bool) -> list[Variant]:
    """fp32 eager, bf16, channels-last alone and with bf16 (convolutional models), then, when
    ``compile_ok``, bf16 + channels-last (where it applies) compiled."""
    conv = method == "mmgl"  # channels-last only matters to convolutions
    chosen = [Variant(), Variant(bf16=True)]
    if conv:
        chosen += [Variant(channels_last=True), Variant(bf16=True, channels_last=True)]
    if compile_ok:
        chosen.append(Variant(bf16=True, channels_last=conv, compile=True))
    return chosen


def figures(measurement: Measurement, log: StepLog, flops: int, steps: int, repeats: int,
            peak: float | None) -> dict:
    """A row's step figures: median step ms, model TFLOP/s over the wall time, MFU with a peak."""
    tflops = flops / (measurement.seconds_median / steps) / 1e12
    out = {"step_ms": round(1e3 * log.timed_median(repeats), 2), "model_tflop_per_s": significant(tflops),
           "flops_per_step": flops, "steps_per_run": steps}
    if peak is not None:
        out["mfu_percent"] = significant(100 * tflops / peak)
    return out


def model_alone(step: TrainStep, views, steps: int, images: int, log: StepLog) -> Case:
    def case() -> int:
        clock = StepClock(step.device)
        clock.tick()
        for _ in range(steps):
            step(views)
            clock.tick()
        log.runs.append(clock.durations())
        return steps * images
    return case


def full_pipeline(step: TrainStep, source: Source, steps: int, images: int, log: StepLog) -> Case:
    """Steps on fresh batches. Each run starts a new epoch of ``source`` in ``prepare`` (outside
    the clock: a streaming source builds the epoch's DALI pipeline and fills its queue there), so
    a run of fewer steps than an epoch times the steady stream, not a pipeline build."""
    state: dict = {}

    def prepare() -> None:
        source.set_epoch(source.epoch + 1)
        batches = iter(source)
        state["batches"] = itertools.chain([next(batches)], batches, endless(source))

    def case() -> int:
        batches = state.pop("batches")
        clock = StepClock(step.device)
        clock.tick()
        for _ in range(steps):
            step(step.views(next(batches)))
            clock.tick()
        log.runs.append(clock.durations())
        return steps * images
    case.prepare = prepare
    return case


def source_for(ctx: RunContext, workload: Workload, spec: DataSpec, device: torch.device):
    """The source the method trains from at full scale (module docstring) over the shared set."""
    config = workload.config()
    kind = "cache" if spec.sampler != "random" else ("dali" if dali_available() else "wds")
    source = make_source(ctx.data.shards, "train", batch_size=config.train.batch_size, size=spec.size, device=device,
                         source=kind, seed=0, sampler=spec.sampler, num_workers=ctx.cores, fit=spec.fit)
    return source, kind


def compile_skipped(ctx: RunContext, method: str) -> str | None:
    """Why ``method`` gets no compiled variant in this run; None when it gets one."""
    if ctx.quick:
        return "quick run"
    return CPU_COMPILE_SKIPPED.get(method) if ctx.device == "cpu" else None


def run_workload(ctx: RunContext, workload: Workload, steps: int, result: SuiteResult) -> dict:
    """Time one method's variants side by side; add its rows and ratios; return its settings."""
    device = torch.device(ctx.device)
    skipped = compile_skipped(ctx, workload.name)
    config, spec = workload.config(), data_spec(workload)
    source, kind = source_for(ctx, workload, spec, device)
    images = config.train.batch_size * spec.images_per_slot
    chosen = variants(workload.name, compile_ok=skipped is None)
    trainers = {v.key: TrainStep(config, v, device, len(source)) for v in chosen}
    baseline, tuned = chosen[0], chosen[-1]
    first = trainers[baseline.key]
    views = first.views(next(iter(source)))  # the model-alone views: made once, kept on the device
    flops = count_flops(first, views)  # one eager step, before anything is timed

    cases, rows = {}, {}  # rows: case key -> (variant, pipeline, its per-step log)
    for v, pipeline in [(v, "alone") for v in chosen] + [(v, "full") for v in dict.fromkeys((baseline, tuned))]:
        key, log = f"{workload.name}_{v.key}_{pipeline}", StepLog()
        make = model_alone if pipeline == "alone" else full_pipeline
        cases[key] = make(trainers[v.key], views if pipeline == "alone" else source, steps, images, log)
        rows[key] = (v, pipeline, log)
    ctx.say(f"  {workload.title}: {images} images per step, {flops / 1e9:.1f} GFLOP per step, source {kind}")
    measured = side_by_side(cases, warmup=ctx.warmup, repeats=ctx.repeats, device=device, say=ctx.say)

    for key, measurement in measured.items():
        variant, pipeline, log = rows[key]
        what = "model alone, views in memory" if pipeline == "alone" else f"full pipeline ({kind} source + views)"
        result.add_row(key, f"{workload.title}, {variant.label}: {what}", measurement,
                       **figures(measurement, log, flops, steps, ctx.repeats, mfu_peak(ctx, device)),
                       method=workload.name, variant=variant.key, pipeline=pipeline)

    target = FULL_STEP_TARGET if device.type == "cuda" else None
    for v in dict.fromkeys((baseline, tuned)):
        result.add_ratio(f"{workload.title}, {v.label}: full pipeline / model alone",
                         f"{workload.name}_{v.key}_full", f"{workload.name}_{v.key}_alone", target)
    for v in chosen[1:]:
        result.add_ratio(f"{workload.title}, model alone: {v.label} / fp32",
                         f"{workload.name}_{v.key}_alone", f"{workload.name}_{baseline.key}_alone")
    return {"preset": workload.preset, "batch_slots": config.train.batch_size, "images_per_step": images,
            "image_size": list(spec.size), "source": kind, "steps_per_run": steps, "flops_per_step": flops,
            "variants": [v.key for v in chosen], "compile_skipped": skipped,
            **({"out_dim": config.method_config.out_dim} if workload.name == "pass" else {})}


def mfu_peak(ctx: RunContext, device: torch.device) -> float | None:
    """The peak MFU is stated against: ``--peak_tflops`` when given, else the datasheet's."""
    return ctx.peak_tflops if ctx.peak_tflops is not None and device.type == "cuda" else peak_tflops(device)


def run(ctx: RunContext) -> SuiteResult:
    device = torch.device(ctx.device)
    workloads, steps = WORKLOADS[(device.type, ctx.quick)]
    peak = mfu_peak(ctx, device)
    columns = [("images_per_s", "source images/s"), ("step_ms", "step ms (median)"),
               ("model_tflop_per_s", "model TFLOP/s")]
    if peak is not None:
        columns.append(("mfu_percent", "MFU %"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = SuiteResult(
        suite="step",
        title=f"model step alone vs full pipeline step, ViT-S PASS and ResNet-50 MMGL on {where}",
        primary="images_per_s", columns=columns,
        settings={**ctx.base_settings(), "torch_threads": torch.get_num_threads(), "peak_bf16_tflops": peak,
                  "peak_basis": ("given (--peak_tflops)" if ctx.peak_tflops is not None and peak is not None
                                 else "datasheet dense bf16" if peak is not None else None)},
    )
    start = time.perf_counter()
    for workload in workloads:
        result.settings[workload.name] = run_workload(ctx, workload, steps, result)
        if device.type == "cuda":  # the next workload starts from free memory
            torch.cuda.empty_cache()
    result.settings["suite_seconds"] = round(time.perf_counter() - start, 1)
    result.notes += [
        "Source images/s: an MMGL slot (one RGB + one IR image) counts 2, a PASS image (2 global + 9 local "
        "views) counts 1. Step ms: median over every timed step (CUDA events on a GPU, host clock on the CPU).",
        "Model TFLOP/s: forward (PASS's teacher included) + backward FLOPs of one step, counted once with "
        "torch.utils.flop_counter.FlopCounterMode on an eager step, over the measured wall time per step; "
        "MFU divides it by the peak in the settings (peak_bf16_tflops, peak_basis): by default the GPU's "
        "datasheet dense bf16 peak (989.4 TFLOP/s for an H200), also for fp32 rows, as MFU is usually stated; "
        "an H200 here measured ~790 TFLOP/s on a large bf16 matmul, which --peak_tflops 790 states MFU against.",
        "Both pipelines of a variant use the same model and optimizer; the full pipeline's source reads "
        "the shared synthetic SYSU-MM01-like set (MMGL: device cache + pairs sampler; PASS: DALI streaming).",
    ]
    if device.type == "cpu":
        result.notes.append(
            "CPU run: the full-step target (>= 0.95 of model alone) is a GPU target. On the CPU the source "
            "(DALI threads), the views (Kornia) and the model share the same cores, so the ratio measures the "
            "data path's share of the CPU, not starvation. Batches are small (see settings) to bound the run.")
        result.notes.append(SHARED_CPU_NOTE)
    for workload in workloads:
        if result.settings[workload.name]["compile_skipped"]:
            result.notes.append(f"No compiled variant of {workload.title}: "
                                f"{result.settings[workload.name]['compile_skipped']}.")
    return result


__all__ = ["WORKLOADS", "run", "variants"]
