"""Self-supervised pre-training, one loop for every method, under HuggingFace accelerate.

    accelerate launch -m train.pretrain --method pass --shards DIR [--preset NAME] [--key value ...]
    python -m train.pretrain --preset pass_tiny --shards DIR          # one process
    python -m train.pretrain ... --resume [PATH]                      # continue a run

The loop is linear, as DINO's ``main_dino.py`` and accelerate's ``complete_cv_example.py``:
configuration -> accelerator -> method -> source -> optimizer and schedules -> resume -> steps.
A step (the method contract, :mod:`train.methods.base`)::

    lr, wd <- schedules[step]
    views = method.make_views(batch, generator seeded by (seed, rank, step))
    method.on_step_start(progress); out = model(views)            # autocast by accelerate
    accelerator.backward(out.loss); method.before_optimizer_step(progress)
    clip; optimizer.step(); method.after_step(progress)

What it writes in ``--output_dir``: ``config.json`` (the resolved configuration),
``metrics.jsonl`` (a line every ``--log_every`` steps: losses averaged over the steps and the
processes, lr, wd, the method's schedule values, images/s), ``tensorboard/`` and
``checkpoints/step_*`` (:mod:`train.checkpointing`: every ``--checkpoint_every_steps`` steps,
every ``--checkpoint_every_epochs`` epochs, and at the end).

Losses are checked at every logging step and before every checkpoint (one device-to-host copy
per ``--log_every`` steps, not one per step): a non-finite loss stops the run with exit status
3, naming the first bad step and its losses; no checkpoint is written after it, so the last
good one is intact (``train.finetune`` stops the same way: both loops run on :mod:`train.runtime`). Bad settings (unknown keys, missing shards, impossible batch settings) stop
the run before training with exit status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from common.cli import ArgumentParser, run_cli
from common.errors import UserError
from pipelines.batch import Batch
from pipelines.sources import Source, make_source
from pipelines.sources.base import seed_of
from shards.remote import local_shards
from train.checkpointing import CHECKPOINTS, Checkpointer, read_json
from train.config import (
    config_differences,
    config_from_dict,
    describe,
    flatten,
    preset_registry,
    resolve_config,
    save_config,
)
from train.methods import METHODS
from train.methods.base import Method, Progress, StepOutput
from train.monitoring import monitor_record, monitor_shards
from train.runtime import (
    EXIT_STATUS_HELP,
    LossCheck,
    MetricsLogger,
    NonFiniteLoss,
    check_run_dir,
    make_accelerator,
    trackers_of,
    non_finite_exit,
)
from train.schedules import cosine_schedule, scaled_learning_rate, step_schedule
from train.settings import RunConfig, TrainConfig, presets_help, settings_help

CONFIG_FILE = "config.json"


# --- command line ----------------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m train.pretrain",
        description="Self-supervised pre-training (one loop for every method) under HuggingFace accelerate. "
        "Settings come from a preset, then from --key value overrides (--name for shared settings, "
        "--method.name for the method's); `--help` with --method or --preset lists them with that preset's values.",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--method", choices=sorted(METHODS), help="pre-training method")
    parser.add_argument("--preset", help="named configuration (default: the method's default preset)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                        help="continue a run: its latest checkpoint (no PATH), or a checkpoint / run folder")
    parser.add_argument("--config", metavar="FILE",
                        help="settings from a JSON or YAML file (e.g. another run's config.json), applied after the "
                             "preset; --key value settings on the command line override it")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved configuration as JSON (the config.json of the run) and exit")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and the settings, then exit")
    return parser


def help_text(parser: ArgumentParser, method: Optional[str], preset: Optional[str]) -> str:
    """Usage, the presets, and every setting with the value of ``preset`` (or the method's default)."""
    lines = [parser.format_help(), "presets:", presets_help(preset_registry(), lambda config: f"[{config.method}] ")]
    try:
        config = resolve_config(method, preset) if (method or preset) else resolve_config("pass", None)
    except UserError as err:
        return "\n".join(lines + [f"\n({err})"])
    lines += [f"\nshared settings (values of preset {config.preset}):", settings_help(config.train),
              f"\n{config.method} settings (values of preset {config.preset}):",
              settings_help(config.method_config, "method."),
              "\n" + EXIT_STATUS_HELP]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        print(help_text(parser, args.method, args.preset))
        return 0
    config = resolve_config(args.method, args.preset, overrides, args.config)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    try:
        train(config, resume=args.resume)
    except NonFiniteLoss as err:
        return non_finite_exit(err)
    return 0


# --- setup -----------------------------------------------------------------------------------------
def build_source(cfg: TrainConfig, method: Method, accelerator: Accelerator) -> Source:
    """This process's share of the training split, in the method's size and sampler; the source
    shards by rank itself (accelerate's DataLoader wrapping is not used)."""
    spec = method.data_spec()
    return make_source(
        cfg.shards, cfg.split, batch_size=cfg.batch_size, size=spec.size, device=accelerator.device,
        source=cfg.source, shuffle=True, seed=cfg.seed, rank=accelerator.process_index,
        world=accelerator.num_processes, drop_last=True, sampler=spec.sampler, num_workers=cfg.num_workers,
        skip_damaged=cfg.skip_damaged, fit=spec.fit,
    )


def parameter_groups(method: Method) -> list[dict[str, Any]]:
    """Trainable parameters split by :meth:`Method.no_weight_decay`: the first group follows the
    weight-decay schedule, the second never decays."""
    decay, no_decay = [], []
    for name, param in method.named_parameters():
        if param.requires_grad:
            (no_decay if method.no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "decay": True}, {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def build_optimizer(method: Method, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernels on CUDA) or momentum SGD; lr and weight decay are set every step."""
    groups = parameter_groups(method)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, fused=True if device.type == "cuda" else None)
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.sgd_momentum, nesterov=cfg.sgd_nesterov)


def make_schedules(cfg: TrainConfig, steps_per_epoch: int, world: int, images_per_slot: int) -> dict[str, np.ndarray]:
    """Per-step learning rate (scaled by the total batch; warm-up then cosine, or AGW's steps)
    and weight decay."""
    total_batch = cfg.batch_size * world * images_per_slot
    peak = scaled_learning_rate(cfg.lr, total_batch, cfg.lr_scaling)
    if cfg.lr_schedule == "step":
        lr = step_schedule(peak, cfg.epochs, steps_per_epoch, int(cfg.warmup_epochs), cfg.lr_milestones, cfg.lr_gamma)
    else:
        lr = cosine_schedule(peak, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs)
    return {
        "lr": lr,
        "wd": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch),
    }


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("decay", True):
            group["weight_decay"] = wd


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float, mode: str) -> None:
    """``param``: scale each tensor's gradient to norm <= ``max_norm`` on its own (DINO's
    ``clip_gradients``); ``global``: scale all together by their total norm. No host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scales = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


def training_step(
    model: Callable[[Any], StepOutput],
    method: Method,
    optimizer: torch.optim.Optimizer,
    views: Any,
    progress: Progress,
    cfg: TrainConfig,
    trainable: list[torch.nn.Parameter],
    backward: Callable[[torch.Tensor], None],
    unscale: Callable[[], None] = lambda: None,
    forward_context: Callable[[], ContextManager] = nullcontext,
) -> StepOutput:
    """One optimization step on ready views: the method's hooks around forward, backward,
    clipping and the optimizer step (the contract in :mod:`train.methods.base`).

    ``model`` is the method as prepared (DDP, compiled) or the method itself; ``backward`` and
    ``unscale`` are accelerate's (or plain ``loss.backward()`` and nothing, as in the step
    benchmark); ``forward_context`` wraps the forward (an autocast where accelerate does not)."""
    method.on_step_start(progress)
    with forward_context():
        out = model(views)
    backward(out.loss)
    method.before_optimizer_step(progress)
    if cfg.clip_grad > 0:
        unscale()
        clip_gradients(trainable, cfg.clip_grad, cfg.clip_mode)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_step(progress)
    return out


def endless(source: Source) -> Iterator[Batch]:
    """Batches across epochs: the source moves to its next epoch when one is exhausted."""
    while True:
        yield from source


def checkpoint_due(done: int, steps_per_epoch: int, cfg: TrainConfig) -> bool:
    """Whether to checkpoint after ``done`` steps (the end of the run is handled apart)."""
    if cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0:
        return True
    epochs_done, at_epoch_end = divmod(done, steps_per_epoch)
    return bool(cfg.checkpoint_every_epochs) and at_epoch_end == 0 and epochs_done % cfg.checkpoint_every_epochs == 0


# --- metrics ---------------------------------------------------------------------------------------
class Monitor:
    """Per-step losses kept on the device; every logging step one reduction across processes and
    one copy to the host, a non-finite check (:class:`train.runtime.LossCheck`), then the metrics
    line (:class:`train.runtime.MetricsLogger`) and the progress bar."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, start: int, last: int, show_bar: bool) -> None:
        self.accelerator = accelerator
        self.losses = LossCheck(accelerator)
        self.log = MetricsLogger(accelerator, run_dir, start)
        self.images = 0
        self.clock = time.perf_counter()
        self.bar = tqdm(total=last, initial=start, dynamic_ncols=True, unit="step",
                        disable=not (accelerator.is_main_process and show_bar))

    def record(self, step: int, out: StepOutput, images: int) -> None:
        if not self.losses.names:
            self.losses.names = ["loss", *out.metrics]
        values = torch.stack([out.loss.detach().float(), *(v.detach().float() for v in out.metrics.values())])
        self.losses.add(step, values)
        self.images += images
        self.bar.update(1)

    def flush(self, done: int, epoch: int, extra: dict[str, float]) -> None:
        """Check and log the steps recorded since the last flush (``done`` steps in all)."""
        values = self.losses.check()  # raises on a non-finite loss
        if values is None:
            return
        now = time.perf_counter()
        images_per_s = self.images * self.accelerator.num_processes / max(now - self.clock, 1e-9)
        self.images, self.clock = 0, now
        line = {"step": done, "epoch": epoch, **dict(zip(self.losses.names, values.mean(axis=0).tolist())),
                **extra, "images_per_s": images_per_s}
        self.bar.set_postfix(loss=f"{line['loss']:.4f}", img_s=f"{images_per_s:.1f}")
        self.log.write(line, done)

    def close(self) -> None:
        self.bar.close()


# --- the run ---------------------------------------------------------------------------------------
def warn_changed_settings(config: RunConfig, checkpoint: Optional[Path], accelerator: Accelerator) -> None:
    """Warn about the settings that changed since the checkpoint a run resumes from."""
    saved = checkpoint / CONFIG_FILE if checkpoint is not None else None
    if saved is not None and saved.is_file():
        changed = config_differences(config_from_dict(read_json(saved)), config)
        if changed and accelerator.is_main_process:
            print("warning: resuming with settings that differ from the checkpoint's:\n  "
                  + "\n  ".join(changed), file=sys.stderr)


def tracker_config(config: RunConfig) -> dict[str, Any]:
    """The flat configuration as TensorBoard hyper-parameters (numbers, strings, booleans)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config).items()}


def train(config: RunConfig, resume: Optional[str] = None) -> None:
    """Run (or continue) the pre-training described by ``config``."""
    cfg = config.train
    cfg.validate()
    trackers = trackers_of(cfg.log_with)
    # a remote location (http(s)://, s3://, gs://, pipe:) is staged and verified on local disk
    cfg.shards = str(local_shards(cfg.shards))
    accelerator = make_accelerator(cfg.output_dir, cfg.precision, trackers=trackers, compile=cfg.compile)
    checkpoint = check_run_dir(cfg.output_dir, resume)
    warn_changed_settings(config, checkpoint, accelerator)
    set_seed(cfg.seed)  # the same initial weights in every process
    method: Method = METHODS[config.method].method(config.method_config)  # checks the method's settings
    set_seed(cfg.seed, device_specific=True)  # then different drop-path draws per process
    # Printed once every check that needs no data has passed (the source's checks read the shards).
    accelerator.print(f"configuration ({accelerator.num_processes} process(es), {accelerator.device}):\n"
                      + describe(config))
    source = build_source(cfg, method, accelerator)
    monitor_on = monitor_shards(cfg.shards, cfg.monitor_shards) if cfg.monitor_every else None
    if accelerator.is_main_process:  # the settings are usable: record them with the run
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(config, Path(cfg.output_dir) / CONFIG_FILE)
    steps_per_epoch = len(source)
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    images_per_slot = method.data_spec().images_per_slot
    schedules = make_schedules(cfg, steps_per_epoch, accelerator.num_processes, images_per_slot)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    method.to(accelerator.device)
    optimizer = build_optimizer(method, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(method, optimizer)
    trainable = [p for p in method.parameters() if p.requires_grad]
    checkpointer = Checkpointer(accelerator, Path(cfg.output_dir) / CHECKPOINTS, cfg.keep_last, objects=[source])

    start = 0
    if checkpoint is not None:
        state = checkpointer.load(checkpoint)
        start = int(state["step"])
        if state.get("steps_per_epoch") != steps_per_epoch:
            accelerator.print(f"warning: the checkpoint had {state.get('steps_per_epoch')} steps per epoch, this run "
                              f"has {steps_per_epoch}: schedules continue at step {start} of the new length")
        accelerator.print(f"resumed from {checkpoint} at step {start}")
    accelerator.init_trackers("pretrain", config=tracker_config(config))
    accelerator.print(f"{type(source).__name__}: {steps_per_epoch} steps per epoch x {cfg.epochs} epochs; "
                      f"running steps {start}..{last_step - 1}")

    def trainer_state(done: int) -> dict[str, Any]:
        return {"step": done, "epoch": done // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "world": accelerator.num_processes, "method": config.method}

    monitor = Monitor(accelerator, Path(cfg.output_dir), start, last_step, cfg.progress_bar)

    def evaluate_frozen(done: int) -> None:
        """The frozen backbone's retrieval (train.monitoring), logged as a ``monitor`` record."""
        record = monitor_record(method, accelerator, *monitor_on, cfg.monitor_trials)
        if record:
            record = {**record, "step": done, "epoch": done // steps_per_epoch}
            monitor.log.write(record, done)
            same = f", RGB->RGB R1 {100 * record['same_modality_R1']:.2f}" if "same_modality_R1" in record else ""
            tqdm.write(f"monitor after {done} steps: {record['setting']} R1 {100 * record['R1']:.2f} "
                       f"mAP {100 * record['mAP']:.2f}{same}")

    if monitor_on is not None and start == 0:
        evaluate_frozen(0)  # the initialisation: the baseline the curve starts from
    generator = torch.Generator(device=accelerator.device)
    stream = endless(source)
    saved_at = start
    try:
        for step in range(start, last_step):
            progress = Progress(step, total_steps, step // steps_per_epoch, steps_per_epoch)
            set_schedules(optimizer, float(schedules["lr"][step]), float(schedules["wd"][step]))
            batch = next(stream)
            generator.manual_seed(seed_of(cfg.seed, accelerator.process_index, step))
            views = method.make_views(batch, generator)
            out = training_step(model, method, optimizer, views, progress, cfg, trainable,
                                backward=accelerator.backward, unscale=accelerator.unscale_gradients)

            done = step + 1
            monitor.record(step, out, len(batch))
            save = checkpoint_due(done, steps_per_epoch, cfg) or done == last_step
            if save or done % cfg.log_every == 0:
                values = {"lr": float(schedules["lr"][step]), "wd": float(schedules["wd"][step]),
                          **method.log_values()}
                monitor.flush(done, progress.epoch, values)  # raises on a non-finite loss
            epochs_done, in_epoch = divmod(done, steps_per_epoch)
            if monitor_on is not None and ((in_epoch == 0 and epochs_done % cfg.monitor_every == 0)
                                           or done == last_step):
                evaluate_frozen(done)
            if save:
                checkpointer.save(trainer_state(done), {CONFIG_FILE: config.to_dict()})
                saved_at = done
    finally:
        monitor.close()
        accelerator.end_training()
    accelerator.print(f"done: {last_step} of {total_steps} steps; last checkpoint at step {saved_at} "
                      f"in {Path(cfg.output_dir) / CHECKPOINTS}")


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
