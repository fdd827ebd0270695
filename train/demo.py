"""The main job: pre-train, fine-tune from the export and from random init, compare.

    python -m train.demo                        # MMGL on synthetic SYSU-MM01, small scale (4-10 min, 2 CPU cores)
    python -m train.demo --method pass          # PASS on synthetic Market-1501
    python -m train.demo --scale full --root /data/SYSU-MM01    # the full-size presets, for a GPU

Stages (each prints one line with its time when it ends)::

    data       synthetic dataset in the method's layout (skipped with --root)
    shards     shards build + verify + the summary table and contact-sheet.png (reused when up
               to date with the data)
    pretrain   python -m train.pretrain (resumes from its last checkpoint)
    export     python -m train.export --format native (recomputed: a second)
    finetune   python -m train.finetune from the export, then from random init, each evaluated
               under the layout's protocol (SYSU-MM01 all-search, 10 trials / Market-1501)

then the two results side by side, ``results.json`` (every number, both inits, the curves) and
``curves.png`` (pre-training loss and accuracy; fine-tuning loss and R1 / mAP per evaluation).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from common.cli import ArgumentParser, run_cli
from common.errors import UserError
from common.interrupts import wait_child
from common.outputs import output_folder
from shards.build import build
from shards.inspection import contact_sheet, random_samples, summary_table
from shards.manifest import MANIFEST_NAME
from shards.synthetic import generate
from shards.verify import verify
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


# Small MMGL: the width-8 two-stream test ResNet (the only small backbone the method offers) on
# 96x48 views: 6 stripes of 16 rows, one row each of the 6x3 feature map. MMGL's own loss
# weights (PCC 0.5). 8 epochs (~1,060 steps) lift per-stripe permutation accuracy from 1/6 to
# ~0.5; 20 epochs did not change the fine-tuned result (measured). 100 identities give 20 test
# identities; the AGW fine-tune is 10 epochs at the same 96x48.
_MMGL_SMALL_PRETRAIN = ("--epochs", "8", "--max_steps", "0", "--warmup_epochs", "0.5", "--log_every", "20")
_AGW_SMALL = ("--image_size", "96,48", "--pad", "6", "--ids_per_batch", "8", "--instances", "4",
              "--epochs", "10", "--steps_per_epoch", "0", "--warmup_epochs", "2", "--milestones", "6,9",
              "--eval_every", "2", "--eval_trials", "10")
_PASS_SMALL_PRETRAIN = ("--epochs", "10", "--max_steps", "0", "--batch_size", "32", "--warmup_epochs", "1",
                        "--log_every", "10")
# lr 1e-2 instead of TransReID's 4e-4 (tuned for a pre-trained ViT-S): at 4e-4 the 2-block test
# ViT's ID loss stayed at ln(50 classes) for 10 epochs, from either init (measured).
_TRANSREID_SMALL = ("--ids_per_batch", "8", "--instances", "4", "--epochs", "10", "--steps_per_epoch", "0",
                    "--warmup_epochs", "2", "--eval_every", "2", "--lr", "0.01")

PLANS: dict[tuple[str, str], Plan] = {
    ("mmgl", "tiny"): Plan(9, 8, "mmgl_tiny", ("--max_steps", "4", "--log_every", "2"),
                           "agw-tiny", ("--eval_trials", "10")),
    ("mmgl", "small"): Plan(100, 40, "mmgl_tiny", _MMGL_SMALL_PRETRAIN, "agw-tiny", _AGW_SMALL),
    ("mmgl", "full"): Plan(491, 87, "mmgl_sysu", (), "agw-sysu", ()),
    ("pass", "tiny"): Plan(10, 6, "pass_tiny", ("--max_steps", "4", "--log_every", "2"), "transreid-tiny", ()),
    ("pass", "small"): Plan(100, 17, "pass_tiny", _PASS_SMALL_PRETRAIN, "transreid-tiny", _TRANSREID_SMALL),
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
                        help="tiny: seconds, a smoke test (the tests); small (default): 4-10 min on a 2-core "
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

    def finetune_dir(self, init: str) -> Path:
        return self.run_dir / f"finetune-{init}"

    def log_file(self, stage: str) -> Path:
        return self.run_dir / "logs" / f"{stage}.log"


def make_demo(args: argparse.Namespace) -> Demo:
    """The run described by the command line; bad values are a :class:`UserError`."""
    plan = PLANS[(args.method, args.scale)]
    root = args.root.expanduser().resolve() if args.root is not None else None
    name = f"{args.method}-{args.scale}" + (f"-{root.name}" if root is not None else "")
    for option, value in (("--ids", args.ids), ("--images_per_id", args.images_per_id), ("--workers", args.workers)):
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: must be at least 1")
    if root is not None and not root.is_dir():
        raise UserError(f"--root {root} is not a folder (expected a {METHOD_LAYOUTS[args.method]} dataset)")
    output_folder(args.out, "--out", create=False)
    return Demo(args.method, args.scale, plan, args.out.expanduser().resolve() / name, root,
                args.ids or plan.ids, args.images_per_id or plan.images_per_id, args.seed, args.workers,
                setting_tokens(args.pretrain, "pretrain"), setting_tokens(args.finetune, "finetune"),
                progress=not args.quiet and sys.stderr.isatty())


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


def stage_pretrain(demo: Demo, records: StageRecords, fingerprint: str) -> tuple[None, str]:
    """Pre-train in a child process; resume an unfinished run, skip a finished one."""
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
    run_child(command, demo.log_file("pretrain"), demo.progress)
    if state is not None:
        how = f"resumed at step {state[0]}"
    else:
        how = "settings changed, recomputed" if status == "changed" else "trained"
    steps = pretrain_state(demo, config.train.max_steps)
    return None, f"{how}: {steps[0] if steps else 0} steps in {demo.pretrain_dir}"


def stage_export(demo: Demo) -> tuple[None, str]:
    """The pre-trained backbone in the native format (recomputed every run: it takes a second)."""
    export(demo.pretrain_dir, "native", demo.backbone_file)
    return None, f"wrote {demo.backbone_file}"


def finetune_tokens(demo: Demo, init: str) -> list[str]:
    """The ``train.finetune`` settings. Both runs get the pre-training's seed, so the random init
    is the very initialisation the pre-training started from (the same factory and seed)."""
    return [*demo.plan.finetune, *demo.finetune_overrides, "--output_dir", str(demo.finetune_dir(init)),
            "--seed", str(demo.seed)]


def stage_finetune(demo: Demo, records: StageRecords, init: str, fingerprint: str) -> tuple[dict, str]:
    """Fine-tune and evaluate in a child process (``--resume latest``: an interrupted run
    continues); a finished run with the same settings and init is reused."""
    init_arg = str(demo.backbone_file) if init == "pretrained" else "random"
    config = finetune_config(demo.plan.finetune_preset, finetune_tokens(demo, init), shards=str(demo.shards_dir),
                            init=init_arg)
    key = {"config": {k: v for k, v in asdict(config).items() if k != "progress_bar"}, "shards": fingerprint,
           "init": _sha256(demo.backbone_file) if init == "pretrained" else "random"}
    out = demo.finetune_dir(init)
    status = records.start(f"finetune-{init}", key, out)
    if status == "same" and (out / RESULTS_FILE).is_file():
        return read_finetune(out), f"finished run reused ({out})"
    command = [sys.executable, "-m", "train.finetune", "--preset", demo.plan.finetune_preset,
               "--shards", str(demo.shards_dir), "--init", init_arg, "--resume", "latest",
               *finetune_tokens(demo, init), f"--progress_bar={str(demo.progress).lower()}"]
    run_child(command, demo.log_file(f"finetune-{init}"), demo.progress)
    result = read_finetune(out)
    how = "settings or init changed, recomputed: " if status == "changed" else ""
    return result, f"{how}R1 {100 * result['metrics']['R1']:.2f}, mAP {100 * result['metrics']['mAP']:.2f} ({out})"


def run_child(command: list[str], log: Path, progress: bool) -> None:
    """Run a training stage; its stdout (and stderr, unless a progress bar shows there) is
    appended to ``log`` (a resumed stage keeps the earlier part). A failure is a
    :class:`StageFailed` naming the log and its last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}\n{' '.join(command)}\n\n")
        f.flush()
        with subprocess.Popen(command, stdout=f, stderr=None if progress else subprocess.STDOUT) as child:
            code = wait_child(child)  # a stopped demo stops its stage too (common.interrupts)
    if code:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise StageFailed(f"{command[2]} failed (exit status {code}): {lines[-1] if lines else ''} -- log: {log}")


def read_finetune(out: Path) -> dict:
    """Final metrics (``results.json``) and history (the latest checkpoint's) of a fine-tuning run."""
    report = json.loads((out / RESULTS_FILE).read_text())
    first = report["results"][0]
    history = json.loads((resolve_checkpoint("latest", out) / STATE_FILE).read_text()).get("history", [])
    metrics = {k: first[k] for k in ("R1", "R5", "R10", "R20", "mAP", "mINP")}
    return {"metrics": metrics, "setting": first["setting"], "protocol": first["protocol"],
            "trials": len(first["trials"]), "queries": first["queries"], "gallery": first["gallery"],
            "seconds": report["seconds"], "history": history, "output_dir": str(out)}


# --------------------------------------------------------------------------------------------
# Report: the side-by-side table, results.json, curves.png
# --------------------------------------------------------------------------------------------


def comparison_table(demo: Demo, runs: dict[str, dict]) -> str:
    """Both inits' R1 / mAP / mINP (percent) and their difference, headed by the protocol."""
    first = runs["pretrained"]
    lines = [f"{first['setting']} (protocol {first['protocol']}, {first['trials']} trial(s); "
             f"{first['queries']} queries, gallery {first['gallery']:.0f} images)",
             f"{'initialisation':<22} {'R1':>7} {'mAP':>7} {'mINP':>7}"]
    titles = {"pretrained": METHOD_TITLES[demo.method], "random": "random init"}
    for init in INITS:
        m = runs[init]["metrics"]
        lines.append(f"{titles[init]:<22} " + " ".join(f"{100 * m[k]:7.2f}" for k in ("R1", "mAP", "mINP")))
    gain = {k: 100 * (runs["pretrained"]["metrics"][k] - runs["random"]["metrics"][k]) for k in ("R1", "mAP", "mINP")}
    lines.append(f"{'pre-trained - random':<22} " + " ".join(f"{gain[k]:+7.2f}" for k in ("R1", "mAP", "mINP")))
    return "\n".join(lines)


def pretrain_curve(demo: Demo) -> list[dict]:
    """The pre-training metric lines (``metrics.jsonl``: loss terms, accuracies, lr)."""
    path = demo.pretrain_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_curves(demo: Demo, pretrain: list[dict], runs: dict[str, dict], path: Path) -> None:
    """Four panels: pre-training losses; pre-training accuracies (MMGL: permutation, PCC) or
    per-token losses (PASS); fine-tuning loss per epoch and R1 / mAP per evaluation, both inits."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    steps = [row["step"] for row in pretrain]
    ax = axes[0][0]
    for name in [k for k in ("loss", "loss_perm", "loss_pcc") if pretrain and k in pretrain[0]]:
        ax.plot(steps, [row[name] for row in pretrain], label=name)
    ax.set(title=f"pre-training ({demo.method.upper()}): loss", xlabel="step")
    ax = axes[0][1]
    accuracies = [k for k in ("perm_acc", "pcc_acc") if pretrain and k in pretrain[0]]
    others = sorted(k for k in (pretrain[0] if pretrain else {}) if k.startswith("loss_"))
    for name in accuracies or others:
        ax.plot(steps, [row[name] for row in pretrain], label=name)
    ax.set(title="pre-training: " + ("permutation / PCC accuracy" if accuracies else "loss per token"),
           xlabel="step")
    styles, markers = {"pretrained": "-", "random": "--"}, {"pretrained": "o", "random": "s"}
    for init in INITS:
        history = runs[init]["history"]
        train = [h for h in history if h["kind"] == "train"]
        evals = [h for h in history if h["kind"] == "eval"]
        axes[1][0].plot([h["epoch"] + 1 for h in train], [h["loss"] for h in train], styles[init], label=init)
        for metric, colour in (("R1", "tab:blue"), ("mAP", "tab:orange")):
            axes[1][1].plot([h["epoch"] + 1 for h in evals], [100 * h[metric] for h in evals], styles[init],
                            color=colour, marker=markers[init], label=f"{metric} {init}")
    axes[1][0].set(title="fine-tuning: loss (ID + triplet)", xlabel="epoch")
    axes[1][1].set(title=f"evaluation: {runs['random']['setting']} (%)", xlabel="epoch")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_document(demo: Demo, manifest, pretrain: list[dict], runs: dict[str, dict], stages: list[dict]) -> dict:
    """Everything measured, for ``results.json``."""
    return {
        "method": demo.method, "scale": demo.scale,
        "dataset": {"layout": demo.layout, "root": str(demo.data_dir), "synthetic": demo.root is None,
                    "ids": demo.ids if demo.root is None else None,
                    "images_per_id": demo.images_per_id if demo.root is None else None,
                    "splits": {s: c.total.images for s, c in manifest.splits.items()}},
        "protocol": runs["pretrained"]["protocol"], "setting": runs["pretrained"]["setting"],
        "trials": runs["pretrained"]["trials"],
        "pretrain": {"preset": demo.plan.pretrain_preset, "overrides": [*demo.plan.pretrain, *demo.pretrain_overrides],
                     "last": pretrain[-1] if pretrain else None, "curve": pretrain},
        "finetune": {"preset": demo.plan.finetune_preset, "overrides": [*demo.plan.finetune, *demo.finetune_overrides],
                     **runs},
        "stages": stages,
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
        "paths": {"run": str(demo.run_dir), "shards": str(demo.shards_dir), "pretrain": str(demo.pretrain_dir),
                  "backbone": str(demo.backbone_file), **{f"finetune_{i}": str(demo.finetune_dir(i)) for i in INITS},
                  "curves": str(demo.run_dir / CURVES_FILE), "contact_sheet": str(demo.run_dir / SHEET_FILE), "logs": str(demo.run_dir / "logs")},
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def check_settings(demo: Demo) -> None:
    """Resolve and validate both configurations up front, so a bad ``--pretrain`` /
    ``--finetune`` value is a one-line error before any data is made or trained on."""
    pretrain_config(demo.method, demo.plan.pretrain_preset, pretrain_tokens(demo)).train.validate()
    finetune_config(demo.plan.finetune_preset, finetune_tokens(demo, "random"), shards=str(demo.shards_dir),
                    init="random").validate()


def run(demo: Demo, fresh: bool) -> dict:
    """Every stage, then the report; returns the results document."""
    check_settings(demo)
    records = StageRecords(demo.run_dir, fresh)
    clock = StageClock(total=6 if demo.root is not None else 7)
    if demo.root is None:
        clock.run("data", lambda: stage_data(demo, records))
    manifest = clock.run("shards", lambda: stage_shards(demo))
    clock.run("pretrain", lambda: stage_pretrain(demo, records, manifest.fingerprint))
    clock.run("export", lambda: stage_export(demo))
    runs = {init: clock.run(f"finetune from {init} init",
                            lambda init=init: stage_finetune(demo, records, init, manifest.fingerprint))
            for init in INITS}
    pretrain = pretrain_curve(demo)
    document = results_document(demo, manifest, pretrain, runs, clock.done)
    return clock.run("report", lambda: write_report(demo, document, pretrain, runs))


def write_report(demo: Demo, document: dict, pretrain: list[dict], runs: dict[str, dict]) -> tuple[dict, str]:
    write_curves(demo, pretrain, runs, demo.run_dir / CURVES_FILE)
    (demo.run_dir / RESULTS_FILE).write_text(json.dumps(document, indent=1) + "\n")
    return document, f"wrote {CURVES_FILE} and {RESULTS_FILE}"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    demo = make_demo(args)
    print(f"demo: {demo.method} at {demo.scale} scale on "
          f"{demo.root or f'synthetic {demo.layout} ({demo.ids} ids)'} -> {demo.run_dir}", flush=True)
    try:
        document = run(demo, args.fresh)
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print()
    print(comparison_table(demo, {init: document["finetune"][init] for init in INITS}))
    print()
    for name in ("shards", "backbone", "finetune_pretrained", "finetune_random", "curves", "logs"):
        print(f"{name:<20} {document['paths'][name]}")
    print(f"{'results':<20} {demo.run_dir / RESULTS_FILE}")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
