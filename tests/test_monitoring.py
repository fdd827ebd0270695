"""Pre-training monitored on the task (``--monitor_every``): the loop logs the frozen backbone's
retrieval, and the figure it logs at the end is the R1 of the exported backbone ranked by a
naive loop (cosine nearest neighbour, same-identity-same-camera entries removed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pass_tiny_data import tiny_args, tiny_shards
from common.cli import run_cli
from pipelines.views.finetune import FinetuneViews
from shards.build import build
from shards.synthetic import generate
from train.evaluation.features import extract_features
from train.evaluation.protocols import same_modality_metrics
from train.export import read_backbone
from train.pretrain import main


@pytest.fixture(scope="module")
def market_shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("monitor-market")
    generate("market1501", base / "data", ids=10, images_per_id=6, workers=1)
    build("market1501", base / "data", base / "shards", shard_size=64, workers=1)
    return base / "shards"


def naive_r1(query, gallery) -> float:
    """R1 by a loop: the query's nearest gallery image by cosine similarity, after dropping the
    gallery images of the query's identity seen by the query's camera."""
    q = torch.nn.functional.normalize(query.features.float(), dim=1)
    g = torch.nn.functional.normalize(gallery.features.float(), dim=1)
    hits = valid = 0
    for i in range(len(query)):
        keep = ~((gallery.pid == query.pid[i]) & (gallery.camera == query.camera[i]))
        if not np.any(keep & (gallery.pid == query.pid[i])):
            continue  # no match in another camera: not a valid query
        similarity = (g @ q[i]).numpy()
        similarity[~keep] = -np.inf
        valid += 1
        hits += int(gallery.pid[int(np.argmax(similarity))] == query.pid[i])
    return hits / valid


def test_monitor_logs_the_frozen_backbones_retrieval(tmp_path, tmp_path_factory, market_shards):
    run = tmp_path / "run"
    args = tiny_args(tiny_shards(tmp_path_factory), run, "--max_steps", "0", "--epochs", "2", "--log_every", "3",
                     "--monitor_every", "1", "--monitor_shards", str(market_shards))
    assert main(args) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    monitor = [line for line in lines if line.get("kind") == "monitor"]
    assert [m["step"] for m in monitor] == [0, 6, 12]  # the init, then each of the 2 epochs of 6 steps
    assert all(m["setting"].startswith("market") and "same_modality_R1" not in m for m in monitor)
    # the last record: the exported backbone (the checkpoint at step 12), ranked by a loop
    exported = read_backbone(run)
    backbone = exported.spec.build()
    backbone.load_state_dict(exported.state_dict)
    backbone.eval()
    views = FinetuneViews((64, 32), normalization="imagenet")
    features = {split: extract_features(lambda v, m: backbone.global_feature(v, m), market_shards, split,
                                        size=(64, 32), transform=views.eval_views, progress=False)
                for split in ("query", "gallery")}
    assert monitor[-1]["R1"] == pytest.approx(naive_r1(features["query"], features["gallery"]))


def test_monitor_shards_without_labels_are_refused_before_training(tmp_path, tmp_path_factory, capsys):
    shards = tiny_shards(tmp_path_factory)
    code = run_cli(main, tiny_args(shards, tmp_path / "run", "--monitor_every", "1"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "protocol" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_same_modality_metrics_match_a_loop():
    """RGB->RGB reference figure: every image queries the others; same id + same camera removed."""
    generator = torch.Generator().manual_seed(0)

    class Features:
        features = torch.randn(30, 8, generator=generator)
        pid = np.repeat(np.arange(6), 5)
        camera = np.tile(np.array([1, 1, 2, 4, 5]), 6)

        def __len__(self):
            return 30

    split = Features()
    assert same_modality_metrics(split)["R1"] == pytest.approx(naive_r1(split, split))
