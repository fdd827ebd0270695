"""ResNet-50 for ReID: last stride 1, one-stream and two-stream (RGB / IR stems) variants.

The architecture is torchvision's ResNet-50 "v1.5" (bottleneck blocks 3-4-6-3, the stride on the
3x3 conv), with the fully connected head removed and the stride of ``layer4`` configurable
(``last_stride=1`` is the ReID convention: 288x144 inputs give an 18x9 map instead of 9x5).

Parameter names follow torchvision exactly so that exported weights load without a renaming
table: ``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``, ``layer4.2.bn3.running_var``...

- :class:`ResNet` (one-stream) keeps the stem at the top level as torchvision does:
  ``conv1.weight``, ``bn1.weight``, ``bn1.running_mean``... Its state dict is torchvision's
  ResNet-50 state dict without ``fc.*``.
- :class:`TwoStreamResNet` (the AGW cross-modal layout used by MMGL) has one stem per modality
  under ``stems``: ``stems.rgb.conv1.weight``, ``stems.rgb.bn1.*``, ``stems.ir.conv1.weight``,
  ``stems.ir.bn1.*``, then the shared ``layer1`` .. ``layer4`` with torchvision's names.

With ``non_local=True`` both carry the AGW baseline's non-local blocks
(:mod:`models.nonlocal_block`: 2 after the last blocks of ``layer2``, 3 after those of
``layer3``, the identity at init) under AGW's key names ``NL_2.*`` and ``NL_3.*``.

Both return the ``layer4`` feature map ``(B, 2048, H/16, W/16)`` (with ``last_stride=1``); heads
belong to the method. Their global ReID feature (:meth:`global_feature`, what
:class:`models.reid.ReIDModel` uses) is the GeM of that map (AGW). Both work with ``channels_last``
inputs and weights: nothing
here calls ``.view`` on an activation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.errors import UserError
from common.modality import MODALITY_CODE
from models.nonlocal_block import AGW_NON_LOCAL_PER_LAYER, NonLocal, run_layer_with_non_local
from models.pooling import gem

RESNET50_BLOCKS = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, torchvision v1.5) -> 1x1 with 4x expansion, plus shortcut.

    ``(B, in_channels, H, W) -> (B, 4 * width, H / stride, W / stride)``.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # torchvision leaves ``downsample`` None (no state-dict keys) when the shapes already match.
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _stem_layers(width: int) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]:
    """conv1 7x7/2, bn1, relu, maxpool 3x3/2: ``(B, 3, H, W) -> (B, width, H/4, W/4)``."""
    return (
        nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


class Stem(nn.Module):
    """One modality's stem in the two-stream model, with torchvision's stem names (conv1, bn1)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = _stem_layers(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, width, H/4, W/4)``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class _ResNetBase(nn.Module):
    """The stem(s), built by the subclass's :meth:`_build_stem` first (so that modules and state
    dict keys come in torchvision's order), then the shared ``layer1`` .. ``layer4``.

    Args:
        blocks: bottleneck blocks per layer, ``(3, 4, 6, 3)`` for ResNet-50.
        base_width: stem channels and layer1's bottleneck width (64 for ResNet-50); the tiny test
            models shrink it, keeping the same code path.
        last_stride: stride of ``layer4`` (1 for ReID, 2 for torchvision's classifier).
        zero_init_residual: start the last BN of every bottleneck at gamma 0 (see
            :meth:`_init_weights`; off by default).
        non_local: add AGW's non-local blocks (``NL_2``, ``NL_3``; see the module docstring).
    """

    def __init__(
        self,
        blocks: Sequence[int] = RESNET50_BLOCKS,
        base_width: int = 64,
        last_stride: int = 1,
        zero_init_residual: bool = False,
        non_local: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be four positive counts, got {tuple(blocks)}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.base_width = base_width
        self.last_stride = last_stride
        self._build_stem(base_width)
        in_channels = base_width
        strides = (1, 2, 2, last_stride)
        for i, (count, stride) in enumerate(zip(blocks, strides)):
            width = base_width * 2**i
            layer = [Bottleneck(in_channels, width, stride)]
            layer += [Bottleneck(width * Bottleneck.expansion, width) for _ in range(count - 1)]
            # ``layer1`` .. ``layer4`` are torchvision's names, kept for key compatibility.
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            in_channels = width * Bottleneck.expansion
        self.num_features = in_channels
        #: Size of :meth:`global_feature` (the ReID model's feature).
        self.feature_dim = in_channels
        self._init_weights(zero_init_residual)
        # Built after the init above: they keep AGW's own init (zero W BatchNorm = identity).
        self.non_local = non_local
        if non_local:
            for i in (2, 3):
                count = min(AGW_NON_LOCAL_PER_LAYER[i - 1], blocks[i - 1])
                channels = base_width * 2 ** (i - 1) * Bottleneck.expansion
                self.add_module(f"NL_{i}", nn.ModuleList(NonLocal(channels) for _ in range(count)))

    def _build_stem(self, width: int) -> None:
        raise NotImplementedError

    def _init_weights(self, zero_init_residual: bool) -> None:
        """Kaiming normal (fan_out, ReLU) for convs, BN weight 1 / bias 0, as torchvision.

        With ``zero_init_residual`` the last BN of every bottleneck starts at gamma 0, so each
        block starts as the identity (Goyal et al., 2017), which helps large-batch training from
        scratch. The default is off, like torchvision's ``resnet50()``, which is what the AGW
        code builds its backbone from.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, base_width, H/4, W/4) -> (B, num_features, H/16, W/16)`` with last stride 1
        (``H/32, W/32`` with last stride 2)."""
        x = self.layer1(x)
        if self.non_local:
            x = run_layer_with_non_local(self.layer2, self.NL_2, x)
            x = run_layer_with_non_local(self.layer3, self.NL_3, x)
        else:
            x = self.layer2(x)
            x = self.layer3(x)
        return self.layer4(x)


class ResNet(_ResNetBase):
    """One-stream ResNet: one stem shared by all modalities. State dict = torchvision's minus fc.

    ``forward(images)``: ``(B, 3, H, W)`` float -> feature map ``(B, num_features, H/16, W/16)``.
    """

    def _build_stem(self, width: int) -> None:
        self.conv1, self.bn1, self.relu, self.maxpool = _stem_layers(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.forward_layers(x)

    def forward_pair(self, rgb: torch.Tensor, ir: torch.Tensor) -> torch.Tensor:
        """Feature maps of an RGB half and an IR half through the shared stem:
        ``(B, 3, H, W)`` x 2 -> ``(2B, num_features, H/16, W/16)``, RGB rows first."""
        return self(torch.cat([rgb, ir]))

    def global_feature(self, images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """GeM of the feature map: ``(B, 3, H, W)`` -> ``(B, num_features)`` (``modality`` unused)."""
        return gem(self(images))


class TwoStreamResNet(_ResNetBase):
    """Two-stream ResNet (AGW layout): an RGB stem and an IR stem, shared ``layer1`` .. ``layer4``.

    ``forward(images, modality)``: images ``(B, 3, H, W)`` float, modality ``(B,)`` int64 with
    :data:`common.modality.MODALITY_CODE` (0 rgb, 1 ir) -> ``(B, num_features, H/16, W/16)`` in the
    input's order. Each stem runs once on its own subset of the batch, so its BatchNorm only sees
    (and its running statistics only track) images of its modality. A stem whose modality is
    absent from the batch is skipped and gets no gradient: under DDP such batches need
    ``find_unused_parameters`` (MMGL's pair batches always carry both modalities).

    Routing: a stable ``argsort`` of ``modality`` on the device groups the rows by modality, each
    stem runs on its contiguous slice, and a gather puts the rows back. Slicing needs the number
    of RGB rows on the host: pass it as ``rgb_count`` when the batch layout fixes it (the
    cross-modal sampler's batches are half RGB, half IR) and nothing waits for the device; without
    it one small read of the per-modality counts does (one host synchronization, where the
    ``nonzero`` routing this replaces took two). Running both stems on the whole batch and
    choosing rows with ``torch.where`` would need no count, but it doubles the stem's work and
    lets each stem's BatchNorm see the other modality's images in training (measured in
    ``benchmarks/routing.py``).
    """

    def _build_stem(self, width: int) -> None:
        self.stems = nn.ModuleDict({name: Stem(width) for name in MODALITY_CODE})

    def forward(self, images: torch.Tensor, modality: torch.Tensor, rgb_count: int | None = None) -> torch.Tensor:
        """images ``(B, 3, H, W)``, modality int64 ``(B,)`` (0 rgb, 1 ir), ``rgb_count``: the
        number of RGB rows when the caller knows it (class docstring) -> ``(B, C, H/16, W/16)``."""
        if modality.shape != images.shape[:1]:
            raise ValueError(f"modality must have shape ({images.shape[0]},), got {tuple(modality.shape)}")
        batch = images.shape[0]
        if rgb_count is None:
            rgb_count = self._rgb_count(modality)
        # Rows grouped by modality, each group in input order (RGB code 0 < IR code 1).
        order = torch.argsort(modality, stable=True)
        groups = (("rgb", order[:rgb_count]), ("ir", order[rgb_count:]))
        # An absent modality's stem is skipped: BatchNorm cannot normalize an empty batch.
        features = torch.cat([self.stems[name](images[idx]) for name, idx in groups if idx.numel()])
        # ``features`` is grouped by modality; gathering with the inverse of ``order`` puts every
        # row back at its input position. Tensor indexing keeps channels_last (index_select does not).
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(batch, device=order.device)
        return self.forward_layers(features[inverse])

    @staticmethod
    def _rgb_count(modality: torch.Tensor) -> int:
        """The number of RGB rows, read on the host (one synchronization); checks the codes."""
        rgb, ir = (torch.stack([(modality == MODALITY_CODE[name]).sum() for name in ("rgb", "ir")])).tolist()
        if rgb + ir != modality.shape[0]:
            raise ValueError(f"modality values must be in {sorted(MODALITY_CODE.values())}")
        return rgb

    def forward_pair(self, rgb: torch.Tensor, ir: torch.Tensor) -> torch.Tensor:
        """Feature maps of an RGB half and an IR half, each through its own stem (no
        data-dependent routing): ``(B, 3, H, W)`` x 2 -> ``(2B, num_features, H/16, W/16)``, RGB rows
        first. Each stem sees only its modality, so its BatchNorm statistics do too."""
        return self.forward_layers(torch.cat([self.stems["rgb"](rgb), self.stems["ir"](ir)]))

    def global_feature(self, images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """GeM of the feature map, each image through its modality's stem: ``(B, 3, H, W)``,
        ``(B,)`` -> ``(B, num_features)``."""
        return gem(self(images, modality))


def resnet50(last_stride: int = 1, zero_init_residual: bool = False, non_local: bool = False) -> ResNet:
    """One-stream ResNet-50 without fc: 23,508,032 parameters (without non-local blocks)."""
    return ResNet(RESNET50_BLOCKS, 64, last_stride, zero_init_residual, non_local)


def resnet50_two_stream(last_stride: int = 1, zero_init_residual: bool = False,
                        non_local: bool = False) -> TwoStreamResNet:
    """Two-stream ResNet-50 (RGB and IR stems, shared layers): 23,517,568 parameters (without
    non-local blocks)."""
    return TwoStreamResNet(RESNET50_BLOCKS, 64, last_stride, zero_init_residual, non_local)


def resnet_tiny_test(two_stream: bool = False, last_stride: int = 1,
                     non_local: bool = False) -> ResNet | TwoStreamResNet:
    """The same architecture at width 8 with one block per layer (num_features 256), for tests."""
    cls = TwoStreamResNet if two_stream else ResNet
    return cls((1, 1, 1, 1), 8, last_stride, non_local=non_local)


def resnet_narrow(two_stream: bool = False, last_stride: int = 1, non_local: bool = False) -> ResNet | TwoStreamResNet:
    """The same architecture at width 32 with one block per layer (num_features 1024): small
    enough to pre-train on a CPU in minutes, wide enough to keep features (the CPU demo)."""
    cls = TwoStreamResNet if two_stream else ResNet
    return cls((1, 1, 1, 1), 32, last_stride, non_local=non_local)


# ------------------------------------------------------------------------------- key layouts
# Exports take the native backbone state dict (``ResNet`` / ``TwoStreamResNet`` keys, no heads)
# and rename keys only: tensors are shared, never copied or reshaped.

#: Where the AGW cross-modal baseline (github mangye16/Cross-Modal-Re-ID-baseline, ``model.py``,
#: ``embed_net``) keeps each part: every stem lives in a whole torchvision-style ResNet of which
#: only ``conv1`` / ``bn1`` run (``visible_module.visible``, ``thermal_module.thermal``), and the
#: shared layers in a third one of which only ``layer1`` .. ``layer4`` run (``base_resnet.base``).
AGW_STEM_PREFIX = {"rgb": "visible_module.visible.", "ir": "thermal_module.thermal."}
AGW_LAYERS_PREFIX = "base_resnet.base."
_STEM_MODULES = ("conv1.", "bn1.")
_LAYER_MODULES = ("layer1.", "layer2.", "layer3.", "layer4.")
#: AGW's non-local blocks: the same names in the native and the AGW layout (top level of ``embed_net``).
_NON_LOCAL_MODULES = ("NL_1.", "NL_2.", "NL_3.", "NL_4.")


def is_two_stream_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a native backbone state dict is a :class:`TwoStreamResNet`'s (``stems.*`` keys)."""
    return any(key.startswith("stems.") for key in state)


def _split_native(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Native state -> (stem entries per stem name, shared layer entries), keys relative to each.

    A one-stream state has one stem, named ``shared``. Non-local blocks (``NL_*``) count as shared
    layers. Any other key (a head left in, a foreign state dict) is refused: an export must not
    silently drop or mislabel weights.
    """
    stems: dict[str, dict[str, torch.Tensor]] = {}
    layers: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(_LAYER_MODULES + _NON_LOCAL_MODULES):
            layers[key] = value
        elif key.startswith("stems.") and key.count(".") >= 2:
            name, rest = key[len("stems."):].split(".", 1)
            stems.setdefault(name, {})[rest] = value
        elif key.startswith(_STEM_MODULES):
            stems.setdefault("shared", {})[key] = value
        else:
            unknown.append(key)
    if unknown or not layers or not stems:
        raise UserError(
            "not a native ResNet backbone state dict (stem + layer1..layer4 keys only)"
            + (f"; unexpected keys: {', '.join(unknown[:5])}" if unknown else "")
        )
    return stems, layers


def to_torchvision_state(state: dict[str, torch.Tensor], stem: str | None = None) -> dict[str, torch.Tensor]:
    """Native backbone state -> torchvision ResNet-50 keys (``conv1.weight``, ``bn1.*``,
    ``layer1.0.conv1.weight`` ...; no ``fc``).

    One-stream: the keys are torchvision's already. Two-stream: torchvision's ResNet has a single
    stem, so one of the two must be picked with ``stem="rgb"`` or ``stem="ir"`` (a
    :class:`UserError` otherwise); the result is then the network that the chosen modality's
    images go through.
    """
    stems, layers = _split_native(state)
    if any(key.startswith(_NON_LOCAL_MODULES) for key in layers):
        raise UserError("this backbone has AGW non-local blocks (NL_* keys), which torchvision's ResNet-50 "
                        "has no place for: export it as 'agw'")
    if "shared" in stems:
        if stem is not None:
            raise UserError(f"stem={stem!r} was given, but this is a one-stream model with a single shared stem")
        chosen = stems["shared"]
    elif stem is None:
        raise UserError(
            "torchvision's ResNet-50 has one stem but this two-stream model has two "
            f"({' and '.join(sorted(stems))}): export it as 'agw' (the two-stream AGW layout), or as "
            "'torchvision_rgb' to keep the RGB stem (the network RGB images went through)"
        )
    elif stem not in stems:
        raise UserError(f"unknown stem {stem!r}; this model has: {', '.join(sorted(stems))}")
    else:
        chosen = stems[stem]
    return {**chosen, **layers}


def to_torchvision_rgb_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`to_torchvision_state` keeping the RGB stem of a two-stream model."""
    return to_torchvision_state(state, stem="rgb")


def to_agw_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native backbone state -> the AGW cross-modal network's keys (``embed_net``):
    ``visible_module.visible.{conv1,bn1}.*`` (RGB stem), ``thermal_module.thermal.{conv1,bn1}.*``
    (IR stem), ``base_resnet.base.layer{1..4}.*`` (shared layers) and, when the backbone has
    them, the non-local blocks under their own names ``NL_2.*``, ``NL_3.*`` (as in ``embed_net``).

    A one-stream model's shared stem is written to both stems: AGW then computes exactly what the
    one-stream model computes, and fine-tuning may let the two stems drift apart.
    ``embed_net`` also holds modules this backbone does not have (the unused ``layer*`` copies
    inside the stem modules, ``conv1``/``bn1`` of ``base_resnet.base``, the non-local blocks when
    this one has none, BNNeck, classifier): load with ``strict=False``, which is what MMGL's AGW
    fine-tuning code does.
    """
    stems, layers = _split_native(state)
    if "shared" in stems:
        stems = {"rgb": stems["shared"], "ir": stems["shared"]}
    if set(stems) != set(AGW_STEM_PREFIX):
        raise UserError(f"the AGW layout needs an RGB and an IR stem, this model has: {', '.join(sorted(stems))}")
    out = {AGW_STEM_PREFIX[name] + key: value for name, entries in stems.items() for key, value in entries.items()}
    out.update({(key if key.startswith(_NON_LOCAL_MODULES) else AGW_LAYERS_PREFIX + key): value
                for key, value in layers.items()})
    return out
