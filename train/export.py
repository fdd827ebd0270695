"""Export the pre-trained backbone of a training checkpoint in the key layout other code loads.

    reid-export RUN/checkpoints/step_00012345 --format transreid --out vit_small_pass.pth
    reid-export RUN --format native --out backbone.pth      # a run folder: its latest checkpoint
    reid-export runs/finetune-agw-sysu --format onnx --out reid.onnx   # the test-time network

``--format onnx`` exports the *test-time network* (images in, the test feature out; see
:mod:`models.onnx_export`) of a fine-tuning run or checkpoint, or of an exported backbone file
(its global feature, as the evaluation computes it), loaded as ``reid-evaluate`` loads it.

(``python -m train.export`` is the same command.) The backbone is what the method's
:meth:`~train.methods.base.Method.backbone_state_dict` gives (PASS: the teacher's ViT, as DINO and
PASS export; MMGL: the ResNet), read from the checkpoint without building the rest of the
training state (the method is built on the meta device and the saved tensors are assigned to
it). The formats and the writer live with the models (:mod:`models.export`); this module is the
training side: checkpoint -> backbone.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from common.cli import ArgumentParser, parse_bool, run_cli
from common.errors import UserError
from models.export import FORMATS, export_payload, write_export
from models.onnx_export import INPUT_KINDS, EmbeddingOf, export_onnx
from models.registry import BackboneSpec
from train.checkpointing import load_model_state, read_json, resolve_checkpoint
from train.config import load_config
from train.finetune import load_for_evaluation
from train.methods import METHODS

ONNX = "onnx"

StateDict = dict[str, torch.Tensor]


@dataclass
class ExportedBackbone:
    """The backbone of a checkpoint: native ``state_dict``, how to rebuild it, where it came from."""

    state_dict: StateDict
    spec: Optional[BackboneSpec]
    source: dict[str, Any]


def read_backbone(checkpoint: str | os.PathLike) -> ExportedBackbone:
    """The method's backbone from a checkpoint folder (or a run folder: its latest checkpoint)."""
    folder = resolve_checkpoint(str(checkpoint), checkpoint)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json: it was not written by train.pretrain")
    config = load_config(config_path)
    state = load_model_state(folder)
    with torch.device("meta"):
        method = METHODS[config.method].method(config.method_config)
    try:
        method.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise UserError(f"the weights of {folder} do not match its config.json: {err}") from None
    step = read_json(folder / "trainer_state.json").get("step")
    return ExportedBackbone(
        state_dict={k: v.detach().clone() for k, v in method.backbone_state_dict().items()},
        spec=method.backbone_spec(),
        source={"checkpoint": str(folder.resolve()), "method": config.method, "preset": config.preset, "step": step},
    )


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike) -> Path:
    """Write the backbone of ``checkpoint`` to ``out`` in format ``fmt``; returns ``out``."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    backbone = read_backbone(checkpoint)
    return write_export(export_payload(backbone.state_dict, backbone.spec, fmt, backbone.source), out)


def export_test_network(checkpoint: str | os.PathLike, out: str | os.PathLike, *, input_kind: str = "uint8",
                        l2_normalize: bool = False, size: Optional[tuple[int, int]] = None,
                        modality: str = "rgb") -> Path:
    """ONNX of the test-time network of a fine-tuning run / checkpoint or an exported backbone
    (module doc): input ``images`` (uint8 or normalized float) at the model's input size, output
    its test feature, for images of ``modality``."""
    # a pre-training checkpoint is refused there: export its backbone first, then that file
    loaded = load_for_evaluation(Path(checkpoint), device="cpu", size=size)
    return export_onnx(EmbeddingOf(loaded.model, loaded.feature, modality), out, image_size=loaded.size,
                       input_kind=input_kind, normalization=loaded.normalization, l2_normalize=l2_normalize)


def build_parser() -> ArgumentParser:
    formats = "\n".join(f"  {name:<16} {f.description}" for name, f in FORMATS.items())
    parser = ArgumentParser(
        prog="reid-export",
        description="Export the pre-trained backbone (PASS: the teacher ViT) of a train.pretrain checkpoint, or "
                    "(--format onnx) the test-time network of a fine-tuning run or an exported backbone.",
        epilog=f"formats:\n{formats}\n  {ONNX:<16} ONNX graph of the test-time network: images in, test feature out "
               "(fine-tuning run or exported backbone; needs the onnx extra)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (RUN/checkpoints/step_*) or a run folder (its latest); "
                                           "--format onnx: a fine-tuning run / checkpoint or an exported backbone file")
    parser.add_argument("--format", default="native", choices=[*FORMATS, ONNX], help="key layout (default: native)")
    parser.add_argument("--out", required=True, help="file to write (torch.save; --format onnx: the .onnx graph)")
    parser.add_argument("--input_kind", default="uint8", choices=INPUT_KINDS,
                        help="--format onnx: uint8 pixels (normalized in the graph; default) or normalized float")
    parser.add_argument("--l2_normalize", type=parse_bool, nargs="?", const=True, default=False,
                        help="--format onnx: L2-normalize the output feature in the graph (default false)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="--format onnx, an exported backbone: input size (default: the network's)")
    parser.add_argument("--modality", default="rgb", choices=("rgb", "ir"),
                        help="--format onnx: the images' modality; a two-stream network's graph holds that "
                             "modality's stem (one graph per modality; default rgb)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.format == ONNX:
        path = export_test_network(args.checkpoint, args.out, input_kind=args.input_kind,
                                   l2_normalize=args.l2_normalize, size=tuple(args.size) if args.size else None,
                                   modality=args.modality)
    else:
        path = export(args.checkpoint, args.format, args.out)
    print(f"wrote {path} ({args.format})")
    return 0


def entry_point() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry_point()
