"""Peak memory of the PASS / DINO loss: the plain form against :class:`train.losses.dino.ViewCrossEntropy`.

    python -m benchmarks.dino_memory [--views 11] [--batch 32] [--dim 65536] [--dtype bfloat16]

One token type, ``G = 2`` teacher views against ``V`` student views of ``(B, D)`` head outputs,
forward and backward. Each form runs in a child process of its own: the inputs are made, the
process's peak resident size is reset (``/proc/self/clear_refs``), the loss and its gradient are
computed, and the new peak above the inputs is what the form needed. The plain form is the loss
as usually written (and as this project had it): ``log_softmax`` of the whole student tensor in
float32, then one ``targets[g] * log_probs`` product per teacher view. CPU only (on a GPU,
``torch.cuda.max_memory_allocated`` gives the same comparison directly).
"""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path

import torch
import torch.nn.functional as F

from train.losses.dino import ViewCrossEntropy

TEACHER_VIEWS, TAU_S, TAU_T = 2, 0.1, 0.04


def plain_terms(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(G, V)`` terms the usual way (module docstring)."""
    log_probs = F.log_softmax(student.float() / TAU_S, dim=-1)
    return torch.stack([-(targets[g] * log_probs).sum(-1).mean(-1) for g in range(targets.shape[0])])


def chunked_terms(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ViewCrossEntropy.apply(student, targets, TAU_S)


FORMS = {"plain": plain_terms, "per_view": chunked_terms}


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure(form: str, views: int, batch: int, dim: int, dtype: str, queue) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(views, batch, dim, generator=gen).to(getattr(torch, dtype)).requires_grad_(True)
    targets = F.softmax(torch.randn(TEACHER_VIEWS, batch, dim, generator=gen) / TAU_T, dim=-1)
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from what is resident now
    base = _peak_kib()
    FORMS[form](student, targets).sum().backward()
    queue.put((_peak_kib() - base) * 1024)


def peak_bytes(form: str, views: int, batch: int, dim: int, dtype: str) -> int:
    """Bytes the form needed above its inputs (module docstring), measured in a child process."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_measure, args=(form, views, batch, dim, dtype, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dino_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=11)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=65536)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = parser.parse_args(argv)
    one = args.views * args.batch * args.dim * 4
    print(f"student ({args.views}, {args.batch}, {args.dim}) {args.dtype}; one float32 copy = {one / 2**20:.1f} MiB")
    for form in FORMS:
        peak = peak_bytes(form, args.views, args.batch, args.dim, args.dtype)
        print(f"{form:9s} peak above inputs {peak / 2**20:8.1f} MiB = {peak / one:5.2f} float32 copies")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
