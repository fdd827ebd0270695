"""The built-in synthetic dataset: people drawn with numpy/PIL, written in a public ReID layout.

``python -m shards.synthetic --layout sysu-mm01|market1501|regdb --out DIR`` writes real image
files with the folder and file naming of SYSU-MM01, Market-1501 or RegDB (DESIGN.md section 7),
so every tool of the project reads it exactly like the real dataset:

- SYSU-MM01: ``cam{1..6}/{pid:04d}/{n:04d}.jpg`` (RGB cameras 1, 2, 4, 5; IR cameras 3, 6 stored
  as 3-channel JPEGs with equal channels) and ``exp/{train,val,test}_id.txt``, one line of
  comma-separated ids each, split in the real proportions (296 / 99 / 96 of 491).
- Market-1501: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` with names
  ``PPPP_cCsS_FFFFFF_NN.jpg``, 128x64 images, junk (pid ``-1``) and distractors (pid ``0000``)
  in the gallery.
- RegDB: ``Visible/<pid>/`` and ``Thermal/<pid>/`` BMP files (128x64; ``images_per_id`` of each,
  exactly, 10 in the real set; image n of both cameras shows the same moment) and
  ``idx/{train,test}_{visible,thermal}_{1..10}.txt`` (lines ``relpath label``), every trial
  splitting the identities in two random halves. The thermal camera sees heat
  (:func:`shards.synthetic_people.thermal_brightness`), not near-infrared reflectance.

Work is planned up front in the parent (which files, which cameras, which sizes: cheap and
deterministic), then identities are rendered in parallel. Every image has its own seed derived
from ``(seed, pid, camera, index)``, so the output is byte-identical whatever ``--workers`` is.
The tree is written to a hidden sibling folder and renamed into place at the end: an
interrupted run never leaves a tree that looks complete.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.cli import ArgumentParser, run_cli
from common.errors import UserError
from common.outputs import output_folder
from shards.synthetic_people import Pose, make_identity, make_scene, render_image

LAYOUTS = ("sysu-mm01", "market1501", "regdb")
SYSU_RGB_CAMERAS, SYSU_IR_CAMERAS = (1, 2, 4, 5), (3, 6)
SYSU_OUTDOOR_CAMERAS = (4, 5, 6)
# Crop heights (pixels, inclusive) of the synthetic SYSU-MM01 images: they vary like the real
# detections' and stay above the 96-144 rows the CPU presets train on, at a fraction of the
# rendering time of full-size crops (a 260-row image costs 3x a 160-row one to draw).
SYSU_HEIGHTS = (120, 200)
MARKET_SIZE = (128, 64)  # (H, W), as the real dataset's resized detections
REGDB_SIZE = (128, 64)  # (H, W): RegDB's crops are small, like Market's
REGDB_CAMERAS = {"Visible": 1, "Thermal": 2}  # as shards/layouts/regdb.py numbers them
REGDB_TRIALS = 10
JUNK_PID, DISTRACTOR_PID = -1, 0


@dataclass(frozen=True)
class LayoutDefaults:
    """Default size of a layout: small enough for a CPU demo (a few thousand images)."""

    ids: int
    images_per_id: int
    min_ids: int


DEFAULTS = {
    "sysu-mm01": LayoutDefaults(ids=60, images_per_id=40, min_ids=3),  # one id per split at least
    "market1501": LayoutDefaults(ids=50, images_per_id=17, min_ids=2),  # one train, one test
    # RegDB: 412 ids of 10 visible + 10 thermal images; every trial splits the ids in halves.
    "regdb": LayoutDefaults(ids=40, images_per_id=10, min_ids=2),
}
# Tags keep the random streams of the plan apart from those of the drawings.
_TAG_SPLIT, _TAG_PLAN, _TAG_IMAGE = 201, 202, 203


@dataclass(frozen=True)
class ImageJob:
    """One file to render: where it goes, what it shows, with which seed.

    ``kind``: ``"person"`` (identity ``pid``), ``"junk"`` (a fragment of a body: Market pid -1)
    or ``"background"`` (a false detection: Market distractor pid 0).
    """

    relpath: str
    camera: int
    size: tuple[int, int]  # (H, W)
    entropy: tuple[int, ...]
    kind: str = "person"


@dataclass(frozen=True)
class IdentityJob:
    """Everything one worker renders in one task: the images of one identity."""

    pid: int
    split: str
    images: tuple[ImageJob, ...]


@dataclass
class GeneratedInfo:
    """What :func:`generate` wrote; ``images_by_split`` counts files per split or folder."""

    layout: str
    root: Path
    identities: int
    images: int
    rgb_images: int
    ir_images: int
    images_by_split: dict[str, int] = field(default_factory=dict)
    ids_by_split: dict[str, int] = field(default_factory=dict)
    junk: int = 0
    distractors: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Planning (parent process; cheap)


def _split_sizes(ids: int) -> tuple[int, int, int]:
    """(train, val, test) counts in SYSU-MM01's proportions (296, 99, 96 of 491), each >= 1."""
    test = max(1, round(ids * 96 / 491))
    val = max(1, round(ids * 99 / 491))
    return ids - val - test, val, test


def _counts_per_camera(rng: np.random.Generator, cameras: list[int], weights: np.ndarray,
                       total: int, minimum: int) -> dict[int, int]:
    """Split ``total`` images over ``cameras`` by ``weights``, at least ``minimum`` each."""
    shares = rng.dirichlet(weights * 4)  # uneven, like real tracks of different lengths
    return {cam: max(minimum, round(total * share)) for cam, share in zip(cameras, shares)}


def _sysu_cameras(rng: np.random.Generator) -> list[int]:
    """Cameras that saw one identity: each with probability 0.7, at least one RGB and one IR."""
    cameras = [cam for cam in range(1, 7) if rng.random() < 0.7]
    if not any(cam in SYSU_RGB_CAMERAS for cam in cameras):
        cameras.append(int(rng.choice(SYSU_RGB_CAMERAS)))
    if not any(cam in SYSU_IR_CAMERAS for cam in cameras):
        cameras.append(int(rng.choice(SYSU_IR_CAMERAS)))
    return sorted(cameras)


def plan_sysu(ids: int, images_per_id: int, seed: int) -> list[IdentityJob]:
    """Identities 1..ids split train/val/test, each with its cameras, image counts and sizes."""
    n_train, n_val, _ = _split_sizes(ids)
    order = np.random.default_rng([seed, _TAG_SPLIT]).permutation(np.arange(1, ids + 1))
    split_of = {int(pid): ("train" if i < n_train else "val" if i < n_train + n_val else "test")
                for i, pid in enumerate(order)}
    jobs = []
    for pid in range(1, ids + 1):
        rng = np.random.default_rng([seed, _TAG_PLAN, pid])
        cameras = _sysu_cameras(rng)
        # About a third of the images are IR, as in the real set (11,909 of 34,167).
        is_ir = np.array([c in SYSU_IR_CAMERAS for c in cameras])
        weights = np.where(is_ir, 0.35 / is_ir.sum(), 0.65 / (~is_ir).sum())
        total = round(images_per_id * rng.uniform(0.7, 1.3))
        counts = _counts_per_camera(rng, cameras, weights, total, minimum=1)
        images = []
        for cam, count in counts.items():
            for n in range(1, count + 1):
                height = int(rng.integers(SYSU_HEIGHTS[0], SYSU_HEIGHTS[1] + 1))
                size = (height, round(height / rng.uniform(2.0, 2.5)))
                images.append(ImageJob(f"cam{cam}/{pid:04d}/{n:04d}.jpg", cam, size,
                                       (seed, _TAG_IMAGE, pid, cam, n)))
        jobs.append(IdentityJob(pid, split_of[pid], tuple(images)))
    return jobs


def _market_names(rng: np.random.Generator, pid_text: str, camera: int, count: int) -> list[str]:
    """``count`` distinct Market file names ``PPPP_cCsS_FFFFFF_NN.jpg`` for one pid and camera."""
    frames = np.sort(rng.choice(1_000_000, size=count, replace=False))
    return [f"{pid_text}_c{camera}s{rng.integers(1, 7)}_{frame:06d}_{rng.integers(1, 9):02d}.jpg"
            for frame in frames]


def _market_identity(pid: int, split: str, images_per_id: int, seed: int) -> IdentityJob:
    """One Market identity: 2-6 cameras; a test identity gives one query per camera.

    A test identity has at least two images in each of at least two cameras, so each query has
    gallery images of the same person in another camera (a valid query under the protocol).
    """
    rng = np.random.default_rng([seed, _TAG_PLAN, pid])
    cameras = sorted(int(c) for c in rng.choice(np.arange(1, 7), rng.integers(2, 7), replace=False))
    total = round(images_per_id * rng.uniform(0.7, 1.3))
    minimum = 2 if split == "test" else 1
    counts = _counts_per_camera(rng, cameras, np.ones(len(cameras)), total, minimum)
    images = []
    for cam, count in counts.items():
        for n, name in enumerate(_market_names(rng, f"{pid:04d}", cam, count)):
            folder = "bounding_box_train" if split == "train" else "query" if n == 0 \
                else "bounding_box_test"
            images.append(ImageJob(f"{folder}/{name}", cam, MARKET_SIZE,
                                   (seed, _TAG_IMAGE, pid + 2, cam, n)))
    return IdentityJob(pid, split, tuple(images))


def _market_false_detections(pid: int, count: int, seed: int) -> IdentityJob:
    """Junk (pid -1: body fragments) or distractors (pid 0: no person) for the gallery."""
    rng = np.random.default_rng([seed, _TAG_PLAN, pid + 2])
    pid_text, kind = ("-1", "junk") if pid == JUNK_PID else ("0000", "background")
    images = []
    for n in range(count):
        cam = int(rng.integers(1, 7))
        name = _market_names(rng, pid_text, cam, 1)[0]
        images.append(ImageJob(f"bounding_box_test/{name}", cam, MARKET_SIZE,
                               (seed, _TAG_IMAGE, pid + 2, cam, n), kind))
    # Names are drawn per file; two could coincide, so keep the first of each name.
    unique = {job.relpath: job for job in reversed(images)}
    return IdentityJob(pid, "test", tuple(sorted(unique.values(), key=lambda job: job.relpath)))


def plan_market(ids: int, images_per_id: int, seed: int) -> list[IdentityJob]:
    """Identities with sparse 4-digit pids (as the real set), half train, half test, plus junk."""
    if ids > 4999:
        raise UserError(f"--ids {ids}: Market-1501 names have 4-digit pids, use at most 4999")
    rng = np.random.default_rng([seed, _TAG_SPLIT])
    pids = np.sort(rng.choice(np.arange(1, 2 * ids + 2), size=ids, replace=False))
    train = set(rng.permutation(pids)[: math.ceil(ids / 2)].tolist())
    jobs = [_market_identity(int(pid), "train" if pid in train else "test", images_per_id, seed)
            for pid in pids]
    false_detections = max(3, math.ceil((ids - len(train)) / 5))
    jobs.append(_market_false_detections(JUNK_PID, false_detections, seed))
    jobs.append(_market_false_detections(DISTRACTOR_PID, false_detections, seed))
    return jobs


def plan_regdb(ids: int, images_per_id: int, seed: int) -> list[IdentityJob]:
    """Identities 1..ids, each with exactly ``images_per_id`` visible and as many thermal images
    (as the real set: 10 + 10), named like RegDB's ``female_back_v_06596_3.bmp`` /
    ``..._t_...``. Image ``n`` of both cameras shares its seed: the pair shows the same moment,
    as RegDB's co-located, synchronised cameras do. The split is per trial (:func:`regdb_trials`)."""
    jobs = []
    for pid in range(1, ids + 1):
        rng = np.random.default_rng([seed, _TAG_PLAN, pid])
        sex = str(rng.choice(["female", "male"]))
        frames = np.sort(rng.choice(100_000, size=images_per_id, replace=False))
        images = []
        for n, frame in enumerate(frames, start=1):
            view = str(rng.choice(["front", "back"]))
            for folder, camera in REGDB_CAMERAS.items():
                name = f"{sex}_{view}_{folder[0].lower()}_{frame:05d}_{n}.bmp"
                images.append(ImageJob(f"{folder}/{pid}/{name}", camera, REGDB_SIZE,
                                       (seed, _TAG_IMAGE, pid, n)))
        jobs.append(IdentityJob(pid, "all", tuple(images)))
    return jobs


def regdb_trials(ids: int, seed: int, trials: int = REGDB_TRIALS) -> list[tuple[list[int], list[int]]]:
    """(train ids, test ids) of each trial: a random half of the identities (rounded down, at
    least one) trains, the rest tests, drawn anew for every trial as RegDB's 10 trials are."""
    splits = []
    for trial in range(1, trials + 1):
        order = np.random.default_rng([seed, _TAG_SPLIT, trial]).permutation(np.arange(1, ids + 1))
        half = max(1, ids // 2)
        splits.append((sorted(order[:half].tolist()), sorted(order[half:].tolist())))
    return splits


# ---------------------------------------------------------------------------------------------
# Rendering (worker processes)


def _junk_pose(rng: np.random.Generator, size: tuple[int, int]) -> Pose:
    """A bad detection box: a body much larger than the crop, only a fragment in view."""
    h, w = size
    height = h * rng.uniform(1.6, 2.6)
    return Pose(cx=w * rng.uniform(0.0, 1.0), top=-rng.uniform(0.1, 0.7) * height, height=height,
                view=str(rng.choice(["front", "back", "side"])), arm_swing=0.3, stride=0.2)


def _render_job(seed: int, layout: str, pid: int, job: ImageJob) -> bytes:
    """JPEG bytes of one image; a pure function of its arguments."""
    rng = np.random.default_rng(list(job.entropy))
    if layout == "sysu-mm01":
        scene = make_scene(seed, job.camera, job.camera in SYSU_IR_CAMERAS,
                           job.camera in SYSU_OUTDOOR_CAMERAS)
    elif layout == "regdb":  # one outdoor camera pair; the thermal one sees heat
        scene = make_scene(seed, 1, False, True, thermal=job.camera == REGDB_CAMERAS["Thermal"])
    else:
        # Market's six cameras all face one open campus area; alternate the background style.
        scene = make_scene(seed, job.camera, False, job.camera % 2 == 0)
    if job.kind == "person":
        image = render_image(rng, make_identity(seed, pid), scene, job.size)
    elif job.kind == "junk":  # a stranger, never one of the dataset's identities
        stranger = make_identity(seed, 10_000 + int(rng.integers(1_000_000)))  # > any pid
        image = render_image(rng, stranger, scene, job.size, _junk_pose(rng, job.size))
    else:
        image = render_image(rng, None, scene, job.size)
    buffer = io.BytesIO()
    if layout == "regdb":
        image.save(buffer, format="BMP")
    else:
        image.save(buffer, format="JPEG", quality=int(rng.integers(80, 96)))
    return buffer.getvalue()


def _render_identity(task: tuple[int, str, str, IdentityJob]) -> int:
    """Worker task: render and write every image of one identity; returns how many."""
    seed, layout, root, identity = task
    for job in identity.images:
        path = Path(root, job.relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_render_job(seed, layout, identity.pid, job))
    return len(identity.images)


def _run_tasks(tasks: list[tuple[int, str, str, IdentityJob]], workers: int,
               progress: bool) -> None:
    """Render all tasks on ``workers`` processes (in this process for one) with a progress bar."""
    total = sum(len(task[3].images) for task in tasks)
    with tqdm(total=total, unit="img", desc="synthetic", disable=not progress,
              file=sys.stderr, smoothing=0.1) as bar:
        if workers <= 1:
            for task in tasks:
                bar.update(_render_identity(task))
            return
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for done in pool.imap_unordered(_render_identity, tasks):
                bar.update(done)


# ---------------------------------------------------------------------------------------------
# The tree


def _write_sysu_lists(root: Path, jobs: list[IdentityJob]) -> None:
    """``exp/{train,val,test}_id.txt``: one line of comma-separated ids, like the real files."""
    (root / "exp").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        pids = sorted(job.pid for job in jobs if job.split == split)
        (root / "exp" / f"{split}_id.txt").write_text(",".join(map(str, pids)) + "\n")


def _write_regdb_lists(root: Path, jobs: list[IdentityJob], ids: int, seed: int) -> None:
    """``idx/{train,test}_{visible,thermal}_{t}.txt``: lines ``relpath label``, the label being
    the identity's index among the trial's train (or test) ids, as in the real lists."""
    (root / "idx").mkdir(parents=True, exist_ok=True)
    files = {job.pid: job.images for job in jobs}
    for trial, split_ids in enumerate(regdb_trials(ids, seed), start=1):
        for part, pids in zip(("train", "test"), split_ids):
            for folder in REGDB_CAMERAS:
                lines = [f"{image.relpath} {label}" for label, pid in enumerate(pids)
                         for image in files[pid] if image.relpath.startswith(folder + "/")]
                (root / "idx" / f"{part}_{folder.lower()}_{trial}.txt").write_text("\n".join(lines) + "\n")


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that holds anything: never mix with or overwrite a user's files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder; "
                        "choose a new path or remove it")


def _summarise(layout: str, out: Path, jobs: list[IdentityJob], seconds: float) -> GeneratedInfo:
    """Counts of what the plan wrote."""
    people = [job for job in jobs if job.pid > 0]
    images = [image for job in jobs for image in job.images]
    if layout == "sysu-mm01":
        ir = sum(image.camera in SYSU_IR_CAMERAS for image in images)
    else:
        ir = sum(image.camera == REGDB_CAMERAS["Thermal"] for image in images) if layout == "regdb" else 0
    if layout == "sysu-mm01":
        by_split = dict(Counter(job.split for job in people for _ in job.images))
    else:
        by_split = dict(Counter(image.relpath.split("/")[0] for image in images))
    false_detections = {job.pid: len(job.images) for job in jobs if job.pid <= 0}
    return GeneratedInfo(
        layout=layout, root=out, identities=len(people), images=len(images),
        rgb_images=len(images) - ir, ir_images=ir, images_by_split=by_split,
        ids_by_split=dict(Counter(job.split for job in people)),
        junk=false_detections.get(JUNK_PID, 0), distractors=false_detections.get(DISTRACTOR_PID, 0),
        seconds=seconds)


def generate(layout: str, out: Path | str, ids: int | None = None, seed: int = 0,
             workers: int | None = None, images_per_id: int | None = None,
             progress: bool = False) -> GeneratedInfo:
    """Write a synthetic dataset in ``layout`` to ``out`` (which must not exist or be empty).

    ``ids`` and ``images_per_id`` (the mean, each identity varying by +-30%; RegDB: exactly, per
    camera) default to the
    layout's demo size; ``workers`` defaults to all cores. Workers are spawned processes, so a
    script calling this with more than one worker needs the ``if __name__ == "__main__"`` guard.
    Raises :class:`UserError` on bad input.
    """
    if layout not in DEFAULTS:
        raise UserError(f"unknown layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    defaults = DEFAULTS[layout]
    ids = defaults.ids if ids is None else ids
    images_per_id = defaults.images_per_id if images_per_id is None else images_per_id
    if ids < defaults.min_ids:
        raise UserError(f"--ids {ids}: the {layout} layout needs at least {defaults.min_ids}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be >= 0")
    if images_per_id < 2:
        raise UserError(f"--images-per-id {images_per_id}: need at least 2")
    out = Path(out)
    _check_out(out)
    start = time.perf_counter()
    plans = {"sysu-mm01": plan_sysu, "market1501": plan_market, "regdb": plan_regdb}
    jobs = plans[layout](ids, images_per_id, seed)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():  # left by an interrupted run of this same command
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    # Biggest identities first, so no worker is left with a long one at the end.
    tasks = [(seed, layout, str(staging), job)
             for job in sorted(jobs, key=lambda job: -len(job.images))]
    _run_tasks(tasks, max(1, min(workers or os.cpu_count() or 1, len(tasks))), progress)
    if layout == "sysu-mm01":
        _write_sysu_lists(staging, jobs)
    elif layout == "regdb":
        _write_regdb_lists(staging, jobs, ids, seed)
    if out.exists():
        out.rmdir()  # empty (checked above); rename cannot replace it on every system
    staging.rename(out)
    return _summarise(layout, out, jobs, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m shards.synthetic",
        description="Write a synthetic person ReID dataset (real JPEG files) in the folder "
                    "layout and file naming of SYSU-MM01, Market-1501 or RegDB.",
        epilog="SYSU-MM01 size: --ids 491 --images-per-id 87 (about 34k train+val images).")
    parser.add_argument("--layout", required=True, choices=LAYOUTS,
                        help="which public dataset's layout to write")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder to create; must not exist or be empty")
    parser.add_argument("--ids", type=int, default=None,
                        help="number of identities (default: "
                             + ", ".join(f"{k} {v.ids}" for k, v in DEFAULTS.items()) + ")")
    parser.add_argument("--images_per_id", type=int, default=None,
                        help="mean images per identity, each varies by +-30%% (regdb: exactly, "
                             "per camera; default: "
                             + ", ".join(f"{k} {v.images_per_id}" for k, v in DEFAULTS.items())
                             + ")")
    parser.add_argument("--seed", type=int, default=0,
                        help="global seed; the same seed and options give byte-identical files")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes rendering identities in parallel (default: all cores); "
                             "does not change the output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    output_folder(args.out, "--out", create=False)
    info = generate(args.layout, args.out, ids=args.ids, seed=args.seed, workers=args.workers,
                    images_per_id=args.images_per_id, progress=True)
    splits = ", ".join(f"{name} {count}" for name, count in sorted(info.images_by_split.items()))
    print(f"wrote {info.images} images of {info.identities} identities ({info.rgb_images} RGB, "
          f"{info.ir_images} IR; {splits}) to {info.root} in {info.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
