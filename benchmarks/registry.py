"""The suites ``python -m benchmarks run`` knows, and what a suite gets when it runs.

A suite is a module with ``run(ctx: RunContext) -> SuiteResult``; adding one is one
:class:`Suite` line in :data:`SUITES` and that module. Modules are imported
when their suite runs, so the CLI starts fast and a suite's heavy imports stay its own.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.data import SyntheticSet
from benchmarks.record import SuiteResult


@dataclass(frozen=True)
class Suite:
    name: str
    module: str
    summary: str

    def run(self, ctx: "RunContext") -> SuiteResult:
        return importlib.import_module(self.module).run(ctx)


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("decode", "benchmarks.decode", "shards -> decoded uint8 batches: usual way, sources, the decode limit"),
    Suite("views", "benchmarks.views", "MMGL and PASS views: per-sample PIL vs batched Kornia"),
    Suite("step", "benchmarks.step", "model step alone vs full pipeline step: ViT-S PASS, ResNet-50 MMGL"),
    Suite("e2e", "benchmarks.e2e", "MMGL epoch and PASS stream, data vs model, projected to 100 epochs"),
    Suite("rerank", "benchmarks.rerank", "k-reciprocal re-ranking at Market-1501 size: time, peak memory, vs dense numpy"),
)}

#: Synthetic SYSU-MM01 size: (identities, mean images per identity) in full and quick runs.
FULL_SET, QUICK_SET = (120, 40), (4, 12)


@dataclass
class RunContext:
    """Settings shared by the suites of one run, and the synthetic data they share."""

    device: str
    quick: bool
    warmup: int
    repeats: int
    workdir: Path
    say: Callable[[str], None] = print
    #: The peak MFU is stated against (TFLOP/s); None: the datasheet's dense bf16 figure
    #: (:data:`benchmarks.training.PEAK_BF16_TFLOPS`).
    peak_tflops: float | None = None
    _data: SyntheticSet | None = field(default=None, repr=False)

    @property
    def cores(self) -> int:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            return os.cpu_count() or 1

    @property
    def data(self) -> SyntheticSet:
        """The synthetic set, generated on first use (one process in quick runs: no spawn cost)."""
        if self._data is None:
            ids, per_id = QUICK_SET if self.quick else FULL_SET
            self.say(f"generating a synthetic SYSU-MM01-like set ({ids} ids x ~{per_id} images) in {self.workdir}")
            self._data = SyntheticSet.create(self.workdir / "sysu", ids=ids, images_per_id=per_id,
                                             workers=1 if self.quick else self.cores)
        return self._data

    def base_settings(self) -> dict:
        return {"device": self.device, "quick": self.quick, "warmup": self.warmup, "repeats": self.repeats,
                "cores": self.cores}


__all__ = ["FULL_SET", "QUICK_SET", "RunContext", "SUITES", "Suite"]
