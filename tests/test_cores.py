"""common.cores: busy cores from two /proc/stat samples, worked by hand."""

import os

import pytest

from common import cores

# user nice system idle iowait irq softirq steal; the aggregate "cpu" line must be ignored.
BEFORE = """cpu  999 0 999 999 0 0 0 0
cpu0 100 0 50 800 50 0 0 0
cpu1 10 0 10 980 0 0 0 0
cpu2 0 0 0 1000 0 0 0 0
intr 12345
"""
# Between the samples: cpu0 +60 user +20 system +10 idle +10 iowait (80 busy of 100);
# cpu1 +0 busy, +100 idle; cpu2 +50 user +50 idle.
AFTER = """cpu  1 0 1 1 0 0 0 0
cpu0 160 0 70 810 60 0 0 0
cpu1 10 0 10 1080 0 0 0 0
cpu2 50 0 0 1050 0 0 0 0
intr 12399
"""


def test_busy_fraction_counts_only_the_allowed_cores():
    assert cores.busy_fraction(BEFORE, AFTER, {0}) == pytest.approx(0.8)
    assert cores.busy_fraction(BEFORE, AFTER, {1}) == pytest.approx(0.0)
    assert cores.busy_fraction(BEFORE, AFTER, {0, 1}) == pytest.approx(80 / 200)
    assert cores.busy_fraction(BEFORE, AFTER, {0, 1, 2}) == pytest.approx(130 / 300)


def test_no_elapsed_time_is_idle():
    assert cores.busy_fraction(BEFORE, BEFORE, {0, 1}) == 0.0


def test_idle_cores_subtracts_the_busy_ones(monkeypatch, tmp_path):
    samples = iter([BEFORE, AFTER])
    monkeypatch.setattr(cores, "PROC_STAT", type("Fake", (), {"read_text": lambda self: next(samples)})())
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    # 130 of 300 jiffies busy on 3 cores = 1.3 busy cores -> 2 idle.
    assert cores.idle_cores(window=0) == 2


def test_idle_cores_falls_back_to_the_load_average(monkeypatch, tmp_path):
    monkeypatch.setattr(cores, "PROC_STAT", tmp_path / "missing")
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cores.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert cores.idle_cores(window=0) == 1
    monkeypatch.setattr(cores.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cores.idle_cores(window=0) == 1  # never fewer than one


def test_available_cores_is_the_affinity_mask():
    assert cores.available_cores() == len(os.sched_getaffinity(0))
