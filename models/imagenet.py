"""ImageNet initialization of this project's ResNets from a user-supplied file, as the AGW
baseline is initialized (the comparison MMGL reports: AGW from ImageNet ~47.50 R1 / ~47.65 mAP
on SYSU-MM01 all-search, against 56.97 / 54.61 from MMGL).

AGW (mangye16/Cross-Modal-Re-ID-baseline ``model.py``) builds each of ``visible_module``,
``thermal_module`` and ``base_resnet`` from ``resnet50(pretrained=True)``, torchvision's ImageNet
weights without ``fc``: the RGB and the IR stem both start from the ImageNet stem, the shared
``layer1`` .. ``layer4`` from the ImageNet layers; the non-local blocks keep their own init.

Input: a torchvision or timm ResNet-50 ImageNet state dict (both name the parameters alike:
``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``, ...,
``fc.*``), read from a file the user passes (``.pth`` / ``.pt`` via ``torch.load`` with
``weights_only``, or ``.safetensors``); nothing is downloaded. ``state_dict`` / ``model``
wrappers and a ``module.`` prefix are accepted. ``num_batches_tracked`` may be absent (timm's
files leave it out); the model's own value is kept then.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.weights import read_weights_file
from common.errors import UserError

_STEM_KEYS = ("conv1.", "bn1.")
_LAYER_KEYS = ("layer1.", "layer2.", "layer3.", "layer4.")
#: Parts of the target backbone that an ImageNet ResNet-50 does not have: they keep their init.
_OWN_INIT_KEYS = ("NL_",)


def _unwrap(payload: Any) -> Mapping[str, torch.Tensor]:
    """The state dict inside a file's payload (plain, or under ``state_dict`` / ``model``),
    without a DataParallel ``module.`` prefix."""
    for wrapper in ("state_dict", "model"):
        if isinstance(payload, Mapping) and isinstance(payload.get(wrapper), Mapping):
            payload = payload[wrapper]
    if not isinstance(payload, Mapping) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise UserError("not an ImageNet ResNet-50 state dict (a mapping of parameter names to tensors)")
    return {key.removeprefix("module."): value for key, value in payload.items()}


def imagenet_backbone_state(payload: Any, two_stream: bool = True) -> dict[str, torch.Tensor]:
    """An ImageNet ResNet state dict -> this project's backbone keys (module docstring).

    payload: a torchvision / timm ResNet state dict (or a wrapper of one).
    two_stream: target a :class:`models.resnet.TwoStreamResNet`: the stem goes to
        ``stems.rgb.*`` AND ``stems.ir.*`` (separate copies, equal values); else to the one-stream
        model's ``conv1.*`` / ``bn1.*``.
    returns: the backbone state without ``fc.*``; tensors of the layers are the payload's.

    A key that is neither stem, layer nor ``fc`` (another architecture's file) is a
    :class:`UserError` naming it.
    """
    state = _unwrap(payload)
    stem = {k: v for k, v in state.items() if k.startswith(_STEM_KEYS)}
    layers = {k: v for k, v in state.items() if k.startswith(_LAYER_KEYS)}
    unknown = sorted(k for k in state if not k.startswith(_STEM_KEYS + _LAYER_KEYS + ("fc.",)))
    if unknown or not stem or not layers:
        raise UserError("not a torchvision/timm ResNet state dict (conv1, bn1, layer1..4, fc)"
                        + (f"; unexpected keys: {', '.join(unknown[:5])}" if unknown else ""))
    if not two_stream:
        return {**stem, **layers}
    out = {f"stems.{name}.{key}": value.clone() for name in ("rgb", "ir") for key, value in stem.items()}
    out.update(layers)
    return out


def load_imagenet(backbone: nn.Module, path: str | Path) -> None:
    """Initialize ``backbone`` (a :class:`models.resnet.ResNet` or ``TwoStreamResNet``) in place
    from the ImageNet ResNet file at ``path``.

    Every backbone key but the non-local blocks' must come from the file with the backbone's
    shape (``num_batches_tracked`` may be missing); otherwise a :class:`UserError` says what
    differs (e.g. a ResNet-18 file, or a test-size backbone).
    """
    two_stream = any(key.startswith("stems.") for key in backbone.state_dict())
    state = imagenet_backbone_state(read_weights_file(path), two_stream)
    own = backbone.state_dict()
    needed = {k for k in own if not k.startswith(_OWN_INIT_KEYS) and not k.endswith("num_batches_tracked")}
    missing = sorted(needed - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in needed & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        details = [f"{label}: {', '.join(keys[:3])}" for label, keys in
                   (("missing", missing), ("unexpected", unexpected), ("other shape", wrong)) if keys]
        raise UserError(f"{path} does not fit this backbone ({'; '.join(details)}): pass an ImageNet ResNet-50 "
                        "state dict from torchvision or timm")
    backbone.load_state_dict(state, strict=False)


__all__ = ["imagenet_backbone_state", "load_imagenet"]
