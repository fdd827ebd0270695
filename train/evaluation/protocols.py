"""Evaluation protocols as data: which splits a protocol reads, which ranking rule it uses, how it
draws galleries or picks trials, and which shard layouts it fits, in one registry
(:data:`PROTOCOLS`); :func:`evaluate` runs any of them (features from :mod:`.features`, ranking
from :mod:`.metrics`).

Market-style (``market``: Market-1501, DukeMTMC-reID, MSMT17 and any query/gallery folder)
-----------------------------------------------------------------------------------------
Query split against gallery split, the market ranking rule, one "trial".

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

SYSU-MM01 multi-shot (``sysu-multi``, ``sysu-indoor-multi``)
-------------------------------------------------------------
As single-shot, but each (identity, RGB camera) contributes 10 images: the AGW code's
``process_gallery_sysu`` with ``gall_mode='multi'``, which calls numpy's
``np.random.choice(files, 10, replace=False)`` on the same sorted file list, identity by identity
and camera by camera. The AGW code draws from numpy's global generator without seeding it per
trial (its ``random.seed(trial)`` seeds Python's generator only), so its multi-shot galleries
depend on what ran before; here trial t draws from ``np.random.RandomState(t)`` (the state
``np.random.seed(t)`` gives), so a trial is reproducible and equals the AGW draw after
``np.random.seed(t)``. A camera with fewer than 10 images of an identity gives all of them (the
AGW call would raise).

Re-ranking and what was ranked
------------------------------
Every protocol ranks through :func:`ranking_distances`: the squared Euclidean distance of
L2-normalized features, or with :class:`Rerank` the k-reciprocal re-ranked distance
(:func:`~train.evaluation.rerank.re_rank` of the query-gallery, query-query and gallery-gallery
distances of that very ranking: per trial gallery for SYSU-MM01, per direction and trial for
RegDB). A :data:`OnRanked` callback receives each ranking (:class:`Ranked`), e.g. to draw it.

To add a protocol: write its ``score(features, trials, max_rank, ranking) -> [ProtocolResult]``
(and a ``trials(manifest, count, wanted)`` when it has trials), then add one :class:`Protocol`
to :data:`PROTOCOLS` saying which splits it reads and which layouts it fits.
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from shards.manifest import Manifest, Trial, load_manifest
from train.evaluation.features import Embedder, Gather, SplitFeatures, extract_features
from train.evaluation.metrics import RankMetrics, compute_metrics, distance_matrix
from train.evaluation.rerank import re_rank

#: RGB gallery cameras of SYSU-MM01 per search mode; the query cameras are the IR ones (3, 6).
SYSU_GALLERY_CAMERAS = {"sysu": (1, 2, 4, 5), "sysu-indoor": (1, 2)}
SYSU_TRIALS = 10
#: Images per identity and camera in a SYSU-MM01 multi-shot gallery.
SYSU_MULTI_SHOT = 10
REPORTED_RANKS = (1, 5, 10, 20)


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


@dataclass(frozen=True)
class Rerank:
    """k-reciprocal re-ranking of every ranking (Zhong et al. 2017; the paper's k1, k2, lambda)."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:  # refused before any feature is extracted
        if self.k1 < 1 or self.k2 < 1:
            raise UserError(f"re-ranking: --rerank_k1 and --rerank_k2 must be at least 1, got {self.k1}, {self.k2}")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise UserError(f"re-ranking: --rerank_lambda must be in [0, 1], got {self.lambda_value}")


@dataclass(frozen=True)
class Ranked:
    """One ranking a protocol computed: ``distances (Q, G)`` (after re-ranking, if any) of
    ``query`` against ``gallery`` (features and labels; their ``index`` is the sample index in
    ``query_split`` / ``gallery_split``) under ranking ``rule``, for ``setting`` and ``trial``."""

    setting: str
    trial: int
    rule: str
    query: SplitFeatures
    gallery: SplitFeatures
    query_split: str
    gallery_split: str
    distances: torch.Tensor


#: Called with each :class:`Ranked` a protocol computes.
OnRanked = Callable[[Ranked], None]


@dataclass(frozen=True)
class Ranking:
    """How a protocol ranks: ``rerank`` (None: plain distances) and an ``on_ranked`` observer."""

    rerank: Rerank | None = None
    on_ranked: OnRanked | None = None


def ranking_distances(query: torch.Tensor, gallery: torch.Tensor, rerank: Rerank | None = None) -> torch.Tensor:
    """``(Q, D), (G, D)`` features -> ``(Q, G)`` distances the ranking uses: the squared Euclidean
    distance of L2-normalized features, re-ranked with ``rerank`` (query-query and
    gallery-gallery distances of the same features) when given."""
    q_g = distance_matrix(query, gallery)
    if rerank is None:
        return q_g
    return re_rank(q_g, distance_matrix(query, query), distance_matrix(gallery, gallery),
                   k1=rerank.k1, k2=rerank.k2, lambda_value=rerank.lambda_value)


def _rank(query: SplitFeatures, gallery: SplitFeatures, rule: str, max_rank: int, ranking: Ranking,
          setting: str, trial: int, splits: tuple[str, str]) -> RankMetrics:
    distances = ranking_distances(query.features, gallery.features, ranking.rerank)
    if ranking.on_ranked is not None:
        ranking.on_ranked(Ranked(setting, trial, rule, query, gallery, *splits, distances))
    return compute_metrics(distances, query.pid, gallery.pid, query.camera, gallery.camera, rule, max_rank)


def _sysu_files(pids: Sequence[int], cameras: Sequence[int], order: Sequence[int], mode: str,
                ) -> list[list[int]]:
    """Per test identity (ascending) and RGB camera of ``mode`` that saw it: the positions of its
    images in source-path order (AGW's sorted folder listings)."""
    if mode not in SYSU_GALLERY_CAMERAS:
        raise ValueError(f"unknown SYSU-MM01 search mode {mode!r}; expected one of: {', '.join(SYSU_GALLERY_CAMERAS)}")
    pids, cameras, order = (np.asarray(a, dtype=np.int64) for a in (pids, cameras, order))
    files: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position in np.argsort(order, kind="stable"):
        files[int(pids[position]), int(cameras[position])].append(int(position))
    return [files[pid, cam] for pid in sorted(set(pids.tolist())) for cam in SYSU_GALLERY_CAMERAS[mode]
            if (pid, cam) in files]


def sysu_multi_shot_gallery_trial(pids: Sequence[int], cameras: Sequence[int], order: Sequence[int], trial: int,
                                  mode: str = "sysu", shots: int = SYSU_MULTI_SHOT) -> np.ndarray:
    """Positions (into ``pids``) of trial ``trial``'s multi-shot gallery (module docstring):
    ``shots`` images without replacement per (identity, camera), drawn by
    ``np.random.RandomState(trial).choice`` in AGW's order; all of them when fewer. Arguments as
    :func:`sysu_gallery_trial`. Returns int64 ``(n,)`` in draw order."""
    rng = np.random.RandomState(trial)  # private: the global numpy state is left alone
    chosen: list[int] = []
    for files in _sysu_files(pids, cameras, order, mode):
        if len(files) < shots:
            chosen.extend(files)
        else:
            chosen.extend(int(f) for f in rng.choice(np.asarray(files), shots, replace=False))
    return np.asarray(chosen, dtype=np.int64)


def sysu_gallery_trial(pids: Sequence[int], cameras: Sequence[int], order: Sequence[int], trial: int,
                       mode: str = "sysu") -> np.ndarray:
    """Positions (into ``pids``) of trial ``trial``'s single-shot gallery (module docstring).

    pids, cameras: ``(N,)`` labels of every RGB image of the test identities (the ``gallery``
    split); order: ``(N,)`` each image's rank in source-path order (the shards' sample
    ``index``); mode: ``sysu`` (all-search, cameras 1, 2, 4, 5) or ``sysu-indoor`` (1, 2).
    Returns int64 ``(n_ids_x_cameras,)`` in draw order (identity, then camera).
    """
    # A private generator in the state random.seed(trial) gives: the draws equal AGW's without
    # touching the global random state.
    rng = random.Random(trial)
    return np.asarray([rng.choice(files) for files in _sysu_files(pids, cameras, order, mode)], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Scoring: features of the protocol's splits -> results
# --------------------------------------------------------------------------------------------


def market_results(features: dict[str, SplitFeatures], trials: Sequence[int], max_rank: int = 20,
                   ranking: Ranking = Ranking()) -> list[ProtocolResult]:
    """Query split against gallery split under the market rule (one trial, numbered 0)."""
    query, gallery = features["query"], features["gallery"]
    run = _rank(query, gallery, "market", max_rank, ranking, "market", 0, ("query", "gallery"))
    return [_average("market", "market", [0], [run], [len(gallery)])]


def sysu_results(features: dict[str, SplitFeatures], trials: Sequence[int], max_rank: int = 20,
                 ranking: Ranking = Ranking(), *, mode: str = "sysu", multi_shot: bool = False) -> list[ProtocolResult]:
    """SYSU-MM01 ``mode`` (all- or indoor-search): every IR query against each trial's drawn RGB
    gallery (:func:`sysu_gallery_trial`, or :func:`sysu_multi_shot_gallery_trial` with
    ``multi_shot``), averaged over ``trials``."""
    query, gallery = features["query"], features["gallery"]
    draw = sysu_multi_shot_gallery_trial if multi_shot else sysu_gallery_trial
    setting = ("sysu all-search" if mode == "sysu" else "sysu indoor-search") + (" multi-shot" if multi_shot else "")
    runs, sizes = [], []
    for trial in trials:
        picked = gallery.subset(draw(gallery.pid, gallery.camera, gallery.index, trial, mode))
        runs.append(_rank(query, picked, "sysu", max_rank, ranking, setting, trial, ("query", "gallery")))
        sizes.append(len(picked))
    name = mode + ("-multi" if multi_shot else "")
    return [_average(setting, name, list(trials), runs, sizes)]


def _regdb_scores(features: dict[str, SplitFeatures], trials: Sequence[Trial], max_rank: int = 20,
                  ranking: Ranking = Ranking()) -> list[ProtocolResult]:
    return regdb_results(features["all"], list(trials), max_rank, ranking)


def regdb_results(everything: SplitFeatures, trials: list, max_rank: int = 20,
                  ranking: Ranking = Ranking()) -> list[ProtocolResult]:
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
            runs.append(_rank(query, gallery, "regdb", max_rank, ranking, setting, trial.trial, ("all", "all")))
            sizes.append(len(gallery))
        results.append(_average(setting, "regdb", [t.trial for t in trials], runs, sizes))
    return results


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------


def single_trial(manifest: Manifest, count: int, wanted: Iterable[int] | None) -> list[int]:
    """Protocols without trials: one run, numbered 0."""
    return [0]


def gallery_draws(manifest: Manifest, count: int, wanted: Iterable[int] | None) -> list[int]:
    """SYSU-MM01: random gallery draws 0 .. count-1."""
    if count < 1:
        raise UserError(f"--trials must be at least 1, got {count}")
    return list(range(count))


def manifest_trials(manifest: Manifest, count: int, wanted: Iterable[int] | None) -> list[Trial]:
    """RegDB: the manifest's trials (from ``idx/``), all or the ``wanted`` numbers."""
    by_number = {t.trial: t for t in manifest.trials}
    if wanted is None:
        return [by_number[t] for t in sorted(by_number)]
    unknown = [t for t in wanted if t not in by_number]
    if unknown:
        raise UserError(f"RegDB trial(s) {unknown} are not in the manifest (it has {sorted(by_number)})")
    return [by_number[t] for t in wanted]


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol.

    splits: the shard splits whose features it scores.
    ranking: the :func:`~train.evaluation.metrics.compute_metrics` rule it ranks with.
    layouts: the shard layouts (``manifest.layout``) it fits; the first protocol listing a
        layout is that layout's default.
    trials: ``(manifest, count, wanted) -> trial list`` (gallery draws, manifest trials, or one).
    score: ``(features by split, trials, max_rank, ranking) -> [ProtocolResult]`` (``ranking``:
        a :class:`Ranking`).
    trained_per_trial: every trial has its own training identities (RegDB): a model is
        fine-tuned on one trial's identities (the manifest ``Trial.train_ids``, split ``all``)
        and evaluated on that trial only.
    """

    splits: tuple[str, ...]
    ranking: str
    layouts: tuple[str, ...]
    trials: Callable[[Manifest, int, Iterable[int] | None], list]
    score: Callable[[dict[str, SplitFeatures], Sequence, int, Ranking], list[ProtocolResult]]
    description: str
    trained_per_trial: bool = False


MARKET_LAYOUTS = ("market1501", "dukemtmc", "msmt17", "manifest")

PROTOCOLS: dict[str, Protocol] = {
    "market": Protocol(("query", "gallery"), "market", MARKET_LAYOUTS, single_trial, market_results,
                       "Market-1501 / DukeMTMC-reID / MSMT17: same-camera matches removed"),
    "sysu": Protocol(("query", "gallery"), "sysu", ("sysu-mm01",), gallery_draws,
                     functools.partial(sysu_results, mode="sysu"),
                     "SYSU-MM01 all-search: IR queries, RGB cameras 1, 2, 4, 5, random single-shot galleries"),
    "sysu-indoor": Protocol(("query", "gallery"), "sysu", ("sysu-mm01",), gallery_draws,
                            functools.partial(sysu_results, mode="sysu-indoor"),
                            "SYSU-MM01 indoor-search: RGB cameras 1, 2"),
    "sysu-multi": Protocol(("query", "gallery"), "sysu", ("sysu-mm01",), gallery_draws,
                           functools.partial(sysu_results, mode="sysu", multi_shot=True),
                           "SYSU-MM01 all-search, multi-shot: 10 random images per identity and RGB camera"),
    "sysu-indoor-multi": Protocol(("query", "gallery"), "sysu", ("sysu-mm01",), gallery_draws,
                                  functools.partial(sysu_results, mode="sysu-indoor", multi_shot=True),
                                  "SYSU-MM01 indoor-search, multi-shot: 10 random images per identity and camera 1, 2"),
    "regdb": Protocol(("all",), "regdb", ("regdb",), manifest_trials, _regdb_scores,
                      "RegDB: visible->thermal and thermal->visible on a trial's test identities",
                      trained_per_trial=True),
}


def layout_protocols(layout: str) -> tuple[str, ...]:
    """The protocols that fit shards of ``layout``, the default first (registry order)."""
    return tuple(name for name, protocol in PROTOCOLS.items() if layout in protocol.layouts)


#: Which protocols suit which shard layouts (derived from :data:`PROTOCOLS`).
LAYOUT_PROTOCOLS = {layout: layout_protocols(layout) for p in PROTOCOLS.values() for layout in p.layouts}


def default_protocol(manifest: Manifest) -> str:
    """The first protocol that fits the shards' layout."""
    allowed = layout_protocols(manifest.layout)
    if not allowed:
        raise UserError(f"layout {manifest.layout!r} has no labelled evaluation protocol to fine-tune for")
    return allowed[0]


def check_protocol(manifest: Manifest, folder: str | Path, protocol: str) -> None:
    """Refuse, with a one-line :class:`UserError`, a protocol the shards cannot be evaluated with."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; expected one of: {', '.join(PROTOCOLS)}")
    allowed = layout_protocols(manifest.layout)
    if protocol not in allowed:
        hint = f"use --protocol {' or '.join(allowed)}" if allowed else "it has no labelled query/gallery splits"
        raise UserError(f"the shards in {folder} are of layout {manifest.layout!r}, which the {protocol} "
                        f"protocol does not evaluate; {hint}")
    for split in PROTOCOLS[protocol].splits:
        if not manifest.shards_of(split):
            raise UserError(f"the {protocol} protocol needs split {split!r}, which {folder} does not have "
                            f"(it has: {', '.join(sorted(manifest.splits)) or 'none'})")
    if PROTOCOLS[protocol].trained_per_trial and not manifest.trials:
        raise UserError(f"{folder} has no RegDB trials in its manifest (idx/ lists missing at build time?)")


def evaluate(embed: Embedder, shards: str | Path, protocol: str, *, size: tuple[int, int],
             transform: Callable[[torch.Tensor], torch.Tensor], trials: int = SYSU_TRIALS,
             regdb_trials: Iterable[int] | None = None, batch_size: int = 128,
             device: str | torch.device | None = None, flip: bool = False, source: str = "auto",
             max_rank: int = 20, rank: int = 0, world: int = 1, gather: Gather | None = None,
             progress: bool = True, ranking: Ranking = Ranking()) -> list[ProtocolResult]:
    """Extract features with ``embed`` and evaluate the shards under ``protocol``.

    protocol: a :data:`PROTOCOLS` name (``market`` | ``sysu`` | ``sysu-indoor`` | ``regdb``).
    trials: SYSU-MM01 gallery trials 0..trials-1.
    regdb_trials: RegDB trial numbers (as in ``idx/``; default: all in the manifest).
    rank, world, gather: several processes share the feature extraction (every one must call
        this; see :func:`~train.evaluation.features.extract_features`); process 0 alone ranks,
        the others return ``[]``.
    progress: feature-extraction bars.
    ranking: re-ranking and an observer of every ranking (:class:`Ranking`).
    Returns one :class:`ProtocolResult` per setting (RegDB: visible->thermal, thermal->visible).
    The caller puts the model in eval mode.
    """
    manifest = load_manifest(shards)
    check_protocol(manifest, shards, protocol)
    chosen = PROTOCOLS[protocol]
    picked_trials = chosen.trials(manifest, trials, regdb_trials)
    extract = dict(size=size, transform=transform, batch_size=batch_size, device=device, flip=flip, source=source,
                   rank=rank, world=world, gather=gather, progress=progress)
    features = {split: extract_features(embed, shards, split, **extract) for split in chosen.splits}
    if rank != 0:
        return []  # their part of the features is given; ranking is cheap next to extraction
    return chosen.score(features, picked_trials, max_rank, ranking)


#: Layouts whose ``gallery`` split is one modality's images of the test identities (SYSU-MM01:
#: RGB), so a same-modality retrieval can be measured beside the cross-modal protocol.
SAME_MODALITY_LAYOUTS = ("sysu-mm01",)


def same_modality_metrics(features: SplitFeatures, max_rank: int = 20) -> dict[str, float]:
    """Same-modality retrieval within one split (SYSU-MM01's RGB ``gallery``): every image
    queries all the others, with the entries of its own identity AND camera removed (the market
    rule, which removes the query itself too), so a hit is the same person seen by another camera.
    A reference figure beside the cross-modal protocol, never part of it. Returns ``R1``, ``mAP``,
    ``mINP`` (fractions) and ``queries`` (those with a match in another camera)."""
    dist = distance_matrix(features.features, features.features)
    metrics = compute_metrics(dist, features.pid, features.pid, features.camera, features.camera, "market",
                              max_rank=max_rank)
    return {"R1": float(metrics.cmc[0]), "mAP": float(metrics.mAP), "mINP": float(metrics.mINP),
            "queries": int(metrics.valid_queries)}


def same_modality(embed: Embedder, shards: str | Path, *, size: tuple[int, int],
                  transform: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 128,
                  device: str | torch.device | None = None, flip: bool = False, source: str = "auto",
                  rank: int = 0, world: int = 1, gather: Gather | None = None,
                  progress: bool = True) -> dict[str, float] | None:
    """:func:`same_modality_metrics` of the ``gallery`` split of shards of a
    :data:`SAME_MODALITY_LAYOUTS` layout (None for another layout, and on processes other than 0)."""
    if load_manifest(shards).layout not in SAME_MODALITY_LAYOUTS:
        return None
    features = extract_features(embed, shards, "gallery", size=size, transform=transform, batch_size=batch_size,
                                device=device, flip=flip, source=source, rank=rank, world=world, gather=gather,
                                progress=progress)
    return same_modality_metrics(features) if rank == 0 else None


def merge_trials(results: list[list[ProtocolResult]]) -> list[ProtocolResult]:
    """Average per-setting results of separate runs (RegDB: one fine-tuned model per trial)."""
    merged = []
    for settings in zip(*results):
        runs = [RankMetrics(np.asarray(r.cmc), r.mAP, r.mINP, r.queries, r.queries) for r in settings]
        trials = [t for r in settings for t in r.trials]
        merged.append(_average(settings[0].setting, settings[0].protocol, trials, runs, [r.gallery for r in settings]))
        merged[-1].per_trial = [p for r in settings for p in r.per_trial]
    return merged


def format_table(results: list[ProtocolResult]) -> str:
    """A fixed-width table: setting, R1, R5, R10, R20, mAP, mINP (percent), protocol, trials."""
    head = f"{'setting':<30} {'R1':>6} {'R5':>6} {'R10':>6} {'R20':>6} {'mAP':>6} {'mINP':>6}  {'protocol':<18} trials"
    lines = [head, "-" * len(head)]
    for r in results:
        s = r.summary()
        numbers = " ".join(f"{100 * s[k]:6.2f}" for k in ("R1", "R5", "R10", "R20", "mAP", "mINP"))
        lines.append(f"{r.setting:<30} {numbers}  {r.protocol:<18} {len(r.trials)}")
    return "\n".join(lines)


