"""What both training loops (:mod:`train.pretrain`, :mod:`train.finetune`) run on: the
accelerator, the run folder, the non-finite loss check and the metrics log.

- :func:`make_accelerator` / :func:`new_accelerator`: mixed precision, TensorBoard, torch.compile
  through accelerate; one accelerator state per run, so runs can follow each other in a process.
- :func:`check_run_dir`: never start over an existing run by mistake; the checkpoint to resume.
- :class:`LossCheck`: per-step losses kept on the device, checked every logging step in one
  reduction across processes and one copy to the host; a non-finite loss raises
  :class:`NonFiniteLoss` (the commands exit with :data:`EXIT_NON_FINITE` through
  :func:`non_finite_exit`), before any checkpoint is written after it.
- :class:`MetricsLogger`: ``metrics.jsonl`` (process 0) and TensorBoard scalars.
- :func:`gather_rows`: an all-gather of row blocks whose lengths differ between processes.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin

from common.errors import UserError
from common.outputs import output_folder
from train.checkpointing import CHECKPOINTS, list_checkpoints, resolve_checkpoint

METRICS_FILE = "metrics.jsonl"
EXIT_NON_FINITE = 3
#: The last line of ``--help`` of both training commands.
EXIT_STATUS_HELP = "exit status: 0 done, 2 bad settings or data, 3 non-finite loss (the last good checkpoint is kept)"


# --- accelerator -------------------------------------------------------------------------------
def new_accelerator(**settings: Any) -> Accelerator:
    """An ``Accelerator`` for a new run in this process.

    accelerate keeps one global state per process and refuses a second ``Accelerator`` with other
    settings (pre-training in bf16, then fine-tuning in float32, from Python, as the demo's
    stages or a notebook do). A run's accelerator state is dropped before the next run builds its
    own; the process group, when there is one, is kept (``PartialState``).

    cuDNN's autotuner is switched on: training steps run at one fixed input shape (MMGL's step is
    mostly ResNet-50 convolutions), so the fastest algorithm is searched once per shape.
    """
    torch.backends.cudnn.benchmark = True
    AcceleratorState._reset_state()
    return Accelerator(**settings)


def make_accelerator(output_dir: str | Path, precision: str, *, tensorboard: bool = True,
                     compile: bool = False) -> Accelerator:
    """The accelerator of a run writing to ``output_dir``: ``precision`` (``no`` / ``bf16`` /
    ``fp16``) autocast, TensorBoard in ``output_dir/tensorboard``, optionally torch.compile
    (inductor). Refuses a launch whose process count accelerate does not see."""
    out = Path(output_dir)
    try:
        accelerator = new_accelerator(
            # Without CUDA, say so: several launched processes then form one gloo group (MULTI_CPU)
            # instead of each running alone and writing the same checkpoints.
            cpu=not torch.cuda.is_available(),
            mixed_precision=precision,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
            log_with="tensorboard" if tensorboard else None,
            dynamo_plugin=TorchDynamoPlugin(backend="inductor") if compile else None,
        )
    except ValueError as err:  # e.g. fp16 without a GPU
        raise UserError(f"--precision {precision}: {err}") from None
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(f"{launched} processes were launched but accelerate runs {accelerator.num_processes} "
                        "process(es) per group; check the `accelerate launch` options")
    return accelerator


# --- run folder --------------------------------------------------------------------------------
def check_run_dir(run_dir: str | Path, resume: Optional[str], *, latest_may_be_missing: bool = False) -> Optional[Path]:
    """The checkpoint to resume from, or None for a fresh run.

    resume: None (a fresh run: ``run_dir`` must not hold checkpoints, so a run is never
    overwritten by mistake), ``latest`` or a checkpoint / run folder
    (:func:`train.checkpointing.resolve_checkpoint`). With ``latest_may_be_missing``, ``latest``
    in a run folder without checkpoints starts afresh (fine-tuning's "run or continue").
    A ``run_dir`` that is a file or cannot be written is refused before anything is built."""
    run_dir = output_folder(run_dir, "--output_dir", create=False)
    if resume is None:
        if list_checkpoints(run_dir / CHECKPOINTS):
            raise UserError(f"{run_dir} already holds checkpoints of a run: pass --resume latest to continue it, "
                            "or choose another --output_dir")
        return None
    if resume == "latest" and latest_may_be_missing and not list_checkpoints(run_dir / CHECKPOINTS):
        return None
    return resolve_checkpoint(resume, run_dir)


# --- non-finite losses -------------------------------------------------------------------------
class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the message names the step and the losses."""


def check_losses(accelerator: Accelerator, steps: list[int], names: Sequence[str], values: torch.Tensor) -> np.ndarray:
    """This process's losses ``values`` ``(len(steps), len(names))`` averaged over the processes
    and copied to the host in one transfer, as ``(len(steps), len(names))`` float numpy.

    Raises :class:`NonFiniteLoss` naming the first of ``steps`` (0-based) whose losses are not
    all finite. The mean over processes is non-finite when one process's loss is, so every
    process stops at the same check instead of one waiting for the others in a collective."""
    host = accelerator.reduce(values, reduction="mean").cpu().numpy()
    bad = ~np.isfinite(host).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        losses = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, host[row]))
        raise NonFiniteLoss(f"non-finite loss at step {steps[row]} (0-based; {losses}); training stopped "
                            "and no checkpoint was written after it: the last good checkpoint is intact")
    return host


def non_finite_exit(err: NonFiniteLoss) -> int:
    """The one-line message and exit status of a run stopped by a non-finite loss."""
    print(f"error: {err}", file=sys.stderr)
    return EXIT_NON_FINITE


class LossCheck:
    """Losses of the steps since the last check, kept on the device (no host synchronization per
    step); :meth:`check` verifies them all at once (:func:`check_losses`)."""

    def __init__(self, accelerator: Accelerator, names: Sequence[str] = ()) -> None:
        self.accelerator = accelerator
        self.names = list(names)
        self.pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, values: torch.Tensor) -> None:
        """The losses ``(len(names),)`` of 0-based ``step``."""
        self.pending.append((step, values))

    def check(self) -> Optional[np.ndarray]:
        """The pending losses averaged over processes, ``(steps, names)`` on the host (None when
        nothing is pending); raises :class:`NonFiniteLoss` on a NaN or infinity."""
        if not self.pending:
            return None
        steps = [s for s, _ in self.pending]
        values = torch.stack([v for _, v in self.pending])
        self.pending.clear()
        return check_losses(self.accelerator, steps, self.names, values)


# --- metrics log -------------------------------------------------------------------------------
class MetricsLogger:
    """One JSON object per line in ``run_dir/metrics.jsonl`` (process 0) and the numbers of the
    same record as TensorBoard scalars (tagged ``kind/name`` when the record has a ``kind``).

    A run resumed from step ``start`` first drops the lines a killed run logged after it, so the
    file reads as one uninterrupted run."""

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, start: int = 0, tensorboard: bool = True) -> None:
        self.accelerator = accelerator
        self.path = Path(run_dir) / METRICS_FILE
        self.tensorboard = tensorboard
        if accelerator.is_main_process:
            self._truncate_after(start)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any], step: int) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            prefix = f"{record['kind']}/" if "kind" in record else ""
            scalars = {f"{prefix}{k}": v for k, v in record.items()
                       if isinstance(v, (int, float)) and k not in ("step", "epoch")}
            self.accelerator.log(scalars, step=step)


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinity for a line cut short by a kill (then dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


# --- collectives -------------------------------------------------------------------------------
def gather_rows(accelerator: Accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    """:data:`train.evaluation.features.Gather` over ``accelerator``'s processes. An all-gather
    needs equal shapes, and the processes' parts of a split may differ by a batch: gather the row
    counts, pad every part to the longest, gather, and cut the padding out again."""

    def gather(rows: torch.Tensor) -> torch.Tensor:
        counts = accelerator.gather(torch.tensor([rows.shape[0]], device=rows.device)).tolist()
        padded = accelerator.gather(accelerator.pad_across_processes(rows, dim=0))
        longest = max(counts)
        return torch.cat([padded[r * longest:r * longest + n] for r, n in enumerate(counts)])

    return gather
