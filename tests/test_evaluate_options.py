"""Evaluation options: re-ranking inside each protocol's ranking (equal to re_rank applied by
hand to the same ranking, then compute_metrics), SYSU-MM01 multi-shot galleries against the AGW
procedure re-written on a folder tree, and ranked-result pictures from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import run_cli
from common.errors import UserError
from models.registry import create_backbone
from models.reid import ReIDModel
from shards.build import build
from shards.synthetic import generate
from train import finetune
from train.evaluate import main
from train.evaluation import protocols
from train.evaluation.features import SplitFeatures
from train.evaluation.metrics import compute_metrics, distance_matrix
from train.evaluation.protocols import (
    PROTOCOLS,
    Ranking,
    Rerank,
    market_results,
    regdb_results,
    sysu_gallery_trial,
    sysu_multi_shot_gallery_trial,
    sysu_results,
)
from train.evaluation.rerank import re_rank
from train.evaluation.visrank import Layout

SETTINGS = Rerank(k1=4, k2=2, lambda_value=0.3)


def clustered(rng, pids, dim=8, noise=0.9) -> torch.Tensor:
    """Features near one centre per identity: noisy enough that rankings make mistakes."""
    centres = {p: rng.normal(size=dim) for p in set(pids.tolist())}
    return torch.tensor(np.stack([centres[p] + noise * rng.normal(size=dim) for p in pids]), dtype=torch.float32)


def split(rng, pids, cams, modality=None) -> SplitFeatures:
    pids, cams = np.asarray(pids), np.asarray(cams)
    modality = np.zeros(len(pids), dtype=np.int64) if modality is None else np.asarray(modality)
    return SplitFeatures(clustered(rng, pids), pids, cams, modality, np.arange(len(pids)))


def by_hand(query: SplitFeatures, gallery: SplitFeatures, rule: str):
    """re_rank of this ranking's three distance matrices, then the metrics."""
    dist = re_rank(distance_matrix(query.features, gallery.features), distance_matrix(query.features, query.features),
                   distance_matrix(gallery.features, gallery.features), k1=SETTINGS.k1, k2=SETTINGS.k2,
                   lambda_value=SETTINGS.lambda_value)
    return compute_metrics(dist, query.pid, gallery.pid, query.camera, gallery.camera, rule)


def test_market_rerank_changes_the_metrics_and_equals_rerank_by_hand():
    rng = np.random.default_rng(3)
    query = split(rng, np.repeat(np.arange(6), 2), np.tile([1, 2], 6))
    gallery = split(rng, np.repeat(np.arange(6), 5), np.tile([1, 2, 3, 4, 5], 6))
    features = {"query": query, "gallery": gallery}
    plain = market_results(features, [0])[0]
    reranked = market_results(features, [0], ranking=Ranking(rerank=SETTINGS))[0]
    expected = by_hand(query, gallery, "market")
    assert reranked.mAP == pytest.approx(expected.mAP) and reranked.mINP == pytest.approx(expected.mINP)
    np.testing.assert_allclose(reranked.cmc, expected.cmc)
    assert reranked.mAP != pytest.approx(plain.mAP)  # the toy case is one where re-ranking matters


def test_sysu_rerank_runs_on_each_trial_gallery():
    rng = np.random.default_rng(5)
    pids = np.repeat(np.arange(1, 9), 8)
    cams = np.tile([1, 2, 4, 5], 16)
    query = split(rng, np.repeat(np.arange(1, 9), 3), np.tile([3, 6, 3], 8), np.ones(24, dtype=np.int64))
    gallery = split(rng, pids, cams)
    reranked = sysu_results({"query": query, "gallery": gallery}, [0, 1, 2], ranking=Ranking(rerank=SETTINGS))[0]
    runs = [by_hand(query, gallery.subset(sysu_gallery_trial(pids, cams, gallery.index, t)), "sysu") for t in (0, 1, 2)]
    assert reranked.mAP == pytest.approx(np.mean([r.mAP for r in runs]))
    np.testing.assert_allclose(reranked.cmc, np.mean([r.cmc for r in runs], axis=0))
    assert [p["mAP"] for p in reranked.per_trial] == pytest.approx([r.mAP for r in runs])


class _Trial:
    def __init__(self, trial, test_ids):
        self.trial, self.test_ids = trial, test_ids


def test_regdb_rerank_in_both_directions():
    rng = np.random.default_rng(7)
    pids = np.repeat(np.arange(1, 9), 6)
    modality = np.tile([0, 0, 0, 1, 1, 1], 8)
    everything = split(rng, pids, np.where(modality == 0, 1, 2), modality)
    trial = _Trial(1, [2, 3, 4, 5, 6, 7])
    results = regdb_results(everything, [trial], ranking=Ranking(rerank=SETTINGS))
    test = np.isin(pids, trial.test_ids)
    for result, (q_mod, g_mod) in zip(results, [(0, 1), (1, 0)]):
        query = everything.subset(np.flatnonzero(test & (modality == q_mod)))
        gallery = everything.subset(np.flatnonzero(test & (modality == g_mod)))
        assert result.mAP == pytest.approx(by_hand(query, gallery, "regdb").mAP)


def test_bad_rerank_settings_are_refused():
    with pytest.raises(UserError, match="rerank_k1"):
        Rerank(k1=0)
    with pytest.raises(UserError, match="rerank_lambda"):
        Rerank(lambda_value=1.5)


# --------------------------------------------------------------------------------------------
# SYSU-MM01 multi-shot galleries
# --------------------------------------------------------------------------------------------


def multi_shot_tree(root: Path, seed: int = 0) -> list[tuple[str, int, int]]:
    """Empty files in the SYSU-MM01 layout, 3..16 images per folder -> (source, pid, camera) of RGB images."""
    rng = np.random.default_rng(seed)
    test_ids = [3, 12, 7, 100, 41]
    (root / "exp").mkdir(parents=True)
    (root / "exp" / "test_id.txt").write_text(",".join(map(str, test_ids)) + "\n")
    rgb = []
    for pid in test_ids:
        for cam in (1, 2, 3, 4, 5, 6):
            if rng.random() < 0.25:
                continue
            folder = root / f"cam{cam}" / f"{pid:04d}"
            folder.mkdir(parents=True)
            for n in rng.choice(np.arange(1, 60), size=rng.integers(3, 17), replace=False):
                (folder / f"{n:04d}.jpg").touch()
                if cam in (1, 2, 4, 5):
                    rgb.append((f"cam{cam}/{pid:04d}/{n:04d}.jpg", pid, cam))
    return rgb


def naive_agw_multi_shot(root: Path, trial: int, mode: str) -> list[str]:
    """AGW's process_gallery_sysu, gall_mode 'multi', after np.random.seed(trial) (re-written from
    its description; a folder with fewer than 10 images gives all of them)."""
    np.random.seed(trial)
    cameras = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    ids = (root / "exp" / "test_id.txt").read_text().splitlines()[0].split(",")
    files = []
    for pid in sorted("%04d" % int(x) for x in ids):
        for cam in cameras:
            folder = os.path.join(root, cam, pid)
            if os.path.isdir(folder):
                names = sorted(folder + "/" + name for name in os.listdir(folder))
                files.extend(names if len(names) < 10 else np.random.choice(names, 10, replace=False))
    return [os.path.relpath(f, root) for f in files]


@pytest.mark.parametrize("mode, agw_mode", [("sysu", "all"), ("sysu-indoor", "indoor")])
def test_multi_shot_gallery_matches_the_agw_procedure(tmp_path, mode, agw_mode):
    rgb = multi_shot_tree(tmp_path)
    shuffled = [rgb[i] for i in np.random.default_rng(1).permutation(len(rgb))]
    sources = [s for s, _, _ in shuffled]
    order = np.argsort(np.argsort(sources))
    pids, cams = [p for _, p, _ in shuffled], [c for _, _, c in shuffled]
    state = np.random.get_state()
    draws = [sysu_multi_shot_gallery_trial(pids, cams, order, t, mode) for t in range(4)]
    assert all(a == b for a, b in zip(state[1], np.random.get_state()[1]))  # the global state is untouched
    for trial, picked in enumerate(draws):
        assert [sources[i] for i in picked] == naive_agw_multi_shot(tmp_path, trial, agw_mode)
    assert len({tuple(d) for d in draws}) == 4
    assert "sysu-multi" in PROTOCOLS and "sysu-indoor-multi" in PROTOCOLS


# --------------------------------------------------------------------------------------------
# The command line: --rerank, --visrank, a multi-shot protocol
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sysu_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("sysu")
    generate("sysu-mm01", base / "data", ids=6, images_per_id=12, workers=1)
    build("sysu-mm01", base / "data", base / "shards", shard_size=64, workers=1)
    torch.manual_seed(0)
    torch.save(create_backbone("resnet_tiny", (64, 32)).state_dict(), base / "backbone.pth")
    return base


def _evaluate(base: Path, out: Path, *extra: str) -> dict:
    argv = ["--checkpoint", str(base / "backbone.pth"), "--shards", str(base / "shards"), "--size", "64", "32",
            "--device", "cpu", "--source", "wds", "--eval_trials", "2", "--no_progress", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_cli_rerank_and_ranked_pictures(sysu_run, tmp_path, monkeypatch):
    calls = []

    def counted(q_g, q_q, g_g, **settings):
        calls.append((tuple(q_g.shape), settings))
        return re_rank(q_g, q_q, g_g, **settings)

    plain = _evaluate(sysu_run, tmp_path / "plain.json", "--protocol", "sysu")
    assert calls == []
    monkeypatch.setattr(protocols, "re_rank", counted)
    report = _evaluate(sysu_run, tmp_path / "rr.json", "--protocol", "sysu", "--rerank", "--rerank_k1", "5",
                       "--rerank_k2", "2", "--visrank", "2", "--visrank_topk", "3")
    assert plain["rerank"] is None and report["rerank"] == {"k1": 5, "k2": 2, "lambda": 0.3}
    queries = report["results"][0]["queries"]
    galleries = [t["gallery"] for t in report["results"][0]["per_trial"]]
    settings = {"k1": 5, "k2": 2, "lambda_value": 0.3}
    assert calls == [((queries, g), settings) for g in galleries]  # once per trial gallery
    folder = tmp_path / "visrank" / "sysu_all-search"
    files = sorted(p.name for p in folder.iterdir())
    assert files[-1] == "sheet.png" and len(files) == 3 and all(f.startswith("query_") for f in files[:2])
    layout = Layout()  # the default: 128x64 images, frame 4, label strip 26
    sheet = np.asarray(Image.open(folder / "sheet.png").convert("RGB"))
    assert sheet.shape[:2] == layout.sheet_size(2, 3)
    for row in range(2):
        top = layout.row_top(row) + layout.border + 10
        assert tuple(sheet[top, layout.cell_left(0) + 1]) == (128, 128, 128)  # the query's grey frame
        for rank in (1, 2, 3):
            assert tuple(sheet[top, layout.cell_left(rank) + 1]) in {(0, 200, 0), (220, 0, 0)}
    single = np.asarray(Image.open(folder / files[0]).convert("RGB"))
    assert single.shape[:2] == layout.sheet_size(1, 3)


def test_cli_multi_shot_protocol(sysu_run, tmp_path):
    report = _evaluate(sysu_run, tmp_path / "multi.json", "--protocol", "sysu-multi")
    (result,) = report["results"]
    single = _evaluate(sysu_run, tmp_path / "single.json", "--protocol", "sysu")["results"][0]
    assert result["setting"] == "sysu all-search multi-shot" and result["protocol"] == "sysu-multi"
    assert result["gallery"] > single["gallery"]  # up to 10 images per identity and camera


def test_cli_bad_visrank_is_one_line_error(sysu_run, tmp_path, capsys):
    argv = ["--checkpoint", str(sysu_run / "backbone.pth"), "--shards", str(sysu_run / "shards"), "--protocol", "sysu",
            "--visrank", "2", "--visrank_dir", str(sysu_run / "backbone.pth")]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert "--visrank_dir" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# Fine-tuning's periodic evaluation
# --------------------------------------------------------------------------------------------


def test_finetune_evaluation_reranks_with_its_settings(monkeypatch):
    config = finetune.resolve_config("agw-tiny", ["--eval_rerank", "true", "--rerank_k1", "5", "--rerank_lambda", "0.5"],
                                     shards="unused")
    assert config.rerank == Rerank(5, 6, 0.5)
    assert finetune.resolve_config("agw-tiny", [], shards="unused").rerank is None  # off by default
    seen = {}
    monkeypatch.setattr(finetune, "evaluate", lambda *args, **kwargs: seen.update(kwargs) or [])
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, device=torch.device("cpu"), process_index=0,
                                  num_processes=1)
    model = ReIDModel(create_backbone("resnet_tiny", (64, 32)), 3)
    finetune.evaluate_model(accelerator, model, config, "sysu")
    assert seen["ranking"] == Ranking(rerank=Rerank(5, 6, 0.5))
    with pytest.raises(UserError, match="rerank_k1"):
        finetune.resolve_config("agw-tiny", ["--rerank_k1", "0"], shards="unused").validate()
