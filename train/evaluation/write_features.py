"""Features out: embed a folder of images or a shard split with a model and write the features
with an index of what each row is (torchreid's ``FeatureExtractor``, fast-reid's demo: the way
a ReID model is deployed on a gallery).

The model is any ``nn.Module`` (or callable) mapping uint8 images ``(B, 3, H, W)`` at ``size`` to
features ``(B, D)``: normalization belongs to it (wrap a network that takes normalized floats in
:class:`models.onnx_export.TestTimeNetwork`, the same graph as the ONNX export). With
``with_modality=True`` it is called ``model(images, modality)`` with the images' modality codes
``(B,)`` int64 (0 rgb, 1 ir): what a two-stream network needs to pick its stem.

Written into the folder ``out``:

- ``features.npy`` (``fmt="npy"``): float32 ``(N, D)``; or ``features.safetensors``
  (``fmt="safetensors"``): the tensor ``features`` ``(N, D)`` float32;
- ``index.csv``: one line per row of the features, in order: ``row,source,pid,camera,modality``
  (UTF-8, a header line). ``source`` is the image's path relative to the folder (or, for shards,
  the source path the shard builder recorded); ``pid`` / ``camera`` are the dataset's numbers,
  -1 where the layout does not name them (a plain folder).

Folders are read by a :mod:`shards.layouts` layout (``folder``: every image under the root,
unlabeled; ``market1501``, ``sysu-mm01``, ... give pids, cameras and modalities), all splits
the layout finds, sorted by source path. Images are decoded with PIL to RGB and resized
bilinearly to ``size``, as the webdataset source does; an unreadable image is left out, and
listed with its reason in the result. Shard splits are read by the project's sources (verified
shards, the same images the evaluation sees), rows in sample-index order.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

from pipelines.sources.wds import decode_image
from common.errors import UserError
from common.outputs import output_folder
from shards.format import IMAGE_EXT, META_EXT, MODALITY_CODE, SampleMeta, parse_index
from shards.layouts import scan
from shards.manifest import load_manifest
from train.evaluation.features import extract_features

FORMATS = ("npy", "safetensors")
MODALITY_NAME = {code: name for name, code in MODALITY_CODE.items()}
INDEX_COLUMNS = ("row", "source", "pid", "camera", "modality")


@dataclass(frozen=True)
class IndexRow:
    """What a feature row is: source path, pid, camera, modality (``rgb`` / ``ir``)."""

    source: str
    pid: int
    camera: int
    modality: str


@dataclass
class Written:
    """The files written, the feature shape, and the inputs left out ``(source, reason)``."""

    features: Path
    index: Path
    count: int
    dim: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def output_paths(out: str | Path, fmt: str) -> tuple[Path, Path]:
    """``(features file, index.csv)`` in ``out``; a bad format is a :class:`UserError`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown features format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    out = Path(out)
    return out / f"features.{fmt}", out / "index.csv"


def check_output(out: str | Path, fmt: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Checked before any work (nothing computed and then lost): ``out`` is a folder or can be
    made, and holds no features or index already unless ``overwrite``."""
    features, index = output_paths(out, fmt)
    out = output_folder(out, "output")
    existing = [p for p in (features, index) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists; choose another output folder or overwrite it")
    return features, index


def write(features: torch.Tensor | np.ndarray, rows: list[IndexRow], out: str | Path, fmt: str = "npy",
          overwrite: bool = False) -> Written:
    """Write ``features`` ``(N, D)`` and the index of its ``rows`` (N) into ``out`` (module doc).
    Each file is written under a temporary name and renamed, so none is ever half-written."""
    array = (features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features))
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2 or len(array) != len(rows):
        raise UserError(f"features must be (N, D) with one row per index entry: got {array.shape} for {len(rows)} rows")
    features_path, index_path = check_output(out, fmt, overwrite)
    tmp = features_path.with_name(f".{features_path.name}.tmp")
    if fmt == "npy":
        with open(tmp, "wb") as f:
            np.save(f, array)
    else:
        save_file({"features": array}, str(tmp), metadata={"rows": str(len(array)), "dim": str(array.shape[1])})
    os.replace(tmp, features_path)
    tmp = index_path.with_name(f".{index_path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows((i, r.source, r.pid, r.camera, r.modality) for i, r in enumerate(rows))
    os.replace(tmp, index_path)
    return Written(features_path, index_path, len(array), int(array.shape[1]))


Model = nn.Module | Callable[..., torch.Tensor]


def _call(model: Model, images: torch.Tensor, modality: torch.Tensor, with_modality: bool) -> torch.Tensor:
    with torch.no_grad():
        return (model(images, modality) if with_modality else model(images)).float()


def embed_folder(model: Model, root: str | Path, *, size: tuple[int, int], layout: str = "folder",
                 batch_size: int = 64, device: str | torch.device = "cpu", with_modality: bool = False,
                 ) -> tuple[torch.Tensor, list[IndexRow], list[tuple[str, str]]]:
    """Features ``(N, D)`` of every image a ``layout`` finds under ``root``, their index rows,
    and the images left out ``(source, reason)`` (unreadable ones, and the layout's rejects)."""
    device = torch.device(device)
    found = scan(layout, Path(root))
    records = sorted(found.records, key=lambda r: r.source)
    skipped = [(r.source, r.reason) for r in found.rejected]
    rows: list[IndexRow] = []
    parts: list[torch.Tensor] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            batch = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).contiguous().to(device)
            codes = torch.tensor([MODALITY_CODE[r.modality] for r in rows[-len(pending):]], device=device)
            parts.append(_call(model, batch, codes, with_modality))
            pending.clear()

    for record in records:
        path = found.base / record.source  # an absolute source stays absolute
        try:
            pending.append(decode_image(path.read_bytes(), tuple(size)))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for unreadable images
            skipped.append((record.source, f"unreadable: {err}"))
            continue
        rows.append(IndexRow(record.source, record.pid, record.camera, record.modality))
        if len(pending) == batch_size:
            flush()
    flush()
    if not rows:
        raise UserError(f"no readable image found under {root} (layout {layout})")
    return torch.cat(parts), rows, skipped


def split_sources(shards: str | Path, split: str) -> dict[int, SampleMeta]:
    """Sample index -> the sample's ``KEY.json`` (source path, labels) for ``split``, read by
    offset through the DALI indexes (no image is read)."""
    folder = Path(shards)
    manifest = load_manifest(folder)
    metas: dict[int, SampleMeta] = {}
    for shard in manifest.shards_of(split):
        with open(folder / shard.file, "rb") as tar:
            for members in parse_index((folder / shard.index).read_text()):
                by_ext = {m.ext: m for m in members}
                if META_EXT not in by_ext or IMAGE_EXT not in by_ext:
                    continue
                tar.seek(by_ext[META_EXT].offset)
                meta = SampleMeta.from_bytes(tar.read(by_ext[META_EXT].size))
                metas[meta.index] = meta
    return metas


def embed_split(model: Model, shards: str | Path, split: str, *, size: tuple[int, int], batch_size: int = 64,
                device: str | torch.device = "cpu", source: str = "auto", with_modality: bool = False,
                progress: bool = False) -> tuple[torch.Tensor, list[IndexRow]]:
    """Features ``(N, D)`` of every sample of a shard split, in sample-index order, and their
    index rows (source paths from the samples' ``KEY.json``)."""
    identity: Callable[[torch.Tensor], torch.Tensor] = lambda images: images  # noqa: E731  (uint8 to the model)
    found = extract_features(lambda images, modality: _call(model, images, modality, with_modality), shards, split,
                             size=tuple(size), transform=identity, batch_size=batch_size, device=device,
                             source=source, progress=progress)
    metas = split_sources(shards, split)
    rows = [IndexRow(metas[int(i)].source, int(p), int(c), MODALITY_NAME[int(m)])
            for i, p, c, m in zip(found.index, found.pid, found.camera, found.modality)]
    return found.features, rows


def write_folder_features(model: Model, root: str | Path, out: str | Path, *, size: tuple[int, int],
                          layout: str = "folder", fmt: str = "npy", batch_size: int = 64,
                          device: str | torch.device = "cpu", with_modality: bool = False,
                          overwrite: bool = False) -> Written:
    """:func:`embed_folder` then :func:`write`; the output is checked first."""
    check_output(out, fmt, overwrite)
    features, rows, skipped = embed_folder(model, root, size=size, layout=layout, batch_size=batch_size, device=device,
                                           with_modality=with_modality)
    written = write(features, rows, out, fmt, overwrite=True)
    written.skipped = skipped
    return written


def write_split_features(model: Model, shards: str | Path, split: str, out: str | Path, *,
                         size: tuple[int, int], fmt: str = "npy", batch_size: int = 64,
                         device: str | torch.device = "cpu", source: str = "auto", with_modality: bool = False,
                         overwrite: bool = False) -> Written:
    """:func:`embed_split` then :func:`write`; the output is checked first."""
    check_output(out, fmt, overwrite)
    features, rows = embed_split(model, shards, split, size=size, batch_size=batch_size, device=device, source=source,
                                 with_modality=with_modality)
    return write(features, rows, out, fmt, overwrite=True)


__all__ = ["FORMATS", "INDEX_COLUMNS", "IndexRow", "Written", "check_output", "embed_folder", "embed_split",
           "split_sources", "write", "write_folder_features", "write_split_features"]
