"""Benchmark charts people can read: the min-max spread of the repeats worked out by hand, a log
axis when the bars span two decades, and the title within the picture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks.record import chart, log_axis, spread


def doc(values_seconds: list[list[float]], items: int = 10, primary: str = "images_per_s") -> dict:
    rows = [{"key": f"r{i}", "name": f"a long row name number {i} " * 3, primary: items / float(np.median(s)),
             "seconds_all": s, "items": items} for i, s in enumerate(values_seconds)]
    return {"suite": "toy", "title": "a title long enough to have been clipped by the old layout " * 3,
            "machine": {"name": "cpu-2c"}, "settings": {"repeats": 3, "warmup": 1}, "primary": primary,
            "columns": [[primary, "images/s"]], "rows": rows}


def test_spread_is_the_slowest_and_fastest_repeat():
    d = doc([[2.0, 1.0, 4.0]])
    assert spread(d, d["rows"][0]) == pytest.approx((10 / 4.0, 10 / 1.0))
    assert spread(doc([[2.0]]), doc([[2.0]])["rows"][0]) is None  # one repeat: no spread
    d = doc([[2.0, 1.0]], primary="ms_per_step")
    assert spread(d, d["rows"][0]) is None  # not items per second


def _blank_margin(path) -> bool:
    """The outermost pixel rows and columns are white: nothing drawn runs off the picture."""
    pixels = np.asarray(Image.open(path).convert("L"))
    return all((edge > 250).all() for edge in (pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]))


def test_charts_open_and_keep_their_text_inside(tmp_path):
    chart(doc([[0.01, 0.02, 0.015], [10.0, 12.0, 11.0]]), tmp_path / "log.png")  # 1000x apart: log axis
    chart(doc([[1.0, 1.2, 1.1], [2.0, 2.5, 2.2]]), tmp_path / "linear.png")
    for name in ("log.png", "linear.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.size[0] == 1100
        assert _blank_margin(tmp_path / name)


def test_log_axis_when_bars_span_two_decades():
    assert log_axis([0.09, 72.9]) and not log_axis([0.7, 4.4]) and not log_axis([0.0, 100.0])
