"""Reading backbone weights from files: native exports, plain state dicts, the checks that make a
wrong file a one-line :class:`~common.errors.UserError`.

- :func:`read_weights_file`: what a ``.pt`` / ``.pth`` / ``.safetensors`` file holds.
- :func:`load_backbone`: rebuild and load a ``native`` export (:mod:`models.export` writes it:
  ``{"format": NATIVE_FORMAT, "backbone": BackboneSpec.to_dict(), "state_dict", "source"}``).
- :func:`read_backbone_state` / :func:`load_backbone_weights`: a backbone state dict with this
  project's module names, possibly nested under ``state_dict`` / ``model`` / ``backbone`` /
  ``teacher`` or prefixed ``backbone.`` / ``module.``, loaded into a given backbone; every key
  must be present.
- :func:`infer_arch` / :func:`infer_spec`: the registry name (and the factory arguments, e.g.
  ``non_local``) of a plain native state dict, from its keys and shapes.
- :func:`backbone_from_file`: any of the above, rebuilt.

A backbone with AGW's non-local blocks (``NL_2.*``, ``NL_3.*``) takes a file without them (an
MMGL export: MMGL pre-trains without them): those blocks, and only those, keep their identity
init, as AGW's own loading (``load_state_dict(strict=False)``) leaves them. A ViT takes a file
whose patch position embeddings are on another grid (a 256x128 export into a 384x128 model):
they are resized as PASS_transreid's loader does (:func:`models.vit.adapt_to_model`).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from common.errors import UserError
from models.formats import read_safetensors
from models.registry import BackboneSpec, backbone_entry, canonical_name, create_backbone, spec_from_dict
from models.vit import VisionTransformer, adapt_to_model

NATIVE_FORMAT = "reid-pretrain/native-backbone/1"
StateDict = dict[str, torch.Tensor]
#: Key prefixes a backbone file may lack: AGW's non-local blocks keep their identity init.
OWN_INIT_PREFIXES = ("NL_",)


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


def is_native_export(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == NATIVE_FORMAT


def native_spec(payload: dict, path: str | Path) -> BackboneSpec:
    """The :class:`BackboneSpec` of a native export's payload (older exports name a factory)."""
    spec = payload.get("backbone") or {}
    if not (spec.get("name") or spec.get("factory")):
        raise UserError(f"{path} does not say how to rebuild its backbone; build it yourself and load "
                        "payload['state_dict']")
    return spec_from_dict(spec)


def load_backbone(path: str | Path) -> nn.Module:
    """Rebuild and load a ``native`` export: the backbone module, weights loaded strictly."""
    payload = read_weights_file(path)
    if not is_native_export(payload):
        raise UserError(f"{path} is not a native export (written by `reid-export --format native`)")
    model = native_spec(payload, path).build()
    model.load_state_dict(payload["state_dict"], strict=True)
    return model


def read_backbone_state(path: str | Path, payload: Any = None) -> StateDict:
    """The backbone state dict in a file (module docstring: nesting and prefixes accepted);
    ``payload``: the file's content when already read by :func:`read_weights_file`."""
    path = Path(path)
    if payload is None and not path.is_file():
        raise UserError(f"backbone file {path} does not exist (give an export, or --init random)")
    state = read_weights_file(path) if payload is None else payload
    for key in ("state_dict", "model", "backbone", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_backbone_weights(backbone: nn.Module, path: str | Path, payload: Any = None) -> list[str]:
    """Load an exported backbone into ``backbone``; every key must match but the non-local
    blocks' (module docstring). ``payload``: the file's content when already read. Returns the
    keys left at their init (``NL_*`` keys the file lacks), sorted."""
    state = read_backbone_state(path, payload)
    if isinstance(backbone, VisionTransformer) and "patch_pos_embed" in state:
        try:
            state = adapt_to_model(backbone, state)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None
    own = backbone.state_dict()
    left_at_init = sorted(k for k in set(own) - set(state) if k.startswith(OWN_INIT_PREFIXES))
    missing = sorted(set(own) - set(state) - set(left_at_init))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit a {type(backbone).__name__}: {len(missing)} missing key(s) "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}); export it with "
            "`reid-export CHECKPOINT --format native`, or check --arch (and --non_local)")
    wrong = [k for k in state if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"{path}: {len(wrong)} weight(s) of the wrong shape, e.g. {k} {tuple(state[k].shape)} "
                        f"instead of {tuple(own[k].shape)} (another --arch or --image_size?)")
    backbone.load_state_dict(state, strict=not left_at_init)
    return left_at_init


#: Stem width -> ResNet name; embedding width -> ViT name (:func:`infer_arch`).
_RESNETS_BY_WIDTH = {64: "resnet50", 32: "resnet_narrow", 8: "resnet_tiny"}
_VITS_BY_WIDTH = {384: "vit_small", 768: "vit_base", 48: "vit_tiny"}


def infer_arch(state: StateDict) -> str:
    """The registry name of a native backbone state dict, from its keys and shapes."""
    name = None
    if "stems.rgb.conv1.weight" in state:
        base = _RESNETS_BY_WIDTH.get(state["stems.rgb.conv1.weight"].shape[0])
        name = base and base + "_two_stream"
    elif "conv1.weight" in state:
        name = _RESNETS_BY_WIDTH.get(state["conv1.weight"].shape[0])
    elif "patch_embed.proj.weight" in state:
        name = _VITS_BY_WIDTH.get(state["patch_embed.proj.weight"].shape[0])
    if name is None:
        raise UserError("the weights are neither a ResNet nor a ViT backbone of this project (unknown key "
                        "layout or width); export them with `reid-export CHECKPOINT --format native`")
    return canonical_name(name)


def infer_spec(state: StateDict, size: Optional[tuple[int, int]] = None) -> BackboneSpec:
    """How to rebuild the network of a native backbone state dict: :func:`infer_arch`, with
    ``non_local=True`` when it holds AGW's non-local blocks (``NL_*`` keys), and ``img_size``
    (``size``, default: the network's input size) for a ViT."""
    name = infer_arch(state)
    entry = backbone_entry(name)
    kwargs: dict[str, Any] = {}
    if any(k.startswith(OWN_INIT_PREFIXES) for k in state):
        kwargs["non_local"] = True
    if entry.sized:
        kwargs["img_size"] = tuple(size) if size else entry.input_size
    return BackboneSpec(name, kwargs)


def backbone_from_file(path: str | Path, size: Optional[tuple[int, int]] = None) -> tuple[nn.Module, str]:
    """A backbone file rebuilt, and its registry name: a native export by :func:`load_backbone`;
    a plain state dict with this project's keys matched to a network by :func:`infer_spec` and
    built for ``size`` (default: the network's :attr:`~models.registry.BackboneEntry.input_size`)."""
    payload = read_weights_file(path)
    if is_native_export(payload):
        return load_backbone(path), native_spec(payload, path).name
    spec = infer_spec(read_backbone_state(path, payload), size)
    backbone = spec.build()
    load_backbone_weights(backbone, path, payload)
    return backbone, spec.name


__all__ = ["NATIVE_FORMAT", "OWN_INIT_PREFIXES", "backbone_from_file", "infer_arch", "infer_spec", "is_native_export",
           "load_backbone",
           "load_backbone_weights", "native_spec", "read_backbone_state", "read_weights_file"]
