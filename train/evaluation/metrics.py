"""Ranking metrics of ReID evaluation: pure functions of a distance matrix and labels.

Ranking metrics (:func:`compute_metrics`)
-----------------------------------------
For every query the gallery is sorted by ascending distance (a *stable* sort, so ties keep the
gallery order; the reference code uses numpy's default quicksort, whose tie order is arbitrary:
with real-valued features ties do not happen). Then, per ``protocol``:

* ``market`` (Market-1501, DukeMTMC-reID, MSMT17): gallery entries with the query's pid AND
  camera are removed; distractors (pid 0) stay. CMC: ``cmc[k-1]`` = fraction of valid queries
  whose first true match is at rank <= k.
* ``sysu`` (SYSU-MM01, as the AGW code's ``eval_sysu``): for a query of camera 3, gallery entries
  of camera 2 are removed, whatever their pid (cameras 2 and 3 are in the same room). CMC counts
  each gallery identity once: the ranking is reduced to the first occurrence of every identity
  (among the kept entries) and the query's rank is its identity's position in that list.
  mAP and mINP use the full ranking after the camera rule (every image of the identity counts).
* ``regdb``: nothing removed (one visible and one thermal camera).

In all three: a query with no true match left is skipped (not counted in the averages);
AP = mean over the true matches of the precision at their rank; mINP's INP = number of matches /
rank of the last match (Ye et al., "Deep Learning for Person Re-identification: A Survey and
Outlook"); mAP and mINP are means over valid queries. Ranks beyond the gallery length keep the
last CMC value (every valid query has matched by then). AGW's ``eval_sysu`` adds its
first-occurrence CMC for *every* query but divides by the valid ones; a query without a match
adds zeros, so that is the same number as skipping it.

Values are fractions in [0, 1]; tables print percentages.

Distance
--------
Features are L2-normalized and compared by squared Euclidean distance ``2 - 2 cos``: the same
ranking as AGW's ``-q @ g.T`` on normalized features and TransReID's Euclidean distance with
``FEAT_NORM``. ``--flip`` averages the features of the image and of its mirror before
normalizing (off by default; the published AGW / PASS numbers do not flip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import UserError

#: Ranking rules of :func:`compute_metrics`.
RANKING_RULES = ("market", "sysu", "regdb")
SYSU_CAMERA_RULE = (3, 2)  # (query camera, gallery camera dropped for it)
#: Elements of one (queries x gallery) block ranked at once: bounds memory on MSMT17-size sets.
BLOCK_ELEMENTS = 1 << 24


@dataclass
class RankMetrics:
    """CMC ``(max_rank,)`` (``cmc[k-1]`` = rank-k accuracy), mAP and mINP as fractions, and how
    many queries were valid (had a true match left after the protocol's removals)."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    valid_queries: int
    queries: int


def _as_int64(values, name: str, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.int64)


def _keep_mask(protocol: str, match: torch.Tensor, q_cams: torch.Tensor, ranked_cams: torch.Tensor) -> torch.Tensor:
    """Which ranked gallery entries count for each query: bool ``(n, G)``."""
    if protocol == "market":
        return ~(match & (ranked_cams == q_cams[:, None]))
    if protocol == "sysu":
        query_cam, dropped_cam = SYSU_CAMERA_RULE
        return ~((q_cams[:, None] == query_cam) & (ranked_cams == dropped_cam))
    return torch.ones_like(match)


def kept_entries(protocol: str, q_pids, q_cams, g_pids, g_cams) -> np.ndarray:
    """The gallery entries the ranking rule ``protocol`` keeps for each query (the removals of
    :func:`compute_metrics`): bool ``(Q, G)`` from ``(Q,)`` query and ``(G,)`` gallery labels."""
    if protocol not in RANKING_RULES:
        raise ValueError(f"unknown ranking protocol {protocol!r}; expected one of: {', '.join(RANKING_RULES)}")
    cpu = torch.device("cpu")
    qp, qc = _as_int64(q_pids, "q_pids", cpu), _as_int64(q_cams, "q_cams", cpu)
    gp, gc = _as_int64(g_pids, "g_pids", cpu), _as_int64(g_cams, "g_cams", cpu)
    match = gp[None, :] == qp[:, None]
    return _keep_mask(protocol, match, qc, gc[None, :].expand_as(match)).numpy()


def _first_identity_rank(ranked_codes: torch.Tensor, keep: torch.Tensor, rank: torch.Tensor,
                         q_codes: torch.Tensor, num_ids: int) -> torch.Tensor:
    """SYSU's first-occurrence rank: the position of the query's identity in the ranking reduced
    to each identity's first kept entry. ``ranked_codes``, ``keep``, ``rank``: ``(n, G)``;
    ``q_codes``: ``(n,)`` (-1 when the identity is not in the gallery) -> int64 ``(n,)``."""
    n, g = ranked_codes.shape
    never = g + 1
    first = torch.full((n, num_ids), never, dtype=torch.int64, device=rank.device)
    first.scatter_reduce_(1, ranked_codes, torch.where(keep, rank, never), reduce="amin")
    own = first.gather(1, q_codes.clamp(min=0)[:, None])
    return (first <= own).sum(1)


def _rank_block(dist: torch.Tensor, q_pids: torch.Tensor, q_cams: torch.Tensor, g_pids: torch.Tensor,
                g_cams: torch.Tensor, protocol: str, g_codes: torch.Tensor | None, q_codes: torch.Tensor | None,
                num_ids: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query results of a block ``dist (n, G)``: (valid bool, first-match rank int64, AP, INP
    float64), each ``(n,)``; ranks are 1-based positions among the kept entries."""
    order = torch.argsort(dist, dim=1, stable=True)
    ranked_pids = g_pids[order]
    match = ranked_pids == q_pids[:, None]
    keep = _keep_mask(protocol, match, q_cams, g_cams[order])
    hits = match & keep
    rank = torch.cumsum(keep, dim=1)  # 1-based rank of each kept entry
    num_hits = hits.sum(1)
    valid = num_hits > 0
    hit_rank = torch.where(hits, rank, 0)
    precision = torch.cumsum(hits, dim=1).double() / rank.clamp(min=1).double()
    ap = torch.where(hits, precision, 0.0).sum(1) / num_hits.clamp(min=1).double()
    inp = num_hits.double() / hit_rank.amax(1).clamp(min=1).double()
    if protocol == "sysu":
        first = _first_identity_rank(g_codes[order], keep, rank, q_codes, num_ids)
    else:
        first = torch.where(hits, rank, rank.shape[1] + 1).amin(1)
    return valid, first, ap, inp


def compute_metrics(distmat, q_pids, g_pids, q_cams, g_cams, protocol: str, max_rank: int = 20) -> RankMetrics:
    """CMC, mAP and mINP of a distance matrix under ``protocol`` (module docstring).

    distmat: ``(Q, G)`` numpy array or tensor (smaller = more similar; on any device, the work
        runs there); q_pids, q_cams: ``(Q,)``; g_pids, g_cams: ``(G,)`` integer arrays.
    protocol: ``market`` (also DukeMTMC-reID and MSMT17), ``sysu`` or ``regdb``.
    Returns :class:`RankMetrics` with ``cmc`` of length ``max_rank``.
    Raises :class:`UserError` when no query has a true match.
    """
    if protocol not in RANKING_RULES:
        raise ValueError(f"unknown ranking protocol {protocol!r}; expected one of: {', '.join(RANKING_RULES)}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    dist = distmat if isinstance(distmat, torch.Tensor) else torch.as_tensor(np.asarray(distmat))
    if dist.ndim != 2:
        raise ValueError(f"distmat must be (queries, gallery), got shape {tuple(dist.shape)}")
    device = dist.device
    qp, qc = _as_int64(q_pids, "q_pids", device), _as_int64(q_cams, "q_cams", device)
    gp, gc = _as_int64(g_pids, "g_pids", device), _as_int64(g_cams, "g_cams", device)
    nq, ng = dist.shape
    if (qp.numel(), qc.numel(), gp.numel(), gc.numel()) != (nq, nq, ng, ng):
        raise ValueError(f"label lengths {qp.numel()}, {qc.numel()}, {gp.numel()}, {gc.numel()} do not match "
                         f"distmat {tuple(dist.shape)}")
    if ng == 0 or nq == 0:
        raise UserError(f"cannot rank an empty set: {nq} queries, {ng} gallery entries")
    g_codes = q_codes = None
    num_ids = 0
    if protocol == "sysu":
        ids, g_codes = torch.unique(gp, return_inverse=True)
        num_ids = ids.numel()
        pos = torch.searchsorted(ids, qp).clamp(max=num_ids - 1)
        q_codes = torch.where(ids[pos] == qp, pos, -1)
    ranks = torch.arange(1, max_rank + 1, device=device)
    hits_at = torch.zeros(max_rank, dtype=torch.float64, device=device)
    ap_sum = inp_sum = 0.0
    valid_total = 0
    step = max(1, BLOCK_ELEMENTS // ng)
    for start in range(0, nq, step):
        block = slice(start, start + step)
        valid, first, ap, inp = _rank_block(dist[block], qp[block], qc[block], gp, gc, protocol,
                                            g_codes, None if q_codes is None else q_codes[block], num_ids)
        hits_at += (first[valid, None] <= ranks).sum(0).double()
        ap_sum += float(ap[valid].sum())
        inp_sum += float(inp[valid].sum())
        valid_total += int(valid.sum())
    if valid_total == 0:
        raise UserError(f"no query has a true match in the gallery under the {protocol} protocol "
                        f"({nq} queries, {ng} gallery entries): wrong splits or labels?")
    return RankMetrics((hits_at / valid_total).cpu().numpy(), ap_sum / valid_total, inp_sum / valid_total,
                       valid_total, nq)


def distance_matrix(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of L2-normalized features ``2 - 2 cos``:
    ``(Q, D), (G, D) -> (Q, G)`` float32, on the features' device."""
    q = torch.nn.functional.normalize(query.float(), dim=1)
    g = torch.nn.functional.normalize(gallery.float(), dim=1)
    return (2.0 - 2.0 * q @ g.T).clamp(min=0.0)
