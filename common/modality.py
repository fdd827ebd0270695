"""Image modalities and their integer codes, shared by the shard format (the label member), the
samplers, the two-stream backbones and evaluation (RegDB directions)."""

from __future__ import annotations

MODALITIES = ("rgb", "ir")
#: Integer code of each modality in the label member and in a Batch's ``modality`` tensor.
MODALITY_CODE = {"rgb": 0, "ir": 1}
