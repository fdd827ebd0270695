"""How learnable the synthetic data is: fine-tune from random init, report held-out retrieval.

    python -m benchmarks.learnability --work /tmp/learn --ids 150 --images-per-id 40 \\
        --finetune arch=resnet_narrow_two_stream --finetune backbone_lr_factor=1.0 ...

Steps (each reused when its output exists): generate a synthetic SYSU-MM01 tree; make a
*validation view* of it (:func:`validation_view`: the ``exp/val_id.txt`` identities play the
test role, the test identities are left out, so a recipe chosen here never sees them); build
shards of that view (or of the real split with ``--split test``); run ``python -m
train.finetune --preset agw-tiny`` with the given overrides (from random init, or from
``--init FILE``, e.g. a pre-training's export, to compare inits on validation identities); then
measure, on the held-out identities, cross-modal retrieval (the fine-tuning's own SYSU-MM01 all-search result) and
same-modality retrieval RGB->RGB (:func:`same_modality_metrics`: every RGB image queries the other
RGB images, those of its own camera removed, the Market rule). One JSON line per run goes to
``<work>/results.jsonl`` with the timings and the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import load_average
from common.cli import run_cli
from common.errors import UserError
from shards.manifest import load_manifest
from shards.synthetic import generate
from train.evaluation.features import SplitFeatures, extract_features
from train.evaluation.metrics import compute_metrics, distance_matrix
from train.finetune import load_for_evaluation

SYSU_CAMERA_FOLDERS = tuple(f"cam{c}" for c in range(1, 7))


def validation_view(root: Path, out: Path) -> Path:
    """A SYSU-MM01 tree at ``out`` whose test identities are ``root``'s validation identities.

    ``cam1..6`` are symbolic links to ``root``'s folders; ``exp/train_id.txt`` is ``root``'s,
    ``exp/val_id.txt`` is empty and ``exp/test_id.txt`` holds ``root``'s validation ids: built
    with ``--layout sysu-mm01``, the shards train on the training ids only and evaluate on the
    validation ids; the test identities are in no list and are dropped by the builder.
    """
    exp = root / "exp"
    val = (exp / "val_id.txt").read_text().strip()
    if not val:
        raise UserError(f"{exp / 'val_id.txt'} lists no identity: nothing to validate on")
    (out / "exp").mkdir(parents=True, exist_ok=True)
    for name in SYSU_CAMERA_FOLDERS:
        link = out / name
        if not link.exists():
            link.symlink_to((root / name).resolve(), target_is_directory=True)
    (out / "exp" / "train_id.txt").write_text((exp / "train_id.txt").read_text())
    (out / "exp" / "val_id.txt").write_text("\n")
    (out / "exp" / "test_id.txt").write_text(val + "\n")
    return out


def same_modality_metrics(features: SplitFeatures, max_rank: int = 20) -> dict[str, float]:
    """Same-modality retrieval within one split's features (e.g. the RGB ``gallery`` split):
    each image queries all others; entries of the query's identity AND camera are removed (the
    Market-1501 rule, which also removes the query itself), so a hit is the same person seen by
    another camera. Returns ``R1``, ``mAP``, ``mINP`` (fractions) and ``valid_queries``."""
    dist = distance_matrix(features.features, features.features)
    metrics = compute_metrics(dist, features.pid, features.pid, features.camera, features.camera, "market",
                              max_rank=max_rank)
    return {"R1": float(metrics.cmc[0]), "mAP": metrics.mAP, "mINP": metrics.mINP,
            "valid_queries": metrics.valid_queries}


def same_modality_rank(run_dir: Path, shards: Path) -> dict[str, float]:
    """RGB->RGB (other camera) retrieval of a fine-tuned run on the RGB images of the held-out
    identities (the SYSU-MM01 ``gallery`` split): :func:`same_modality_metrics`."""
    loaded = load_for_evaluation(run_dir, device="cpu")
    feats = extract_features(loaded.embed, shards, "gallery", size=loaded.size, transform=loaded.transform,
                             device="cpu", source="cache", progress=False)
    return same_modality_metrics(feats)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], log: Path, threads: int) -> tuple[float, float]:
    """Run a child process with ``threads`` intra-op threads; returns its wall and CPU seconds
    (on a loaded machine the CPU time of a one-thread run is what it would take alone)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start, cpu = time.perf_counter(), _children_cpu()
    with open(log, "w") as f:
        status = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if status:
        raise UserError(f"{' '.join(command[:4])} ... failed with status {status}; see {log}")
    return time.perf_counter() - start, _children_cpu() - cpu


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learnability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for data, shards, runs, results.jsonl")
    parser.add_argument("--ids", type=int, default=150, help="synthetic identities (default 150)")
    parser.add_argument("--images-per-id", type=int, default=40, help="mean images per identity (default 40)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="held-out identities: val (choose recipes here) or test (report only)")
    parser.add_argument("--preset", default="agw-tiny", help="fine-tuning preset (default agw-tiny)")
    parser.add_argument("--finetune", action="append", default=[], metavar="KEY=VALUE",
                        help="a train.finetune setting; repeatable")
    parser.add_argument("--init", default="random",
                        help="the fine-tuning's --init: random (default) or a backbone file, e.g. a pre-training "
                             "export (compare inits on the validation identities)")
    parser.add_argument("--seed", type=int, action="append", default=None,
                        help="fine-tuning seed; repeatable (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the fine-tuning (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating the data (default 2)")
    parser.add_argument("--name", default="run", help="label of this recipe in results.jsonl")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"sysu-{args.ids}x{args.images_per_id}-s{args.data_seed}"
    timings = {}
    if not (data / "exp").is_dir():
        info = generate("sysu-mm01", data, ids=args.ids, images_per_id=args.images_per_id, seed=args.data_seed,
                        workers=args.workers)
        timings["generate_s"] = round(info.seconds, 1)
        print(f"generated {info.images} images in {info.seconds:.1f} s (load {load_average()})", flush=True)
    root = validation_view(data, work / f"{data.name}-val") if args.split == "val" else data
    shards = work / f"{root.name}-shards"
    if not (shards / "manifest.json").is_file():
        wall, _ = _run([sys.executable, "-m", "shards", "build", "--layout", "sysu-mm01", "--root", str(root),
                        "--out", str(shards), "--quiet", "--workers", "1"], work / "build.log", 1)
        timings["shards_s"] = round(wall, 1)
    manifest = load_manifest(shards)
    tokens = []
    for pair in args.finetune:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--finetune {pair!r}: expected KEY=VALUE")
        tokens += [f"--{key}", value]
    for seed in args.seed or [0]:
        out = work / "runs" / f"{args.name}-{args.split}-seed{seed}"
        load_before = load_average()
        seconds, cpu = _run([sys.executable, "-m", "train.finetune", "--preset", args.preset, "--shards", str(shards),
                        "--init", args.init, *tokens, "--seed", str(seed), "--output_dir", str(out),
                        "--progress_bar", "false", "--tensorboard", "false"], work / f"{out.name}.log", args.threads)
        results = json.loads((out / "results.json").read_text())
        same = same_modality_rank(out, shards)
        row = {"name": args.name, "split": args.split, "seed": seed, "ids": args.ids,
               "images_per_id": args.images_per_id, "held_out_ids": manifest.splits["query"].total.identities,
               "init": args.init, "finetune": args.finetune, "finetune_s": round(seconds, 1),
               "finetune_cpu_s": round(cpu, 1), "threads": args.threads,
               "load_before": load_before, "load_after": load_average(), "cross_modal": results,
               "rgb_rgb": same, **timings}
        with open(work / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
