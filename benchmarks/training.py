"""What the ``step`` and ``e2e`` suites time: one optimizer step of a pre-training method, taken
the way :mod:`train.pretrain`'s loop takes it, and the clocks and FLOP counts around it.

:class:`TrainStep` builds the method from a preset (:func:`train.config.resolve_config`) and its
optimizer and schedules with the loop's own functions (``build_optimizer``, ``make_schedules``,
``set_schedules``), then takes the loop's own step, :func:`train.pretrain.training_step`, on
ready views. The loop runs it through accelerate (``accelerator.backward``, its autocast and its
``torch.compile``); with bf16 (no loss scaler) and one process those are the plain calls used
here (``loss.backward()``, an autocast around the forward), so the benchmark times the same
kernels without an accelerate ``Accelerator``.

A :class:`Variant` switches bf16 autocast, channels-last weights and ``torch.compile`` (inductor)
on or off. FLOPs are counted once per workload with :class:`torch.utils.flop_counter.FlopCounterMode`
on an eager step (forward, teacher included, and backward; matmuls, convolutions and attention;
the optimizer's element-wise work is not model FLOPs), outside every timed region.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipelines.batch import Batch
from train.config import resolve_config
from train.methods import METHODS
from train.methods.base import Method, Progress
from train.pretrain import build_optimizer, make_schedules, set_schedules, training_step
from train.settings import RunConfig

#: Dense bf16 tensor-core peak, TFLOP/s, by a substring of ``torch.cuda.get_device_name``
#: (vendor data sheets, SXM parts; first match wins, so the PCIe H100 comes before the H100).
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("RTX 4090", 165.2))


#: What a CPU run's reader must know about its figures (both suites add it to their notes).
SHARED_CPU_NOTE = ("On a shared CPU the figures move with other jobs' load: torch's OpenMP threads wait for "
                   "descheduled peers, which stretches wall and CPU time alike (seen on the 2-core machine: the "
                   "same ResNet-50 fp32 step took 0.97 s in one run and 3.6 s in another minutes later, and one "
                   "ViT-S step repeated on the same views 4 to 20 s at load 5); read them with the recorded "
                   "load averages.")


@dataclass(frozen=True)
class Variant:
    """How the step runs: bf16 autocast, channels-last weights and inputs, ``torch.compile``."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False

    @property
    def key(self) -> str:
        on = [name for name, flag in (("bf16", self.bf16), ("cl", self.channels_last), ("compile", self.compile))
              if flag]
        return "_".join(on) or "fp32"

    @property
    def label(self) -> str:
        parts = ["bf16" if self.bf16 else "fp32"]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("compiled")
        return ", ".join(parts)


#: How results name the models of the presets the suites run.
MODEL_NAMES = {"pass_vits_lup": "ViT-S/16 PASS", "pass_tiny": "tiny-ViT PASS (test preset)",
               "mmgl_sysu": "ResNet-50 MMGL", "mmgl_tiny": "tiny-ResNet MMGL (test preset)"}


@dataclass(frozen=True)
class Workload:
    """A method (``name``) at a preset, with the overrides of this benchmark (batch size, ...)."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        return MODEL_NAMES.get(self.preset, self.preset)

    def config(self) -> RunConfig:
        # the loop refuses a run without shards; the benchmark hands its source in directly
        return resolve_config(None, self.preset, ["--shards", "unused", *self.overrides])


class TrainStep:
    """A method with its optimizer and schedules; calling it on views takes one training step.

    The steps run at the schedules' positions from the start of epoch 1 on (wrapping around at
    the end of the run), past PASS's epoch with a frozen last layer: the step most of the run takes.
    """

    def __init__(self, config: RunConfig, variant: Variant, device: torch.device, steps_per_epoch: int) -> None:
        cfg = config.train
        torch.manual_seed(cfg.seed)
        torch.backends.cudnn.benchmark = True  # as the loop (train.pretrain.new_accelerator): fixed shapes
        self.config, self.variant, self.device = config, variant, device
        self.method: Method = METHODS[config.method].method(config.method_config)
        if variant.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.method.to(device)
        self.optimizer = build_optimizer(self.method, cfg, device)
        self.model = torch.compile(self.method) if variant.compile else self.method
        self.trainable = [p for p in self.method.parameters() if p.requires_grad]
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        self.schedules = make_schedules(cfg, steps_per_epoch, 1, self.method.data_spec().images_per_slot)
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.taken = 0

    def views(self, batch: Batch):
        """The method's views of ``batch`` (on the batch's device), as the loop makes them."""
        return self.method.make_views(batch, self.generator)

    def _progress(self) -> Progress:
        step = (self.steps_per_epoch + self.taken) % self.total_steps
        return Progress(step, self.total_steps, step // self.steps_per_epoch, self.steps_per_epoch)

    def __call__(self, views) -> None:
        """One step of the loop's own sequence (:func:`train.pretrain.training_step`)."""
        progress = self._progress()
        set_schedules(self.optimizer, float(self.schedules["lr"][progress.step]),
                      float(self.schedules["wd"][progress.step]))
        autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if self.variant.bf16 else nullcontext
        training_step(self.model, self.method, self.optimizer, views, progress, self.config.train, self.trainable,
                      backward=torch.Tensor.backward, forward_context=autocast)
        self.taken += 1


def count_flops(step: TrainStep, views) -> int:
    """Model FLOPs of one step on ``views`` (forward + backward), counted on an eager step.

    The step is really taken (the weights move once); call it before timing."""
    if step.variant.compile:
        raise ValueError("count FLOPs on an eager step: the counter does not see inside compiled graphs")
    with FlopCounterMode(display=False) as counter:
        step(views)
    return int(counter.get_total_flops())


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of ``device`` (:data:`PEAK_BF16_TFLOPS`); None on the CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in name), None)


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (figures span orders of magnitude)."""
    return float(f"{value:.{digits}g}")


class StepClock:
    """Per-step durations without a host synchronization per step.

    On CUDA, an event is recorded at every step boundary and read after the run (one
    synchronization at the end), so the pipeline keeps its asynchrony; on the CPU, the host
    clock at every boundary.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def tick(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        """Seconds between consecutive ticks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


__all__ = ["MODEL_NAMES", "PEAK_BF16_TFLOPS", "SHARED_CPU_NOTE", "StepClock", "TrainStep", "Variant", "Workload",
           "count_flops", "peak_tflops", "significant"]
