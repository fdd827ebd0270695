"""Backbone weights in the key layouts other code loads: the export formats and the writer.

What to export comes from the training side (:mod:`train.export` reads a checkpoint and calls
:func:`write_export`; the command is ``reid-export`` / ``python -m train.export``): this module
knows backbones and key layouts only, never checkpoints or methods.

Formats (:data:`FORMATS`; each is a key conversion living next to its model):

- ``native``: ``{"format", "backbone": {"name", "kwargs"}, "state_dict", "source"}``, the
  project's own keys and the :class:`~models.registry.BackboneSpec` to rebuild it;
  :func:`models.weights.load_backbone` rebuilds the model and loads it strictly.
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
file's metadata and :func:`models.weights.read_weights_file` reads it back).

To add a format: put the key conversion in the model's file (or :mod:`models.formats`) and add an :class:`ExportFormat` to
:data:`FORMATS` naming the backbone family (:attr:`models.registry.BackboneEntry.family`) it
applies to.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from common.errors import UserError
from models.registry import BackboneSpec, backbone_entry
from models.formats import save_weights, to_pass_transreid_state, to_timm_state, to_transreid_state
from models.resnet import to_agw_state, to_torchvision_rgb_state, to_torchvision_state
from models.weights import NATIVE_FORMAT, StateDict


@dataclass(frozen=True)
class ExportFormat:
    """``convert(state_dict) -> state_dict`` for backbones of ``family`` (None: any backbone)."""

    convert: Callable[[StateDict], StateDict]
    family: Optional[str]
    description: str


FORMATS: dict[str, ExportFormat] = {
    "native": ExportFormat(dict, None, "the project's keys + how to rebuild the backbone (models.weights.load_backbone)"),
    "transreid": ExportFormat(to_transreid_state, "vit", "TransReID deit_small_patch16_224_TransReID keys (its load_param)"),
    "timm": ExportFormat(to_timm_state, None, "timm vit_small_patch16_224 / resnet50 with num_classes=0 (strict=True)"),
    "pass_reid": ExportFormat(to_pass_transreid_state, "vit", "PASS_transreid ViT keys (part_token1..3, cls_pos, ...)"),
    "torchvision": ExportFormat(to_torchvision_state, "resnet", "torchvision ResNet-50 keys (one-stream models)"),
    "torchvision_rgb": ExportFormat(to_torchvision_rgb_state, "resnet", "torchvision ResNet-50 keys, the RGB stem of a two-stream model"),
    "agw": ExportFormat(to_agw_state, "resnet", "AGW cross-modal embed_net keys (load with strict=False)"),
}


def export_payload(state_dict: StateDict, spec: Optional[BackboneSpec], fmt: str,
                   source: Mapping[str, Any]) -> Any:
    """What the file of format ``fmt`` holds for a backbone ``state_dict`` (native keys) built by
    ``spec`` (None: unknown); ``source`` (where it came from) is kept by the native format."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    chosen = FORMATS[fmt]
    family = backbone_entry(spec.name).family if spec else None
    if chosen.family is not None and family != chosen.family:
        raise UserError(f"format {fmt!r} is for {chosen.family} backbones; this checkpoint's backbone "
                        f"is {spec.name if spec else 'unknown'}")
    if fmt == "native":
        return {"format": NATIVE_FORMAT, "backbone": spec.to_dict() if spec else {}, "state_dict": state_dict,
                "source": dict(source)}
    return chosen.convert(state_dict)


def write_export(payload: Any, out: str | os.PathLike) -> Path:
    """``payload`` to ``out`` (torch.save, or safetensors for a ``.safetensors`` name) through a
    temporary file (never a half-written export under the final name); an unwritable ``out`` is a
    one-line :class:`UserError`."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'backbone.pth'}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_weights(payload, tmp, safetensors=out.suffix == ".safetensors")
        os.replace(tmp, out)
    except OSError as err:
        with contextlib.suppress(OSError):  # absent, or its folder is not one
            tmp.unlink()
        where = f" ({err.filename})" if err.filename else ""
        raise UserError(f"cannot write the export to {out}: {err.strerror or err}{where}") from None
    return out


__all__ = ["ExportFormat", "FORMATS", "export_payload", "write_export"]
