"""Export the pre-trained backbone of a training checkpoint in the key layout other code loads.

    python -m models.export RUN/checkpoints/step_00012345 --format transreid --out vit_small_pass.pth
    python -m models.export RUN --format native --out backbone.pth      # a run folder: its latest checkpoint

The backbone is what the method's :meth:`~train.methods.base.Method.backbone_state_dict` gives
(PASS: the teacher's ViT, as DINO and PASS export; MMGL: the ResNet), read from the checkpoint
without building the rest of the training state (the method is built on the meta device and
the saved tensors are assigned to it).

Formats (:data:`FORMATS`; each is a key conversion living next to its model):

- ``native``: ``{"format", "backbone": {"factory", "kwargs"}, "state_dict", "source"}``, the
  project's own keys; :func:`load_backbone` rebuilds the model and loads it strictly.
- ``transreid``: a plain ``state_dict`` for TransReID's (damo-cv/TransReID)
  ``deit_small_patch16_224_TransReID`` (:func:`models.formats.to_transreid_state`):
  ``patch_embed.proj.*``, ``cls_token``, ``pos_embed`` ``(1, 1 + N, D)``, ``blocks.N.*``,
  ``norm.*``; loads with its ``load_param`` (the [PART] tokens are left out: an unexpected key
  is fatal there). Not its ``vit_small_patch16_224_TransReID``, a different, 768-wide network.
- ``timm``: ``timm.create_model("vit_small_patch16_224", img_size=(256, 128), num_classes=0)``
  or ``timm.create_model("resnet50", num_classes=0)``, ``load_state_dict(strict=True)``
  (:func:`models.formats.to_timm_state`).
- ``pass_reid``: a plain ``state_dict`` for PASS-reID's own fine-tuning ViT
  (``PASS_transreid``: ``part_token1..3``, ``cls_pos``, ``part{k}_pos``, ``pos_embed`` of the
  patches only; :func:`models.formats.to_pass_transreid_state`), what its ``load_param`` takes.

- ``torchvision`` / ``torchvision_rgb`` / ``agw`` (ResNet backbones, :mod:`models.resnet`):
  torchvision's ResNet-50 keys (a one-stream model; ``torchvision_rgb`` keeps the RGB stem of a
  two-stream one) and the AGW ``embed_net`` keys (load with ``strict=False``).

Every format is written as ``torch.save`` or, for an ``--out`` name ending in ``.safetensors``,
as safetensors (:func:`models.formats.save_weights`; a native export's description goes to the
file's metadata and :func:`load_backbone` reads it back).

To add a format: put the key conversion in the model's file (or :mod:`models.formats`) and add an
:class:`ExportFormat` to :data:`FORMATS` naming the backbone module it applies to.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from models.formats import read_safetensors, save_weights, to_pass_transreid_state, to_timm_state, to_transreid_state
from models.resnet import to_agw_state, to_torchvision_rgb_state, to_torchvision_state
from shards.errors import UserError, run_cli

NATIVE_FORMAT = "reid-pretrain/native-backbone/1"
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ExportFormat:
    """``convert(state_dict) -> state_dict`` for backbones built by a factory in module
    ``backbone_module`` (None: any backbone)."""

    convert: Callable[[StateDict], StateDict]
    backbone_module: Optional[str]
    description: str


FORMATS: dict[str, ExportFormat] = {
    "native": ExportFormat(dict, None, "the project's keys + how to rebuild the backbone (models.export.load_backbone)"),
    "transreid": ExportFormat(to_transreid_state, "models.vit", "TransReID deit_small_patch16_224_TransReID keys (its load_param)"),
    "timm": ExportFormat(to_timm_state, None, "timm vit_small_patch16_224 / resnet50 with num_classes=0 (strict=True)"),
    "pass_reid": ExportFormat(to_pass_transreid_state, "models.vit", "PASS_transreid ViT keys (part_token1..3, cls_pos, ...)"),
    "torchvision": ExportFormat(to_torchvision_state, "models.resnet", "torchvision ResNet-50 keys (one-stream models)"),
    "torchvision_rgb": ExportFormat(to_torchvision_rgb_state, "models.resnet", "torchvision ResNet-50 keys, the RGB stem of a two-stream model"),
    "agw": ExportFormat(to_agw_state, "models.resnet", "AGW cross-modal embed_net keys (load with strict=False)"),
}


@dataclass
class ExportedBackbone:
    """The backbone of a checkpoint: native ``state_dict``, how to rebuild it, where it came from."""

    state_dict: StateDict
    factory: Optional[str]
    kwargs: dict[str, Any]
    source: dict[str, Any]


def read_backbone(checkpoint: str | os.PathLike) -> ExportedBackbone:
    """The method's backbone from a checkpoint folder (or a run folder: its latest checkpoint)."""
    from train.checkpointing import load_model_state, read_json, resolve_checkpoint
    from train.config import load_config
    from train.methods import METHODS

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
    spec = method.backbone_spec()
    step = read_json(folder / "trainer_state.json").get("step")
    return ExportedBackbone(
        state_dict={k: v.detach().clone() for k, v in method.backbone_state_dict().items()},
        factory=spec.factory if spec else None,
        kwargs=dict(spec.kwargs) if spec else {},
        source={"checkpoint": str(folder.resolve()), "method": config.method, "preset": config.preset, "step": step},
    )


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike) -> Path:
    """Write the backbone of ``checkpoint`` to ``out`` in format ``fmt``; returns ``out``."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    chosen = FORMATS[fmt]
    backbone = read_backbone(checkpoint)
    module = (backbone.factory or "").partition(":")[0]
    if chosen.backbone_module is not None and module != chosen.backbone_module:
        raise UserError(f"format {fmt!r} is for {chosen.backbone_module} backbones; this checkpoint's backbone "
                        f"is {backbone.factory or 'unknown'}")
    if fmt == "native":
        payload: Any = {"format": NATIVE_FORMAT, "backbone": {"factory": backbone.factory, "kwargs": backbone.kwargs},
                        "state_dict": backbone.state_dict, "source": backbone.source}
    else:
        payload = chosen.convert(backbone.state_dict)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'backbone.pth'}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_weights(payload, tmp, safetensors=out.suffix == ".safetensors")
        os.replace(tmp, out)  # never a half-written export under the final name
    except OSError as err:
        with contextlib.suppress(OSError):  # absent, or its folder is not one
            tmp.unlink()
        where = f" ({err.filename})" if err.filename else ""
        raise UserError(f"cannot write the export to {out}: {err.strerror or err}{where}") from None
    return out


def read_weights_file(path: str | Path) -> Any:
    """What a weights file holds (``.safetensors``, or ``torch.load`` with ``weights_only``);
    a missing or unreadable file is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            tensors, metadata = read_safetensors(path)
            # a native export keeps its description in the metadata (models.formats.save_weights)
            return {**metadata, "state_dict": tensors} if metadata.get("format") == NATIVE_FORMAT else tensors
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: a user error, whatever the loader raised
        # torch.load's messages run over many lines (and suggest weights_only=False): keep the gist.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = "not a weights file (tensors saved with torch.save or safetensors)" if isinstance(
            err, pickle.UnpicklingError) else (lines[0] if lines else type(err).__name__)
        raise UserError(f"cannot read weights from {path}: {reason}") from None


def load_backbone(path: str | os.PathLike) -> nn.Module:
    """Rebuild and load a ``native`` export: the backbone module, weights loaded strictly."""
    payload = read_weights_file(path)
    if not isinstance(payload, dict) or payload.get("format") != NATIVE_FORMAT:
        raise UserError(f"{path} is not a native export (written by `python -m models.export --format native`)")
    spec = payload["backbone"]
    if not spec.get("factory"):
        raise UserError(f"{path} does not say how to rebuild its backbone; build it yourself and load "
                        "payload['state_dict']")
    module_name, _, function = spec["factory"].partition(":")
    model = getattr(importlib.import_module(module_name), function)(**_tuples(spec["kwargs"]))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model


def _tuples(kwargs: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples the factories take (e.g. ``img_size``)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def main(argv: Optional[list[str]] = None) -> int:
    formats = "\n".join(f"  {name:<10} {f.description}" for name, f in FORMATS.items())
    parser = argparse.ArgumentParser(
        prog="python -m models.export",
        description="Export the pre-trained backbone (PASS: the teacher ViT) of a train.pretrain checkpoint.",
        epilog=f"formats:\n{formats}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (RUN/checkpoints/step_*) or a run folder (its latest)")
    parser.add_argument("--format", default="native", choices=list(FORMATS), help="key layout (default: native)")
    parser.add_argument("--out", required=True, help="file to write: torch.save, or safetensors for a .safetensors name")
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.format, args.out)
    print(f"wrote {path} ({args.format})")
    return 0


def entry_point() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry_point()


__all__ = ["ExportFormat", "ExportedBackbone", "FORMATS", "export", "load_backbone", "read_backbone", "read_weights_file"]
