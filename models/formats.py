"""Weights in and out of the code bases users run: official PASS-reID checkpoints in; timm,
TransReID and PASS_transreid layouts out; safetensors files.

In: official PASS-reID weights (:func:`load_pass_reid_weights`)
-----------------------------------------------------------------
Two layouts are accepted, the two the PASS_transreid loader (``TransReID.load_param`` in
``PASS_transreid/model/backbones/vit_pytorch.py``) takes:

- a pre-training checkpoint of ``PASS/main_pass.py`` (``checkpoint.pth``, ``checkpoint0100.pth``):
  a dict with ``teacher`` (``backbone.*`` + the DINO heads ``head.*``, ``module.``-prefixed
  when the teacher was wrapped in DistributedDataParallel), ``student`` (``module.backbone.*``),
  ``optimizer``, ``epoch``, ``args`` (an ``argparse.Namespace``), ``dino_loss`` (the centers)
  and maybe ``fp16_scaler``. The teacher's backbone is taken, as the reference does: ``module.``
  stripped, keys outside ``backbone.`` dropped, ``backbone.`` stripped;
- the converted file the PASS release distributes (``pass_vit_small_full.pth``, what
  ``PASS/convert_model_dino.py`` writes): the teacher backbone as a plain state dict, maybe in a
  ``model`` or ``state_dict`` wrapper.

Keys containing ``head``, ``dist`` or ``pre_logits`` are skipped (the reference's rule). The
PASS layout (``part_token1..K``, ``cls_pos``, ``part{k}_pos`` ``(1, 1, D)``, ``pos_embed`` of
the patches only) is converted to this project's ViT (:func:`models.vit.from_pass_reid_state_dict`),
the patch position embeddings are resized to the model's grid when it differs (bilinear, as the
reference's loader; 16x8 -> 24x8 for 384x128) and the result is loaded strictly: a key the model
does not have, or one it lacks, is an error, not a silent skip.

Files are read with ``torch.load(weights_only=True)``: no arbitrary code runs. A pre-training
checkpoint holds one non-tensor object, its ``args`` (``argparse.Namespace``), which is allowed
by name (:data:`CHECKPOINT_SAFE_GLOBALS`, through ``torch.serialization.safe_globals``) and
nothing else; any other object in the file is refused with a one-line error naming it.

Out: key layouts (:data:`models.export.FORMATS`)
-------------------------------------------------
- ``transreid`` (:func:`to_transreid_state`): TransReID's (damo-cv/TransReID)
  ``deit_small_patch16_224_TransReID`` (dim 384, depth 12, 6 heads; NOT its
  ``vit_small_patch16_224_TransReID``, a 768-wide, 8-block network). Keys ``cls_token``,
  ``pos_embed`` ``(1, 1 + N, D)``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``; the
  [PART] tokens have no place there and are left out, because its ``load_param`` crashes on any
  key its model lacks.
- ``timm`` (:func:`to_timm_state`): ``timm.create_model("vit_small_patch16_224",
  img_size=(256, 128), num_classes=0)`` (the same keys as ``transreid``), or for a ResNet
  ``timm.create_model("resnet50", num_classes=0)`` (torchvision's keys without ``fc``): both
  load with ``strict=True``.
- ``pass_reid``: PASS_transreid's ViT (``part_token1..3``...): :func:`to_pass_transreid_state`.

Safetensors: :func:`save_weights` writes any format as safetensors (``models.export`` does so
for an ``--out`` name ending in ``.safetensors`` (tensors made contiguous and unshared; the ``native`` format's description goes to the
file's string metadata), and :func:`read_safetensors` reads it back.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.resnet import to_torchvision_state
from models.vit import (
    TIMM_EXTRA_KEYS,
    VisionTransformer,
    adapt_to_model,
    from_pass_reid_state_dict,
    to_pass_reid_state_dict,
    to_timm_state_dict,
)
from common.errors import UserError

StateDict = dict[str, torch.Tensor]

#: The only non-tensor types a PASS-reID checkpoint may hold (its ``args``).
CHECKPOINT_SAFE_GLOBALS = (argparse.Namespace,)
#: Substrings of keys the PASS_transreid / TransReID loaders skip.
SKIPPED_KEY_PARTS = ("head", "dist", "pre_logits")
#: PASS_transreid's ViT has exactly three [PART] tokens (``part_token1..3``).
PASS_TRANSREID_PARTS = 3


# --- reading ---------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with :data:`CHECKPOINT_SAFE_GLOBALS` allowed, on
    the CPU; a missing file, an unreadable one or one holding other objects is a one-line
    :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:
            raise UserError(f"cannot read weights from {path}: not a weights file (tensors saved with torch.save)") from None
        raise UserError(f"cannot read {path} safely: it holds an object of type {found.group(1)}, and only tensors and "
                        "a checkpoint's args are read (never arbitrary code)") from None
    except Exception as err:  # not a torch file, truncated, ...
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UserError(f"cannot read weights from {path}: {lines[0] if lines else type(err).__name__}") from None


def pass_reid_backbone(payload: Any) -> StateDict:
    """The ViT backbone of a PASS-reID file's contents, in PASS's own keys (module docstring):
    ``model`` / ``state_dict`` wrappers unwrapped, a pre-training checkpoint's ``teacher``
    taken (``module.`` stripped, only ``backbone.*`` kept, ``backbone.`` stripped), keys
    containing ``head`` / ``dist`` / ``pre_logits`` skipped."""
    if not isinstance(payload, Mapping):
        raise UserError(f"expected a state dict or a PASS-reID checkpoint, found a {type(payload).__name__}")
    for wrapper in ("model", "state_dict"):
        if wrapper in payload and isinstance(payload[wrapper], Mapping):
            payload = payload[wrapper]
    if "teacher" in payload:
        teacher = {k.removeprefix("module."): v for k, v in payload["teacher"].items()}
        payload = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    state = {k: v for k, v in payload.items() if not any(part in k for part in SKIPPED_KEY_PARTS)}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise UserError("not a PASS-reID ViT state dict" + (f" (non-tensor entries: {', '.join(bad[:5])})" if bad else
                                                            " (no backbone weights found)"))
    return state


def load_pass_reid_weights(model: VisionTransformer, path: str | os.PathLike, hw_ratio: int = 2) -> StateDict:
    """Load official PASS-reID weights (a ``main_pass.py`` checkpoint or the converted
    PASS_transreid file) into ``model`` strictly, its patch position embeddings resized to the
    model's grid; returns the loaded state (this project's keys). ``hw_ratio``: height / width
    of the pre-training images (2 for 256x128; PASS_transreid's ``PRETRAIN_HW_RATIO``)."""
    try:
        state = from_pass_reid_state_dict(pass_reid_backbone(read_checkpoint(path)))
    except KeyError as err:
        raise UserError(f"{path} is not in the PASS-reID ViT layout: {err.args[0]}") from None
    try:
        state = adapt_to_model(model, state, hw_ratio)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise UserError(f"the weights of {path} do not fit this ViT: {' '.join(first[1:3]) or first[0]}") from None
    return state


# --- writing ---------------------------------------------------------------------------------------
def to_transreid_state(state: StateDict) -> StateDict:
    """Native ViT backbone -> TransReID's ``deit_small_patch16_224_TransReID`` keys (module
    docstring): timm's layout without the [PART] keys its loader would crash on."""
    return {k: v for k, v in to_timm_state_dict(state).items() if k not in TIMM_EXTRA_KEYS}


def to_timm_state(state: StateDict) -> StateDict:
    """Native backbone -> a timm model's keys: a ViT as ``vit_small_patch16_224`` (``cls_token``,
    ``pos_embed`` ``(1, 1 + N, D)``, ``patch_embed``, ``blocks``, ``norm``), a one-stream ResNet
    as ``resnet50`` (torchvision's keys; timm's ResNet has the same names), both with
    ``num_classes=0`` (no head keys) so that ``load_state_dict(strict=True)`` takes them."""
    if "cls_token" in state:
        return to_transreid_state(state)
    return to_torchvision_state(state)


def to_pass_transreid_state(state: StateDict) -> StateDict:
    """Native ViT backbone -> PASS_transreid's ViT keys (:func:`models.vit.to_pass_reid_state_dict`);
    refused unless the backbone has the three [PART] tokens that network has."""
    parts = state["part_tokens"].shape[1]
    if parts != PASS_TRANSREID_PARTS:
        raise UserError(f"PASS_transreid's ViT has {PASS_TRANSREID_PARTS} [PART] tokens, this backbone has {parts}; "
                        "its loader would crash on the difference")
    return to_pass_reid_state_dict(state)


def save_weights(payload: Any, path: Path, safetensors: bool) -> None:
    """Write ``payload`` to ``path``: with ``safetensors`` (for ``.safetensors`` names) a
    ``{key: tensor}`` dict, or a ``native`` payload's ``state_dict`` with its other entries as
    JSON string metadata; else ``torch.save``. The caller handles temporary names and errors."""
    if not safetensors:
        with open(path, "wb") as f:  # opened here: a clear OSError (torch.save's own is a RuntimeError)
            torch.save(payload, f)
        return
    from safetensors.torch import save

    if "state_dict" in payload:  # native: tensors + how to rebuild the model
        tensors = payload["state_dict"]
        metadata = {k: json.dumps(v) for k, v in payload.items() if k != "state_dict"}
    else:
        tensors, metadata = payload, {}
    # safetensors refuses shared or non-contiguous storage: give every tensor its own.
    data = save({k: v.detach().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)


def read_safetensors(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any]]:
    """A ``.safetensors`` file's tensors and its metadata (JSON values decoded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: _json_or_text(v) for k, v in (f.metadata() or {}).items()}
    return tensors, metadata


def _json_or_text(value: str) -> Any:
    """Metadata written by :func:`save_weights` is JSON; other writers store plain strings."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


__all__ = [
    "CHECKPOINT_SAFE_GLOBALS",
    "load_pass_reid_weights",
    "pass_reid_backbone",
    "read_checkpoint",
    "read_safetensors",
    "save_weights",
    "to_pass_transreid_state",
    "to_timm_state",
    "to_transreid_state",
]
