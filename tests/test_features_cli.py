"""``reid-features`` through main(argv): the rows written are the features of the images the index
names, computed here by hand (PIL resize, ImageNet normalization, the backbone's GeM feature)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from common.cli import run_cli
from models.registry import create_backbone
from models.reid import ReIDModel
from shards.build import build
from shards.synthetic import generate
from train.features import main

SIZE = (64, 32)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "backbone.pth"
    torch.save(create_backbone("resnet_tiny", SIZE).state_dict(), path)
    return path


def by_hand(backbone_file, paths, modality=0) -> np.ndarray:
    backbone = create_backbone("resnet_tiny", SIZE)
    backbone.load_state_dict(torch.load(backbone_file))
    model = ReIDModel(backbone, 1).eval()
    pixels = [np.asarray(Image.open(p).convert("RGB").resize(SIZE[::-1], Image.BILINEAR)) / 255.0 for p in paths]
    x = torch.tensor(np.stack([(p - MEAN) / STD for p in pixels]), dtype=torch.float32).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model.embed(x, torch.full((len(paths),), modality), "pre_bn").numpy()


def read_index(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_folder_of_images(tmp_path, backbone_file, capsys):
    rng = np.random.default_rng(0)
    for name in ("b/two.jpg", "a/one.png", "c.png"):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / name)
    argv = ["--checkpoint", str(backbone_file), "--images", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--size", *map(str, SIZE), "--device", "cpu", "--batch_size", "2"]
    assert main(argv) == 0
    rows = read_index(tmp_path / "out" / "index.csv")
    assert [r["source"] for r in rows] == ["a/one.png", "b/two.jpg", "c.png"]
    features = np.load(tmp_path / "out" / "features.npy")
    np.testing.assert_allclose(features, by_hand(backbone_file, [tmp_path / "data" / r["source"] for r in rows]),
                               atol=2e-4, rtol=1e-3)
    assert "wrote 3 x" in capsys.readouterr().out
    # again without --overwrite: refused in one line, before any work
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert "exists" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--overwrite", "--l2_normalize"]) == 0
    np.testing.assert_allclose(np.linalg.norm(np.load(tmp_path / "out" / "features.npy"), axis=1), 1.0, atol=1e-5)


def test_shard_split_as_safetensors(tmp_path, backbone_file):
    generate("market1501", tmp_path / "data", ids=4, images_per_id=4, workers=1)
    build("market1501", tmp_path / "data", tmp_path / "shards", shard_size=16, workers=1)
    argv = ["--checkpoint", str(backbone_file), "--shards", str(tmp_path / "shards"), "--split", "query",
            "--out", str(tmp_path / "out"), "--format", "safetensors", "--size", *map(str, SIZE), "--device", "cpu",
            "--source", "wds"]
    assert main(argv) == 0
    rows = read_index(tmp_path / "out" / "index.csv")
    features = load_file(str(tmp_path / "out" / "features.safetensors"))["features"]
    assert len(rows) == len(features) > 0
    assert [r["source"] for r in rows] == sorted(r["source"] for r in rows)  # sample-index = path order
    expected = by_hand(backbone_file, [tmp_path / "data" / r["source"] for r in rows])
    # the shard builder stores Market's 128x64 JPEGs as they are; the source decodes them as PIL does
    np.testing.assert_allclose(features, expected, atol=2e-3, rtol=1e-2)
    assert {r["pid"] for r in rows} == {r["source"].split("/")[-1][:4].lstrip("0") or "0" for r in rows}


@pytest.mark.parametrize("extra, message", [
    (["--shards", "nowhere"], "--split"),
    (["--images", "nowhere"], "not a folder"),
])
def test_bad_input_is_one_line_error(tmp_path, backbone_file, capsys, extra, message):
    argv = ["--checkpoint", str(backbone_file), "--out", str(tmp_path / "out"), *extra]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
