"""Export the pre-trained backbone of a training checkpoint in the key layout other code loads.

    reid-export RUN/checkpoints/step_00012345 --format transreid --out vit_small_pass.pth
    reid-export RUN --format native --out backbone.pth      # a run folder: its latest checkpoint

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

from common.cli import ArgumentParser, run_cli
from common.errors import UserError
from models.export import FORMATS, export_payload, write_export
from models.registry import BackboneSpec
from train.checkpointing import load_model_state, read_json, resolve_checkpoint
from train.config import load_config
from train.methods import METHODS

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


def build_parser() -> ArgumentParser:
    formats = "\n".join(f"  {name:<16} {f.description}" for name, f in FORMATS.items())
    parser = ArgumentParser(
        prog="reid-export",
        description="Export the pre-trained backbone (PASS: the teacher ViT) of a train.pretrain checkpoint.",
        epilog=f"formats:\n{formats}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (RUN/checkpoints/step_*) or a run folder (its latest)")
    parser.add_argument("--format", default="native", choices=list(FORMATS), help="key layout (default: native)")
    parser.add_argument("--out", required=True, help="file to write (torch.save)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    path = export(args.checkpoint, args.format, args.out)
    print(f"wrote {path} ({args.format})")
    return 0


def entry_point() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry_point()
