"""rerank: k-reciprocal re-ranking (:func:`train.evaluation.rerank.re_rank`) at Market-1501 size,
its time and peak memory, and side by side with the usual way at a quarter of that size.

- usual way: the toolboxes' dense numpy computation (torchreid's ``re_ranking``, TransReID's on
  distances): the full (Q+G)^2 distance matrix, its full argsort, a dense V, a Python loop per
  image and an inverted index for the Jaccard sums; written out here (:func:`dense_re_rank`);
- blocked: :func:`re_rank`, rows of the matrix a block at a time, V sparse, torch operations on
  the inputs' device (the GPU with ``--device cuda``).

Inputs are Euclidean distances between L2-normalised synthetic features clustered by identity
(Market-1501's 1,501 identities, 128-d), made once before timing; the figure is queries
re-ranked per second against the whole gallery. Peak memory counts the inputs: their bytes plus
the process's peak resident set (Linux ``VmHWM``, reset before each run via
``/proc/self/clear_refs``) above what it held before the call; on CUDA, the inputs plus the peak
of torch's allocator above its level before.
The usual way runs at a quarter of Market's size only: at full size it needs several dense
19,281^2 arrays (the float32 matrix, V and the V of query expansion 1.5 GB each, the int64
argsort 3 GB), too much for a shared 2-core machine's budget.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.record import SuiteResult
from benchmarks.registry import RunContext
from benchmarks.timing import Case, side_by_side
from train.evaluation.rerank import re_rank

MARKET = (3368, 15913)       # Market-1501 query and gallery images
QUARTER = (842, 3978)        # the side-by-side size
QUICK_MARKET, QUICK_QUARTER = (60, 240), (30, 120)
IDENTITIES, DIM, NOISE = 1501, 128, 0.7
K1, K2, LAMBDA = 20, 6, 0.3


def distances(queries: int, gallery: int, device: torch.device, seed: int = 0):
    """Euclidean (q_g, q_q, g_g) float32 distances of clustered unit features on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(IDENTITIES, DIM, generator=generator)

    def features(n: int) -> torch.Tensor:
        ids = torch.randint(0, IDENTITIES, (n,), generator=generator)
        return torch.nn.functional.normalize(centers[ids] + NOISE * torch.randn(n, DIM, generator=generator), dim=1)

    qf, gf = features(queries).to(device), features(gallery).to(device)

    def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * a @ b.T).clamp_(min=0).sqrt_()

    return euclidean(qf, gf), euclidean(qf, qf), euclidean(gf, gf)


def _reciprocal_dense(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = rank[i, :k + 1]
    back = rank[forward, :k + 1]
    return forward[(back == i).any(axis=1)]


def dense_re_rank(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, k1: int = K1, k2: int = K2,
                  lambda_value: float = LAMBDA) -> np.ndarray:
    """The usual way: the published algorithm on dense (Q+G)^2 numpy arrays, a loop per image
    (the toolboxes' structure; same numbers as :func:`re_rank`, ties aside)."""
    q = q_g.shape[0]
    d = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32) ** 2
    d = (d / d.max(axis=0)).T
    n = d.shape[0]
    rank = np.argsort(d, axis=1)
    half = int(np.around(k1 / 2))
    v = np.zeros_like(d)
    for i in range(n):
        r = _reciprocal_dense(rank, i, k1)
        expanded = [r]
        for c in r:
            rc = _reciprocal_dense(rank, c, half)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expanded.append(rc)
        members = np.unique(np.concatenate(expanded))
        w = np.exp(-d[i, members])
        v[i, members] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    holders = [np.nonzero(v[:, j])[0] for j in range(n)]
    final = np.empty((q, n - q), dtype=np.float32)
    for i in range(q):
        m = np.zeros(n, dtype=np.float32)
        for j in np.nonzero(v[i])[0]:
            m[holders[j]] += np.minimum(v[i, j], v[holders[j], j])
        jaccard = 1 - m / (2 - m)
        final[i] = (jaccard * (1 - lambda_value) + d[i] * lambda_value)[q:]
    return final


class PeakMemory:
    """Peak memory of a call with its inputs: the inputs' bytes plus the peak above the level
    before the call, of the host resident set (Linux) and of torch's CUDA allocator."""

    def __init__(self, device: torch.device, inputs) -> None:
        self.device = device
        self.inputs_mib = sum(x.nbytes for x in inputs) / 2**20
        self.host_mib: list[float] = []
        self.cuda_mib: list[float] = []

    @staticmethod
    def _status(field: str) -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024

    def measure(self, case: Case) -> Case:
        def measured() -> int:
            before = self._status("VmRSS:")
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current resident set
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                cuda_before = torch.cuda.memory_allocated(self.device)
            items = case()
            host_inputs = 0.0 if self.device.type == "cuda" else self.inputs_mib
            self.host_mib.append(host_inputs + self._status("VmHWM:") - before)
            if self.device.type == "cuda":
                above = torch.cuda.max_memory_allocated(self.device) - cuda_before
                self.cuda_mib.append(self.inputs_mib + above / 2**20)
            return items
        return measured

    def extra(self) -> dict:
        out = {"peak_host_mib": round(max(self.host_mib), 1)}
        if self.cuda_mib:
            out["peak_cuda_mib"] = round(max(self.cuda_mib), 1)
        return out


def run(ctx: RunContext) -> SuiteResult:
    device = torch.device(ctx.device)
    market, quarter = (QUICK_MARKET, QUICK_QUARTER) if ctx.quick else (MARKET, QUARTER)
    small = distances(*quarter, device)
    small_np = [x.cpu().numpy() for x in small]
    memory = {"usual": PeakMemory(torch.device("cpu"), small_np), "blocked": PeakMemory(device, small)}
    pair = side_by_side({
        "usual": memory["usual"].measure(lambda: len(dense_re_rank(*small_np))),
        "blocked": memory["blocked"].measure(lambda: len(re_rank(*small))),
    }, warmup=ctx.warmup, repeats=ctx.repeats, device=device, say=ctx.say)
    agreement = float(np.abs(dense_re_rank(*small_np) - re_rank(*small).cpu().numpy()).max())
    del small, small_np

    full = distances(*market, device)
    memory["market"] = PeakMemory(device, full)
    whole = side_by_side({"market": memory["market"].measure(lambda: len(re_rank(*full)))},
                         warmup=0, repeats=ctx.repeats, device=device, say=ctx.say)

    where = "GPU" if device.type == "cuda" else "CPU"
    result = SuiteResult(
        suite="rerank",
        title=f"k-reciprocal re-ranking, Market-1501 size, on {where}",
        primary="querys_per_s",
        columns=[("querys_per_s", "queries/s"), ("seconds_median", "seconds (median)"),
                 ("peak_host_mib", "peak host MiB, inputs included"),
                 *([("peak_cuda_mib", "peak CUDA MiB, inputs included")] if device.type == "cuda" else [])],
        settings={**ctx.base_settings(), "market_size": list(market), "side_by_side_size": list(quarter),
                  "k1": K1, "k2": K2, "lambda_value": LAMBDA, "identities": IDENTITIES, "dim": DIM,
                  "noise": NOISE, "torch_threads": torch.get_num_threads(),
                  "max_abs_difference_usual_vs_blocked": agreement},
    )
    q, g = quarter
    result.add_row("usual", f"usual way: dense numpy, loop per image ({q} x {g}, CPU)", pair["usual"], per="query",
                   **memory["usual"].extra())
    result.add_row("blocked", f"blocked re_rank ({q} x {g}, {where})", pair["blocked"], per="query",
                   **memory["blocked"].extra())
    q, g = market
    size = "quick size" if ctx.quick else "Market-1501 size"
    result.add_row("market", f"blocked re_rank, {size} ({q} x {g}, {where})", whole["market"],
                   per="query", **memory["market"].extra())
    result.add_ratio("blocked / usual way, same size", "blocked", "usual")
    result.add_ratio("peak memory: blocked / usual way, same size", "blocked", "usual", metric="peak_host_mib")
    result.notes += [
        "Inputs: Euclidean distances of L2-normalised synthetic features clustered by identity, made "
        "before timing; k1=20, k2=6, lambda=0.3 (the paper's). Queries/s: queries re-ranked against the "
        "whole gallery per second of one call.",
        "Peak host MiB: the three input matrices' bytes plus the process's peak resident set during "
        "the call (Linux VmHWM, reset before each call) above its resident set before it; the largest "
        "over the runs (CUDA runs: the inputs are on the GPU and counted in peak CUDA MiB, torch's "
        "allocator peak above its level before the call plus the inputs).",
        "The usual way runs at a quarter of Market's size: at full size it holds several dense "
        "19,281^2 arrays (float32 matrix, V, query-expanded V: 1.5 GB each; int64 argsort: 3 GB).",
        f"Largest difference between the two results at the side-by-side size: {agreement:.2g}.",
    ]
    return result


__all__ = ["dense_re_rank", "distances", "run"]
