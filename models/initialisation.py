"""Where a fine-tuning backbone's weights come from: the ``--init`` of ``reid-finetune``.

``init`` is one of

- ``random``: the network's own init;
- ``imagenet:PATH``: a torchvision or timm ImageNet ResNet-50 state dict, the AGW baseline's init
  (:func:`models.imagenet.load_imagenet`: ``fc.*`` dropped, the ImageNet stem in both stems);
- ``PATH`` of an official PASS-reID file, recognised by its keys: a ``main_pass.py`` checkpoint
  (a ``teacher`` entry) or the converted PASS_transreid file (``part_token1`` ...):
  :func:`models.formats.load_pass_reid_weights` (read safely, position embeddings resized);
- ``PATH`` of any other backbone file with this project's keys (a native export, a plain state
  dict): :func:`models.weights.load_backbone_weights`.

Every failure is a one-line :class:`~common.errors.UserError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from common.errors import UserError
from models.formats import load_pass_reid_weights, read_checkpoint
from models.imagenet import load_imagenet
from models.vit import VisionTransformer
from models.weights import load_backbone_weights, read_weights_file

IMAGENET_PREFIX = "imagenet:"


def is_pass_reid_payload(payload: Any) -> bool:
    """True for the content of an official PASS-reID file: a pre-training checkpoint (``teacher``)
    or the converted PASS_transreid layout (``part_token1``), possibly under ``model`` /
    ``state_dict``."""
    for wrapper in ("model", "state_dict"):
        if isinstance(payload, Mapping) and isinstance(payload.get(wrapper), Mapping):
            payload = payload[wrapper]
    return isinstance(payload, Mapping) and ("teacher" in payload or any(
        str(k).removeprefix("module.").removeprefix("backbone.") == "part_token1" for k in payload))


def _read_any(path: Path) -> Any:
    """The file's content: safetensors as :func:`read_weights_file` reads them, a torch file with
    a PASS-reID checkpoint's ``args`` allowed (:func:`models.formats.read_checkpoint`)."""
    return read_weights_file(path) if path.suffix == ".safetensors" else read_checkpoint(path)


def initialise_backbone(backbone: nn.Module, init: str) -> str:
    """Load ``init`` (module docstring) into ``backbone`` in place; returns a one-line
    description of what was loaded (and what kept its own init)."""
    if init == "random":
        return "random init"
    if init.startswith(IMAGENET_PREFIX):
        path = Path(init[len(IMAGENET_PREFIX):]).expanduser()
        if not str(path) or str(path) == ".":
            raise UserError("--init imagenet:PATH needs the path of a torchvision or timm ResNet-50 state dict")
        if isinstance(backbone, VisionTransformer):
            raise UserError("--init imagenet:PATH loads an ImageNet ResNet-50; this run's --arch is a ViT")
        load_imagenet(backbone, path)
        return f"ImageNet ResNet-50 from {path} (stem into every stem{', non-local blocks at identity' if _has_nl(backbone) else ''})"
    path = Path(init).expanduser()
    payload = _read_any(path)
    if is_pass_reid_payload(payload):
        if not isinstance(backbone, VisionTransformer):
            raise UserError(f"{path} is a PASS-reID ViT checkpoint; this run's --arch is not a ViT")
        load_pass_reid_weights(backbone, path)
        return f"PASS-reID weights from {path}"
    left = load_backbone_weights(backbone, path, payload)
    kept = f" ({len(left)} non-local block weights at their identity init: the file has none)" if left else ""
    return f"backbone from {path}{kept}"


def _has_nl(backbone: nn.Module) -> bool:
    return bool(getattr(backbone, "non_local", False))


__all__ = ["IMAGENET_PREFIX", "initialise_backbone", "is_pass_reid_payload"]
