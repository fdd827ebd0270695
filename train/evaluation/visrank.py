"""Ranked results as pictures (torchreid's ``visrank``): a query, then its top-k gallery images in
rank order, each framed green when it is a true match and red when it is not, with its
identity, camera and modality written underneath. One PNG per query, or one sheet with a row
per query.

Pure over images and labels: the caller picks the queries, ranks the gallery (after whatever
protocol rule removes entries) and passes the pictures; nothing here reads a dataset or a model.
RGB and infrared images mix freely (SYSU-MM01, RegDB cross-modal rankings): a one-channel image
is shown in grey.

Layout of a row (all sizes in pixels, :class:`Layout`)::

    | margin | query cell | query_gap | cell | gap | cell | ... | margin |

A cell is the image resized to ``image_size`` framed by a ``border``-wide frame (grey for the
query, green / red for the gallery), over a ``label_height`` strip with its label lines. A
sheet stacks rows with ``gap`` between them and ``margin`` around.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.errors import UserError

MATCH_COLOR = (0, 200, 0)
MISMATCH_COLOR = (220, 0, 0)
QUERY_COLOR = (128, 128, 128)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
LINE_HEIGHT = 12  # Pillow's default font is ~11 px high


@dataclass(frozen=True)
class ImageLabel:
    """What is written under an image: identity, camera, modality (``rgb`` / ``ir``)."""

    pid: int
    camera: int
    modality: str = "rgb"

    def lines(self) -> tuple[str, str]:
        return f"id {self.pid}", f"cam {self.camera} {self.modality}"


@dataclass(frozen=True)
class Layout:
    """Pixel sizes of the picture (module doc). ``image_size`` is (height, width)."""

    image_size: tuple[int, int] = (128, 64)
    border: int = 4
    gap: int = 4
    query_gap: int = 16
    margin: int = 6
    label_height: int = 26

    @property
    def cell_width(self) -> int:
        return self.image_size[1] + 2 * self.border

    @property
    def cell_height(self) -> int:
        """A framed image and its label strip."""
        return self.image_size[0] + 2 * self.border + self.label_height

    def cell_left(self, position: int) -> int:
        """Left edge of cell ``position`` in a row: 0 is the query, 1..k the ranks."""
        if position == 0:
            return self.margin
        return self.margin + self.cell_width + self.query_gap + (position - 1) * (self.cell_width + self.gap)

    def row_width(self, topk: int) -> int:
        return self.cell_left(topk) + self.cell_width + self.margin

    def row_top(self, row: int) -> int:
        return self.margin + row * (self.cell_height + self.gap)

    def sheet_size(self, rows: int, topk: int) -> tuple[int, int]:
        """(height, width) of a picture of ``rows`` rows of a query and ``topk`` ranks."""
        return self.row_top(rows) - self.gap + self.margin, self.row_width(topk)


@dataclass(frozen=True)
class RankedQuery:
    """One query and its ranked gallery images.

    ``query``: the query image; ``gallery``: the top-k gallery images, best first; ``matches``:
    (k,) true where the gallery image is a true match; labels for each. Images are uint8
    ``(H, W, 3)``, ``(H, W)`` or ``(3 | 1, H, W)`` numpy arrays or tensors, any size.
    """

    query: object
    query_label: ImageLabel
    gallery: Sequence[object]
    gallery_labels: Sequence[ImageLabel]
    matches: Sequence[bool]

    def __post_init__(self) -> None:
        k = len(self.gallery)
        if k == 0:
            raise UserError("visrank: a ranked query needs at least one gallery image")
        if len(self.gallery_labels) != k or len(self.matches) != k:
            raise UserError(f"visrank: {k} gallery images need {k} labels and {k} match flags, "
                            f"got {len(self.gallery_labels)} and {len(self.matches)}")


def _as_hwc_uint8(image) -> np.ndarray:
    """An image as uint8 ``(H, W, 3)``: channel-first moved last, one channel repeated."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise UserError(f"visrank: images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise UserError(f"visrank: an image must be (H, W), (H, W, 3) or (3, H, W), got shape {array.shape}")
    return np.ascontiguousarray(array)


def _framed(image, color: tuple[int, int, int], layout: Layout) -> Image.Image:
    """The image resized to ``layout.image_size`` inside a frame of ``color``."""
    height, width = layout.image_size
    picture = Image.fromarray(_as_hwc_uint8(image)).resize((width, height), Image.BILINEAR)
    cell = Image.new("RGB", (layout.cell_width, height + 2 * layout.border), color)
    cell.paste(picture, (layout.border, layout.border))
    return cell


def _label(title: str, label: ImageLabel, layout: Layout, font) -> Image.Image:
    """The label strip of a cell (text longer than the cell is cut at its edge)."""
    strip = Image.new("RGB", (layout.cell_width, layout.label_height), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    first, second = label.lines()
    draw.text((0, 1), f"{title} {first}", fill=TEXT_COLOR, font=font)
    draw.text((0, 1 + LINE_HEIGHT), second, fill=TEXT_COLOR, font=font)
    return strip


def _draw_row(canvas: Image.Image, top: int, ranked: RankedQuery, layout: Layout, font) -> None:
    label_top = top + layout.image_size[0] + 2 * layout.border
    cells = [(ranked.query, QUERY_COLOR, "query", ranked.query_label)]
    cells += [(image, MATCH_COLOR if match else MISMATCH_COLOR, f"#{rank}", label)
              for rank, (image, label, match) in
              enumerate(zip(ranked.gallery, ranked.gallery_labels, ranked.matches), start=1)]
    for position, (image, color, title, label) in enumerate(cells):
        left = layout.cell_left(position)
        canvas.paste(_framed(image, color, layout), (left, top))
        canvas.paste(_label(title, label, layout, font), (left, label_top))


def render(queries: Sequence[RankedQuery], layout: Layout = Layout()) -> np.ndarray:
    """A sheet with one row per ranked query: uint8 ``(H, W, 3)``, sized by
    :meth:`Layout.sheet_size` for the longest ranking (shorter rows leave blank cells)."""
    if not queries:
        raise UserError("visrank: no query to draw")
    topk = max(len(q.gallery) for q in queries)
    height, width = layout.sheet_size(len(queries), topk)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    font = ImageFont.load_default()
    for row, ranked in enumerate(queries):
        _draw_row(canvas, layout.row_top(row), ranked, layout, font)
    return np.asarray(canvas)


def write_sheet(path: str | Path, queries: Sequence[RankedQuery], layout: Layout = Layout()) -> Path:
    """Write :func:`render` of ``queries`` as one PNG at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(queries, layout)).save(path, format="PNG")
    return path


def write_per_query(folder: str | Path, queries: Sequence[RankedQuery], names: Sequence[str] | None = None,
                    layout: Layout = Layout()) -> list[Path]:
    """One PNG per query in ``folder``: ``names[i]`` + ``.png`` (default ``query_00000.png``...)."""
    names = list(names) if names is not None else [f"query_{i:05d}" for i in range(len(queries))]
    if len(names) != len(queries):
        raise UserError(f"visrank: {len(queries)} queries need {len(queries)} names, got {len(names)}")
    return [write_sheet(Path(folder) / f"{name}.png", [ranked], layout) for name, ranked in zip(names, queries)]


def top_k(distances, gallery_pids, query_pid: int, k: int, keep=None) -> tuple[np.ndarray, np.ndarray]:
    """Gallery indices of the ``k`` closest entries of one query (stable order) among ``keep``
    (a (G,) bool mask, the protocol's kept entries; default all), and their match flags
    (same pid): two ``(min(k, kept),)`` arrays."""
    distances = np.asarray(distances.cpu() if isinstance(distances, torch.Tensor) else distances)
    candidates = np.arange(len(distances)) if keep is None else np.flatnonzero(np.asarray(keep))
    order = candidates[np.argsort(distances[candidates], kind="stable")][:k]
    return order, np.asarray(gallery_pids)[order] == query_pid


__all__ = ["ImageLabel", "Layout", "RankedQuery", "render", "top_k", "write_per_query", "write_sheet"]
