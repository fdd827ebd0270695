"""The Batch contract: what every source yields, whatever its backend (DALI, webdataset, cache).

Everything after a source has one code path because all of them yield this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A batch of decoded images and their labels, on the training device.

    images:   uint8 ``(B, 3, H, W)``, RGB (infrared images are stored as 3-channel RGB)
    pid:      int64 ``(B,)``, the dataset's own identity number (-1 when unknown)
    camera:   int64 ``(B,)``, the dataset's own camera number (-1 when unknown)
    modality: int64 ``(B,)``, :data:`common.modality.MODALITY_CODE` (0 rgb, 1 ir)
    index:    int64 ``(B,)``, the sample's index in its split (see :class:`shards.format.SampleMeta`)
    """

    images: torch.Tensor
    pid: torch.Tensor
    camera: torch.Tensor
    modality: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.images, self.pid, self.camera, self.modality, self.index)))
