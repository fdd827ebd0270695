"""What a benchmark figure was measured on: machine, cores, library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(packages: tuple[str, ...] = ("pillow", "numpy", "torch", "nvidia-dali-cuda120",
                                                  "nvidia-dali-cuda130", "webdataset", "kornia")) -> dict:
    """A JSON-ready description of this machine and the versions that matter."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "versions": {p: _version(p) for p in packages},
    }


def machine_name() -> str:
    """A short folder name for results: ``cpu-<cores>c`` here, a GPU's name where one is used."""
    return f"cpu-{os.cpu_count()}c"
