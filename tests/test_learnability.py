"""benchmarks.learnability: the validation view of a SYSU-MM01 tree and same-modality retrieval."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.learnability import same_modality_metrics, validation_view
from shards.layouts.sysu import scan_sysu
from shards.synthetic import generate
from train.evaluation.features import SplitFeatures


def test_validation_view_makes_val_ids_the_test_ids_and_drops_the_test_ids(tmp_path):
    root = tmp_path / "data"
    generate("sysu-mm01", root, ids=12, images_per_id=4, seed=0, workers=1)
    ids = {split: {int(t) for t in (root / "exp" / f"{split}_id.txt").read_text().strip().split(",")}
           for split in ("train", "val", "test")}
    scan = scan_sysu(validation_view(root, tmp_path / "view"))
    by_split = {}
    for record in scan.records:
        by_split.setdefault(record.split, set()).add(record.pid)
    assert by_split["train"] == ids["train"]
    assert by_split["query"] == by_split["gallery"] == ids["val"]
    assert not (set().union(*by_split.values()) & ids["test"])
    # Every image of a val id is there: the view links the original folders.
    val_images = [p for p in root.glob("cam*/*/*.jpg") if int(p.parent.name) in ids["val"]]
    assert sum(r.pid in ids["val"] for r in scan.records) == len(val_images)


def naive_rank1(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray) -> float:
    """Nearest other-camera-or-other-identity image by Euclidean distance of L2-normalized rows."""
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    hits = valid = 0
    for i in range(len(feats)):
        keep = [j for j in range(len(feats)) if not (pids[j] == pids[i] and cams[j] == cams[i])]
        if not any(pids[j] == pids[i] for j in keep):
            continue
        valid += 1
        best = min(keep, key=lambda j: ((unit[i] - unit[j]) ** 2).sum())
        hits += pids[best] == pids[i]
    return hits / valid


def test_same_modality_rank1_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(1, 7), 4)
    cams = np.tile([1, 1, 2, 4], 6)
    feats = rng.normal(size=(24, 5)) + pids[:, None] * 0.6 * rng.normal(size=(1, 5))
    split = SplitFeatures(torch.tensor(feats, dtype=torch.float32), pids, cams, np.zeros(24, np.int64),
                          np.arange(24))
    result = same_modality_metrics(split)
    assert abs(result["R1"] - naive_rank1(feats, pids, cams)) < 1e-9
    assert result["valid_queries"] == 24
