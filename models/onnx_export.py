"""ONNX export of the test-time network: images in, the test feature out, batch size free.

The graph's input is named ``images``, ``(batch, 3, H, W)`` at the network's input size, either

- ``uint8`` (default): pixels as decoded, 0..255; the graph converts to float, scales to [0, 1]
  and normalizes with the recipe's mean and std itself, so a deployment feeds decoded (and
  resized) images and nothing else; or
- ``float``: float32 images already normalized by the caller, exactly what the PyTorch network
  takes.

Its output ``features`` is ``(batch, D)`` float32: the network's test feature (e.g. the BNNeck
feature of a fine-tuned model), L2-normalized in the graph with ``l2_normalize=True`` (the
project's evaluation compares L2-normalized features). Resizing stays outside the graph (the
evaluation resizes with antialiasing, which ONNX's ``Resize`` does not reproduce exactly).

The graph is produced by ``torch.onnx.export`` (the ``torch.export``-based exporter, opset
:data:`OPSET`) with the batch dimension dynamic, checked by ``onnx.checker``, and carries its
input convention in the model's metadata (``input_kind``, ``image_size``, ``mean``, ``std``,
``l2_normalize``, ``feature_dim``). Exporting needs the ``onnx`` extra (onnx, onnxscript);
running it, an ONNX runtime such as onnxruntime.

A network here is any ``nn.Module`` mapping normalized float ``(B, 3, H, W)`` to ``(B, D)``;
:class:`EmbeddingOf` adapts a model with the fine-tuning model's ``embed(images, modality, which)``
for images of one modality. A two-stream ResNet routes a mixed batch with a stable sort, which
ONNX lacks; for one modality the graph holds that modality's stem alone
(:meth:`~models.resnet.TwoStreamResNet.global_feature_of`), the same numbers: one graph per
modality (RGB gallery, IR queries).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.views.common import NORMALIZATIONS
from common.errors import UserError
from common.modality import MODALITY_CODE
from models.resnet import TwoStreamResNet

OPSET = 18
INPUT_KINDS = ("uint8", "float")


class EmbeddingOf(nn.Module):
    """``model.embed(images, modality, which)`` as a one-input module: ``(B, 3, H, W)`` float ->
    ``(B, D)``, every image of ``modality`` (``rgb`` / ``ir``)."""

    def __init__(self, model: nn.Module, which: str = "bn", modality: str = "rgb") -> None:
        super().__init__()
        if modality not in MODALITY_CODE:
            raise UserError(f"modality must be one of {sorted(MODALITY_CODE)}, got {modality!r}")
        self.model, self.which, self.modality, self.code = model, which, modality, MODALITY_CODE[modality]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model.backbone, TwoStreamResNet):
            # every row is of one modality: its stem directly (the routing's sort has no ONNX op)
            features = self.model.backbone.global_feature_of(images, self.modality)
            return self.model.bottleneck(features) if self.which == "bn" else features
        modality = torch.full(images.shape[:1], self.code, dtype=torch.long, device=images.device)
        return self.model.embed(images, modality, self.which)


class TestTimeNetwork(nn.Module):
    """What the ONNX graph computes (module doc): ``images (B, 3, H, W)`` uint8 or normalized
    float -> ``features (B, D)`` float32."""

    def __init__(self, network: nn.Module, input_kind: str = "uint8", normalization: str = "imagenet",
                 l2_normalize: bool = False) -> None:
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise UserError(f"input kind must be one of {', '.join(INPUT_KINDS)}, got {input_kind!r}")
        if normalization not in NORMALIZATIONS:
            raise UserError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
        self.network, self.input_kind, self.l2_normalize = network, input_kind, l2_normalize
        mean, std = NORMALIZATIONS[normalization]
        # (x / 255 - mean) / std folded into one multiply-add, the constants and the operation of
        # the evaluation's pipelines.views.common.Normalizer, so both give the same floats
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        self.mean, self.std = mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.float(), self.scale) if self.input_kind == "uint8" else images
        features = self.network(x).float()
        return F.normalize(features, dim=1) if self.l2_normalize else features


def _example(image_size: tuple[int, int], input_kind: str, batch: int = 2) -> torch.Tensor:
    shape = (batch, 3, *image_size)
    if input_kind == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    return torch.randn(shape)


def export_onnx(network: nn.Module, path: str | Path, *, image_size: tuple[int, int], input_kind: str = "uint8",
                normalization: str = "imagenet", l2_normalize: bool = False, opset: int = OPSET) -> Path:
    """Write ``network`` (normalized float ``(B, 3, H, W)`` -> ``(B, D)``) as an ONNX graph at
    ``path`` (module doc): input ``images`` of ``input_kind`` at ``image_size`` (H, W), output
    ``features``, dynamic batch. The network is exported on the CPU in eval mode (its modules'
    training flags and its device are restored). Returns the path."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install 'reid-pretrain[onnx]'")
    wrapped = TestTimeNetwork(network, input_kind, normalization, l2_normalize)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(network.parameters()).device
    modes = {module: module.training for module in network.modules()}
    wrapped.cpu().eval()
    try:
        example = _example(tuple(image_size), input_kind)
        with torch.no_grad():
            feature_dim = int(wrapped(example).shape[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            program = torch.onnx.export(wrapped, (example,), dynamo=True, input_names=["images"],
                                        output_names=["features"], opset_version=opset, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(path), external_data=False)
    finally:
        network.to(device)
        for module, training in modes.items():
            module.train(training)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    meta = {"input_kind": input_kind, "image_size": json.dumps(list(image_size)), "mean": json.dumps(wrapped.mean),
            "std": json.dumps(wrapped.std), "l2_normalize": str(l2_normalize).lower(), "feature_dim": str(feature_dim)}
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return path


__all__ = ["EmbeddingOf", "INPUT_KINDS", "OPSET", "TestTimeNetwork", "export_onnx"]
