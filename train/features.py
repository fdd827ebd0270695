"""``reid-features`` / ``python -m train.features``: features of a folder of images or of a shard
split, from a fine-tuned run or an exported backbone (torchreid's ``FeatureExtractor``, fast-reid's
demo: how a ReID model is deployed on a gallery).

    reid-features --checkpoint runs/finetune-agw-sysu --images my_people/ --out feats/
    reid-features --checkpoint pass_vit_small.pth --shards shards/market --split gallery --out feats/ --format safetensors

The model is loaded as the evaluation loads it (:func:`train.finetune.load_for_evaluation`: a
fine-tuned run gives the recipe's test feature, an exported backbone its global feature), images
are resized to its input size and normalized as the evaluation does, and the rows are written by
:mod:`train.evaluation.write_features` (``features.npy`` or ``features.safetensors`` and
``index.csv``: ``row,source,pid,camera,modality``). Features are as the network gives them;
``--l2_normalize`` normalizes each row (the evaluation compares normalized features).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import ArgumentParser, parse_bool, run_cli
from common.errors import UserError
from shards.layouts import LAYOUTS
from shards.manifest import load_manifest
from shards.remote import local_shards
from train.evaluate import parse_device
from train.evaluation.write_features import FORMATS, check_output, write_folder_features, write_split_features
from train.finetune import LoadedModel, load_for_evaluation


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m train.features",
        description="Write the features of a folder of images (--images) or of a shard split (--shards, --split) "
                    "computed by a fine-tuned run or an exported backbone: features.npy or .safetensors (N, D) and "
                    "index.csv (row, source, pid, camera, modality).",
    )
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a train.finetune run or checkpoint folder, or an exported backbone file (reid-export)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of images")
    source.add_argument("--shards", help="a shard folder built by `python -m shards build`, or an http(s)://, s3://, "
                                         "gs:// or pipe: location of one (staged and verified on local disk first)")
    parser.add_argument("--layout", default="folder", choices=list(LAYOUTS),
                        help="how --images is read (default folder: every image, unlabeled; a dataset layout such "
                             "as market1501 or sysu-mm01 also gives pids, cameras and modalities)")
    parser.add_argument("--split", default=None, help="with --shards: the split (query, gallery, train, all...)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--format", default="npy", choices=FORMATS, help="features file format (default npy)")
    parser.add_argument("--l2_normalize", type=parse_bool, nargs="?", const=True, default=False,
                        help="L2-normalize every feature row (default false)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="input size for an exported backbone (default: the network's)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--source", default="auto", choices=("auto", "dali", "wds", "cache"),
                        help="image source for --shards (default auto)")
    parser.add_argument("--overwrite", type=parse_bool, nargs="?", const=True, default=False,
                        help="replace features already in --out (default false)")
    return parser


def uint8_model(loaded: LoadedModel, l2_normalize: bool):
    """``(images uint8 (B, 3, H, W), modality (B,)) -> (B, D)``: the evaluation's transform and
    embedding, optionally L2-normalized."""

    def model(images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        features = loaded.embed(loaded.transform(images.to(loaded.device)), modality.to(loaded.device)).float()
        return F.normalize(features, dim=1) if l2_normalize else features

    return model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.shards is not None and not args.split:
        raise UserError("--shards needs --split (e.g. --split gallery)")
    if args.images is not None and not args.images.is_dir():
        raise UserError(f"--images {args.images} is not a folder")
    device = parse_device(args.device)
    if args.shards is not None:
        args.shards = Path(local_shards(args.shards))
        manifest = load_manifest(args.shards)
        if not manifest.shards_of(args.split):
            raise UserError(f"{args.shards} has no split {args.split!r} (it has: {', '.join(sorted(manifest.splits))})")
    check_output(args.out, args.format, args.overwrite)  # before any work
    loaded = load_for_evaluation(args.checkpoint, device=device, size=tuple(args.size) if args.size else None)
    model = uint8_model(loaded, args.l2_normalize)
    common = dict(size=loaded.size, fmt=args.format, batch_size=args.batch_size, device=loaded.device,
                  with_modality=True, overwrite=args.overwrite)
    if args.images is not None:
        written = write_folder_features(model, args.images, args.out, layout=args.layout, **common)
    else:
        written = write_split_features(model, args.shards, args.split, args.out, source=args.source, **common)
    print(f"wrote {written.count} x {written.dim} features of {loaded.description} to {written.features} "
          f"and {written.index}")
    for source, reason in written.skipped[:10]:
        print(f"  left out {source}: {reason}")
    if len(written.skipped) > 10:
        print(f"  ... {len(written.skipped) - 10} more left out")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
