"""Ranked-result pictures: the PNG opens, has the size worked out by hand from the layout, and
the frame colours sit at the expected pixels; cross-modal rows mix RGB and one-channel IR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from train.evaluation.visrank import ImageLabel, Layout, RankedQuery, render, top_k, write_per_query, write_sheet

LAYOUT = Layout(image_size=(40, 20), border=3, gap=4, query_gap=10, margin=5, label_height=26)
# cell: 20 + 2*3 = 26 wide; 40 + 6 + 26 = 72 high
# row of a query and 3 ranks: 5 + 26 + 10 + 3*26 + 2*4 + 5 = 132 wide
GREEN, RED, GREY = (0, 200, 0), (220, 0, 0), (128, 128, 128)


def plain(value: int, shape=(64, 32, 3)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def ranked(matches, query=None, gallery=None) -> RankedQuery:
    k = len(matches)
    return RankedQuery(
        query=plain(200) if query is None else query,
        query_label=ImageLabel(pid=5, camera=3, modality="ir"),
        gallery=gallery if gallery is not None else [plain(40 * i) for i in range(k)],
        gallery_labels=[ImageLabel(pid=5 if m else 9, camera=1, modality="rgb") for m in matches],
        matches=matches,
    )


def frame_pixel(picture: np.ndarray, row_top: int, cell_left: int) -> tuple:
    """A pixel in the middle of the cell's left frame bar."""
    return tuple(picture[row_top + 3 + 20, cell_left + 1])


def test_sheet_size_and_frame_colours(tmp_path):
    rows = [ranked([True, False, True]), ranked([False, False, True])]
    path = write_sheet(tmp_path / "sheet.png", rows, LAYOUT)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        picture = np.asarray(image)
    # height: 5 + 72 + 4 + 72 + 5 = 158
    assert picture.shape == (158, 132, 3)
    lefts = [5, 41, 71, 101]            # query, rank 1, 2, 3
    tops = [5, 81]                       # row 0, row 1
    expected = [[GREY, GREEN, RED, GREEN], [GREY, RED, RED, GREEN]]
    for top, colours in zip(tops, expected):
        for left, colour in zip(lefts, colours):
            assert frame_pixel(picture, top, left) == colour
            assert tuple(picture[top, left + 13]) == colour            # top bar
            assert tuple(picture[top + 45, left + 13]) == colour       # bottom bar (40 + 2*3 - 1)
    # inside the frame: the image itself (uniform grey levels survive the resize)
    assert tuple(picture[5 + 3 + 20, 5 + 3 + 10]) == (200, 200, 200)
    assert tuple(picture[81 + 3 + 20, 71 + 3 + 10]) == (40, 40, 40)
    # gaps and margins stay background
    assert tuple(picture[30, 5 + 26 + 5]) == (255, 255, 255)   # between query and rank 1
    assert tuple(picture[2, 2]) == (255, 255, 255)


def test_labels_are_written_under_each_cell():
    picture = render([ranked([True, False]), ranked([True, True, True])], LAYOUT)
    label_rows = picture[5 + 46:5 + 72]
    for left in (5, 41, 71):
        strip = label_rows[:, left:left + 26]
        assert (strip < 128).any(), "text under the cell"
    assert (picture[5:5 + 72, 97:] == 255).all()  # row 0 has no third rank: its cell stays blank
    assert (picture[81 + 46:81 + 72, 101:127] < 128).any()  # row 1 has one


def test_cross_modal_row_takes_one_channel_and_channel_first_images(tmp_path):
    ir = np.full((80, 40), 90, dtype=np.uint8)                 # (H, W) infrared
    chw = torch.full((3, 64, 32), 150, dtype=torch.uint8)      # (3, H, W) tensor
    one = torch.full((1, 30, 15), 10, dtype=torch.uint8)       # (1, H, W)
    row = ranked([True, False, True], query=ir, gallery=[chw, one, plain(70)])
    paths = write_per_query(tmp_path / "ranks", [row, ranked([False])], layout=LAYOUT)
    assert [p.name for p in paths] == ["query_00000.png", "query_00001.png"]
    with Image.open(paths[0]) as image:
        picture = np.asarray(image)
    assert picture.shape == (82, 132, 3)  # 5 + 72 + 5
    assert tuple(picture[5 + 3 + 20, 5 + 3 + 10]) == (90, 90, 90)
    assert tuple(picture[5 + 3 + 20, 41 + 3 + 10]) == (150, 150, 150)
    assert tuple(picture[5 + 3 + 20, 71 + 3 + 10]) == (10, 10, 10)
    with Image.open(paths[1]) as image:
        assert image.size == (5 + 26 + 10 + 26 + 5, 82)


def test_top_k_respects_the_kept_entries_and_ties():
    dist = np.array([0.5, 0.1, 0.1, 0.9, 0.0])
    pids = np.array([1, 2, 1, 1, 7])
    order, match = top_k(dist, pids, query_pid=1, k=3, keep=np.array([True, True, True, True, False]))
    assert order.tolist() == [1, 2, 0] and match.tolist() == [False, True, True]
    order, _ = top_k(torch.tensor(dist), pids, query_pid=1, k=10)
    assert order.tolist() == [4, 1, 2, 0, 3]


@pytest.mark.parametrize("make,message", [
    (lambda: RankedQuery(plain(0), ImageLabel(1, 1), [plain(0)], [], [True]), "labels"),
    (lambda: RankedQuery(plain(0), ImageLabel(1, 1), [], [], []), "at least one"),
    (lambda: render([ranked([True], query=np.zeros((4, 4, 3), np.float32))]), "uint8"),
    (lambda: render([ranked([True], query=np.zeros((4, 4, 2, 2), np.uint8))]), "shape"),
    (lambda: render([]), "no query"),
])
def test_bad_input_is_a_user_error(make, message):
    with pytest.raises(UserError, match=message):
        make()
