"""Pre-training monitored on the task: the frozen backbone's retrieval every few epochs.

``--monitor_every N`` (epochs; 0, the default of the full presets, turns it off) makes the
pre-training loop (:mod:`train.pretrain`) evaluate the backbone the method would export, as it
is at that moment: no training, no head, the backbone's ``global_feature`` (the registry's
contract, :mod:`models.registry`), ranked under the shards' protocol (SYSU-MM01 all-search
with ``--monitor_trials`` gallery draws, Market-1501, ...; :mod:`train.evaluation.protocols`),
plus RGB->RGB (other camera) retrieval on SYSU-layout shards. The shards are
``--monitor_shards`` (default: the training shards, whose query/gallery splits hold the test
identities the pre-training never labels). It tells whether pre-training is making features
that retrieve people before a fine-tuning run is spent on it. Views: :func:`monitor_size` (the
backbone's own input size when it has one, a ViT's ``img_size``; else the pre-training's view
size), ImageNet normalization (what both methods' views use).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from pipelines.views.finetune import FinetuneViews
from shards.manifest import load_manifest
from train.evaluation.protocols import default_protocol, evaluate, same_modality
from train.methods.base import Method
from train.runtime import gather_rows


def monitor_shards(shards: str, monitor: str) -> tuple[str, str]:
    """``(shard folder, protocol)`` the monitor evaluates on; a folder without a labelled
    protocol is a :class:`~common.errors.UserError` (raised before any step)."""
    folder = monitor or shards
    return folder, default_protocol(load_manifest(folder))


def monitor_size(method: Method) -> tuple[int, int]:
    """``(H, W)`` the monitor embeds at: the exported backbone's ``img_size`` (a ViT's position
    grid; PASS's data size is its canvas, larger than the views), else the method's view size."""
    size = method.backbone_spec().kwargs.get("img_size")
    return tuple(size) if size else tuple(method.data_spec().size)


def frozen_backbone(method: Method, device: torch.device) -> torch.nn.Module:
    """A copy of the backbone the method would export now, in eval mode on ``device``."""
    spec = method.backbone_spec()
    backbone = spec.build()
    backbone.load_state_dict({k: v.detach() for k, v in method.backbone_state_dict().items()})
    return backbone.to(device).eval()


@torch.no_grad()
def monitor_record(method: Method, accelerator: Accelerator, shards: str, protocol: str,
                   trials: int) -> dict[str, Any]:
    """Evaluate the frozen backbone (every process embeds its part; process 0 ranks). Returns
    ``{"kind": "monitor", "R1", "mAP", "mINP"[, "same_modality_R1"]}`` (fractions) on process 0,
    ``{}`` on the others."""
    method = accelerator.unwrap_model(method)
    size = monitor_size(method)
    backbone = frozen_backbone(method, accelerator.device)
    views = FinetuneViews(tuple(size), normalization="imagenet")

    def embed(images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return backbone.global_feature(images, modality)

    common = dict(size=tuple(size), transform=views.eval_views, device=accelerator.device,
                  rank=accelerator.process_index, world=accelerator.num_processes,
                  gather=gather_rows(accelerator), progress=False)
    results = evaluate(embed, shards, protocol, trials=trials, **common)
    same = same_modality(embed, shards, **common)
    if not results:
        return {}
    summary = results[0].summary()
    record = {"kind": "monitor", "R1": summary["R1"], "mAP": summary["mAP"], "mINP": summary["mINP"],
              "setting": results[0].setting}
    if same is not None:
        record["same_modality_R1"] = same["R1"]
    return record
