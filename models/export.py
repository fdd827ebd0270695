"""Backbone weights in the key layouts other code loads: the export formats and the writer.

What to export comes from the training side (:mod:`train.export` reads a checkpoint and calls
:func:`write_export`; the command is ``reid-export`` / ``python -m train.export``): this module
knows backbones and key layouts only, never checkpoints or methods.

Formats (:data:`FORMATS`; each is a key conversion living next to its model):

- ``native``: ``{"format", "backbone": {"name", "kwargs"}, "state_dict", "source"}``, the
  project's own keys and the :class:`~models.registry.BackboneSpec` to rebuild it;
  :func:`models.weights.load_backbone` rebuilds the model and loads it strictly.
- ``transreid``: a plain ``state_dict`` in timm's / TransReID's ViT layout
  (:func:`models.vit.to_timm_state_dict`): ``patch_embed.proj.*``, ``cls_token``, ``pos_embed``
  ``(1, 1 + N, D)``, ``blocks.N.*``, ``norm.*``, plus the extra keys ``part_tokens`` and
  ``part_pos_embed`` ``(1, K, D)``, which ``load_state_dict(..., strict=False)`` reports as
  unexpected and skips.
- ``pass_reid``: a plain ``state_dict`` for PASS-reID's own fine-tuning ViT
  (:func:`models.vit.to_pass_reid_state_dict`: ``part_token{k}``, ``cls_pos``, ``part{k}_pos``,
  ``pos_embed`` of the patches only).
- ``torchvision`` / ``torchvision_rgb`` / ``agw`` (ResNet backbones, :mod:`models.resnet`):
  torchvision's ResNet-50 keys (a one-stream model; ``torchvision_rgb`` keeps the RGB stem of a
  two-stream one) and the AGW ``embed_net`` keys (load with ``strict=False``).

To add a format: put the key conversion in the model's file and add an :class:`ExportFormat` to
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
from models.resnet import to_agw_state, to_torchvision_rgb_state, to_torchvision_state
from models.vit import to_pass_reid_state_dict, to_timm_state_dict
from models.weights import NATIVE_FORMAT, StateDict


@dataclass(frozen=True)
class ExportFormat:
    """``convert(state_dict) -> state_dict`` for backbones of ``family`` (None: any backbone)."""

    convert: Callable[[StateDict], StateDict]
    family: Optional[str]
    description: str


FORMATS: dict[str, ExportFormat] = {
    "native": ExportFormat(dict, None, "the project's keys + how to rebuild the backbone (models.weights.load_backbone)"),
    "transreid": ExportFormat(to_timm_state_dict, "vit", "timm / TransReID ViT keys (+ part_tokens, part_pos_embed)"),
    "pass_reid": ExportFormat(to_pass_reid_state_dict, "vit", "PASS-reID fine-tuning ViT keys"),
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
    """``torch.save(payload)`` to ``out`` through a temporary file (never a half-written export
    under the final name); an unwritable ``out`` is a one-line :class:`UserError`."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'backbone.pth'}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # opened here: a clear OSError (torch.save's own is a RuntimeError)
            torch.save(payload, f)
        os.replace(tmp, out)
    except OSError as err:
        with contextlib.suppress(OSError):  # absent, or its folder is not one
            tmp.unlink()
        where = f" ({err.filename})" if err.filename else ""
        raise UserError(f"cannot write the export to {out}: {err.strerror or err}{where}") from None
    return out


__all__ = ["ExportFormat", "FORMATS", "export_payload", "write_export"]
