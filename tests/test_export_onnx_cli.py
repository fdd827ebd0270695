"""``reid-export --format onnx``: the graph of an exported backbone and of a fine-tuned run, run by
onnxruntime, gives the evaluation's features of the same images; a two-stream ResNet gives one
graph per modality, each equal to the routed network on images of that modality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from models.registry import create_backbone  # noqa: E402
from shards.build import build  # noqa: E402
from shards.synthetic import generate  # noqa: E402
from train.export import main  # noqa: E402
from train.finetune import load_for_evaluation, resolve_config, run_finetune  # noqa: E402

SIZE = (64, 32)


def onnx_features(path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["features"], {"images": images})[0]


def evaluation_features(checkpoint, images: np.ndarray, modality: int = 0) -> np.ndarray:
    loaded = load_for_evaluation(checkpoint, device="cpu", size=SIZE)
    with torch.no_grad():
        views = loaded.transform(torch.from_numpy(images))
        return loaded.embed(views, torch.full((len(images),), modality)).numpy()


def test_backbone_export_matches_the_evaluation(tmp_path):
    torch.manual_seed(0)
    torch.save(create_backbone("resnet_tiny", SIZE).state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "reid.onnx"
    assert main([str(tmp_path / "backbone.pth"), "--format", "onnx", "--out", str(out), "--size", *map(str, SIZE)]) == 0
    images = np.random.default_rng(0).integers(0, 256, (3, 3, *SIZE), dtype=np.uint8)  # batch 3: dynamic
    np.testing.assert_allclose(onnx_features(out, images), evaluation_features(tmp_path / "backbone.pth", images),
                               rtol=1e-4, atol=1e-4)
    assert main([str(tmp_path / "backbone.pth"), "--format", "onnx", "--out", str(out), "--size", *map(str, SIZE),
                 "--l2_normalize"]) == 0
    np.testing.assert_allclose(np.linalg.norm(onnx_features(out, images), axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("modality, code", [("rgb", 0), ("ir", 1)])
def test_two_stream_exports_one_graph_per_modality(tmp_path, modality, code):
    torch.manual_seed(0)
    torch.save(create_backbone("resnet_tiny_two_stream", SIZE).state_dict(), tmp_path / "two.pth")
    out = tmp_path / f"{modality}.onnx"
    assert main([str(tmp_path / "two.pth"), "--format", "onnx", "--out", str(out), "--size", *map(str, SIZE),
                 "--modality", modality]) == 0
    images = np.random.default_rng(2).integers(0, 256, (3, 3, *SIZE), dtype=np.uint8)
    # the evaluation routes each image through its modality's stem (argsort routing)
    np.testing.assert_allclose(onnx_features(out, images), evaluation_features(tmp_path / "two.pth", images, code),
                               rtol=1e-4, atol=1e-4)


def test_finetuned_run_export_matches_the_evaluation(tmp_path):
    generate("market1501", tmp_path / "data", ids=10, images_per_id=6, workers=1)
    build("market1501", tmp_path / "data", tmp_path / "shards", shard_size=64, workers=1)
    config = resolve_config("transreid-tiny", ["--progress_bar", "false", "--tensorboard", "false", "--epochs", "1",
                                               "--steps_per_epoch", "1", "--warmup_epochs", "0", "--output_dir",
                                               str(tmp_path / "run")], shards=str(tmp_path / "shards"))
    run_finetune(config)
    out = tmp_path / "vit.onnx"
    assert main([str(tmp_path / "run"), "--format", "onnx", "--out", str(out)]) == 0
    loaded = load_for_evaluation(tmp_path / "run", device="cpu")
    images = np.random.default_rng(1).integers(0, 256, (2, 3, *loaded.size), dtype=np.uint8)
    with torch.no_grad():
        expected = loaded.embed(loaded.transform(torch.from_numpy(images)), torch.zeros(2, dtype=torch.long)).numpy()
    np.testing.assert_allclose(onnx_features(out, images), expected, rtol=1e-4, atol=1e-4)
