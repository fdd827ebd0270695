"""torchvision's ``resnet50()`` state dict (key -> shape), written out from the architecture
independently of ``models.resnet``: the reference that the model and its exports are checked
against."""

from __future__ import annotations

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet50_shapes(fc: bool = True) -> dict[str, tuple[int, ...]]:
    """Stem 7x7x64 + BN, bottlenecks 3-4-6-3 of widths 64-128-256-512 with 4x expansion, a
    downsample (1x1 conv + BN) on the first block of each layer, then (``fc``) fc 2048 -> 1000."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        shapes.update({f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in BN_KEYS})

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    c_in = 64
    for layer, (count, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(count):
            p = f"layer{layer}.{block}"
            shapes[f"{p}.conv1.weight"] = (width, c_in, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            bn(f"{p}.bn3", 4 * width)
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * width, c_in, 1, 1)
                bn(f"{p}.downsample.1", 4 * width)
            c_in = 4 * width
    if fc:
        shapes["fc.weight"] = (1000, 2048)
        shapes["fc.bias"] = (1000,)
    return shapes
