"""Shard builder throughput: the JPEG-copy path and the re-encode path, 1 worker and all cores.

    python -m benchmarks.shard_build [--ids 60] [--repeats 3]

Generates a synthetic SYSU-MM01 tree (and a PNG copy of it, which the builder must re-encode),
warms the page cache, then builds each configuration ``--repeats`` times into a fresh folder
and reports the median images/s. Results go to ``benchmarks/results/<machine>/shard_build.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from common.cli import ArgumentParser
from benchmarks.machine import machine_info, machine_name
from shards.build import build
from shards.synthetic import generate

RESULTS = Path(__file__).parent / "results"


def _png_copy(source: Path, target: Path) -> None:
    """The same tree with every JPEG saved as PNG (the builder's re-encode path)."""
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if path.is_dir():
            (target / relative).mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".jpg":
            with Image.open(path) as image:
                image.save((target / relative).with_suffix(".png"))
        else:
            shutil.copy(path, target / relative)


def _read_all(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()


def _time_build(root: Path, work: Path, workers: int, repeats: int) -> tuple[int, list[float]]:
    seconds = []
    images = 0
    for repeat in range(repeats):
        out = work / f"out-{workers}-{repeat}"
        start = time.perf_counter()
        manifest = build("sysu-mm01", root, out, workers=workers)
        seconds.append(time.perf_counter() - start)
        images = sum(s.samples for s in manifest.shards)
        shutil.rmtree(out)
    return images, seconds


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.shard_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=60, help="synthetic identities (default 60)")
    parser.add_argument("--repeats", type=int, default=3, help="timed builds per configuration (median reported)")
    parser.add_argument("--no_save", action="store_true", help="print only; do not write the results JSON")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jpeg_root = work / "sysu-jpeg"
        generate("sysu-mm01", jpeg_root, ids=args.ids, seed=0)
        png_root = work / "sysu-png"
        _png_copy(jpeg_root, png_root)
        for path_name, root in (("jpeg-copy", jpeg_root), ("re-encode (PNG input)", png_root)):
            _read_all(root)  # warm the page cache: measure the builder, not the disk
            for workers in sorted({1, cores}):
                images, seconds = _time_build(root, work, workers, args.repeats)
                median = statistics.median(seconds)
                rows.append({"path": path_name, "workers": workers, "images": images,
                             "seconds_median": round(median, 3), "seconds_all": [round(s, 3) for s in seconds],
                             "images_per_s": round(images / median, 1)})
                print(f"{path_name:24s} workers={workers:<3d} {images} images  {median:6.2f} s  {images / median:8.0f} images/s")
    result = {"benchmark": "shard_build", "command": "python -m benchmarks.shard_build "
              f"--ids {args.ids} --repeats {args.repeats}", "machine": machine_info(), "results": rows}
    if not args.no_save:
        folder = RESULTS / machine_name()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "shard_build.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"saved {folder / 'shard_build.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
