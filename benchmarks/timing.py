"""Timing shared by every suite: wall and CPU time of one run of a case, and side-by-side
medians of repeats after warm-up.

A *case* is a callable that does a fixed amount of work and returns how many items (images)
it processed. :func:`side_by_side` runs the cases of a comparison round-robin -- warm-up
rounds first, then ``repeats`` timed rounds, each round running every case once -- so that
load from other processes on a shared machine falls on all cases alike instead of on
whichever happened to run during a busy minute. Each figure is the median over the timed rounds.

CPU time is the process's own (every thread, DALI's included) plus its children's
(``RUSAGE_CHILDREN``: DataLoader workers, process pools). Children are counted only once they
have exited and been waited for, so a case must end its worker processes before it returns
(a DataLoader with ``persistent_workers=False`` run to the end does; so does a joined pool).

On CUDA, :func:`synchronize` runs before the clock starts and before it stops, so queued
kernels are charged to the run that launched them.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Case = Callable[[], int]


def synchronize(device: str | torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Measurement:
    """Timed runs of one case: wall seconds, CPU seconds and items of each run."""

    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    items: list[int] = field(default_factory=list)

    def add(self, seconds: float, cpu: float, items: int) -> None:
        self.seconds.append(seconds)
        self.cpu.append(cpu)
        self.items.append(items)

    @property
    def items_per_s(self) -> float:
        """Median over runs of items / wall seconds."""
        return statistics.median(n / s for n, s in zip(self.items, self.seconds))

    @property
    def cpu_ms_per_item(self) -> float:
        """Median over runs of CPU milliseconds per item."""
        return statistics.median(1e3 * c / n for n, c in zip(self.items, self.cpu))

    @property
    def seconds_median(self) -> float:
        return statistics.median(self.seconds)


def time_once(case: Case, device: str | torch.device = "cpu") -> tuple[float, float, int]:
    """``(wall seconds, CPU seconds, items)`` of one run of ``case``."""
    synchronize(device)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    items = case()
    synchronize(device)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if items <= 0 or seconds <= 0:
        raise RuntimeError(f"a benchmark case processed {items} items in {seconds:.3g} s")
    return seconds, cpu, items


def side_by_side(cases: dict[str, Case], *, warmup: int, repeats: int, device: str | torch.device = "cpu",
                 say: Callable[[str], None] = print) -> dict[str, Measurement]:
    """Round-robin ``warmup`` untimed and ``repeats`` timed rounds of every case (module doc)."""
    results = {name: Measurement() for name in cases}
    for round_ in range(warmup + repeats):
        timed = round_ >= warmup
        for name, case in cases.items():
            seconds, cpu, items = time_once(case, device)
            if timed:
                results[name].add(seconds, cpu, items)
            say(f"  {'round' if timed else 'warm-up'} {round_ + 1 - (warmup if timed else 0)}: {name:28s} "
                f"{items / seconds:9.1f} items/s  {1e3 * cpu / items:7.3f} ms CPU/item")
    return results


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded (other jobs on a shared machine)."""
    return [round(x, 2) for x in os.getloadavg()]


__all__ = ["Case", "Measurement", "cpu_seconds", "load_average", "side_by_side", "synchronize", "time_once"]
