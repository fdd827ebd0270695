"""The throughput suite.

    python -m benchmarks run [--suite decode|views|step|e2e|all] [--device cpu|cuda] [--quick] [--results DIR]
    python -m benchmarks report [--results DIR]

``run`` writes ``<results>/<machine>/<suite>.json`` (+ ``.md`` table, ``.png`` chart) per suite
and rebuilds ``<results>/README.md``; ``report`` rebuilds the tables, charts and README from
the JSON files alone. ``--quick`` runs tiny sizes with one timed repeat (seconds; for tests).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common.cli import ArgumentParser, run_cli
from common.errors import UserError
from benchmarks.record import DEFAULT_RESULTS, PROJECT_README, report, save
from benchmarks.registry import SUITES, RunContext
from benchmarks.timing import load_average
from common.outputs import output_folder, writing_failed


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run suites and save their results")
    run.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    run.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: seconds (tests)")
    run.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    run.add_argument("--repeats", type=int, default=None, help="timed rounds, median reported (default 3; quick 1)")
    run.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"results folder (default {DEFAULT_RESULTS}); "
                     "a folder elsewhere leaves the project README alone")
    run.add_argument("--peak_tflops", type=float, default=None,
                     help="the peak MFU is stated against, TFLOP/s (default: the GPU's datasheet dense bf16 peak, "
                          "989.4 for an H200; a measured bf16 matmul rate, ~790 there, gives a higher MFU)")
    rep = sub.add_parser("report", help="rebuild tables, charts and README from the results JSON")
    rep.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return parser


def _run(args: argparse.Namespace, command: str) -> int:
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
            return 2
    names = list(SUITES) if args.suite == "all" else [args.suite]
    warmup = 1 if args.warmup is None else args.warmup
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if warmup < 0 or repeats < 1:
        print("--warmup must be >= 0 and --repeats >= 1", file=sys.stderr)
        return 2
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError(f"--peak_tflops must be positive, got {args.peak_tflops}")
    output_folder(args.results, "--results")  # before any suite runs: no result is computed and lost
    with tempfile.TemporaryDirectory(prefix="reid-bench-") as tmp:
        ctx = RunContext(device=args.device, quick=args.quick, warmup=warmup, repeats=repeats, workdir=Path(tmp),
                         peak_tflops=args.peak_tflops)
        for name in names:
            ctx.say(f"== suite {name} ({SUITES[name].summary}), device {args.device}")
            before = load_average()
            result = SUITES[name].run(ctx)
            result.settings.update(load_average_before=before, load_average_after=load_average())
            try:
                path = save(result, args.results, command=command, device=args.device)
            except OSError as err:
                raise writing_failed(err, f"the results of suite {name}", "earlier suites' results are saved") from None
            ctx.say(f"saved {path} (+ .md, .png)")
    print(report(args.results, list(SUITES), readme=_project_readme(args.results)))
    return 0


def _project_readme(results: Path) -> Path | None:
    """The project README when the committed results are rebuilt (not a scratch ``--results``)."""
    return PROJECT_README if Path(results).resolve() == DEFAULT_RESULTS.resolve() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "report":
        print(report(args.results, list(SUITES), readme=_project_readme(args.results)))
        return 0
    return _run(args, "python -m benchmarks " + " ".join(argv))


def entry_point() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry_point()
