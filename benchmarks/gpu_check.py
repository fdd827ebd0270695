"""One call that proves the GPU path: ``make gpu-check`` / ``python3 -m benchmarks.gpu_check``.

From a fresh copy of the repository on a GPU machine that has PyTorch but not DALI, Kornia or
webdataset, in one command (under 8 minutes on one H200 by the stage budgets below):

1. install: ``.gpu-deps/part-*`` (DALI + codecs + Kornia + webdataset, made here by
   ``CUDA=13 ../shared/tools/pack-gpu-deps 3.12 .gpu-deps``) unpacked to ``/tmp/gpu-site``, and
   any wheels in ``.whl/`` installed to ``/tmp/site``; both go on ``PYTHONPATH`` of every stage;
2. versions: Python, torch (+ its CUDA), the GPU and driver, DALI, Kornia, webdataset;
3. the ``gpu``-marked tests (``pytest -m gpu``): DALI mixed decode vs the CPU decode, the device
   cache, views on CUDA vs CPU, a bf16 step of each method, compile without recompiles;
4. the benchmark suites in the GPU size (``decode``, then ``step``: model alone vs full pipeline,
   images/s, MFU), one timed round after one warm-up, into ``<out>/bench``;
5. a short pre-training of ``mmgl_sysu`` and ``pass_vits_lup`` at full model size on a synthetic
   SYSU-MM01-like set (the loop as a user runs it: accelerate, bf16, its source), images/s from
   the loop's own log;
6. ``summary.md``: images/s, MFU, full-step / model-alone ratios of both methods, the stages'
   status and times, what failed. Everything lands in ``<out>`` (default
   ``benchmarks/results/<machine>/gpu-check``); ``--archive FILE.tar.gz`` packs it into one file
   (the device tool brings back at most 8 files).

Every stage runs in a child process with its own time limit and its log in ``<out>``; a failed
or timed-out stage is reported and the next one runs. ``--device cpu --dry-run`` runs the same
stages at test size on a CPU (the tests use it so that the script cannot rot).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Time limit of every stage of a CPU dry run (test size, but a shared CPU can be slow).
DRY_RUN_LIMIT = 600
GPU_SITE, WHEEL_SITE = Path("/tmp/gpu-site"), Path("/tmp/site")


@dataclass
class Stage:
    """One step of the check: a command (argv) with a time limit, run from the repository root."""

    name: str
    argv: list[str]
    limit_s: int


@dataclass
class Outcome:
    name: str
    status: str  # ok, failed (rc), timed out, skipped
    seconds: float
    log: str
    detail: str = ""


@dataclass
class Plan:
    """What a check runs: the stages and the settings the summary reads back."""

    device: str
    out: Path
    stages: list[Stage] = field(default_factory=list)


def install(out: Path) -> tuple[list[str], str]:
    """Unpack the carried DALI parts and install the carried wheels (module docstring, step 1).
    Returns the extra ``PYTHONPATH`` entries and a one-line account of what was done."""
    paths, said = [], []
    parts = sorted(glob.glob(str(ROOT / ".gpu-deps" / "part-*")))
    if parts:
        if not (GPU_SITE / "nvidia").is_dir():
            command = f"cat {' '.join(shlex.quote(p) for p in parts)} | xz -d | tar -x -C /tmp"
            subprocess.run(command, shell=True, check=True)
        paths.append(str(GPU_SITE))
        said.append(f"{len(parts)} DALI part(s) -> {GPU_SITE}")
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(WHEEL_SITE), *wheels], check=True)
        paths.append(str(WHEEL_SITE))
        said.append(f"{len(wheels)} wheel(s) -> {WHEEL_SITE}")
    (out / "install.log").write_text("\n".join(said or ["nothing carried: using what is installed"]) + "\n")
    return paths, "; ".join(said) or "nothing carried"


VERSIONS = r"""
import importlib, json, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cudnn": torch.backends.cudnn.version()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as err:
        info["driver"] = f"nvidia-smi failed: {err}"
for name, module in (("dali", "nvidia.dali"), ("kornia", "kornia"), ("webdataset", "webdataset"),
                     ("accelerate", "accelerate"), ("numpy", "numpy"), ("pillow", "PIL")):
    try:
        info[name] = importlib.import_module(module).__version__
    except Exception as err:
        info[name] = f"missing ({type(err).__name__}: {err})"
print(json.dumps(info, indent=1))
"""

SYNTHETIC = r"""
import sys
from pathlib import Path
from benchmarks.data import SyntheticSet
ids, per_id, workers = (int(a) for a in sys.argv[2:5])
s = SyntheticSet.create(Path(sys.argv[1]), ids=ids, images_per_id=per_id, workers=workers)
print(s.shards)
"""


def plan(device: str, out: Path, dry_run: bool, cores: int) -> Plan:
    """The stages (module docstring) at GPU size, or at test size with ``dry_run``."""
    py = sys.executable
    bench = out / "bench"
    data = out / "data"
    result = Plan(device, out)
    add = result.stages.append
    # GPU budgets (seconds, 470 in all, with the install under the 8 minutes) are estimates until
    # the first run on an H200; a CPU dry run gets DRY_RUN_LIMIT per stage (shared CPUs are slow).
    limit = (lambda seconds: DRY_RUN_LIMIT) if dry_run else (lambda seconds: seconds)
    add(Stage("versions", [py, "-c", VERSIONS], limit(30)))
    tests = ["tests/test_gpu.py"] if dry_run else ["tests"]
    add(Stage("gpu_tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *tests], limit(120)))
    common = ["--device", device, "--results", str(bench)]
    if dry_run:
        add(Stage("bench_decode", [py, "-m", "benchmarks", "run", "--suite", "decode", "--quick", *common], limit(60)))
    else:
        add(Stage("bench_decode", [py, "-m", "benchmarks", "run", "--suite", "decode", "--repeats", "1", *common], 60))
        add(Stage("bench_step", [py, "-m", "benchmarks", "run", "--suite", "step", "--repeats", "1", *common], 150))
    ids, per_id = (4, 12) if dry_run else (60, 40)
    add(Stage("synthetic_data", [py, "-c", SYNTHETIC, str(data), str(ids), str(per_id), str(cores)], limit(20)))
    runs = (("mmgl", "mmgl_tiny", 4), ("pass", "pass_tiny", 4)) if dry_run else \
        (("mmgl", "mmgl_sysu", 100), ("pass", "pass_vits_lup", 100))
    for method, preset, steps in runs:
        argv = [py, "-m", "train.pretrain", "--preset", preset, "--shards", str(data / "shards"),
                "--max_steps", str(steps), "--log_every", str(max(1, steps // 6)), "--progress_bar", "false",
                "--checkpoint_every_epochs", "0", "--output_dir", str(out / "runs" / preset)]
        if not dry_run:
            argv += ["--batch_size", "64" if method == "mmgl" else "128"]
        add(Stage(f"pretrain_{method}", argv, limit(45)))
    return result


def run_stage(stage: Stage, out: Path, env: dict[str, str], say) -> Outcome:
    log = out / f"{stage.name}.log"
    say(f"== {stage.name} (limit {stage.limit_s} s): {' '.join(shlex.quote(a) for a in stage.argv[:8])}"
        f"{' ...' if len(stage.argv) > 8 else ''}")
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(stage.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=stage.limit_s)
            status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = "timed out"
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.stat().st_size else []
    say(f"   {status} in {seconds:.0f} s{': ' + tail[0][:160] if tail and status != 'ok' else ''}")
    return Outcome(stage.name, status, seconds, log.name, tail[0][:300] if tail else "")


def loop_images_per_s(run_dir: Path) -> float | None:
    """The loop's last logged images/s (its own clock, over the steps since the last log)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return lines[-1].get("images_per_s") if lines else None


def step_figures(bench: Path) -> list[str]:
    """Rows and ratios of the step suite's JSON, as summary lines."""
    found = sorted(bench.glob("*/step.json"))
    if not found:
        return ["step suite: no results"]
    doc = json.loads(found[0].read_text())
    lines = [f"step suite ({found[0].parent.name}), peak {doc['settings'].get('peak_bf16_tflops')} TFLOP/s "
             f"({doc['settings'].get('peak_basis')}):"]
    for row in doc["rows"]:
        lines.append(f"  {row['name']}: {row.get('images_per_s')} images/s, step {row.get('step_ms')} ms, "
                     f"{row.get('model_tflop_per_s')} TFLOP/s, MFU {row.get('mfu_percent', '-')} %")
    for ratio in doc["ratios"]:
        target = f" (target >= {ratio['target']})" if ratio.get("target") else ""
        lines.append(f"  ratio {ratio['name']}: {ratio['value']}{target}")
    return lines


def summarize(result: Plan, outcomes: list[Outcome], installed: str, total: float) -> str:
    lines = [f"# gpu-check on {result.device}", "", f"installed: {installed}", f"total: {total:.0f} s", "",
             "| stage | status | seconds | log |", "|---|---|---:|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.log} |" for o in outcomes]
    versions = result.out / "versions.log"
    if versions.is_file():
        lines += ["", "versions:", "```", versions.read_text().strip(), "```"]
    lines += ["", *step_figures(result.out / "bench"), ""]
    for run_dir in sorted((result.out / "runs").glob("*")):
        rate = loop_images_per_s(run_dir)
        lines.append(f"pre-training {run_dir.name}: {rate:.1f} images/s (loop log)" if rate is not None
                     else f"pre-training {run_dir.name}: no metrics logged")
    failed = [o for o in outcomes if o.status != "ok"]
    if failed:
        lines += ["", "not ok:"] + [f"- {o.name}: {o.status}: {o.detail}" for o in failed]
    return "\n".join(lines) + "\n"


def default_out(device: str) -> Path:
    name = "cpu" if device == "cpu" else "gpu"
    try:
        import torch

        if device == "cuda" and torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-").lower()
    except ImportError:  # pragma: no cover - torch is always there in this project
        pass
    return ROOT / "benchmarks" / "results" / name / "gpu-check"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="the same stages at test size (seconds per stage)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<gpu>/gpu-check)")
    parser.add_argument("--archive", type=Path, default=None, help="also pack the results folder into this .tar.gz")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages (names as in summary.md)")
    args = parser.parse_args(argv)
    out = (args.out or default_out(args.device)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    say = print
    start = time.perf_counter()
    try:
        extra, installed = install(out)
    except (subprocess.CalledProcessError, OSError) as err:
        print(f"gpu-check: installing the carried packages failed: {err}", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *extra, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    result = plan(args.device, out, args.dry_run, cores)
    outcomes = []
    for stage in result.stages:
        if args.only is not None and stage.name not in args.only:
            continue
        outcomes.append(run_stage(stage, out, env, say))
    text = summarize(result, outcomes, installed, time.perf_counter() - start)
    (out / "summary.md").write_text(text)
    print(text)
    if args.archive is not None:
        args.archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        print(f"packed {out} into {args.archive}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
