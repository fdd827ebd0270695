"""Features out: the rows written for a folder and for a shard split are the features of the
images the index names, computed here independently (a model whose feature is the mean colour
of each channel, on images decoded by PIL in the test)."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from torch import nn

import tiny_datasets
from common.errors import UserError
from train.evaluation.write_features import IndexRow, write, write_folder_features, write_split_features

SIZE = (32, 16)


class MeanColour(nn.Module):
    """uint8 (B, 3, H, W) -> (B, 3): the mean of each channel in [0, 1]."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and tuple(images.shape[2:]) == SIZE
        return images.float().mean(dim=(2, 3)) / 255


def read_index(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def solid(path, colour, size=(20, 50)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_rows_are_the_named_images_in_path_order(tmp_path):
    colours = {"b/two.png": (10, 20, 30), "a/one.png": (200, 100, 0), "a/z/three.bmp": (0, 0, 255)}
    for source, colour in colours.items():
        solid(tmp_path / "data" / source, colour)
    tiny_datasets.truncated_jpeg(tmp_path / "data" / "a" / "broken.jpg", 1)
    written = write_folder_features(MeanColour(), tmp_path / "data", tmp_path / "out", size=SIZE, batch_size=2)
    assert written.features == tmp_path / "out" / "features.npy" and written.count == 3 and written.dim == 3
    assert [s for s, _ in written.skipped] == ["a/broken.jpg"]
    rows = read_index(written.index)
    assert list(rows[0]) == ["row", "source", "pid", "camera", "modality"]
    assert [r["source"] for r in rows] == ["a/one.png", "a/z/three.bmp", "b/two.png"]
    assert all((r["pid"], r["camera"], r["modality"]) == ("-1", "-1", "rgb") for r in rows)
    features = np.load(written.features)
    assert features.dtype == np.float32 and features.shape == (3, 3)
    for row, feature in zip(rows, features):
        np.testing.assert_allclose(feature, np.array(colours[row["source"]]) / 255, atol=1e-6)


def test_folder_layout_labels_and_safetensors(tmp_path):
    data = tiny_datasets.sysu(tmp_path / "sysu")
    written = write_folder_features(MeanColour(), data.root, tmp_path / "out", size=SIZE, layout="sysu-mm01",
                                    fmt="safetensors")
    rows = read_index(written.index)
    assert {r["source"]: (int(r["pid"]), int(r["camera"]), r["modality"]) for r in rows} == {
        source: (pid, cam, modality) for source, (pid, cam, modality, _) in data.expected.items()}
    features = load_file(str(written.features))["features"]
    assert features.shape == (len(rows), 3)
    for row, feature in zip(rows[:5], features[:5]):
        with Image.open(data.root / row["source"]) as image:
            pixels = np.asarray(image.convert("RGB").resize((SIZE[1], SIZE[0]), Image.BILINEAR))
        np.testing.assert_allclose(feature, pixels.reshape(-1, 3).mean(0) / 255, atol=1e-5)


@pytest.fixture(scope="module")
def market_shards(tmp_path_factory):
    from shards.build import build
    from shards.synthetic import generate

    base = tmp_path_factory.mktemp("market")
    generate("market1501", base / "data", ids=4, images_per_id=4, workers=1)
    build("market1501", base / "data", base / "shards", shard_size=8, workers=1)
    return base


def test_split_rows_carry_source_paths_and_labels(market_shards, tmp_path):
    written = write_split_features(MeanColour(), market_shards / "shards", "query", tmp_path / "out", size=SIZE,
                                   source="wds", batch_size=3)
    rows = read_index(written.index)
    sources = sorted((market_shards / "data" / "query").glob("*.jpg"))
    assert [r["source"] for r in rows] == [f"query/{p.name}" for p in sources]  # sample index = path order
    features = np.load(written.features)
    for row, feature, path in zip(rows, features, sources):
        pid, cam = re.match(r"([-\d]+)_c(\d)", path.name).groups()
        assert (int(row["pid"]), int(row["camera"]), row["modality"]) == (int(pid), int(cam), "rgb")
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            pixels = np.asarray(image.convert("RGB").resize((SIZE[1], SIZE[0]), Image.BILINEAR))
        np.testing.assert_allclose(feature, pixels.reshape(-1, 3).mean(0) / 255, atol=1e-5)


def test_output_checked_before_the_work(tmp_path):
    rows = [IndexRow("x.jpg", 1, 2, "ir")]
    write(np.ones((1, 4)), rows, tmp_path / "out")
    with pytest.raises(UserError, match="exists"):
        write_folder_features(MeanColour(), tmp_path / "missing-folder", tmp_path / "out", size=SIZE)
    assert write(torch.zeros(1, 4), rows, tmp_path / "out", overwrite=True).count == 1
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        write(np.ones((1, 4)), rows, tmp_path / "file")
    with pytest.raises(UserError, match="format"):
        write(np.ones((1, 4)), rows, tmp_path / "o2", fmt="h5")
    with pytest.raises(UserError, match="one row per index entry"):
        write(np.ones((2, 4)), rows, tmp_path / "o3")
    with pytest.raises(UserError, match="does not exist"):
        write_folder_features(MeanColour(), tmp_path / "missing-folder", tmp_path / "o4", size=SIZE)


def test_modality_reaches_a_two_input_model(tmp_path, market_shards):
    """``with_modality``: the model gets each image's modality code (a two-stream network's stem)."""
    def colour_and_modality(images, modality):
        return torch.cat([MeanColour()(images), modality[:, None].float()], dim=1)

    data = tiny_datasets.sysu(tmp_path / "sysu")
    written = write_folder_features(colour_and_modality, data.root, tmp_path / "out", size=SIZE, layout="sysu-mm01",
                                    with_modality=True, batch_size=5)
    codes = np.load(written.features)[:, 3]
    assert [{0.0: "rgb", 1.0: "ir"}[c] for c in codes] == [r["modality"] for r in read_index(written.index)]
    assert {"rgb", "ir"} == {r["modality"] for r in read_index(written.index)}
    written = write_split_features(colour_and_modality, market_shards / "shards", "gallery", tmp_path / "split",
                                   size=SIZE, source="wds", with_modality=True)
    assert (np.load(written.features)[:, 3] == 0).all()
