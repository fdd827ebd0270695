"""Feature extraction for evaluation: every sample of a split through an embedding function,
batched on a device, optionally shared by several processes (each embeds its part, a gather
collects them)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.errors import UserError
from pipelines.sources import make_source
from pipelines.sources.base import rank_range, warn_source
from shards.manifest import load_manifest

#: ``embed(views, modality) -> features``: float ``(B, 3, H, W)`` normalized views and int64
#: ``(B,)`` modality codes (0 rgb, 1 ir) -> ``(B, D)`` features (not necessarily normalized).
Embedder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SplitFeatures:
    """The features of a split, one row per sample in sample-index (= source path) order:
    ``features (N, D)`` on the extraction device; ``pid``, ``camera``, ``modality``, ``index``
    int64 numpy ``(N,)``."""

    features: torch.Tensor
    pid: np.ndarray
    camera: np.ndarray
    modality: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return self.features.shape[0]

    def subset(self, rows: np.ndarray) -> "SplitFeatures":
        rows = np.asarray(rows, dtype=np.int64)
        picked = torch.as_tensor(rows, device=self.features.device)
        return SplitFeatures(self.features[picked], self.pid[rows], self.camera[rows], self.modality[rows],
                             self.index[rows])


#: ``gather(rows) -> rows of every process``: concatenates, in rank order, the ``(n_r, ...)``
#: tensors of all processes (``n_r`` may differ); every process gets the result (an all-gather).
Gather = Callable[[torch.Tensor], torch.Tensor]


def _extraction_bar(split: str, total: int, progress: bool, rank: int):
    """A tqdm bar on stderr counting images (its rate is images/s); shown on process 0 only, when
    ``progress`` is set and stderr is a terminal (``disable=None``: not in logs or pipes)."""
    return tqdm(total=total, desc=f"features {split}", unit="img", leave=False, dynamic_ncols=True,
                file=sys.stderr, disable=None if progress and rank == 0 else True)


@torch.no_grad()
def extract_features(embed: Embedder, shards: str | Path, split: str, *, size: tuple[int, int],
                     transform: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 128,
                     device: str | torch.device | None = None, flip: bool = False,
                     source: str = "auto", rank: int = 0, world: int = 1, gather: Gather | None = None,
                     progress: bool = True) -> SplitFeatures:
    """Features of every sample of ``split``, batched on ``device``.

    transform: uint8 ``(B, 3, H, W)`` -> float views (e.g. ``FinetuneViews.eval_views``).
    flip: average with the features of the horizontally mirrored views.
    rank, world, gather: with ``world > 1`` each process embeds its part of the split and
        ``gather`` (:data:`Gather`) collects the parts, so every process returns the whole split.
    progress: a bar with images/s on stderr (:func:`_extraction_bar`).
    One epoch of the source (``shuffle=False``, ``drop_last=False``) covers every sample; repeats
    (the cache's wrap-around padding) are dropped; samples lost to damaged shards are left out
    with a warning. Labels stay on the device until one copy to the host at the end.
    """
    stream = make_source(shards, split, batch_size=batch_size, size=size, device=device, source=source,
                         shuffle=False, drop_last=False, rank=rank, world=world)
    expected = load_manifest(shards).splits[split].total.images
    lo, hi = rank_range(expected, rank, world)
    rows: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with _extraction_bar(split, hi - lo, progress, rank) as bar:
        for batch in stream:
            views = transform(batch.images)
            feats = embed(views, batch.modality).float()
            if flip:
                feats = feats + embed(views.flip(-1), batch.modality).float()
            rows.append(feats)
            labels.append(torch.stack([batch.pid, batch.camera, batch.modality, batch.index], 1))
            bar.update(min(len(batch), bar.total - bar.n))  # the padded last batch repeats samples
    if not rows:
        raise UserError(f"split {split!r} of {shards} yielded no samples")
    features, meta = torch.cat(rows), torch.cat(labels)
    if gather is not None:
        features, meta = gather(features), gather(meta)
    meta = meta.cpu().numpy()
    # The device cache pads the last batch by wrapping around its permutation: keep each sample
    # once, in index order.
    _, order = np.unique(meta[:, 3], return_index=True)
    if len(order) < expected and rank == 0:
        warn_source(f"split {split!r}: {expected - len(order)} sample(s) in damaged shards were left out of the "
                    "evaluation; results are not comparable with published numbers")
    picked = torch.as_tensor(order, device=features.device)
    return SplitFeatures(features[picked], *(np.ascontiguousarray(meta[order, i]) for i in range(4)))
