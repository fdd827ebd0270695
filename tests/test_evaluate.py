"""Ranking metrics against per-query loops written from the definitions, hand-worked cases, and
the SYSU-MM01 gallery draw against a re-implementation of the AGW procedure on a folder tree."""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from shards.manifest import load_manifest
from train.evaluate import main
from train.evaluation.features import SplitFeatures
from train.evaluation.metrics import RankMetrics, compute_metrics, distance_matrix
from train.evaluation.protocols import check_protocol, format_table, regdb_results, sysu_gallery_trial


# --------------------------------------------------------------------------------------------
# Naive references: one query at a time, straight from the definitions
# --------------------------------------------------------------------------------------------


def naive_metrics(dist, q_pids, g_pids, q_cams, g_cams, protocol, max_rank=20):
    cmcs, aps, inps = [], [], []
    for i in range(len(q_pids)):
        order = sorted(range(len(g_pids)), key=lambda j: (dist[i][j], j))
        kept = []
        for j in order:
            if protocol == "market" and g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i]:
                continue
            if protocol == "sysu" and q_cams[i] == 3 and g_cams[j] == 2:
                continue
            kept.append(j)
        matches = [g_pids[j] == q_pids[i] for j in kept]
        if not any(matches):
            continue
        hit_ranks = [r + 1 for r, m in enumerate(matches) if m]
        aps.append(np.mean([(n + 1) / r for n, r in enumerate(hit_ranks)]))
        inps.append(len(hit_ranks) / hit_ranks[-1])
        if protocol == "sysu":  # identities in order of first appearance
            seen = []
            for j in kept:
                if g_pids[j] not in seen:
                    seen.append(g_pids[j])
            first = seen.index(q_pids[i]) + 1
        else:
            first = hit_ranks[0]
        cmcs.append([1.0 if first <= k else 0.0 for k in range(1, max_rank + 1)])
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps))


def naive_agw_gallery(root: Path, trial: int, mode: str) -> list[str]:
    """The AGW gallery procedure on a SYSU-MM01 folder (facts of its data manager, re-written)."""
    random.seed(trial)
    cameras = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    ids = (root / "exp" / "test_id.txt").read_text().splitlines()[0].split(",")
    files = []
    for pid in sorted("%04d" % int(x) for x in ids):
        for cam in cameras:
            folder = os.path.join(root, cam, pid)
            if os.path.isdir(folder):
                files.append(random.choice(sorted(folder + "/" + name for name in os.listdir(folder))))
    return [os.path.relpath(f, root) for f in files]


def random_problem(rng, nq, ng, ids, cams):
    q_pids = rng.integers(0, ids, nq)
    g_pids = rng.integers(0, ids, ng)
    q_cams = rng.choice(cams, nq)
    g_cams = rng.choice(cams, ng)
    dist = rng.random((nq, ng)).astype(np.float32)
    return dist, q_pids, g_pids, q_cams, g_cams


# --------------------------------------------------------------------------------------------
# compute_metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol, cams", [("market", [1, 2, 3]), ("sysu", [1, 2, 3, 4, 5, 6]), ("regdb", [1, 2])])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference(protocol, cams, seed):
    rng = np.random.default_rng(seed)
    dist, qp, gp, qc, gc = random_problem(rng, 40, 60, 8, cams)
    if seed == 2:  # ties: the stable order must match the naive (distance, position) order
        dist = np.round(dist * 4) / 4
    got = compute_metrics(dist, qp, gp, qc, gc, protocol)
    cmc, mAP, mINP = naive_metrics(dist, qp, gp, qc, gc, protocol)
    np.testing.assert_allclose(got.cmc, cmc, atol=1e-12)
    assert got.mAP == pytest.approx(mAP, abs=1e-12)
    assert got.mINP == pytest.approx(mINP, abs=1e-12)


def test_blocks_and_torch_input_give_the_same_numbers(monkeypatch):
    rng = np.random.default_rng(5)
    dist, qp, gp, qc, gc = random_problem(rng, 50, 30, 6, [1, 2, 3, 6])
    whole = compute_metrics(dist, qp, gp, qc, gc, "sysu")
    monkeypatch.setattr("train.evaluation.metrics.BLOCK_ELEMENTS", 64)  # blocks of 2 queries
    blocked = compute_metrics(torch.from_numpy(dist), torch.from_numpy(qp), gp, qc, torch.from_numpy(gc), "sysu")
    np.testing.assert_allclose(blocked.cmc, whole.cmc)
    assert (blocked.mAP, blocked.mINP) == pytest.approx((whole.mAP, whole.mINP))


def test_hand_worked_market_case():
    # Query pid 1 cam 1. Ranked gallery: (1,c1) same camera -> removed; (0,c2) distractor kept;
    # (1,c2) hit at rank 2; (2,c3); (1,c3) hit at rank 4.
    dist = np.array([[0.0, 0.1, 0.2, 0.3, 0.4]])
    g_pids, g_cams = np.array([1, 0, 1, 2, 1]), np.array([1, 2, 2, 3, 3])
    m = compute_metrics(dist, [1], g_pids, [1], g_cams, "market", max_rank=5)
    np.testing.assert_allclose(m.cmc, [0, 1, 1, 1, 1])
    assert m.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m.mINP == pytest.approx(2 / 4)
    assert (m.valid_queries, m.queries) == (1, 1)


def test_query_without_valid_match_is_skipped():
    # Query 0 (pid 5) only matches itself in the same camera: removed, so it is skipped.
    dist = np.array([[0.0, 0.5], [0.5, 0.0]])
    m = compute_metrics(dist, [5, 6], [5, 6], [1, 1], [1, 2], "market", max_rank=2)
    assert (m.valid_queries, m.queries) == (1, 2)
    np.testing.assert_allclose(m.cmc, [1, 1])
    assert m.mAP == 1.0


def test_no_valid_query_is_a_user_error():
    with pytest.raises(UserError, match="no query has a true match"):
        compute_metrics(np.zeros((1, 1)), [1], [2], [1], [1], "regdb")


def test_sysu_camera_rule_and_first_occurrence_cmc():
    # Query pid 1 from camera 3. Ranking: (2,c2) dropped (cam 2 for a cam-3 query, any pid),
    # (1,c2) dropped too, then (3,c1), (3,c4), (4,c5), (1,c1) hit at raw rank 4.
    # First-occurrence ranking: 3, 4, 1 -> rank 3 (identity 3 counted once).
    dist = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    g_pids, g_cams = np.array([2, 1, 3, 3, 4, 1]), np.array([2, 2, 1, 4, 5, 1])
    m = compute_metrics(dist, [1], g_pids, [3], g_cams, "sysu", max_rank=4)
    np.testing.assert_allclose(m.cmc, [0, 0, 1, 1])
    assert m.mAP == pytest.approx(1 / 4)  # one hit at raw rank 4 after the camera rule
    assert m.mINP == pytest.approx(1 / 4)
    # A camera-6 query keeps camera 2: the hit (1, c2) is at rank 2, behind identity 2.
    m6 = compute_metrics(dist, [1], g_pids, [6], g_cams, "sysu", max_rank=4)
    np.testing.assert_allclose(m6.cmc, [0, 1, 1, 1])
    assert m6.mAP == pytest.approx((1 / 2 + 2 / 6) / 2)
    # The market rule would keep (2, c2) and drop nothing for pid 1 (no camera 3 in the gallery).
    mk = compute_metrics(dist, [1], g_pids, [3], g_cams, "market", max_rank=4)
    np.testing.assert_allclose(mk.cmc, [0, 1, 1, 1])


def test_regdb_drops_nothing():
    dist = np.array([[0.0, 0.1]])
    m = compute_metrics(dist, [1], [1, 2], [1], [2, 2], "regdb", max_rank=3)
    np.testing.assert_allclose(m.cmc, [1, 1, 1])  # past the gallery length: the last value


def test_distance_is_cosine_ranking():
    rng = np.random.default_rng(0)
    q, g = torch.from_numpy(rng.normal(size=(4, 8))), torch.from_numpy(rng.normal(size=(6, 8)))
    cos = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    d = distance_matrix(q, g)
    torch.testing.assert_close(d, (2 - 2 * cos).float(), atol=1e-5, rtol=0)
    assert torch.equal(torch.argsort(d, 1), torch.argsort(-cos.float(), 1))


def test_sysu_sized_problem_is_fast():
    import time

    rng = np.random.default_rng(0)
    dist, qp, gp, qc, gc = random_problem(rng, 3803, 301, 96, [1, 2, 3, 4, 5, 6])
    started = time.perf_counter()
    for _ in range(2):  # the real protocol runs 10 trials: about 0.35 s each on 2 CPU cores
        compute_metrics(dist, qp, gp, qc, gc, "sysu")
    assert time.perf_counter() - started < 6


# --------------------------------------------------------------------------------------------
# SYSU-MM01 galleries
# --------------------------------------------------------------------------------------------


def sysu_tree(root: Path, seed: int = 0) -> list[tuple[str, int, int]]:
    """Empty files in the SYSU-MM01 layout (test ids only) -> (source, pid, camera) of RGB images."""
    rng = np.random.default_rng(seed)
    test_ids = [3, 12, 7, 100, 41]
    (root / "exp").mkdir(parents=True)
    (root / "exp" / "test_id.txt").write_text(",".join(map(str, test_ids)) + "\n")
    rgb = []
    for pid in test_ids:
        for cam in (1, 2, 3, 4, 5, 6):
            if rng.random() < 0.3:
                continue  # this camera did not see this person
            folder = root / f"cam{cam}" / f"{pid:04d}"
            folder.mkdir(parents=True)
            for n in rng.choice(np.arange(1, 40), size=rng.integers(1, 7), replace=False):
                (folder / f"{n:04d}.jpg").touch()
                if cam in (1, 2, 4, 5):
                    rgb.append((f"cam{cam}/{pid:04d}/{n:04d}.jpg", pid, cam))
    return rgb


@pytest.mark.parametrize("mode, agw_mode", [("sysu", "all"), ("sysu-indoor", "indoor")])
def test_sysu_gallery_matches_the_agw_procedure(tmp_path, mode, agw_mode):
    rgb = sysu_tree(tmp_path)
    rng = np.random.default_rng(1)
    shuffled = [rgb[i] for i in rng.permutation(len(rgb))]  # the extraction order does not matter
    sources = [s for s, _, _ in shuffled]
    order = np.argsort(np.argsort(sources))  # rank in source-path order (the shards' index)
    pids = [p for _, p, _ in shuffled]
    cams = [c for _, _, c in shuffled]
    galleries = []
    for trial in range(10):
        picked = sysu_gallery_trial(pids, cams, order, trial, mode)
        assert [sources[i] for i in picked] == naive_agw_gallery(tmp_path, trial, agw_mode)
        # one image per (test id, RGB camera that saw it)
        pairs = [(pids[i], cams[i]) for i in picked]
        allowed = {1: (1, 2, 4, 5), 0: (1, 2)}[mode == "sysu"]
        assert sorted(pairs) == sorted({(p, c) for p, c in zip(pids, cams) if c in allowed})
        assert np.array_equal(picked, sysu_gallery_trial(pids, cams, order, trial, mode))  # reproducible
        galleries.append(tuple(picked))
    assert len(set(galleries)) > 1  # trials differ


def test_sysu_gallery_leaves_global_random_state_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    sysu_gallery_trial([1, 1, 2], [1, 1, 4], [0, 1, 2], trial=3)
    assert random.random() == expected


# --------------------------------------------------------------------------------------------
# RegDB, protocol checks, table
# --------------------------------------------------------------------------------------------


class _Trial:
    def __init__(self, trial, test_ids):
        self.trial, self.test_ids = trial, test_ids


def test_regdb_both_directions_over_trials():
    # pids 1..4; features equal per identity, so every query matches perfectly.
    pids = np.repeat([1, 2, 3, 4], 4)
    modality = np.tile([0, 0, 1, 1], 4)
    basis = torch.eye(4)
    feats = basis[torch.as_tensor(pids - 1)]
    split = SplitFeatures(feats, pids, np.where(modality == 0, 1, 2), modality, np.arange(16))
    results = regdb_results(split, [_Trial(1, [1, 2]), _Trial(2, [3, 4])])
    assert [r.setting for r in results] == ["regdb visible->thermal", "regdb thermal->visible"]
    for r in results:
        assert r.trials == [1, 2] and r.rank(1) == 1.0 and r.mAP == 1.0
        assert r.queries == 4 and r.gallery == 4
    assert "regdb visible->thermal" in format_table(results)


def test_wrong_protocol_for_the_shards_is_one_line_error(tmp_path, capsys):
    from shards.manifest import Manifest

    manifest = Manifest("market1501", "/x", "f", 0, 1, {}, [], {}, [], {}, 0)
    with pytest.raises(UserError, match="layout 'market1501'.*use --protocol market"):
        check_protocol(manifest, tmp_path, "sysu")
    with pytest.raises(UserError, match="needs split 'query'"):
        check_protocol(manifest, tmp_path, "market")
    from common.cli import run_cli

    assert run_cli(main, ["--checkpoint", "x.pt", "--shards", str(tmp_path / "none"), "--protocol", "sysu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_rankmetrics_fields():
    m = compute_metrics(np.array([[0.0]]), [1], [1], [1], [2], "market", max_rank=1)
    assert isinstance(m, RankMetrics) and m.cmc.shape == (1,)


def test_merge_trials_averages_separate_runs():
    from train.evaluation.protocols import ProtocolResult, merge_trials

    def run(trial, r1, m):
        return [ProtocolResult("regdb visible->thermal", "regdb", [trial], [r1] * 20, m, m, 10, 10.0,
                               [{"trial": trial, "R1": r1}])]

    (merged,) = merge_trials([run(1, 0.5, 0.4), run(2, 1.0, 0.6)])
    assert merged.trials == [1, 2] and merged.rank(1) == pytest.approx(0.75) and merged.mAP == pytest.approx(0.5)
    assert [p["trial"] for p in merged.per_trial] == [1, 2]


@pytest.mark.parametrize("extra, message", [
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "nonsense"], "not a device name"),
    (["--out", "."], "is a folder"),
    (["--out", "blocker/results.json"], "cannot write --out"),
])
def test_bad_device_or_out_is_one_line_error_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    from common.cli import run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file, not a folder")
    argv = ["--checkpoint", "x.pt", "--shards", str(tmp_path / "none"), "--protocol", "sysu", *extra]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def market_shards(tmp_path_factory):
    from shards.build import build
    from shards.synthetic import generate

    base = tmp_path_factory.mktemp("market")
    generate("market1501", base / "data", ids=6, images_per_id=4, workers=1)
    build("market1501", base / "data", base / "shards", shard_size=16, workers=1)
    return base / "shards"


def _extract(shards, split="gallery", **kwargs):
    from train.evaluation.features import extract_features

    return extract_features(lambda views, modality: views.flatten(1)[:, :16] + modality[:, None], shards, split,
                            size=(32, 16), transform=lambda images: images.float() / 255, batch_size=4,
                            source="wds", device="cpu", **kwargs)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_extraction_bar_counts_images_on_a_terminal_only(market_shards, monkeypatch):
    images = load_manifest(market_shards).splits["gallery"].total.images
    for progress, stream, shown in [(True, _Terminal(), True), (False, _Terminal(), False),
                                    (True, io.StringIO(), False)]:
        monkeypatch.setattr(sys, "stderr", stream)
        _extract(market_shards, progress=progress)
        assert ("img/s" in stream.getvalue()) is shown, (progress, type(stream))
        if shown:
            assert f"/{images} " in stream.getvalue() and "features gallery" in stream.getvalue()
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    _extract(market_shards, rank=1, world=2)
    assert stream.getvalue() == ""  # process 0 only


def test_labels_reach_the_host_in_one_copy(market_shards, monkeypatch):
    copies = []
    original = torch.Tensor.cpu

    def counted(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("train", "evaluation", "features.py")):
            copies.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    features = _extract(market_shards, progress=False)
    images = load_manifest(market_shards).splits["gallery"].total.images
    assert images > 4 and len(features) == images  # several batches of 4
    assert copies == [(images, 4)]


def test_processes_extract_parts_that_gather_into_the_whole_split(market_shards):
    whole = _extract(market_shards, progress=False)
    peer: list[torch.Tensor] = []  # what process 1 gives its gather: features, then labels

    def record(rows):
        peer.append(rows)
        return rows

    part = _extract(market_shards, rank=1, world=2, gather=record, progress=False)
    assert 0 < len(part) < len(whole)
    given = iter(peer)
    gathered = _extract(market_shards, rank=0, world=2, gather=lambda rows: torch.cat([rows, next(given)]),
                        progress=False)
    torch.testing.assert_close(gathered.features, whole.features, rtol=0, atol=0)
    for name in ("pid", "camera", "modality", "index"):
        assert np.array_equal(getattr(gathered, name), getattr(whole, name)), name
