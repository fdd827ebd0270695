"""Command line of the shard builder: ``python -m shards {build,verify,inspect}`` (also
installed as ``reid-shards``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common.outputs import output_file, writing_failed
from shards.build import DEFAULT_SHARD_SIZE, build
from common.cli import ArgumentParser, run_cli
from common.errors import UserError
from shards.inspection import contact_sheet, random_samples, summary_table
from shards.layouts import LAYOUTS
from shards.manifest import load_manifest
from shards.verify import verify

DESCRIPTION = """\
Pack a person re-identification dataset into webdataset tar shards that DALI, webdataset and
plain tarfile can read: one sample = KEY.jpg (source JPEG bytes, or an RGB re-encoding of other
formats), KEY.json (pid, camera, modality, split, source path) and KEY.lbl (int32 labels for
DALI), a DALI index per tar, and manifest.json (counts, sha256 per shard, pid->label map,
rejected inputs with reasons)."""

LAYOUT_HELP = """\
layouts (--root is the dataset folder, or the list file for 'manifest'):
  market1501  bounding_box_train/, query/, bounding_box_test/  (junk pid -1 dropped)
  dukemtmc    the same folders, cameras 1..8
  msmt17      train/, test/, list_{train,val,query,gallery}.txt  (train = train + val)
  sysu-mm01   cam1..cam6/<pid>/*.jpg, exp/{train,val,test}_id.txt  (train = train + val ids;
              query = IR images of test ids; gallery = all RGB images of test ids)
  regdb       Visible/<pid>/, Thermal/<pid>/, idx/*_{1..10}.txt  (one split 'all'; trials in
              the manifest)
  folder      every image under --root, recursively (unlabeled, e.g. LUPerson)
  manifest    a .csv (with header) or .jsonl list: path, pid, camera, modality, split
"""


#: Endings of the contact sheet that Pillow writes from an RGB image.
SHEET_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m shards", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,verify,inspect}")

    b = commands.add_parser("build", help="pack a dataset folder into shards",
                            description=DESCRIPTION, epilog=LAYOUT_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--layout", required=True, choices=sorted(LAYOUTS), metavar="LAYOUT",
                   help="how the dataset is organised (see below)")
    b.add_argument("--root", required=True, type=Path, help="dataset folder (or list file for 'manifest')")
    b.add_argument("--out", required=True, type=Path, help="output folder for the shards (created; a re-run resumes)")
    b.add_argument("--seed", type=int, default=0, help="seed of the train split's shuffle across shards (default 0)")
    b.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per shard (default {DEFAULT_SHARD_SIZE})")
    b.add_argument("--workers", type=int, default=os.cpu_count(),
                   help=f"worker processes (default and 0: all {os.cpu_count()} cores)")
    b.add_argument("--strict", action="store_true", help="fail on any unreadable or corrupt input instead of skipping it")
    b.add_argument("--overwrite", action="store_true", help="replace shards of another build in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bars or summary")

    v = commands.add_parser("verify", help="check every shard against the manifest (exit 1 naming bad shards)")
    v.add_argument("folder", type=Path, help="a shard folder (holding manifest.json)")

    i = commands.add_parser("inspect", help="counts per split and modality; optional contact sheet")
    i.add_argument("folder", type=Path, help="a shard folder (holding manifest.json)")
    i.add_argument("--sheet", type=Path, metavar="FILE.png", help="write a contact sheet of random samples")
    i.add_argument("--count", type=int, default=48, help="samples on the sheet (default 48)")
    i.add_argument("--split", help="take the sheet's samples from this split only")
    i.add_argument("--seed", type=int, default=0, help="seed of the sheet's random choice")
    return parser


def _build(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifest = build(args.layout, args.root, args.out, seed=args.seed, shard_size=args.shard_size,
                     workers=args.workers, strict=args.strict, overwrite=args.overwrite, progress=not args.quiet)
    seconds = time.perf_counter() - start
    if not args.quiet:
        images = sum(s.samples for s in manifest.shards)
        print(summary_table(manifest))
        print(f"\n{images} images in {len(manifest.shards)} shards in {args.out}: "
              f"{seconds:.1f} s, {images / max(seconds, 1e-9):.0f} images/s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.folder)
    problems = verify(args.folder)
    for problem in problems:
        print(f"BAD {problem.file}: {problem.reason}")
    if problems:
        bad = len({p.file for p in problems})
        print(f"{bad} bad file(s) in {args.folder}: rebuild with `python -m shards build ...` "
              "(a re-run with --overwrite replaces them)", file=sys.stderr)
        return 1
    samples = sum(s.samples for s in manifest.shards)
    print(f"OK: {len(manifest.shards)} shards, {samples} samples in {args.folder} match the manifest")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.folder)
    if args.sheet:
        output_file(args.sheet, "--sheet", SHEET_SUFFIXES)
    print(summary_table(manifest))
    if args.sheet:
        if args.count < 1:
            raise UserError("--count must be at least 1")
        samples = random_samples(args.folder, manifest, args.count, args.split, args.seed)
        try:
            contact_sheet(samples).save(args.sheet)
        except OSError as err:
            raise writing_failed(err, f"the contact sheet {args.sheet}") from None
        print(f"contact sheet of {len(samples)} samples: {args.sheet}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"build": _build, "verify": _verify, "inspect": _inspect}[args.command](args)


def entry_point() -> None:
    raise SystemExit(run_cli(main))
