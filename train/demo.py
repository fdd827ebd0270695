"""The main job: pre-train, fine-tune every arm with several seeds, compare with the noise.

    python -m train.demo                        # MMGL on synthetic SYSU-MM01, small scale (2 CPU cores)
    python -m train.demo --method pass          # PASS on synthetic Market-1501
    python -m train.demo --scale full --root /data/SYSU-MM01 --imagenet resnet50.pth   # the paper's table, GPU

Stages (each prints one line with its time when it ends)::

    data       synthetic dataset in the method's layout (skipped with --root)
    shards     shards build + verify + the summary table and contact-sheet.png (reused when up
               to date with the data)
    pretrain   python -m train.pretrain on the training images, no labels (resumes from its
               last checkpoint); --monitor_every evaluates the frozen backbone on the way
    export     python -m train.export --format native (recomputed: a second)
    finetune   python -m train.finetune for every arm x seed (:func:`demo_arms`: pre-trained and
               random init, ImageNet init with --imagenet; all labels and --label_fraction of
               the training identities), --jobs at a time, each evaluated under the layout's
               protocol (SYSU-MM01 all-search, 10 trials / Market-1501) plus RGB->RGB on SYSU;
               on a CPU the runs that need no pre-trained backbone start during pretrain

then one line per arm (mean and spread over seeds, chance R1, test identities), a verdict per
label setting ("within noise" unless the difference is at least the seed spread),
``results.json`` (the ``summary`` rows, arms, verdicts, every run, the curves, the machine) and
``curves.png``.

Everything goes under ``OUT/<method>-<scale>/`` (``-<root folder name>`` with ``--root``), so
scales and methods never collide. Re-running the same command reuses what is finished: the
dataset, the shards (the builder's own fingerprint), a finished pre-training or fine-tuning; an
interrupted pre-training or fine-tuning resumes from its last checkpoint. A stage whose settings
changed (another ``--pretrain`` / ``--finetune`` value, other data, a new export) is deleted
and recomputed, and the progress line says so; ``--fresh`` recomputes everything.

Training stages run as child processes (``python -m train.pretrain`` / ``train.finetune``):
accelerate's process-wide ``AcceleratorState`` refuses a second ``Accelerator`` with another
mixed precision, and the full presets pre-train in bf16 but fine-tune in float32. Their output
goes to ``logs/<stage>.log``; the progress bar shows on the terminal when there is one.

Scales (:data:`PLANS`): ``tiny`` (seconds; the tests), ``small`` (the default; sized and measured
for a 2-core CPU), ``full`` (the full-size presets unchanged: mmgl_sysu + agw-sysu,
pass_vits_lup + transreid-market; synthetic data of the real datasets' size unless ``--root``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from common.cli import ArgumentParser, run_cli
from common.cores import available_cores, idle_cores
from common.errors import UserError
from common.interrupts import stop_children, wait_child
from common.outputs import output_folder
from shards.build import build
from shards.inspection import contact_sheet, random_samples, summary_table
from shards.manifest import MANIFEST_NAME
from shards.synthetic import generate
from shards.verify import verify
from models.initialisation import IMAGENET_PREFIX
from train.checkpointing import CHECKPOINTS, STATE_FILE, list_checkpoints, resolve_checkpoint
from train.config import resolve_config as pretrain_config
from train.export import export
from train.finetune import resolve_config as finetune_config

METHOD_LAYOUTS = {"mmgl": "sysu-mm01", "pass": "market1501"}
METHOD_TITLES = {"mmgl": "MMGL pre-trained", "pass": "PASS pre-trained"}
SCALES = ("tiny", "small", "full")
STAGES_FILE = "stages.json"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
SHEET_FILE = "contact-sheet.png"
INITS = ("pretrained", "random")


class StageFailed(Exception):
    """A stage failed for a reason other than the user's input; the message names its log."""


@dataclass(frozen=True)
class Plan:
    """What one method runs at one scale: synthetic data size, presets and their overrides."""

    ids: int
    images_per_id: int
    pretrain_preset: str
    pretrain: tuple[str, ...]
    finetune_preset: str
    finetune: tuple[str, ...]
    seeds: int = 2
    label_fraction: float = 0.25


# Small MMGL: the width-8 two-stream test ResNet on 96x48 views (6 stripes of 16 rows). 310
# identities give 61 test identities (chance R1 1.6%), 249 train + val ones. The release's
# optimizer (SGD Nesterov, lr 0.1, weight decay 5e-4) and PCC weight 1.0 (the top of the
# paper's 0.2-1.0): on validation identities both did better than the tiny preset's AdamW and
# 0.5 (README "Pre-training levers"); cosine over 4 epochs (in place of the steps at 20 and 50
# of 100) after half an epoch of warm-up; the frozen backbone evaluated every 2 epochs.
_MMGL_SMALL_PRETRAIN = ("--epochs", "4", "--max_steps", "0", "--warmup_epochs", "0.5", "--log_every", "20",
                        "--optimizer", "sgd", "--lr", "0.1", "--lr_scaling", "none", "--sgd_nesterov", "true",
                        "--weight_decay", "5e-4", "--weight_decay_end", "5e-4", "--lr_schedule", "cosine",
                        "--method.pcc_weight", "1.0", "--monitor_every", "2")
# The fine-tuning recipe that fits from scratch, the same for every arm, chosen on the validation
# identities (benchmarks.learnability, README "How learnable it is"): backbone lr factor 1.0
# (AGW's 0.1 assumes an ImageNet backbone: at 0.1 the ID loss sat at ln(classes) for two
# epochs), 64x32 inputs (96x48 matched them on validation at 1.7x the time), 10 epochs with the
# steps at 7 and 9 (12 were 2 points better on validation, within the seed spread, and put the
# demo past 5 minutes), one warm-up epoch, evaluated at the end.
_AGW_SMALL = ("--image_size", "64,32", "--pad", "4", "--ids_per_batch", "8", "--instances", "4",
              "--epochs", "10", "--steps_per_epoch", "0", "--warmup_epochs", "1", "--milestones", "7,9",
              "--backbone_lr_factor", "1.0", "--eval_every", "0", "--eval_trials", "10", "--log_every", "50")
_PASS_SMALL_PRETRAIN = ("--epochs", "10", "--max_steps", "0", "--batch_size", "32", "--warmup_epochs", "1",
                        "--log_every", "10", "--monitor_every", "2")
# The fine-tuning recipe that fits the 2-block test ViT from scratch, chosen on the people of
# another synthetic Market-1501 (data seed 1: none of the demo's test identities; README "The
# PASS path"): SGD lr 0.1 instead of TransReID's 8e-3 (tuned for a pre-trained ViT-S: at 1e-2
# the ID loss stayed near ln(65 classes) for 10 epochs), 100 epochs with 5 of warm-up, and no
# random erasing (TransReID's p 0.5 blanks up to a third of the image, here up to 3 of the 8
# patches a 64x32 image has: R1 33.5 with it, 46.9 without, fine-tuning seed 0; 36.0 without
# on seed 1, with it not run).
_TRANSREID_SMALL = ("--ids_per_batch", "8", "--instances", "4", "--epochs", "100", "--steps_per_epoch", "0",
                    "--warmup_epochs", "5", "--eval_every", "0", "--lr", "0.1", "--erase_p", "0")
_TINY_PRETRAIN = ("--max_steps", "4", "--log_every", "2", "--monitor_every", "1")

PLANS: dict[tuple[str, str], Plan] = {
    ("mmgl", "tiny"): Plan(9, 8, "mmgl_tiny", _TINY_PRETRAIN, "agw-tiny", ("--eval_trials", "10"),
                           label_fraction=0.5),
    ("mmgl", "small"): Plan(310, 20, "mmgl_tiny", _MMGL_SMALL_PRETRAIN, "agw-tiny", _AGW_SMALL),
    ("mmgl", "full"): Plan(491, 87, "mmgl_sysu", (), "agw-sysu", ()),
    ("pass", "tiny"): Plan(10, 6, "pass_tiny", _TINY_PRETRAIN, "transreid-tiny", (), label_fraction=0.5),
    # 130 identities: 65 test identities in Market-1501's half split.
    ("pass", "small"): Plan(130, 17, "pass_tiny", _PASS_SMALL_PRETRAIN, "transreid-tiny", _TRANSREID_SMALL),
    # Market-1501's size: 1,501 identities, 32,668 images.
    ("pass", "full"): Plan(1501, 22, "pass_vits_lup", (), "transreid-market", ()),
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m train.demo",
        description="The main job: synthetic data (or --root) -> shards -> self-supervised pre-training -> export "
                    "-> fine-tuning from the export AND from random init -> evaluation under the standard "
                    "protocol; prints both side by side, writes results.json and curves.png.",
        epilog="Stages resume or reuse what a previous run of the same command finished. "
               "Exit status: 0 done, 2 bad input or settings, 1 a stage failed (its log is named).",
    )
    parser.add_argument("--method", choices=sorted(METHOD_LAYOUTS), default="mmgl",
                        help="mmgl: RGB-IR, SYSU-MM01 layout (default); pass: RGB, Market-1501 layout")
    parser.add_argument("--scale", choices=SCALES, default="small",
                        help="tiny: seconds, a smoke test (the tests); small (default): sized for a 2-core "
                             "CPU, depending on its load; full: the full-size presets unchanged, for a GPU")
    parser.add_argument("--output_dir", "--out", dest="out", type=Path, default=Path("demo"),
                        help="output folder (default: demo)")
    parser.add_argument("--root", type=Path, default=None,
                        help="a real dataset in the method's layout (SYSU-MM01 / Market-1501) instead of the "
                             "synthetic one")
    parser.add_argument("--ids", type=int, default=None, help="synthetic identities (default: the scale's)")
    parser.add_argument("--images_per_id", type=int, default=None,
                        help="synthetic mean images per identity (default: the scale's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of every run")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes generating and packing the data (default: all cores)")
    parser.add_argument("--pretrain", action="append", default=[], metavar="KEY=VALUE",
                        help="change a pre-training setting after the scale's (e.g. epochs=20, "
                             "method.pcc_weight=0.3; see python -m train.pretrain --help); repeatable")
    parser.add_argument("--finetune", action="append", default=[], metavar="KEY=VALUE",
                        help="change a fine-tuning setting of both runs (e.g. epochs=20; see "
                             "python -m train.finetune --help); repeatable")
    parser.add_argument("--seeds", type=int, default=None,
                        help="fine-tuning seeds per arm: seed, seed+1, ... (default: the scale's, 2)")
    parser.add_argument("--label_fraction", type=float, default=None,
                        help="the label-scarce arms' fraction of labelled training identities (default: the "
                             "scale's, 0.25; 0: no label-scarce arms)")
    parser.add_argument("--imagenet", type=Path, default=None, metavar="FILE",
                        help="an ImageNet ResNet-50 state dict (torchvision/timm keys): adds the ImageNet-init "
                             "arm (fine-tuned as a ResNet-50 two-stream), beside the paper's numbers at --scale full")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per training process (default: the cores available to this process and "
                             "not busy by the load average, at least 1, divided among --jobs)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="fine-tuning runs side by side (default: one per idle core, at most 2); on a CPU the "
                             "random-init runs start beside the pre-training, which then leaves them a slot")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage instead of reusing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (stage lines only)")
    return parser


def setting_tokens(pairs: list[str], option: str) -> tuple[str, ...]:
    """``["epochs=3"]`` -> ``("--epochs=3",)``; a pair without ``=`` is a :class:`UserError`."""
    tokens = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip("-"):
            raise UserError(f"--{option} {pair!r}: expected KEY=VALUE, e.g. --{option} epochs=3")
        tokens.append(f"--{key.lstrip('-')}={value}")
    return tuple(tokens)


# --------------------------------------------------------------------------------------------
# The run folder and its stage records
# --------------------------------------------------------------------------------------------


@dataclass
class Demo:
    """One demo run: what the user asked for, resolved against the scale's :class:`Plan`."""

    method: str
    scale: str
    plan: Plan
    run_dir: Path
    root: Optional[Path]
    ids: int
    images_per_id: int
    seed: int
    workers: Optional[int]
    pretrain_overrides: tuple[str, ...]
    finetune_overrides: tuple[str, ...]
    progress: bool
    seeds: tuple[int, ...] = (0,)
    imagenet: Optional[Path] = None
    threads: int = 1
    jobs: int = 1
    pretrain_threads: int = 1
    #: the pre-training's threads while fine-tuning runs use the other cores (0: never side by side)
    shared_pretrain_threads: int = 0
    label_fraction: float = 0.0

    @property
    def layout(self) -> str:
        return METHOD_LAYOUTS[self.method]

    @property
    def data_dir(self) -> Path:
        return self.root if self.root is not None else self.run_dir / "data"

    @property
    def shards_dir(self) -> Path:
        return self.run_dir / "shards"

    @property
    def pretrain_dir(self) -> Path:
        return self.run_dir / "pretrain"

    @property
    def backbone_file(self) -> Path:
        return self.run_dir / "backbone.pt"

    def finetune_dir(self, name: str) -> Path:
        return self.run_dir / f"finetune-{name}"

    def log_file(self, stage: str) -> Path:
        return self.run_dir / "logs" / f"{stage}.log"


def make_demo(args: argparse.Namespace) -> Demo:
    """The run described by the command line; bad values are a :class:`UserError`."""
    plan = PLANS[(args.method, args.scale)]
    root = args.root.expanduser().resolve() if args.root is not None else None
    name = f"{args.method}-{args.scale}" + (f"-{root.name}" if root is not None else "")
    for option, value in (("--ids", args.ids), ("--images_per_id", args.images_per_id), ("--workers", args.workers),
                          ("--seeds", args.seeds), ("--threads", args.threads), ("--jobs", args.jobs)):
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: must be at least 1")
    if root is not None and not root.is_dir():
        raise UserError(f"--root {root} is not a folder (expected a {METHOD_LAYOUTS[args.method]} dataset)")
    output_folder(args.out, "--out", create=False)
    imagenet = args.imagenet.expanduser().resolve() if args.imagenet is not None else None
    if imagenet is not None and not imagenet.is_file():
        raise UserError(f"--imagenet {args.imagenet}: no such file (expected an ImageNet ResNet-50 state dict)")
    if imagenet is not None and args.method != "mmgl":
        raise UserError("--imagenet: the ImageNet-init arm is a ResNet-50 for the MMGL path (--method mmgl)")
    if args.label_fraction is not None and not 0 <= args.label_fraction < 1:
        raise UserError(f"--label_fraction {args.label_fraction}: expected a fraction in [0, 1) (0: no label-scarce arms)")
    cores = idle_cores()
    jobs = args.jobs or max(1, min(2, cores))
    threads = args.threads or max(1, cores // jobs)
    pretrain_threads = args.threads or cores
    # Beside the pre-training, the runs that need no pre-trained backbone use the cores it
    # leaves: on 2 cores the small MMGL pre-training took 39.5 s on 2 threads alone and 48.2 s on
    # 1 beside a fine-tuning run, and the whole demo 3m 30s -> 3m 09s (README "Threads"). Not on
    # a GPU, where the runs would share the one device's memory and time.
    shared = 0
    if jobs > 1 and not torch.cuda.is_available():
        shared = args.threads or max(1, cores - threads)
    return Demo(args.method, args.scale, plan, args.out.expanduser().resolve() / name, root,
                args.ids or plan.ids, args.images_per_id or plan.images_per_id, args.seed, args.workers,
                setting_tokens(args.pretrain, "pretrain"), setting_tokens(args.finetune, "finetune"),
                progress=not args.quiet and sys.stderr.isatty(),
                seeds=tuple(args.seed + i for i in range(args.seeds or plan.seeds)), imagenet=imagenet,
                threads=threads, jobs=jobs, pretrain_threads=pretrain_threads, shared_pretrain_threads=shared,
                label_fraction=plan.label_fraction if args.label_fraction is None else args.label_fraction)


class StageRecords:
    """``stages.json`` in the run folder: the settings each stage last started with.

    A stage is reused or resumed only when its settings are the ones recorded; otherwise its
    output is deleted first. The record is written when a stage starts, so an interrupted stage
    resumes on the next run with the same settings.
    """

    def __init__(self, run_dir: Path, fresh: bool) -> None:
        self.path = run_dir / STAGES_FILE
        self.records: dict[str, Any] = {} if fresh or not self.path.is_file() else json.loads(self.path.read_text())

    def start(self, stage: str, key: Any, output: Path) -> str:
        """Record ``key`` for ``stage``. Returns ``same`` (the settings ``output`` was made with:
        kept), ``changed`` or ``new`` (``output`` removed: nothing stale is ever reused)."""
        key = json.loads(json.dumps(key))  # tuples as lists, as the file holds them
        previous = self.records.get(stage)
        status = "same" if previous == key else "new" if previous is None else "changed"
        if status != "same":
            _remove(output)
        self.records[stage] = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.records, indent=1) + "\n")
        return status


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class StageClock:
    """Prints ``[i/n] stage ... what happened (time)`` lines and keeps them for results.json."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.done = total, 0, []

    def run(self, name: str, action) -> Any:
        """Run ``action() -> (result, note)`` and print its line; returns ``result``."""
        self.index += 1
        print(f"[{self.index}/{self.total}] {name} ...", flush=True)
        start = time.perf_counter()
        result, note = action()
        seconds = time.perf_counter() - start
        print(f"[{self.index}/{self.total}] {name}: {note} ({_duration(seconds)})", flush=True)
        self.done.append({"stage": name, "seconds": round(seconds, 1), "note": note})
        return result


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{seconds:.1f}s"


def stage_data(demo: Demo, records: StageRecords) -> tuple[None, str]:
    """The synthetic dataset (generated once per size and seed; the generator writes a hidden
    folder and renames it, so an existing ``data/`` is complete)."""
    key = {"layout": demo.layout, "ids": demo.ids, "images_per_id": demo.images_per_id, "seed": demo.seed}
    if records.start("data", key, demo.data_dir) == "same" and demo.data_dir.is_dir():
        return None, f"reused {demo.data_dir}"
    info = generate(demo.layout, demo.data_dir, ids=demo.ids, seed=demo.seed, workers=demo.workers,
                    images_per_id=demo.images_per_id)
    return None, (f"{info.images} images of {info.identities} identities ({info.rgb_images} RGB, "
                  f"{info.ir_images} IR) in {demo.data_dir}")


def stage_shards(demo: Demo) -> tuple[Any, str]:
    """Shards of the data, verified, with their summary table and a contact sheet. The builder
    itself reuses shards up to date with the inputs; the folder is the demo's own, so shards of
    other inputs (a new dataset size) are replaced."""
    manifest_file = demo.shards_dir / MANIFEST_NAME
    before = manifest_file.stat().st_mtime_ns if manifest_file.is_file() else None
    manifest = build(demo.layout, demo.data_dir, demo.shards_dir, seed=demo.seed, workers=demo.workers,
                     overwrite=True)
    problems = verify(demo.shards_dir)
    if problems:  # written a moment ago: a disk or file-system fault, not a setting
        raise StageFailed(f"shards failed verification: {problems[0].file}: {problems[0].reason} "
                          f"({len(problems)} problem(s)); re-run with --fresh")
    print("\n".join(f"    {line}".rstrip() for line in summary_table(manifest).splitlines()), flush=True)
    contact_sheet(random_samples(demo.shards_dir, manifest, 48, None, demo.seed)).save(demo.run_dir / SHEET_FILE)
    reused = before is not None and manifest_file.stat().st_mtime_ns == before
    return manifest, (f"{'up to date, reused' if reused else 'built'} and verified: {len(manifest.shards)} shards "
                      f"in {demo.shards_dir}, samples in {SHEET_FILE}")


def pretrain_tokens(demo: Demo) -> list[str]:
    """The ``train.pretrain`` settings: the scale's, the user's, then the demo's paths."""
    return [*demo.plan.pretrain, *demo.pretrain_overrides, "--shards", str(demo.shards_dir),
            "--output_dir", str(demo.pretrain_dir), "--seed", str(demo.seed)]


def pretrain_state(demo: Demo, max_steps: int) -> Optional[tuple[int, int]]:
    """``(steps done, steps the run will make)`` of the latest checkpoint, or None."""
    found = list_checkpoints(demo.pretrain_dir / CHECKPOINTS)
    if not found:
        return None
    state = json.loads((found[-1] / STATE_FILE).read_text())
    total = int(state["total_steps"])
    return int(state["step"]), min(total, max_steps) if max_steps else total


def stage_pretrain(demo: Demo, records: StageRecords, fingerprint: str, pool: JobPool) -> tuple[None, str]:
    """Pre-train in a child process; resume an unfinished run, skip a finished one. While it
    runs, ``pool``'s queued runs use the cores it leaves (``demo.shared_pretrain_threads``);
    with none queued it has ``demo.pretrain_threads``."""
    config = pretrain_config(demo.method, demo.plan.pretrain_preset, pretrain_tokens(demo))
    key = {"config": config.to_dict(), "shards": fingerprint}
    key["config"]["train"].pop("progress_bar")  # display only: never a reason to recompute
    status = records.start("pretrain", key, demo.pretrain_dir)
    state = pretrain_state(demo, config.train.max_steps)
    if state is not None and state[0] >= state[1]:
        return None, f"finished run reused ({state[0]} steps, {demo.pretrain_dir})"
    command = [sys.executable, "-m", "train.pretrain", "--preset", demo.plan.pretrain_preset,
               *pretrain_tokens(demo), f"--progress_bar={str(demo.progress).lower()}"]
    if state is not None:
        command.append("--resume")
    shared = bool(pool.pending) and demo.shared_pretrain_threads > 0
    pool.slots = demo.jobs - 1 if shared else 0
    threads = demo.shared_pretrain_threads if shared else demo.pretrain_threads
    run_child(command, demo.log_file("pretrain"), demo.progress, threads, while_waiting=pool.poll)
    if state is not None:
        how = f"resumed at step {state[0]}"
    else:
        how = "settings changed, recomputed" if status == "changed" else "trained"
    steps = pretrain_state(demo, config.train.max_steps)
    beside = f", {threads} thread(s) beside {pool.slots} fine-tuning run(s) at a time" if shared else ""
    return None, f"{how}: {steps[0] if steps else 0} steps in {demo.pretrain_dir}{beside}"


def stage_export(demo: Demo) -> tuple[None, str]:
    """The pre-trained backbone in the native format (recomputed every run: it takes a second)."""
    export(demo.pretrain_dir, "native", demo.backbone_file)
    return None, f"wrote {demo.backbone_file}"


@dataclass(frozen=True)
class Arm:
    """One fine-tuning setting: the initialisation and the fraction of training identities
    whose labels it uses (1: all; less: the label-scarce setting)."""

    init: str
    label_fraction: float = 1.0

    @property
    def name(self) -> str:
        return self.init if self.label_fraction >= 1 else f"{self.init}-{round(100 * self.label_fraction)}%labels"

    @property
    def labels(self) -> str:
        """The label setting, as the verdict lines group arms."""
        return "all labels" if self.label_fraction >= 1 else f"{round(100 * self.label_fraction)}% of the ids labelled"


def demo_arms(demo: Demo) -> list[Arm]:
    """Every (init, labels) arm: pre-trained and random init (and ImageNet with ``--imagenet``),
    with all labels and, when the scale has one, the label-scarce fraction."""
    inits = [*INITS, *(["imagenet"] if demo.imagenet is not None else [])]
    fractions = [1.0, *([demo.label_fraction] if demo.label_fraction else [])]
    return [Arm(init, fraction) for fraction in fractions for init in inits]


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}-seed{seed}"


def finetune_tokens(demo: Demo, arm: Arm, seed: int) -> list[str]:
    """The ``train.finetune`` settings of one (arm, seed) run. The first seed is the
    pre-training's, so its random init is the very initialisation the pre-training started from
    (the same factory and seed). The ImageNet arm needs the ResNet-50 a file of that kind fits."""
    arch = ["--arch", "resnet50_two_stream"] if arm.init == "imagenet" else []
    fraction = ["--label_fraction", str(arm.label_fraction)] if arm.label_fraction < 1 else []
    return [*demo.plan.finetune, *demo.finetune_overrides, *arch, *fraction,
            "--output_dir", str(demo.finetune_dir(run_name(arm, seed))), "--seed", str(seed)]


def init_argument(demo: Demo, arm: Arm) -> str:
    if arm.init == "pretrained":
        return str(demo.backbone_file)
    return f"{IMAGENET_PREFIX}{demo.imagenet}" if arm.init == "imagenet" else "random"


def init_fingerprint(demo: Demo, arm: Arm) -> str:
    if arm.init == "pretrained":
        return _sha256(demo.backbone_file)
    return _sha256(demo.imagenet) if arm.init == "imagenet" else "random"


@dataclass
class FinetuneJob:
    """One fine-tuning run to start (or a finished one, reused)."""

    arm: Arm
    seed: int
    command: list[str]
    out: Path
    status: str
    process: Optional[subprocess.Popen] = None
    log: Any = None


def finetune_job(demo: Demo, records: StageRecords, arm: Arm, seed: int, fingerprint: str) -> FinetuneJob:
    """The job of one (arm, seed) run; its stage record decides reuse (``status`` ``same`` with
    a results.json: nothing to run) or recomputation."""
    init = init_argument(demo, arm)
    tokens = finetune_tokens(demo, arm, seed)
    config = finetune_config(demo.plan.finetune_preset, tokens, shards=str(demo.shards_dir), init=init)
    key = {"config": {k: v for k, v in asdict(config).items() if k != "progress_bar"}, "shards": fingerprint,
           "init": init_fingerprint(demo, arm)}
    out = demo.finetune_dir(run_name(arm, seed))
    status = records.start(f"finetune-{run_name(arm, seed)}", key, out)
    command = [sys.executable, "-m", "train.finetune", "--preset", demo.plan.finetune_preset,
               "--shards", str(demo.shards_dir), "--init", init, "--resume", "latest", *tokens,
               "--progress_bar=false"]
    return FinetuneJob(arm, seed, command, out, status)


def finetune_jobs(demo: Demo, records: StageRecords, fingerprint: str, inits: tuple[str, ...]) -> list[FinetuneJob]:
    """The jobs of every (arm, seed) whose init is in ``inits``, seed-major (every arm's first
    seed before any arm's second)."""
    return [finetune_job(demo, records, arm, seed, fingerprint)
            for seed in demo.seeds for arm in demo_arms(demo) if arm.init in inits]


class JobPool:
    """Fine-tuning runs as child processes of ``demo.threads`` threads, ``slots`` at a time (on
    a small CPU two one-thread runs side by side do more than one two-thread run).

    :meth:`poll` starts and reaps; it is called while the pre-training runs (with one slot fewer:
    the runs that do not need the pre-trained backbone use the cores it leaves) and then until
    every run has finished. Longer runs start first (all labels before a label fraction), so the
    last ones do not leave a core idle. A finished run prints one line; a failed one stops the
    others and is a :class:`StageFailed`."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.pending: list[FinetuneJob] = []
        self.running: list[FinetuneJob] = []
        self.slots = demo.jobs
        self.finished = 0

    def add(self, jobs: list[FinetuneJob]) -> None:
        """Queue the jobs that have no finished run with the same settings."""
        self.pending += [j for j in jobs if not (j.status == "same" and (j.out / RESULTS_FILE).is_file())]
        self.pending.sort(key=lambda j: -j.arm.label_fraction)  # stable: seed-major within a fraction

    def poll(self) -> None:
        """Start pending runs into free slots; reap the finished ones."""
        while self.pending and len(self.running) < self.slots:
            self._start(self.pending.pop(0))
        for job in [j for j in self.running if j.process.poll() is not None]:
            self.running.remove(job)
            job.log.close()
            if job.process.returncode:
                self.stop(None)
                log = Path(job.log.name)
                lines = [line for line in log.read_text().splitlines() if line.strip()]
                raise StageFailed(f"train.finetune failed (exit status {job.process.returncode}): "
                                  f"{lines[-1] if lines else ''} -- log: {log}")
            self.finished += 1
            print_run(job)

    def drain(self) -> None:
        """Poll until every queued run has finished."""
        while self.pending or self.running:
            self.poll()
            time.sleep(0.2)

    def stop(self, err: Optional[BaseException]) -> None:
        """Stop the running runs: with the signal the demo got (``err`` a KeyboardInterrupt: they
        save nothing half-written and stop with one line, as common.interrupts.wait_child), else
        SIGTERM; killed after the grace period."""
        self.pending.clear()
        stop_children([job.process for job in self.running], err)
        for job in self.running:
            job.log.close()
        self.running.clear()

    def _start(self, job: FinetuneJob) -> None:
        job.log = open(self.demo.log_file(f"finetune-{run_name(job.arm, job.seed)}"), "a")
        job.log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}\n{' '.join(job.command)}\n\n")
        job.log.flush()
        job.process = subprocess.Popen(job.command, stdout=job.log, stderr=subprocess.STDOUT,
                                       env=thread_environment(self.demo.threads))
        self.running.append(job)


def print_run(job: FinetuneJob) -> None:
    """The line of one finished run: cross-modal (or Market) R1 and mAP, RGB->RGB R1, time."""
    result = read_finetune(job.out)
    same = result["same_modality"]
    how = "settings or init changed, recomputed: " if job.status == "changed" else ""
    print(f"    {run_name(job.arm, job.seed):<34} {how}R1 {100 * result['metrics']['R1']:.2f}, "
          f"mAP {100 * result['metrics']['mAP']:.2f}"
          + (f", RGB->RGB R1 {100 * same['R1']:.2f}" if same else "")
          + f" ({_duration(result['seconds'])})", flush=True)


def stage_finetune(demo: Demo, records: StageRecords, fingerprint: str, pool: JobPool,
                   early: list[FinetuneJob]) -> tuple[dict[str, dict], str]:
    """Every (arm, seed) fine-tuning: ``early`` (the jobs queued before the pre-training, which
    need no pre-trained backbone) and the pre-trained arm's, all ``demo.jobs`` at a time.
    Finished runs with the same settings and init are reused. Returns ``{run name:
    read_finetune(...)}`` in arm order."""
    late = finetune_jobs(demo, records, fingerprint, ("pretrained",))
    done_early = pool.finished
    pool.slots = demo.jobs
    pool.add(late)
    pool.drain()
    by_name = {run_name(j.arm, j.seed): j for j in [*early, *late]}
    order = [run_name(arm, seed) for seed in demo.seeds for arm in demo_arms(demo)]
    runs = {name: {"arm": by_name[name].arm.name, "init": by_name[name].arm.init,
                   "label_fraction": by_name[name].arm.label_fraction, "seed": by_name[name].seed,
                   **read_finetune(by_name[name].out)} for name in order}
    reused = len(order) - pool.finished
    note = f"{len(order)} runs ({len(demo_arms(demo))} arms x {len(demo.seeds)} seeds)"
    if done_early:
        note += f", {done_early} of them during the pre-training"
    return runs, note + (f", {reused} finished run(s) reused" if reused else "") + f" in {demo.run_dir}"


def thread_environment(threads: int) -> dict[str, str]:
    """The environment of a training child: ``threads`` intra-op threads (torch reads these at
    start). Without it each child takes every core, and children side by side, or another
    process on the machine, oversubscribe the cores (measured: 17x slower, issue 13)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_child(command: list[str], log: Path, progress: bool, threads: int,
              while_waiting: Optional[Callable[[], None]] = None) -> None:
    """Run a training stage with ``threads`` threads; its stdout (and stderr, unless a progress
    bar shows there) is appended to ``log`` (a resumed stage keeps the earlier part).
    ``while_waiting`` is called every 0.2 s while it runs. A failure is a
    :class:`StageFailed` naming the log and its last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}\n{' '.join(command)}\n\n")
        f.flush()
        with subprocess.Popen(command, stdout=f, stderr=None if progress else subprocess.STDOUT,
                              env=thread_environment(threads)) as child:
            # a stopped demo stops its stage too (common.interrupts)
            code = wait_child(child, while_waiting=while_waiting)
    if code:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise StageFailed(f"{command[2]} failed (exit status {code}): {lines[-1] if lines else ''} -- log: {log}")


def read_finetune(out: Path) -> dict:
    """Final metrics (``results.json``) and history (the latest checkpoint's) of a fine-tuning run."""
    report = json.loads((out / RESULTS_FILE).read_text())
    first = report["results"][0]
    history = json.loads((resolve_checkpoint("latest", out) / STATE_FILE).read_text()).get("history", [])
    metrics = {k: first[k] for k in ("R1", "R5", "R10", "R20", "mAP", "mINP")}
    return {"metrics": metrics, "same_modality": report.get("same_modality"), "setting": first["setting"],
            "protocol": first["protocol"], "trials": len(first["trials"]), "queries": first["queries"],
            "gallery": first["gallery"], "labelled_ids": report.get("labelled_ids"),
            "seconds": report["seconds"], "history": history, "output_dir": str(out)}


# --------------------------------------------------------------------------------------------
# Report: per-run summary, arms with mean and spread, verdicts, results.json, curves.png
# --------------------------------------------------------------------------------------------

#: The papers' results beside ours at ``--scale full`` (SYSU-MM01 all-search single-shot /
#: Market-1501; R1, mAP in percent), from the MMGL and AGW READMEs (DESIGN.md section 5) and
#: PASS-reID's (ViT-S, 256x128).
PAPER = {"mmgl": {"pretrained": (56.97, 54.61), "imagenet": (47.50, 47.65)},
         "pass": {"pretrained": (96.3, 92.2)}}
SUMMARY_METRICS = ("R1", "mAP", "mINP", "same_modality_R1")


def summary_rows(runs: dict[str, dict]) -> list[dict]:
    """One row per (arm, seed): ``arm``, ``seed``, ``R1``, ``mAP``, ``mINP``, ``same_modality_R1``
    (fractions; the last None where the layout has no same-modality figure)."""
    rows = []
    for run in runs.values():
        same = run["same_modality"]
        rows.append({"arm": run["arm"], "seed": run["seed"], **{k: run["metrics"][k] for k in ("R1", "mAP", "mINP")},
                     "same_modality_R1": same["R1"] if same else None})
    return rows


def arm_statistics(rows: list[dict]) -> dict[str, dict]:
    """Per arm and metric: ``mean`` and ``spread`` (max - min over the seeds: with two or three
    seeds, the range is the honest noise figure) and the per-seed values, in arm order."""
    arms: dict[str, dict] = {}
    for row in rows:
        arms.setdefault(row["arm"], {"seeds": []})["seeds"].append(row["seed"])
    for name, arm in arms.items():
        mine = [r for r in rows if r["arm"] == name]
        for metric in SUMMARY_METRICS:
            values = [r[metric] for r in mine if r[metric] is not None]
            arm[metric] = ({"mean": sum(values) / len(values), "spread": max(values) - min(values), "values": values}
                           if values else None)
    return arms


def verdict(difference: float, spread: float) -> str:
    """``better`` / ``worse`` when ``|difference|`` (pre-trained - random, mean R1) is at least
    ``spread`` (the larger of the two arms' seed ranges), else ``within noise``."""
    if abs(difference) < spread or difference == 0:
        return "within noise"
    return "better" if difference > 0 else "worse"


def verdicts(arms: list[Arm], stats: dict[str, dict]) -> list[dict]:
    """For each label setting, the pre-trained arm against random init (and ImageNet against
    random, when present), on mean R1."""
    lines = []
    for arm in arms:
        if arm.init == "random":
            continue
        base = Arm("random", arm.label_fraction).name
        a, b = stats[arm.name]["R1"], stats[base]["R1"]
        difference, spread = a["mean"] - b["mean"], max(a["spread"], b["spread"])
        lines.append({"arm": arm.name, "against": base, "labels": arm.labels, "R1_difference": difference,
                      "spread": spread, "verdict": verdict(difference, spread)})
    return lines


def chance_r1(test_ids: int) -> float:
    """R1 of a random ranking when every test identity has as many gallery images: 1 / ids."""
    return 1.0 / max(test_ids, 1)


def _pct(stat: Optional[dict]) -> str:
    if stat is None:
        return f"{'-':>15}"
    return f"{100 * stat['mean']:7.2f} ±{100 * stat['spread'] / 2:5.2f}"


def comparison_table(demo: Demo, document: dict) -> str:
    """Every arm's mean ± half the seed range (percent) of R1, mAP, mINP and the same-modality
    R1, chance R1 and the test identities, then the verdict lines."""
    first = next(iter(document["finetune"]["runs"].values()))
    titles = {"pretrained": METHOD_TITLES[demo.method], "random": "random init", "imagenet": "ImageNet init"}
    seeds = ", ".join(str(s) for s in demo.seeds)
    # RGB->RGB only where the layout has two modalities (SYSU-MM01; Market-1501 is RGB only)
    same = any(row["same_modality_R1"] is not None for row in document["summary"])
    metrics = SUMMARY_METRICS if same else SUMMARY_METRICS[:-1]
    lines = [f"{first['setting']} (protocol {first['protocol']}, {first['trials']} trial(s); {first['queries']} "
             f"queries, gallery {first['gallery']:.0f} images; {document['test_ids']} test identities, chance R1 "
             f"{100 * document['chance_R1']:.2f}%)",
             f"mean ± half the range over fine-tuning seeds {seeds}"
             + ("; RGB->RGB: same-modality R1, other camera" if same else ""),
             f"{'arm':<44} {'R1':>15} {'mAP':>15} {'mINP':>15}" + (f" {'RGB->RGB R1':>15}" if same else "")]
    paper = PAPER.get(demo.method, {}) if demo.scale == "full" else {}
    for arm in demo_arms(demo):
        stat = document["arms"][arm.name]
        title = titles[arm.init] + ("" if arm.label_fraction >= 1 else f", {arm.labels}")
        lines.append(f"{title:<44} " + " ".join(_pct(stat[k]) for k in metrics)
                     + (f"   paper: R1 {paper[arm.init][0]:.2f}, mAP {paper[arm.init][1]:.2f}"
                        if arm.init in paper and arm.label_fraction >= 1 else ""))
    for line in document["verdicts"]:
        lines.append(f"verdict ({line['labels']}): {line['arm']} - {line['against']} = {100 * line['R1_difference']:+.2f} "
                     f"R1, seed spread {100 * line['spread']:.2f}: {line['verdict']}")
    return "\n".join(lines)


def pretrain_curve(demo: Demo) -> list[dict]:
    """The pre-training metric lines (``metrics.jsonl``: loss terms, accuracies, lr; ``monitor``
    records: the frozen backbone's retrieval)."""
    path = demo.pretrain_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_curves(demo: Demo, pretrain: list[dict], runs: dict[str, dict], path: Path) -> None:
    """Six panels: pre-training losses; accuracies (MMGL: permutation, PCC) or per-token losses
    (PASS); the frozen backbone's retrieval during pre-training (``--monitor_every``);
    fine-tuning loss per epoch, R1 per evaluation (every run, coloured by arm) and final R1 per arm."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    steps_rows = [row for row in pretrain if row.get("kind") != "monitor"]
    monitor_rows = [row for row in pretrain if row.get("kind") == "monitor"]
    steps = [row["step"] for row in steps_rows]
    ax = axes[0][0]
    for name in [k for k in ("loss", "loss_perm", "loss_pcc") if steps_rows and k in steps_rows[0]]:
        ax.plot(steps, [row[name] for row in steps_rows], label=name)
    ax.set(title=f"pre-training ({demo.method.upper()}): loss", xlabel="step")
    ax = axes[0][1]
    accuracies = [k for k in ("perm_acc", "perm_acc_stripe", "pcc_acc") if steps_rows and k in steps_rows[0]]
    others = sorted(k for k in (steps_rows[0] if steps_rows else {}) if k.startswith("loss_"))
    for name in accuracies or others:
        ax.plot(steps, [row[name] for row in steps_rows], label=name)
    ax.set(title="pre-training: " + ("permutation / PCC accuracy" if accuracies else "loss per token"), xlabel="step")
    ax = axes[0][2]
    for name, style in (("R1", "o-"), ("mAP", "s-"), ("same_modality_R1", "^--")):
        points = [(row["epoch"], 100 * row[name]) for row in monitor_rows if name in row]
        if points:
            ax.plot(*zip(*points), style, label="RGB->RGB R1" if name == "same_modality_R1" else name)
    ax.set(title="pre-training: frozen backbone retrieval (%)", xlabel="epoch")
    colours = {arm.name: f"C{i}" for i, arm in enumerate(demo_arms(demo))}
    labelled = set()
    for run in runs.values():
        train = [h for h in run["history"] if h["kind"] == "train"]
        evals = [h for h in run["history"] if h["kind"] == "eval"]
        label = None if run["arm"] in labelled else run["arm"]
        labelled.add(run["arm"])
        axes[1][0].plot([h["epoch"] + 1 for h in train], [h["loss"] for h in train], color=colours[run["arm"]],
                        label=label)
        axes[1][1].plot([h["epoch"] + 1 for h in evals], [100 * h["R1"] for h in evals], "o-",
                        color=colours[run["arm"]], label=label)
    axes[1][0].set(title="fine-tuning: loss (ID + triplet)", xlabel="epoch")
    first = next(iter(runs.values()))
    axes[1][1].set(title=f"fine-tuning: {first['setting']} R1 (%)", xlabel="epoch")
    ax = axes[1][2]
    names = [arm.name for arm in demo_arms(demo)]
    for i, name in enumerate(names):
        values = [100 * run["metrics"]["R1"] for run in runs.values() if run["arm"] == name]
        ax.scatter([i] * len(values), values, color=colours[name])
        ax.bar(i, sum(values) / len(values), color=colours[name], alpha=0.4)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    ax.set(title="final R1 per arm (%): bar = mean, dots = seeds")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.has_data() and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_document(demo: Demo, manifest, pretrain: list[dict], runs: dict[str, dict], stages: list[dict],
                     wall: float) -> dict:
    """Everything measured, for ``results.json``."""
    first = next(iter(runs.values()))
    rows = summary_rows(runs)
    stats = arm_statistics(rows)
    test_ids = manifest.splits["query"].total.identities if "query" in manifest.splits else None
    return {
        "method": demo.method, "scale": demo.scale,
        "dataset": {"layout": demo.layout, "root": str(demo.data_dir), "synthetic": demo.root is None,
                    "ids": demo.ids if demo.root is None else None,
                    "images_per_id": demo.images_per_id if demo.root is None else None,
                    "splits": {s: c.total.images for s, c in manifest.splits.items()}},
        "protocol": first["protocol"], "setting": first["setting"], "trials": first["trials"],
        "test_ids": test_ids, "chance_R1": chance_r1(test_ids or 1),
        "summary": rows, "arms": stats, "verdicts": verdicts(demo_arms(demo), stats),
        "paper": PAPER.get(demo.method, {}) if demo.scale == "full" else {},
        "pretrain": {"preset": demo.plan.pretrain_preset, "overrides": [*demo.plan.pretrain, *demo.pretrain_overrides],
                     "last": next((r for r in reversed(pretrain) if r.get("kind") != "monitor"), None),
                     "monitor": [r for r in pretrain if r.get("kind") == "monitor"], "curve": pretrain},
        "finetune": {"preset": demo.plan.finetune_preset, "overrides": [*demo.plan.finetune, *demo.finetune_overrides],
                     "seeds": list(demo.seeds), "runs": runs},
        "stages": stages,
        "machine": {"cpus": os.cpu_count(), "cpus_available": available_cores(), "threads": demo.threads,
                    "pretrain_threads": demo.pretrain_threads, "shared_pretrain_threads": demo.shared_pretrain_threads,
                    "jobs": demo.jobs, "load_average": list(os.getloadavg()), "wall_seconds": round(wall, 1),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "paths": {"run": str(demo.run_dir), "shards": str(demo.shards_dir), "pretrain": str(demo.pretrain_dir),
                  "backbone": str(demo.backbone_file), "finetune": str(demo.run_dir / "finetune-*"),
                  "curves": str(demo.run_dir / CURVES_FILE), "contact_sheet": str(demo.run_dir / SHEET_FILE),
                  "logs": str(demo.run_dir / "logs")},
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def check_settings(demo: Demo) -> None:
    """Resolve and validate both configurations up front, so a bad ``--pretrain`` /
    ``--finetune`` value is a one-line error before any data is made or trained on."""
    pretrain_config(demo.method, demo.plan.pretrain_preset, pretrain_tokens(demo)).train.validate()
    for arm in demo_arms(demo):
        finetune_config(demo.plan.finetune_preset, finetune_tokens(demo, arm, demo.seeds[0]),
                        shards=str(demo.shards_dir), init="random").validate()


def run(demo: Demo, fresh: bool) -> dict:
    """Every stage, then the report; returns the results document. The fine-tuning runs that
    need no pre-trained backbone are queued before the pre-training and start beside it."""
    started = time.perf_counter()
    check_settings(demo)
    records = StageRecords(demo.run_dir, fresh)
    clock = StageClock(total=5 if demo.root is not None else 6)
    if demo.root is None:
        clock.run("data", lambda: stage_data(demo, records))
    manifest = clock.run("shards", lambda: stage_shards(demo))
    pool = JobPool(demo)
    try:
        early = finetune_jobs(demo, records, manifest.fingerprint, ("random", "imagenet"))
        pool.add(early)
        clock.run("pretrain", lambda: stage_pretrain(demo, records, manifest.fingerprint, pool))
        clock.run("export", lambda: stage_export(demo))
        runs = clock.run("finetune", lambda: stage_finetune(demo, records, manifest.fingerprint, pool, early))
    except BaseException as err:  # a stopped or failed demo stops its runs too
        pool.stop(err)
        raise
    pretrain = pretrain_curve(demo)
    document = results_document(demo, manifest, pretrain, runs, clock.done, time.perf_counter() - started)
    return clock.run("report", lambda: write_report(demo, document, pretrain, runs))


def write_report(demo: Demo, document: dict, pretrain: list[dict], runs: dict[str, dict]) -> tuple[dict, str]:
    write_curves(demo, pretrain, runs, demo.run_dir / CURVES_FILE)
    (demo.run_dir / RESULTS_FILE).write_text(json.dumps(document, indent=1) + "\n")
    return document, f"wrote {CURVES_FILE} and {RESULTS_FILE}"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    demo = make_demo(args)
    print(f"demo: {demo.method} at {demo.scale} scale on "
          f"{demo.root or f'synthetic {demo.layout} ({demo.ids} ids)'} -> {demo.run_dir}; "
          f"{available_cores()} core(s) available; pre-training on {demo.pretrain_threads} thread(s)"
          + (f" ({demo.shared_pretrain_threads} beside fine-tuning)" if demo.shared_pretrain_threads else "")
          + f", {demo.jobs} fine-tuning(s) at a time x {demo.threads} thread(s); "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    started = time.perf_counter()
    try:
        document = run(demo, args.fresh)
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print()
    print(comparison_table(demo, document))
    print()
    for name in ("shards", "backbone", "finetune", "curves", "logs"):
        print(f"{name:<20} {document['paths'][name]}")
    print(f"{'results':<20} {demo.run_dir / RESULTS_FILE}")
    print(f"wall time {_duration(time.perf_counter() - started)} on {available_cores()} core(s), load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
