"""``--visrank N``: an evaluation's rankings as pictures (torchreid's ``visrank``), read from the
shards the evaluation ranked.

:class:`RankingRecorder` is an :data:`~train.evaluation.protocols.OnRanked` observer that keeps
the first ranking of every setting (the only trial of Market, trial 0 of the SYSU-MM01 gallery
draws, the first RegDB trial of each direction). :func:`write_ranked_pictures` then picks
``count`` queries spread evenly over the query set (positions ``round(linspace(0, Q - 1,
count))``: many identities, reproducible), ranks each one's gallery among the entries the
protocol keeps (:func:`~train.evaluation.metrics.kept_entries`: Market drops same-identity
same-camera images, SYSU-MM01 camera 2 for camera-3 queries), reads those images from the shard
tars by offset, and draws them (:mod:`train.evaluation.visrank`). Written per setting into
``out/<setting>/`` (spaces and arrows spelled out: ``sysu_all-search``,
``regdb_visible-to-thermal``): ``sheet.png`` (a row per query) and ``query_<pos>_id<pid>.png``
(one per query, ``pos`` = the query's position in the query set).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common.modality import MODALITY_CODE
from shards.format import IMAGE_EXT, parse_index, split_member_name
from shards.manifest import load_manifest
from train.evaluation.metrics import kept_entries
from train.evaluation.protocols import Ranked
from train.evaluation.visrank import ImageLabel, RankedQuery, top_k, write_per_query, write_sheet

DEFAULT_TOPK = 10
MODALITY_NAME = {code: name for name, code in MODALITY_CODE.items()}


@dataclass
class RankingRecorder:
    """Keeps the first :class:`~train.evaluation.protocols.Ranked` of every setting, in order."""

    rankings: dict[str, Ranked] = field(default_factory=dict)

    def __call__(self, ranked: Ranked) -> None:
        self.rankings.setdefault(ranked.setting, ranked)


def spread_positions(count: int, total: int) -> np.ndarray:
    """``min(count, total)`` distinct positions in ``0..total-1``, evenly spread, ascending."""
    if count <= 0 or total <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, total - 1, min(count, total))).astype(np.int64))


def read_split_images(shards: str | Path, split: str, indices: Iterable[int]) -> dict[int, np.ndarray]:
    """Sample index -> uint8 ``(H, W, 3)`` image at its stored size, for the ``indices`` of
    ``split``, read by offset through the shards' DALI indexes (only those images are read)."""
    folder = Path(shards)
    wanted = set(int(i) for i in indices)
    prefix = f"{split}_"
    images: dict[int, np.ndarray] = {}
    for shard in load_manifest(folder).shards_of(split):
        if len(images) == len(wanted):
            break
        with open(folder / shard.file, "rb") as tar:
            for members in parse_index((folder / shard.index).read_text()):
                for member in members:
                    key, _ = split_member_name(member.name)
                    if member.ext != IMAGE_EXT or not key.startswith(prefix):
                        continue
                    index = int(key[len(prefix):])
                    if index in wanted:
                        tar.seek(member.offset)
                        with Image.open(io.BytesIO(tar.read(member.size))) as picture:
                            images[index] = np.asarray(picture.convert("RGB"))
    return images


def _label(split_features, row: int) -> ImageLabel:
    return ImageLabel(int(split_features.pid[row]), int(split_features.camera[row]),
                      MODALITY_NAME.get(int(split_features.modality[row]), "?"))


def ranked_queries(ranked: Ranked, shards: str | Path, count: int, topk: int = DEFAULT_TOPK,
                   ) -> tuple[np.ndarray, list[RankedQuery]]:
    """The query positions picked (module doc) and their :class:`RankedQuery` rows (images from
    the shards, top ``topk`` among the kept gallery entries)."""
    query, gallery = ranked.query, ranked.gallery
    positions = spread_positions(count, len(query))
    distances = ranked.distances[positions].cpu().numpy()
    keep = kept_entries(ranked.rule, query.pid[positions], query.camera[positions], gallery.pid, gallery.camera)
    tops = [top_k(distances[i], gallery.pid, int(query.pid[q]), topk, keep[i]) for i, q in enumerate(positions)]
    query_images = read_split_images(shards, ranked.query_split, query.index[positions])
    gallery_images = read_split_images(shards, ranked.gallery_split,
                                       gallery.index[np.concatenate([order for order, _ in tops])])
    rows = []
    for q, (order, match) in zip(positions, tops):
        rows.append(RankedQuery(query_images[int(query.index[q])], _label(query, q),
                                [gallery_images[int(gallery.index[g])] for g in order],
                                [_label(gallery, g) for g in order], [bool(m) for m in match]))
    return positions, rows


def setting_folder(setting: str) -> str:
    """A setting's name as a folder name: ``regdb visible->thermal`` -> ``regdb_visible-to-thermal``."""
    return setting.replace("->", "-to-").replace(" ", "_")


def write_ranked_pictures(rankings: Iterable[Ranked], shards: str | Path, out: str | Path, count: int,
                          topk: int = DEFAULT_TOPK) -> list[Path]:
    """For every ranking: ``out/<setting>/sheet.png`` and one PNG per query (module doc).
    Returns the files written, sheets first per setting."""
    written: list[Path] = []
    for ranked in rankings:
        positions, rows = ranked_queries(ranked, shards, count, topk)
        if not rows:
            continue
        folder = Path(out) / setting_folder(ranked.setting)
        written.append(write_sheet(folder / "sheet.png", rows))
        names = [f"query_{int(p):05d}_id{row.query_label.pid}" for p, row in zip(positions, rows)]
        written.extend(write_per_query(folder, rows, names))
    return written


__all__ = ["DEFAULT_TOPK", "RankingRecorder", "ranked_queries", "read_split_images", "setting_folder",
           "spread_positions", "write_ranked_pictures"]
