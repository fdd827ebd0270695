"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), as the ReID toolboxes compute it, in memory that grows with the number of
images, not with its square.

What is computed (the published algorithm, step by step as torchreid's ``re_ranking`` and the
authors' Python code do it; TransReID's ``re_ranking`` is the same on features):

1. ``D`` = the (Q+G) x (Q+G) matrix ``[[q_q, q_g], [q_g^T, g_g]]``, **squared** element-wise, in
   float32; every column divided by its maximum, then transposed (so row i is column i over its
   max: for symmetric inputs, row i over the row's maximum).
2. ``rank[i]`` = the nodes sorted by ``D[i]`` ascending. ``N(i, k)`` = its first ``k + 1``
   entries. The k-reciprocal set ``R(i, k)`` = the ``j`` in ``N(i, k)`` with ``i`` in ``N(j, k)``.
3. Expansion: ``R*(i)`` = ``R(i, k1)`` united with every ``R(c, round(k1 / 2))``, ``c`` in
   ``R(i, k1)``, that shares more than 2/3 of its members with ``R(i, k1)`` (``round`` as
   numpy's ``around``: half to even).
4. ``V[i, j] = exp(-D[i, j]) / sum_{j' in R*(i)} exp(-D[i, j'])`` for ``j`` in ``R*(i)``, else 0.
5. Local query expansion (``k2 != 1``): ``V[i]`` <- mean of ``V[j]`` over the first ``k2``
   entries of ``rank[i]``.
6. Jaccard distance ``J[i, g] = 1 - m / (2 - m)``, ``m = sum_j min(V[i, j], V[g, j])``.
7. Result: ``(1 - lambda) * J + lambda * D``, query rows and gallery columns.

Inputs are distances as the caller measures them; step 1 squares them, as the reference does
(torchreid passes its squared Euclidean ``distmat``, so its re-ranking sees fourth powers).
TransReID builds ``D`` from features as the squared Euclidean distance, so
``TransReID re_ranking(qf, gf)`` equals ``re_rank`` of the plain (not squared) Euclidean
distances.

How it differs from the reference (the numbers do not, up to float32 rounding):

* Memory. The reference holds ``D``, its argsort and ``V`` as dense (Q+G)^2 arrays (for
  Market-1501, 3,368 queries x 15,913 gallery images, that is 19,281^2 entries: 1.5 GB each in
  float32, the int64 argsort 3 GB) plus temporaries. Here ``D`` is built a block of rows at a
  time from the three inputs, only the first ``max(k1 + 1, k2)`` ranks of every row are kept,
  ``V`` is held sparse (a few hundred entries per row) and the Jaccard sums are a sparse join
  of query and gallery rows on their shared columns, so besides the inputs only the (Q, G)
  result and per-row lists live at once (measured in ``python -m benchmarks run --suite rerank``).
* Ties. The reference sorts with numpy's default (unstable) argsort, whose order among equal
  distances depends on the sort algorithm. Here equal distances are ordered by node index
  (queries first, then gallery, as in ``D``), the order of numpy's ``kind="stable"``.
* Device. Everything is torch operations on the inputs' device: CUDA tensors run on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import UserError

#: Rows of ``D`` built at once (a block is ``ROW_BLOCK x (Q + G)`` float32: ~80 MB for Market).
ROW_BLOCK = 1024
#: Query-gallery pairs of the Jaccard join handled at once (each costs ~30 bytes).
JOIN_CHUNK = 1 << 23


@dataclass(frozen=True)
class _Problem:
    """The three distance matrices (tensors on one device, any float dtype), and the sizes."""

    q_g: torch.Tensor  # (Q, G)
    q_q: torch.Tensor  # (Q, Q)
    g_g: torch.Tensor  # (G, G)

    @property
    def queries(self) -> int:
        return self.q_g.shape[0]

    @property
    def nodes(self) -> int:
        return self.q_g.shape[0] + self.q_g.shape[1]

    def squared_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the squared, transposed matrix of step 1 before the division:
        ``(stop - start, Q + G)`` float32. ``start:stop`` lies within the queries or within the
        gallery. Row i is column i of ``[[q_q, q_g], [q_g^T, g_g]]``."""
        q = self.queries
        if stop <= q:
            rows = torch.cat([self.q_q[:, start:stop].T, self.q_g[start:stop]], dim=1)
        else:
            g0, g1 = start - q, stop - q
            rows = torch.cat([self.q_g[:, g0:g1].T, self.g_g[:, g0:g1].T], dim=1)
        if not torch.isfinite(rows).all():
            raise UserError("re-ranking: the distance matrices hold NaN or infinite values")
        return (rows * rows).to(torch.float32)

    def normalized_rows(self, start: int, stop: int, largest: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of ``D`` (step 1): ``(stop - start, Q + G)`` float32; their
        maxima before the division are written into ``largest`` ``(stop - start,)`` if given."""
        rows = self.squared_rows(start, stop)
        row_max = rows.amax(dim=1)
        if not (row_max > 0).all():
            raise UserError("re-ranking: every distance of an image to all images is zero; "
                            "the distances cannot be normalized")
        if largest is not None:
            largest.copy_(row_max)
        return rows / row_max[:, None]

    def entries(self, start: int, stop: int, cols: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
        """``D[start + b, cols[b, m]]`` of step 1 without building the rows: ``(B, M)`` float32
        for rows ``start:stop`` (within the queries or within the gallery), ``cols`` (B, M) and
        the row maxima ``largest`` (Q + G,) of the squares. The same floats as
        :meth:`normalized_rows` (same square, cast and division)."""
        q = self.queries
        nodes = torch.arange(start, stop, device=cols.device)[:, None]
        in_queries = cols < q
        # D[i, j] is entry (j, i) of [[q_q, q_g], [q_g^T, g_g]]
        j_query, j_gallery = cols.clamp(max=q - 1), (cols - q).clamp(min=0)
        if stop <= q:
            values = torch.where(in_queries, self.q_q[j_query, nodes], self.q_g[nodes, j_gallery])
        else:
            i = nodes - q
            values = torch.where(in_queries, self.q_g[j_query, i], self.g_g[j_gallery, i])
        return (values * values).to(torch.float32) / largest[start:stop, None]

    def blocks(self, block: int = ROW_BLOCK):
        """``(start, stop)`` row blocks, split at the query/gallery boundary."""
        for begin, end in ((0, self.queries), (self.queries, self.nodes)):
            for start in range(begin, end, block):
                yield start, min(start + block, end)


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise UserError(f"re-ranking: {name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise UserError(f"re-ranking: {name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    return x


def _check(q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor, k1: int, k2: int, lambda_value: float) -> None:
    q, g = q_g.shape
    if q == 0 or g == 0:
        raise UserError(f"re-ranking: needs at least one query and one gallery image, got q_g_dist {q} x {g}")
    if tuple(q_q.shape) != (q, q) or tuple(g_g.shape) != (g, g):
        raise UserError(f"re-ranking: q_q_dist must be {q} x {q} and g_g_dist {g} x {g} for a {q} x {g} q_g_dist, "
                        f"got {tuple(q_q.shape)} and {tuple(g_g.shape)}")
    if len({q_g.device, q_q.device, g_g.device}) != 1:
        raise UserError("re-ranking: the three distance matrices must be on the same device")
    if k1 < 1 or k2 < 1:
        raise UserError(f"re-ranking: k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise UserError(f"re-ranking: lambda_value must be in [0, 1], got {lambda_value}")


def _stable_smallest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the ``k`` smallest entries of every row, ascending, equal values in
    index order (numpy ``argsort(kind="stable")[:, :k]``): ``(B, k)`` int64.

    ``topk`` picks the ``k`` smallest fast but leaves ties in any order; so its picks are put in
    (value, index) order, and the rare rows where a value equal to the k-th is left out (a tie
    across the cut) are sorted whole."""
    values, index = torch.topk(rows, k, dim=1, largest=False, sorted=True)
    by_index = index.argsort(dim=1)
    index, values = index.gather(1, by_index), values.gather(1, by_index)
    order = values.argsort(dim=1, stable=True)
    index = index.gather(1, order)
    cut = values.gather(1, order)[:, -1:]
    tied = ((rows <= cut).sum(dim=1) > k).nonzero().flatten()
    if len(tied):
        index[tied] = rows[tied].argsort(dim=1, stable=True)[:, :k]
    return index


def _ranks(problem: _Problem, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank[:, :width]`` of step 2 for every node, ``(Q + G, width)`` int64, and the maximum of
    every row of squares (step 1's divisor), ``(Q + G,)`` float32."""
    device = problem.q_g.device
    ranks = torch.empty(problem.nodes, width, dtype=torch.long, device=device)
    largest = torch.empty(problem.nodes, dtype=torch.float32, device=device)
    for start, stop in problem.blocks():
        rows = problem.normalized_rows(start, stop, largest[start:stop])
        ranks[start:stop] = _stable_smallest(rows, width)
    return ranks, largest


def _reciprocal(ranks: torch.Tensor, nodes: torch.Tensor, k: int) -> torch.Tensor:
    """For ``nodes`` (B,): which of their first ``k`` ranks have them among their own first
    ``k``: ``(B, k)`` bool (step 2's ``R(i, k - 1)`` as a mask over ``ranks[nodes, :k]``)."""
    neighbours = ranks[nodes, :k]
    return (ranks[neighbours, :k] == nodes[:, None, None]).any(dim=2)


@dataclass
class _SparseRows:
    """Rows of a sparse matrix: parallel 1-D tensors ``row``, ``col``, ``val``, sorted by row
    then column, one entry per (row, col)."""

    row: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor


def _merge_duplicates(col: torch.Tensor, val: torch.Tensor, empty: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``col`` / ``val`` (B, W): sort the columns (stable) and add the values of equal
    ones (in their order: the reference's sequential sum). Unused slots hold column ``empty``.
    Returns ``(col, val)`` (B, W): merged entries first, then ``empty`` with value 0."""
    col, order = col.sort(dim=1, stable=True)
    val = val.gather(1, order)
    new = torch.ones_like(col, dtype=torch.bool)
    new[:, 1:] = col[:, 1:] != col[:, :-1]
    slot = new.cumsum(dim=1) - 1
    merged_val = torch.zeros_like(val).scatter_add_(1, slot, val)
    merged_col = torch.full_like(col, empty).scatter_(1, slot, col)
    return merged_col, merged_val


def _to_sparse(start: int, col: torch.Tensor, val: torch.Tensor, empty: int) -> _SparseRows:
    keep = col != empty
    rows = torch.arange(start, start + col.shape[0], device=col.device)[:, None].expand_as(col)
    return _SparseRows(rows[keep], col[keep], val[keep])


def _cat(parts: list[_SparseRows]) -> _SparseRows:
    return _SparseRows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("row", "col", "val")))


def _encoding(problem: _Problem, ranks: torch.Tensor, largest: torch.Tensor, k1: int) -> _SparseRows:
    """``V`` of steps 3-4, sparse: ``(Q + G) x (Q + G)``."""
    n, device = problem.nodes, ranks.device
    kr, kh = min(k1 + 1, n), min(round(k1 / 2) + 1, n)
    half = torch.empty(n, kh, dtype=torch.bool, device=device)
    for start, stop in problem.blocks():
        half[start:stop] = _reciprocal(ranks, torch.arange(start, stop, device=device), kh)
    parts = []
    for start, stop in problem.blocks():
        nodes = torch.arange(start, stop, device=device)
        forward = ranks[start:stop, :kr]                       # (B, kr): N(i, k1)
        recip = _reciprocal(ranks, nodes, kr)                  # (B, kr): R(i, k1) as a mask
        cand = ranks[forward, :kh]                             # (B, kr, kh): N(c, k1/2) per c
        cand_recip = half[forward]                             # (B, kr, kh): R(c, k1/2) as a mask
        in_r = ((cand[..., None] == forward[:, None, None, :]) & recip[:, None, None, :]).any(dim=3)
        shared = (in_r & cand_recip).sum(dim=2)
        size = cand_recip.sum(dim=2)
        # "more than 2/3 of R(c)": 3 * shared > 2 * size is the reference's float test
        # len > 2/3 * len exactly for these small integers
        accept = recip & (3 * shared > 2 * size)
        col = torch.cat([forward.masked_fill(~recip, n),
                         cand.masked_fill(~(accept[..., None] & cand_recip), n).flatten(1)], dim=1)
        col, _ = col.sort(dim=1)
        col[:, 1:].masked_fill_(col[:, 1:] == col[:, :-1], n)  # each member once
        dist = problem.entries(start, stop, col.clamp(max=n - 1), largest)
        weight = torch.exp(-dist).masked_fill(col == n, 0.0)
        parts.append(_to_sparse(start, col, weight / weight.sum(dim=1, keepdim=True), n))
    return _cat(parts)


def _padded(v: _SparseRows, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` as ``(n, W)`` column and value tables, unused slots column ``n`` value 0."""
    counts = torch.bincount(v.row, minlength=n)
    width = int(counts.max())
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(v.row), device=v.row.device) - first[v.row]
    col = torch.full((n, width), n, dtype=torch.long, device=v.row.device)
    val = torch.zeros(n, width, dtype=v.val.dtype, device=v.row.device)
    col[v.row, slot] = v.col
    val[v.row, slot] = v.val
    return col, val


def _query_expansion(problem: _Problem, v: _SparseRows, ranks: torch.Tensor, k2: int) -> _SparseRows:
    """Step 5: row i <- mean of the rows ``rank[i, :k2]``."""
    n = problem.nodes
    k2 = min(k2, n)
    col, val = _padded(v, n)
    parts = []
    for start, stop in problem.blocks():
        near = ranks[start:stop, :k2]
        merged_col, merged_val = _merge_duplicates(col[near].flatten(1), val[near].flatten(1), n)
        parts.append(_to_sparse(start, merged_col, merged_val / k2, n))
    return _cat(parts)


def _jaccard_sums(v: _SparseRows, queries: int, gallery: int) -> torch.Tensor:
    """Step 6's ``m[i, g] = sum_j min(V[i, j], V[Q + g, j])``: ``(Q, G)`` float32, by joining
    every query entry with the gallery entries of its column."""
    n = queries + gallery
    is_query = v.row < queries
    q_row, q_col, q_val = v.row[is_query], v.col[is_query], v.val[is_query]
    g_row, g_col, g_val = v.row[~is_query], v.col[~is_query], v.val[~is_query]
    by_col = g_col.argsort(stable=True)
    g_row, g_val = g_row[by_col] - queries, g_val[by_col]
    per_col = torch.bincount(g_col, minlength=n)
    col_start = torch.cumsum(per_col, 0) - per_col
    pairs = per_col[q_col]
    ends = torch.cumsum(pairs, 0)
    sums = torch.zeros(queries * gallery, dtype=torch.float32, device=v.val.device)
    begin = 0
    while begin < len(q_col):
        # entries [begin, end) whose pairs fit one chunk (at least one entry)
        limit = torch.tensor([(int(ends[begin - 1]) if begin else 0) + JOIN_CHUNK], device=ends.device)
        end = max(int(torch.searchsorted(ends, limit, right=True)), begin + 1)
        count = pairs[begin:end]
        entry = torch.repeat_interleave(torch.arange(begin, end, device=count.device), count)
        offset = torch.arange(len(entry), device=count.device) - (torch.cumsum(count, 0) - count)[entry - begin]
        g = col_start[q_col[entry]] + offset
        sums.index_add_(0, q_row[entry] * gallery + g_row[g], torch.minimum(q_val[entry], g_val[g]))
        begin = end
    return sums.view(queries, gallery)


def re_rank(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3):
    """k-reciprocal re-ranking of query-gallery distances (module doc; Zhong et al. 2017).

    Args:
        q_g_dist: (Q, G) query-gallery distances (numpy array or torch tensor).
        q_q_dist: (Q, Q) query-query distances.
        g_g_dist: (G, G) gallery-gallery distances.
        k1, k2, lambda_value: the paper's k1, k2 and lambda (defaults: the paper's 20, 6, 0.3).

    Returns:
        (Q, G) float32 re-ranked distances: a torch tensor on the inputs' device for tensor
        inputs, a numpy array for numpy inputs. Smaller is closer, as before.
    """
    as_numpy = isinstance(q_g_dist, np.ndarray)
    tensors = [_as_tensor(x, name) for x, name in
               ((q_g_dist, "q_g_dist"), (q_q_dist, "q_q_dist"), (g_g_dist, "g_g_dist"))]
    _check(*tensors, k1, k2, lambda_value)
    dtype = torch.promote_types(torch.promote_types(tensors[0].dtype, tensors[1].dtype), tensors[2].dtype)
    problem = _Problem(*(t.to(dtype) for t in tensors))  # one dtype: rows mix the three matrices
    queries, gallery = problem.q_g.shape
    with torch.no_grad():
        ranks, largest = _ranks(problem, min(max(k1 + 1, k2), problem.nodes))
        v = _encoding(problem, ranks, largest, k1)
        if k2 != 1:
            v = _query_expansion(problem, v, ranks, k2)
        del ranks
        sums = _jaccard_sums(v, queries, gallery)
        del v
        for start, stop in problem.blocks():
            if start >= queries:
                break
            block = sums[start:stop]
            jaccard = 1 - block / (2 - block)
            original = problem.normalized_rows(start, stop)[:, queries:]
            sums[start:stop] = jaccard * (1 - lambda_value) + original * lambda_value
    return sums.cpu().numpy() if as_numpy else sums


__all__ = ["re_rank"]
