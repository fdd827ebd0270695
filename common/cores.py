"""How many CPU cores a stage may use: the ones this process may run on, less the busy ones.

A training process with a thread per core spins against other processes on a loaded machine
(measured 17x slower, issue 13), so the stages size their threads from :func:`idle_cores`.
The busy cores are sampled from ``/proc/stat`` over a short window: the 1-minute load average
lags by about a minute, so right after ``make`` has installed the environment it still counts a
core as busy on an idle machine (measured: load 0.98 at the start of an idle ``make demo``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's limit),
    not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _core_times(text: str, cores: set[int]) -> tuple[int, int]:
    """``(busy, total)`` jiffies summed over the ``cpuN`` lines of ``/proc/stat`` text whose N
    is in ``cores``. Idle time is the ``idle`` and ``iowait`` columns (4th and 5th)."""
    busy = total = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        values = [int(v) for v in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        total += sum(values)
        busy += sum(values) - idle
    return busy, total


def busy_fraction(before: str, after: str, cores: set[int]) -> float:
    """The fraction in [0, 1] of ``cores``' time spent busy between two ``/proc/stat`` texts."""
    busy0, total0 = _core_times(before, cores)
    busy1, total1 = _core_times(after, cores)
    return min(1.0, max(0.0, (busy1 - busy0) / (total1 - total0))) if total1 > total0 else 0.0


def idle_cores(window: float = 0.5) -> int:
    """The available cores less those other processes keep busy, at least 1.

    Busy cores are measured over ``window`` seconds from ``/proc/stat`` (rounded to the
    nearest core); where that file is missing (not Linux), the 1-minute load average stands in.
    """
    available = available_cores()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(available))
    try:
        before = PROC_STAT.read_text()
        time.sleep(window)
        after = PROC_STAT.read_text()
        busy = busy_fraction(before, after, set(cores)) * available
    except OSError:
        busy = os.getloadavg()[0]
    return max(1, available - round(busy))
