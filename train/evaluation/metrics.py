"""ReID evaluation under the published protocols: ranking metrics, SYSU-MM01 galleries, RegDB
trials, batched feature extraction, and ``python -m train.evaluate``.

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

SYSU-MM01 (``sysu`` all-search, ``sysu-indoor`` indoor-search)
---------------------------------------------------------------
Query: every IR image (cameras 3 and 6) of the test identities, the shards' ``query`` split
(the same set for indoor search). Gallery of trial t (t = 0..trials-1, 10 by default): Python's
``random.Random(t)`` (the state ``random.seed(t)`` gives), then for each test identity in
ascending order and each RGB camera in (1, 2, 4, 5) (all) or (1, 2) (indoor) that has images of
it, one ``choice`` from that camera's images sorted by source path -- exactly the order of calls
of AGW's ``process_gallery_sysu`` (identity folders ``%04d`` sorted as strings = numerically;
``sorted`` file list; cameras without a folder for the id skipped, so they draw nothing), hence
the same galleries, image for image, as long as the shards hold the same images (an image the
shard builder rejected as corrupt would shift the draws; ``python -m shards inspect`` lists
rejects). Metrics are averaged over trials.

RegDB
-----
Trial t uses its own test identities (the manifest's ``trials``, from ``idx/test_*_{t}.txt``):
visible->thermal (query = visible images of the test ids, gallery = thermal ones) and
thermal->visible, nothing removed, each averaged over the trials evaluated. Every trial has its
own training identities, so a model fine-tuned on trial t is evaluated on trial t only; the full
protocol fine-tunes one model per trial and averages (pass every trial's checkpoint).

Distance
--------
Features are L2-normalized and compared by squared Euclidean distance ``2 - 2 cos``: the same
ranking as AGW's ``-q @ g.T`` on normalized features and TransReID's Euclidean distance with
``FEAT_NORM``. ``--flip`` averages the features of the image and of its mirror before
normalizing (off by default; the published AGW / PASS numbers do not flip).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.cli import run_cli
from common.errors import UserError
from shards.manifest import Manifest, load_manifest

#: Ranking rules of :func:`compute_metrics`.
RANKING_RULES = ("market", "sysu", "regdb")
#: Dataset protocols of :func:`evaluate` and the CLI.
PROTOCOLS = ("market", "sysu", "sysu-indoor", "regdb")
#: RGB gallery cameras of SYSU-MM01 per search mode; the query cameras are the IR ones (3, 6).
SYSU_GALLERY_CAMERAS = {"sysu": (1, 2, 4, 5), "sysu-indoor": (1, 2)}
SYSU_CAMERA_RULE = (3, 2)  # (query camera, gallery camera dropped for it)
SYSU_TRIALS = 10
#: Which protocols suit which shard layouts (the ``manifest`` layout: any query/gallery folder).
LAYOUT_PROTOCOLS = {
    "market1501": ("market",),
    "dukemtmc": ("market",),
    "msmt17": ("market",),
    "manifest": ("market",),
    "sysu-mm01": ("sysu", "sysu-indoor"),
    "regdb": ("regdb",),
}
#: Elements of one (queries x gallery) block ranked at once: bounds memory on MSMT17-size sets.
BLOCK_ELEMENTS = 1 << 24
REPORTED_RANKS = (1, 5, 10, 20)


# --------------------------------------------------------------------------------------------
# Ranking metrics
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# SYSU-MM01 galleries and RegDB trials
# --------------------------------------------------------------------------------------------


def sysu_gallery_trial(pids: Sequence[int], cameras: Sequence[int], order: Sequence[int], trial: int,
                       mode: str = "sysu") -> np.ndarray:
    """Positions (into ``pids``) of trial ``trial``'s single-shot gallery (module docstring).

    pids, cameras: ``(N,)`` labels of every RGB image of the test identities (the ``gallery``
    split); order: ``(N,)`` each image's rank in source-path order (the shards' sample
    ``index``); mode: ``sysu`` (all-search, cameras 1, 2, 4, 5) or ``sysu-indoor`` (1, 2).
    Returns int64 ``(n_ids_x_cameras,)`` in draw order (identity, then camera).
    """
    if mode not in SYSU_GALLERY_CAMERAS:
        raise ValueError(f"unknown SYSU-MM01 search mode {mode!r}; expected one of: {', '.join(SYSU_GALLERY_CAMERAS)}")
    pids, cameras, order = (np.asarray(a, dtype=np.int64) for a in (pids, cameras, order))
    files: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position in np.argsort(order, kind="stable"):
        files[int(pids[position]), int(cameras[position])].append(int(position))
    # A private generator in the state random.seed(trial) gives: the draws equal AGW's without
    # touching the global random state.
    rng = random.Random(trial)
    chosen = [rng.choice(files[pid, cam])
              for pid in sorted(set(pids.tolist()))
              for cam in SYSU_GALLERY_CAMERAS[mode]
              if (pid, cam) in files]
    return np.asarray(chosen, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

#: ``embed(views, modality) -> features``: float ``(B, 3, H, W)`` normalized views and int64
#: ``(B,)`` modality codes (0 rgb, 1 ir) -> ``(B, D)`` features (not necessarily normalized).
Embedder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SplitFeatures:
    """The features of a split, one row per sample in sample-index (= source path) order:
    ``features (N, D)`` on the extraction device; ``pid``, ``camera``, ``modality``, ``index``
    int64 numpy ``(N,)``."""

    features: torch.Tensor
    pid: np.ndarray
    camera: np.ndarray
    modality: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return self.features.shape[0]

    def subset(self, rows: np.ndarray) -> "SplitFeatures":
        rows = np.asarray(rows, dtype=np.int64)
        picked = torch.as_tensor(rows, device=self.features.device)
        return SplitFeatures(self.features[picked], self.pid[rows], self.camera[rows], self.modality[rows],
                             self.index[rows])


#: ``gather(rows) -> rows of every process``: concatenates, in rank order, the ``(n_r, ...)``
#: tensors of all processes (``n_r`` may differ); every process gets the result (an all-gather).
Gather = Callable[[torch.Tensor], torch.Tensor]


def _extraction_bar(split: str, total: int, progress: bool, rank: int):
    """A tqdm bar on stderr counting images (its rate is images/s); shown on process 0 only, when
    ``progress`` is set and stderr is a terminal (``disable=None``: not in logs or pipes)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"features {split}", unit="img", leave=False, dynamic_ncols=True,
                file=sys.stderr, disable=None if progress and rank == 0 else True)


@torch.no_grad()
def extract_features(embed: Embedder, shards: str | Path, split: str, *, size: tuple[int, int],
                     transform: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 128,
                     device: str | torch.device | None = None, flip: bool = False,
                     source: str = "auto", rank: int = 0, world: int = 1, gather: Gather | None = None,
                     progress: bool = True) -> SplitFeatures:
    """Features of every sample of ``split``, batched on ``device``.

    transform: uint8 ``(B, 3, H, W)`` -> float views (e.g. ``FinetuneViews.eval_views``).
    flip: average with the features of the horizontally mirrored views.
    rank, world, gather: with ``world > 1`` each process embeds its part of the split and
        ``gather`` (:data:`Gather`) collects the parts, so every process returns the whole split.
    progress: a bar with images/s on stderr (:func:`_extraction_bar`).
    One epoch of the source (``shuffle=False``, ``drop_last=False``) covers every sample; repeats
    (the cache's wrap-around padding) are dropped; samples lost to damaged shards are left out
    with a warning. Labels stay on the device until one copy to the host at the end.
    """
    from pipelines.sources import make_source  # heavy imports (DALI probe) only when extracting
    from pipelines.sources.base import rank_range, warn_source

    stream = make_source(shards, split, batch_size=batch_size, size=size, device=device, source=source,
                         shuffle=False, drop_last=False, rank=rank, world=world)
    expected = load_manifest(shards).splits[split].total.images
    lo, hi = rank_range(expected, rank, world)
    rows: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with _extraction_bar(split, hi - lo, progress, rank) as bar:
        for batch in stream:
            views = transform(batch.images)
            feats = embed(views, batch.modality).float()
            if flip:
                feats = feats + embed(views.flip(-1), batch.modality).float()
            rows.append(feats)
            labels.append(torch.stack([batch.pid, batch.camera, batch.modality, batch.index], 1))
            bar.update(min(len(batch), bar.total - bar.n))  # the padded last batch repeats samples
    if not rows:
        raise UserError(f"split {split!r} of {shards} yielded no samples")
    features, meta = torch.cat(rows), torch.cat(labels)
    if gather is not None:
        features, meta = gather(features), gather(meta)
    meta = meta.cpu().numpy()
    # The device cache pads the last batch by wrapping around its permutation: keep each sample
    # once, in index order.
    _, order = np.unique(meta[:, 3], return_index=True)
    if len(order) < expected and rank == 0:
        warn_source(f"split {split!r}: {expected - len(order)} sample(s) in damaged shards were left out of the "
                    "evaluation; results are not comparable with published numbers")
    picked = torch.as_tensor(order, device=features.device)
    return SplitFeatures(features[picked], *(np.ascontiguousarray(meta[order, i]) for i in range(4)))


# --------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------


@dataclass
class ProtocolResult:
    """One evaluated setting (``market``, ``sysu all-search``, ``regdb visible->thermal``...),
    averaged over ``trials``; ``per_trial`` keeps each trial's R1 / mAP / mINP."""

    setting: str
    protocol: str
    trials: list[int]
    cmc: list[float]
    mAP: float
    mINP: float
    queries: int
    gallery: float
    per_trial: list[dict] = field(default_factory=list)

    def rank(self, k: int) -> float:
        return self.cmc[min(k, len(self.cmc)) - 1]

    def summary(self) -> dict[str, float]:
        """``{"R1", "R5", "R10", "R20", "mAP", "mINP"}`` as fractions."""
        return {**{f"R{k}": self.rank(k) for k in REPORTED_RANKS}, "mAP": self.mAP, "mINP": self.mINP}

    def to_dict(self) -> dict:
        return {**asdict(self), **self.summary()}


def _average(setting: str, protocol: str, trials: list[int], runs: list[RankMetrics], gallery_sizes: list[int]) -> ProtocolResult:
    cmc = np.mean([r.cmc for r in runs], axis=0)
    per_trial = [{"trial": t, "R1": float(r.cmc[0]), "mAP": r.mAP, "mINP": r.mINP, "valid_queries": r.valid_queries,
                  "gallery": g} for t, r, g in zip(trials, runs, gallery_sizes)]
    return ProtocolResult(setting, protocol, list(trials), [float(v) for v in cmc],
                          float(np.mean([r.mAP for r in runs])), float(np.mean([r.mINP for r in runs])),
                          runs[0].queries, float(np.mean(gallery_sizes)), per_trial)


def _rank(query: SplitFeatures, gallery: SplitFeatures, rule: str, max_rank: int) -> RankMetrics:
    return compute_metrics(distance_matrix(query.features, gallery.features), query.pid, gallery.pid,
                           query.camera, gallery.camera, rule, max_rank)


def check_protocol(manifest: Manifest, folder: str | Path, protocol: str) -> None:
    """Refuse, with a one-line :class:`UserError`, a protocol the shards cannot be evaluated with."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; expected one of: {', '.join(PROTOCOLS)}")
    allowed = LAYOUT_PROTOCOLS.get(manifest.layout, ())
    if protocol not in allowed:
        hint = f"use --protocol {' or '.join(allowed)}" if allowed else "it has no labelled query/gallery splits"
        raise UserError(f"the shards in {folder} are of layout {manifest.layout!r}, which the {protocol} "
                        f"protocol does not evaluate; {hint}")
    needed = ("all",) if protocol == "regdb" else ("query", "gallery")
    for split in needed:
        if not manifest.shards_of(split):
            raise UserError(f"the {protocol} protocol needs split {split!r}, which {folder} does not have "
                            f"(it has: {', '.join(sorted(manifest.splits)) or 'none'})")
    if protocol == "regdb" and not manifest.trials:
        raise UserError(f"{folder} has no RegDB trials in its manifest (idx/ lists missing at build time?)")


def _regdb_trials(manifest: Manifest, wanted: Iterable[int] | None) -> list:
    by_number = {t.trial: t for t in manifest.trials}
    if wanted is None:
        return [by_number[t] for t in sorted(by_number)]
    unknown = [t for t in wanted if t not in by_number]
    if unknown:
        raise UserError(f"RegDB trial(s) {unknown} are not in the manifest (it has {sorted(by_number)})")
    return [by_number[t] for t in wanted]


def evaluate(embed: Embedder, shards: str | Path, protocol: str, *, size: tuple[int, int],
             transform: Callable[[torch.Tensor], torch.Tensor], trials: int = SYSU_TRIALS,
             regdb_trials: Iterable[int] | None = None, batch_size: int = 128,
             device: str | torch.device | None = None, flip: bool = False, source: str = "auto",
             max_rank: int = 20, rank: int = 0, world: int = 1, gather: Gather | None = None,
             progress: bool = True) -> list[ProtocolResult]:
    """Extract features with ``embed`` and evaluate the shards under ``protocol``.

    protocol: ``market`` | ``sysu`` | ``sysu-indoor`` | ``regdb`` (module docstring).
    trials: SYSU-MM01 gallery trials 0..trials-1.
    regdb_trials: RegDB trial numbers (as in ``idx/``; default: all in the manifest).
    rank, world, gather: several processes share the feature extraction (every one must call
        this; see :func:`extract_features`); process 0 alone ranks, the others return ``[]``.
    progress: feature-extraction bars (:func:`extract_features`).
    Returns one :class:`ProtocolResult` per setting (RegDB: visible->thermal, thermal->visible).
    The caller puts the model in eval mode.
    """
    manifest = load_manifest(shards)
    check_protocol(manifest, shards, protocol)
    if protocol in SYSU_GALLERY_CAMERAS and trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    chosen = _regdb_trials(manifest, regdb_trials) if protocol == "regdb" else []
    extract = dict(size=size, transform=transform, batch_size=batch_size, device=device, flip=flip, source=source,
                   rank=rank, world=world, gather=gather, progress=progress)
    splits = ("all",) if protocol == "regdb" else ("query", "gallery")
    features = {split: extract_features(embed, shards, split, **extract) for split in splits}
    if rank != 0:
        return []  # their part of the features is given; ranking is cheap next to extraction
    if protocol == "regdb":
        return regdb_results(features["all"], chosen, max_rank)
    query, gallery = features["query"], features["gallery"]
    if protocol == "market":
        return [_average("market", "market", [0], [_rank(query, gallery, "market", max_rank)], [len(gallery)])]
    runs, sizes = [], []  # SYSU-MM01, the protocols left (check_protocol admits PROTOCOLS only)
    for trial in range(trials):
        picked = gallery.subset(sysu_gallery_trial(gallery.pid, gallery.camera, gallery.index, trial, protocol))
        runs.append(_rank(query, picked, "sysu", max_rank))
        sizes.append(len(picked))
    setting = "sysu all-search" if protocol == "sysu" else "sysu indoor-search"
    return [_average(setting, protocol, list(range(trials)), runs, sizes)]


def regdb_results(everything: SplitFeatures, trials: list, max_rank: int = 20) -> list[ProtocolResult]:
    """RegDB visible->thermal and thermal->visible over ``trials`` (manifest ``Trial`` records),
    from the features of the whole ``all`` split."""
    directions = {"regdb visible->thermal": (0, 1), "regdb thermal->visible": (1, 0)}
    results = []
    for setting, (q_mod, g_mod) in directions.items():
        runs, sizes = [], []
        for trial in trials:
            test = np.isin(everything.pid, np.asarray(trial.test_ids, dtype=np.int64))
            query = everything.subset(np.flatnonzero(test & (everything.modality == q_mod)))
            gallery = everything.subset(np.flatnonzero(test & (everything.modality == g_mod)))
            if not len(query) or not len(gallery):
                raise UserError(f"RegDB trial {trial.trial}: no {'visible' if q_mod == 0 else 'thermal'} query or "
                                "gallery image of its test identities in the shards")
            runs.append(_rank(query, gallery, "regdb", max_rank))
            sizes.append(len(gallery))
        results.append(_average(setting, "regdb", [t.trial for t in trials], runs, sizes))
    return results


def merge_trials(results: list[list[ProtocolResult]]) -> list[ProtocolResult]:
    """Average per-setting results of separate runs (RegDB: one fine-tuned model per trial)."""
    merged = []
    for settings in zip(*results):
        runs = [RankMetrics(np.asarray(r.cmc), r.mAP, r.mINP, r.queries, r.queries) for r in settings]
        trials = [t for r in settings for t in r.trials]
        merged.append(_average(settings[0].setting, settings[0].protocol, trials, runs, [r.gallery for r in settings]))
        merged[-1].per_trial = [p for r in settings for p in r.per_trial]
    return merged


# --------------------------------------------------------------------------------------------
# Reporting and the command line
# --------------------------------------------------------------------------------------------


def format_table(results: list[ProtocolResult]) -> str:
    """A fixed-width table: setting, R1, R5, R10, R20, mAP, mINP (percent), protocol, trials."""
    head = f"{'setting':<24} {'R1':>6} {'R5':>6} {'R10':>6} {'R20':>6} {'mAP':>6} {'mINP':>6}  {'protocol':<12} trials"
    lines = [head, "-" * len(head)]
    for r in results:
        s = r.summary()
        numbers = " ".join(f"{100 * s[k]:6.2f}" for k in ("R1", "R5", "R10", "R20", "mAP", "mINP"))
        lines.append(f"{r.setting:<24} {numbers}  {r.protocol:<12} {len(r.trials)}")
    return "\n".join(lines)


def _trial_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated trial numbers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Evaluate a fine-tuned ReID model (or an exported backbone) under the standard protocols: "
                    "Market-1501/DukeMTMC/MSMT17 (market), SYSU-MM01 all-search (sysu) and indoor-search "
                    "(sysu-indoor), 10 random single-shot galleries as the AGW code draws them, and RegDB "
                    "(visible->thermal and thermal->visible). Prints R1/R5/R10/R20/mAP/mINP and writes JSON.",
        epilog="Features are L2-normalized; distance = squared Euclidean (= cosine ranking). A fine-tuned "
               "checkpoint gives the recipe's test feature (BN feature for AGW, pre-BN for the ViT recipe); an "
               "exported backbone gives GeM (ResNet) or cat(CLS, mean PART) (ViT) features.",
    )
    parser.add_argument("--checkpoint", required=True, nargs="+", type=Path,
                        help="a train.finetune run folder (its latest checkpoint) or checkpoint folder "
                             "(RUN/checkpoints/step_*), or an exported backbone file (models.export); for RegDB "
                             "one fine-tuned run per trial may be given")
    parser.add_argument("--shards", required=True, type=Path, help="shard folder built by `python -m shards build`")
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS, help="evaluation protocol")
    parser.add_argument("--trials", type=int, default=SYSU_TRIALS, help="SYSU-MM01: gallery trials 0..N-1 (default 10)")
    parser.add_argument("--regdb-trials", type=_trial_list, default=None,
                        help="RegDB: trial numbers, e.g. 1,2,3 (default: the checkpoint's own trial, or all for a "
                             "backbone that was not fine-tuned on one)")
    parser.add_argument("--flip", action="store_true", help="average features of each image and its mirror")
    parser.add_argument("--batch-size", type=int, default=128, help="images per extraction batch (default 128)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="input size for an exported backbone (default 288 144 ResNet, 256 128 ViT)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--source", default="auto", choices=("auto", "dali", "wds", "cache"),
                        help="image source (default auto)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no feature-extraction bar (it shows only when stderr is a terminal)")
    return parser


def _regdb_trials_for(loaded, requested: list[int] | None) -> list[int] | None:
    """A fine-tuned RegDB model is evaluated on its own trial only (its training ids are the others' test ids)."""
    if loaded.regdb_trial is None:
        return requested
    if requested is not None and requested != [loaded.regdb_trial]:
        raise UserError(f"{loaded.path} was fine-tuned on RegDB trial {loaded.regdb_trial}; evaluating it on trial(s) "
                        f"{requested} would test on its own training identities")
    return [loaded.regdb_trial]


def _device(text: str | None) -> torch.device | None:
    """``--device`` checked: a device name torch knows, CUDA only where it is available."""
    if text is None:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text!r} is not a device name (cuda, cuda:1, cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_writable(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written, before any feature is extracted."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'results.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write --out {out}: {err.strerror or err} ({out.parent})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write --out {out}: its folder {out.parent} is not writable")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from train.finetune import load_for_evaluation  # the model code; finetune imports this module

    if len(args.checkpoint) > 1 and args.protocol != "regdb":
        raise UserError("several --checkpoint files are only meaningful for RegDB (one model per trial)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = _device(args.device)
    if args.out is not None:
        _check_writable(args.out)  # before the work, not after it
    check_protocol(load_manifest(args.shards), args.shards, args.protocol)
    started = time.perf_counter()
    runs = []
    for path in args.checkpoint:
        loaded = load_for_evaluation(path, device=device, size=tuple(args.size) if args.size else None)
        trials = _regdb_trials_for(loaded, args.regdb_trials) if args.protocol == "regdb" else None
        runs.append(evaluate(loaded.embed, args.shards, args.protocol, size=loaded.size, transform=loaded.transform,
                             trials=args.trials, regdb_trials=trials, batch_size=args.batch_size,
                             device=loaded.device, flip=args.flip, source=args.source, progress=args.progress))
    results = runs[0] if len(runs) == 1 else merge_trials(runs)
    print(format_table(results))
    if args.out is not None:
        report = {"protocol": args.protocol, "checkpoints": [str(p) for p in args.checkpoint], "flip": args.flip,
                  "distance": "squared euclidean on L2-normalized features", "seconds": time.perf_counter() - started,
                  "results": [r.to_dict() for r in results]}
        try:
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as err:
            raise UserError(f"cannot write --out {args.out}: {err.strerror or err}") from None
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
