"""The backbone registry: one name per network, used by the pre-training methods, fine-tuning,
export and evaluation (timm's ``register_model`` idea, as a plain dict).

:data:`BACKBONES` maps a name to a :class:`BackboneEntry`: the keyword factory that builds it, its
family (which export formats apply), and its input conventions (default size, normalization). A
:class:`BackboneSpec` (name + keyword arguments, JSON values) is what a checkpoint or an export
stores to rebuild the network: ``spec.build()``.

Every backbone module offers ``global_feature(images, modality) -> (B, feature_dim)`` and
``feature_dim``: the ReID model (:mod:`models.reid`) asks the backbone, never its class.

Old names (configs, checkpoints and native exports written before the registry) are still read:
:data:`ALIASES` (``vit_tiny_test``), :func:`legacy_mmgl_backbone` (MMGL's ``backbone`` +
``two_stream``) and :func:`spec_from_legacy_factory` (an export's ``"models.resnet:resnet_narrow"``).

To add a backbone: write its factory in the model's file (``models/<family>.py``; the module has
``global_feature`` and ``feature_dim``), add one :class:`BackboneEntry` below, and, when its
state dict keys differ from the existing ones, a rule in :func:`models.weights.infer_arch`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from common.errors import UserError
from models.resnet import resnet50, resnet50_two_stream, resnet_narrow, resnet_tiny_test
from models.vit import vit_base, vit_small, vit_tiny_test

RESNET_INPUT = (288, 144)
VIT_INPUT = (256, 128)


@dataclass(frozen=True)
class BackboneEntry:
    """How to build one network and how it expects its input.

    factory: keyword factory returning the module (``sized`` ones take ``img_size``).
    family: ``resnet`` or ``vit``: the export formats of :mod:`models.export` that apply.
    input_size: ``(H, W)`` test input when nothing else says (a native export, a fine-tuned run do).
    normalization: ``imagenet`` or ``half`` (mean = std = 0.5, the PASS convention).
    sized: the factory takes ``img_size`` (a ViT learns position embeddings on that grid).
    """

    factory: Callable[..., nn.Module]
    family: str
    input_size: tuple[int, int]
    normalization: str
    sized: bool
    description: str


BACKBONES: dict[str, BackboneEntry] = {
    "resnet50_two_stream": BackboneEntry(resnet50_two_stream, "resnet", RESNET_INPUT, "imagenet", False,
                                         "ResNet-50, last stride 1, RGB and IR stems (AGW layout)"),
    "resnet50": BackboneEntry(resnet50, "resnet", RESNET_INPUT, "imagenet", False,
                              "ResNet-50, last stride 1, one stem"),
    "resnet_narrow_two_stream": BackboneEntry(functools.partial(resnet_narrow, two_stream=True), "resnet",
                                              RESNET_INPUT, "imagenet", False,
                                              "width-32 ResNet, one block per layer, two stems (CPU runs)"),
    "resnet_narrow": BackboneEntry(resnet_narrow, "resnet", RESNET_INPUT, "imagenet", False,
                                   "width-32 ResNet, one block per layer, one stem"),
    "resnet_tiny_two_stream": BackboneEntry(functools.partial(resnet_tiny_test, two_stream=True), "resnet",
                                            RESNET_INPUT, "imagenet", False, "width-8 test ResNet, two stems"),
    "resnet_tiny": BackboneEntry(resnet_tiny_test, "resnet", RESNET_INPUT, "imagenet", False,
                                 "width-8 test ResNet, one stem"),
    "vit_small": BackboneEntry(vit_small, "vit", VIT_INPUT, "half", True, "ViT-S/16 with [PART] tokens"),
    "vit_base": BackboneEntry(vit_base, "vit", VIT_INPUT, "half", True, "ViT-B/16 with [PART] tokens"),
    "vit_tiny": BackboneEntry(vit_tiny_test, "vit", VIT_INPUT, "half", True, "2-block dim-48 test ViT"),
}

#: Old names still accepted when reading configs, checkpoints and exports.
ALIASES = {"vit_tiny_test": "vit_tiny"}


def canonical_name(name: str) -> str:
    """``name`` or the registry name an old alias stands for; an unknown name is a :class:`UserError`."""
    name = ALIASES.get(name, name)
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; expected one of: {', '.join(BACKBONES)}")
    return name


def backbone_entry(name: str) -> BackboneEntry:
    return BACKBONES[canonical_name(name)]


def create_backbone(name: str, image_size: tuple[int, int] | None = None, **kwargs: Any) -> nn.Module:
    """A fresh backbone ``name``; ``image_size`` ``(H, W)`` reaches the factories that take one
    (ViTs), ``kwargs`` go to the factory (e.g. ``num_parts``, ``drop_path_rate``)."""
    entry = backbone_entry(name)
    if entry.sized and image_size is not None:
        kwargs = {**kwargs, "img_size": tuple(image_size)}
    return entry.factory(**kwargs)


@dataclass(frozen=True)
class BackboneSpec:
    """How to rebuild a backbone: its registry ``name`` and the factory's keyword arguments
    (JSON values), stored in native exports."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return create_backbone(self.name, **_tuples(self.kwargs))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}


def spec_from_dict(values: Mapping[str, Any]) -> BackboneSpec:
    """The inverse of :meth:`BackboneSpec.to_dict`; also reads the older ``{"factory":
    "module:function", "kwargs"}`` form (:func:`spec_from_legacy_factory`)."""
    if values.get("name"):
        return BackboneSpec(canonical_name(values["name"]), dict(values.get("kwargs") or {}))
    if values.get("factory"):
        return spec_from_legacy_factory(values["factory"], values.get("kwargs") or {})
    raise UserError("the backbone description names no network (neither 'name' nor 'factory')")


#: Factory functions of exports written before the registry -> registry name (+ ``_two_stream``).
_LEGACY_FACTORIES = {"resnet50_two_stream": "resnet50_two_stream", "resnet50": "resnet50",
                     "resnet_narrow": "resnet_narrow", "resnet_tiny_test": "resnet_tiny",
                     "vit_small": "vit_small", "vit_base": "vit_base", "vit_tiny_test": "vit_tiny"}


def spec_from_legacy_factory(factory: str, kwargs: Mapping[str, Any]) -> BackboneSpec:
    """``"models.resnet:resnet_narrow"`` + ``{"two_stream": true}`` -> ``resnet_narrow_two_stream``."""
    function = factory.partition(":")[2] or factory
    if function not in _LEGACY_FACTORIES:
        raise UserError(f"unknown backbone factory {factory!r}; expected one of: {', '.join(_LEGACY_FACTORIES)}")
    kwargs = dict(kwargs)
    name = _LEGACY_FACTORIES[function] + ("_two_stream" if kwargs.pop("two_stream", False) else "")
    return BackboneSpec(canonical_name(name), kwargs)


def legacy_mmgl_backbone(backbone: str, two_stream: bool) -> str:
    """MMGL's old pair of settings (``backbone`` resnet50 / narrow / tiny, ``two_stream``) -> name."""
    base = {"resnet50": "resnet50", "narrow": "resnet_narrow", "tiny": "resnet_tiny"}.get(backbone, backbone)
    return canonical_name(base + ("_two_stream" if two_stream and not base.endswith("_two_stream") else ""))


def _tuples(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples the factories take (e.g. ``img_size``)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


__all__ = ["ALIASES", "BACKBONES", "BackboneEntry", "BackboneSpec", "backbone_entry", "canonical_name",
           "create_backbone", "legacy_mmgl_backbone", "spec_from_dict", "spec_from_legacy_factory"]
