"""``reid-evaluate`` / ``python -m train.evaluate``: evaluate a fine-tuned ReID model (or an
exported backbone) under a standard protocol and print R1 / R5 / R10 / R20 / mAP / mINP.

The work is in :mod:`train.evaluation` (metrics, features, the protocol registry); loading a
checkpoint or an export for evaluation is :func:`train.finetune.load_for_evaluation`. This module
is the command line: arguments, checks before any work, the table and the JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from common.cli import ArgumentParser, parse_bool, run_cli
from common.errors import UserError
from common.outputs import output_folder
from shards.manifest import load_manifest
from shards.remote import local_shards
from train.evaluation.protocols import (
    PROTOCOLS,
    SYSU_TRIALS,
    Ranking,
    Rerank,
    check_protocol,
    evaluate,
    format_table,
    merge_trials,
)
from train.evaluation.ranked_pictures import DEFAULT_TOPK, RankingRecorder, write_ranked_pictures
from train.finetune import load_for_evaluation


def _trial_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated trial numbers, got {text!r}") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m train.evaluate",
        description="Evaluate a fine-tuned ReID model (or an exported backbone) under the standard protocols: "
                    "Market-1501/DukeMTMC/MSMT17 (market), SYSU-MM01 all-search (sysu) and indoor-search "
                    "(sysu-indoor), 10 random single-shot galleries as the AGW code draws them (multi-shot: "
                    "sysu-multi, sysu-indoor-multi), and RegDB (visible->thermal and thermal->visible). Prints "
                    "R1/R5/R10/R20/mAP/mINP and writes JSON; optionally k-reciprocal re-ranking (--rerank) and "
                    "pictures of ranked results (--visrank N).",
        epilog="Features are L2-normalized; distance = squared Euclidean (= cosine ranking). A fine-tuned "
               "checkpoint gives the recipe's test feature (BN feature for AGW, pre-BN for the ViT recipe); an "
               "exported backbone gives GeM (ResNet) or cat(CLS, mean PART) (ViT) features.",
    )
    parser.add_argument("--checkpoint", required=True, nargs="+", type=Path,
                        help="a train.finetune run folder (its latest checkpoint) or checkpoint folder "
                             "(RUN/checkpoints/step_*), or an exported backbone file (reid-export); for RegDB "
                             "one fine-tuned run per trial may be given")
    parser.add_argument("--shards", required=True,
                        help="shard folder built by `python -m shards build`, or an http(s)://, s3://, gs:// or pipe: "
                             "location of one (staged and verified on local disk first, then read like a local "
                             "folder; see `shards fetch`)")
    parser.add_argument("--protocol", required=True, choices=list(PROTOCOLS), help="evaluation protocol")
    parser.add_argument("--eval_trials", "--trials", dest="eval_trials", type=int, default=SYSU_TRIALS,
                        help="SYSU-MM01: gallery trials 0..N-1 (default 10)")
    parser.add_argument("--regdb_trials", type=_trial_list, default=None,
                        help="RegDB: trial numbers, e.g. 1,2,3 (default: the checkpoint's own trial, or all for a "
                             "backbone that was not fine-tuned on one)")
    parser.add_argument("--eval_flip", "--flip", dest="eval_flip", type=parse_bool, nargs="?", const=True, default=False,
                        help="average features of each image and its mirror (default false)")
    parser.add_argument("--eval_batch_size", "--batch_size", dest="eval_batch_size", type=int, default=128,
                        help="images per extraction batch (default 128)")
    parser.add_argument("--eval_rerank", "--rerank", dest="eval_rerank", type=parse_bool, nargs="?", const=True,
                        default=False, help="k-reciprocal re-ranking (Zhong et al. 2017) of every ranking: per trial "
                                            "gallery for SYSU-MM01, per direction for RegDB (default false)")
    parser.add_argument("--rerank_k1", type=int, default=20, help="re-ranking k1 (default 20, the paper's)")
    parser.add_argument("--rerank_k2", type=int, default=6, help="re-ranking k2 (default 6, the paper's)")
    parser.add_argument("--rerank_lambda", type=float, default=0.3,
                        help="re-ranking lambda, the weight of the original distance (default 0.3, the paper's)")
    parser.add_argument("--visrank", type=int, default=0, metavar="N",
                        help="draw the ranked gallery of N queries (spread over the query set) of the first trial of "
                             "every setting as PNGs, query then top-k, green frame = true match, red = false "
                             "(default 0: none); images are read from the shards")
    parser.add_argument("--visrank_topk", type=int, default=DEFAULT_TOPK,
                        help=f"gallery images per query in the pictures (default {DEFAULT_TOPK})")
    parser.add_argument("--visrank_dir", type=Path, default=None,
                        help="folder for the pictures: DIR/<setting>/sheet.png and one PNG per query (default: "
                             "visrank/ beside --out, else ./visrank)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="input size for an exported backbone (default 288 144 ResNet, 256 128 ViT)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--source", default="auto", choices=("auto", "dali", "wds", "cache"),
                        help="image source (default auto)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--progress_bar", type=parse_bool, default=True, metavar="BOOL",
                        help="feature-extraction bar (default true; it shows only when stderr is a terminal)")
    parser.add_argument("--no_progress", dest="progress_bar", action="store_false", help="--progress_bar false")
    return parser


def _regdb_trials_for(loaded, requested: list[int] | None) -> list[int] | None:
    """A fine-tuned RegDB model is evaluated on its own trial only (its training ids are the others' test ids)."""
    if loaded.regdb_trial is None:
        return requested
    if requested is not None and requested != [loaded.regdb_trial]:
        raise UserError(f"{loaded.path} was fine-tuned on RegDB trial {loaded.regdb_trial}; evaluating it on trial(s) "
                        f"{requested} would test on its own training identities")
    return [loaded.regdb_trial]


def parse_device(text: str | None) -> torch.device | None:
    """``--device`` checked: a device name torch knows, CUDA only where it is available."""
    if text is None:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text!r} is not a device name (cuda, cuda:1, cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_writable(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written, before any feature is extracted."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'results.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write --out {out}: {err.strerror or err} ({out.parent})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write --out {out}: its folder {out.parent} is not writable")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.checkpoint) > 1 and args.protocol != "regdb":
        raise UserError("several --checkpoint files are only meaningful for RegDB (one model per trial)")
    if args.eval_batch_size < 1:
        raise UserError(f"--eval_batch_size must be at least 1, got {args.eval_batch_size}")
    if args.visrank < 0 or args.visrank_topk < 1:
        raise UserError(f"--visrank must be >= 0 and --visrank_topk >= 1, got {args.visrank}, {args.visrank_topk}")
    rerank = Rerank(args.rerank_k1, args.rerank_k2, args.rerank_lambda) if args.eval_rerank else None
    device = parse_device(args.device)
    if args.out is not None:
        _check_writable(args.out)  # before the work, not after it
    visrank_dir = args.visrank_dir or (args.out.parent if args.out is not None else Path(".")) / "visrank"
    if args.visrank:
        output_folder(visrank_dir, "--visrank_dir")  # before any feature is extracted
    recorder = RankingRecorder()
    ranking = Ranking(rerank=rerank, on_ranked=recorder if args.visrank else None)
    args.shards = Path(local_shards(args.shards))
    check_protocol(load_manifest(args.shards), args.shards, args.protocol)
    started = time.perf_counter()
    runs = []
    for path in args.checkpoint:
        loaded = load_for_evaluation(path, device=device, size=tuple(args.size) if args.size else None)
        trials = _regdb_trials_for(loaded, args.regdb_trials) if args.protocol == "regdb" else None
        runs.append(evaluate(loaded.embed, args.shards, args.protocol, size=loaded.size, transform=loaded.transform,
                             trials=args.eval_trials, regdb_trials=trials, batch_size=args.eval_batch_size,
                             device=loaded.device, flip=args.eval_flip, source=args.source, progress=args.progress_bar,
                             ranking=ranking))
    results = runs[0] if len(runs) == 1 else merge_trials(runs)
    print(format_table(results))
    if args.visrank:
        pictures = write_ranked_pictures(recorder.rankings.values(), args.shards, visrank_dir, args.visrank,
                                         args.visrank_topk)
        print(f"wrote {len(pictures)} ranked-result pictures under {visrank_dir}")
    if args.out is not None:
        report = {"protocol": args.protocol, "checkpoints": [str(p) for p in args.checkpoint], "flip": args.eval_flip,
                  "rerank": None if rerank is None else {"k1": rerank.k1, "k2": rerank.k2,
                                                         "lambda": rerank.lambda_value},
                  "distance": "squared euclidean on L2-normalized features", "seconds": time.perf_counter() - started,
                  "results": [r.to_dict() for r in results]}
        try:
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as err:
            raise UserError(f"cannot write --out {args.out}: {err.strerror or err}") from None
        print(f"wrote {args.out}")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
