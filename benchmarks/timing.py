"""Timing shared by every suite: wall and CPU time of one run of a case, and side-by-side
medians of repeats after warm-up.

A *case* is a callable that does a fixed amount of work and returns how many items (images)
it processed. A case may carry a ``prepare`` attribute: a callable run before each run's clock
starts (work that belongs to setting up, not to the measured path, e.g. building a DALI
pipeline for the epoch the run reads). :func:`side_by_side` runs the cases of a comparison round-robin -- warm-up
rounds first, then ``repeats`` timed rounds, each round running every case once -- so that
load from other processes on a shared machine falls on all cases alike instead of on
whichever happened to run during a busy minute. Each figure is the median over the timed rounds.

CPU time is the process's own (every thread, DALI's included) plus its children's
(``RUSAGE_CHILDREN``: DataLoader workers, process pools). Children are counted only once they
have exited and been waited for, so a case must end its worker processes before it returns
(a DataLoader with ``persistent_workers=False`` run to the end does; so does a joined pool).

Page faults and system time: each run also records the minor page faults (``ru_minflt``) and
the system CPU seconds (``ru_stime``) of this process and its reaped children. A data path that
allocates large fresh buffers per batch shows them there (the allocator hands the pages back to
the kernel and faults them in again) long before it shows in images/s.

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


def usage() -> tuple[float, float, int]:
    """``(user + system CPU seconds, system CPU seconds, minor page faults)`` of this process and
    of its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    system = own.ru_stime + children.ru_stime
    return own.ru_utime + children.ru_utime + system, system, own.ru_minflt + children.ru_minflt


@dataclass
class Measurement:
    """Timed runs of one case: wall seconds, CPU seconds and items of each run."""

    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    system: list[float] = field(default_factory=list)
    minor_faults: list[int] = field(default_factory=list)

    def add(self, seconds: float, cpu: float, items: int, system: float = 0.0, minor_faults: int = 0) -> None:
        self.seconds.append(seconds)
        self.cpu.append(cpu)
        self.items.append(items)
        self.system.append(system)
        self.minor_faults.append(minor_faults)

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

    @property
    def system_ms_per_item(self) -> float:
        """Median over runs of system CPU milliseconds per item."""
        return statistics.median(1e3 * s / n for n, s in zip(self.items, self.system))

    @property
    def minor_faults_per_item(self) -> float:
        """Median over runs of minor page faults per item."""
        return statistics.median(f / n for n, f in zip(self.items, self.minor_faults))


def time_once(case: Case, device: str | torch.device = "cpu") -> tuple[float, float, int]:
    """``(wall seconds, CPU seconds, items)`` of one run of ``case``."""
    seconds, cpu, items, _, _ = time_run(case, device)
    return seconds, cpu, items


def time_run(case: Case, device: str | torch.device = "cpu") -> tuple[float, float, int, float, int]:
    """``(wall seconds, CPU seconds, items, system CPU seconds, minor page faults)`` of one run
    (``case.prepare()`` first, untimed, when the case has one)."""
    prepare = getattr(case, "prepare", None)
    if prepare is not None:
        prepare()
    synchronize(device)
    (cpu0, sys0, faults0), t0 = usage(), time.perf_counter()
    items = case()
    synchronize(device)
    seconds = time.perf_counter() - t0
    cpu1, sys1, faults1 = usage()
    if items <= 0 or seconds <= 0:
        raise RuntimeError(f"a benchmark case processed {items} items in {seconds:.3g} s")
    return seconds, cpu1 - cpu0, items, sys1 - sys0, faults1 - faults0


def side_by_side(cases: dict[str, Case], *, warmup: int, repeats: int, device: str | torch.device = "cpu",
                 say: Callable[[str], None] = print) -> dict[str, Measurement]:
    """Round-robin ``warmup`` untimed and ``repeats`` timed rounds of every case (module doc)."""
    results = {name: Measurement() for name in cases}
    for round_ in range(warmup + repeats):
        timed = round_ >= warmup
        for name, case in cases.items():
            seconds, cpu, items, system, faults = time_run(case, device)
            if timed:
                results[name].add(seconds, cpu, items, system, faults)
            say(f"  {'round' if timed else 'warm-up'} {round_ + 1 - (warmup if timed else 0)}: {name:28s} "
                f"{items / seconds:9.1f} items/s  {1e3 * cpu / items:7.3f} ms CPU/item  "
                f"{system:6.2f} s system  {faults:8d} minor faults")
    return results


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded (other jobs on a shared machine)."""
    return [round(x, 2) for x in os.getloadavg()]


__all__ = ["Case", "Measurement", "cpu_seconds", "load_average", "side_by_side", "synchronize", "time_once",
           "time_run", "usage"]
