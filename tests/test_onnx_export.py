"""ONNX export of the test-time network, run by onnxruntime against PyTorch's output: ResNet
(GeM + BNNeck) and ViT (cat(CLS, mean PART) + BNNeck) test-size networks, uint8 input normalized
in the graph and normalized float input, batch sizes other than the exported one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from models.onnx_export import EmbeddingOf, export_onnx  # noqa: E402
from models.resnet import resnet_tiny_test  # noqa: E402
from models.vit import vit_tiny_test  # noqa: E402
from common.errors import UserError  # noqa: E402
from models.reid import ReIDModel  # noqa: E402

SIZE = (64, 32)
IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))


def reid_model(arch: str) -> ReIDModel:
    torch.manual_seed(0)
    backbone = resnet_tiny_test() if arch == "resnet" else vit_tiny_test(img_size=SIZE)
    model = ReIDModel(backbone, num_classes=5)
    with torch.no_grad():  # a BNNeck with statistics of its own, so the BN feature is not the identity
        model.bottleneck.running_mean.uniform_(-0.5, 0.5)
        model.bottleneck.running_var.uniform_(0.5, 2.0)
        model.bottleneck.weight.uniform_(0.5, 1.5)
    return model.eval()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def pixels(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 3, *SIZE), dtype=np.uint8)


def normalized_by_hand(images: np.ndarray, mean, std) -> torch.Tensor:
    x = images.astype(np.float32) / 255.0
    return torch.from_numpy(((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32))


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_uint8_graph_matches_pytorch_at_any_batch(tmp_path, arch):
    model = reid_model(arch)
    normalization, (mean, std) = ("imagenet", IMAGENET) if arch == "resnet" else ("half", (np.full(3, .5),) * 2)
    path = export_onnx(EmbeddingOf(model, "bn"), tmp_path / f"{arch}.onnx", image_size=SIZE,
                       normalization=normalization)
    graph = onnx.load(str(path))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["input_kind"] == "uint8" and meta["image_size"] == "[64, 32]"
    run = session(path)
    (inp,), (out,) = run.get_inputs(), run.get_outputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and out.name == "features"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, *SIZE]  # batch is symbolic
    for batch in (1, 5):
        images = pixels(batch, seed=batch)
        got = run.run(None, {"images": images})[0]
        with torch.no_grad():
            modality = torch.zeros(batch, dtype=torch.long)
            expected = model.embed(normalized_by_hand(images, mean, std), modality, "bn").numpy()
        assert got.shape == (batch, model.feature_dim) == expected.shape
        # float32 convolutions accumulate in another order in onnxruntime; GeM's cube root
        # magnifies that on channels that are nearly all zero: tolerance relative to the scale
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert meta["feature_dim"] == str(model.feature_dim)


def test_float_input_and_l2_normalized_output(tmp_path):
    model = reid_model("resnet")
    path = export_onnx(EmbeddingOf(model, "pre_bn"), tmp_path / "f.onnx", image_size=SIZE, input_kind="float",
                       l2_normalize=True)
    run = session(path)
    assert run.get_inputs()[0].type == "tensor(float)"
    x = torch.randn(3, 3, *SIZE)
    got = run.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        feature = model.embed(x, torch.zeros(3, dtype=torch.long), "pre_bn")
    expected = (feature / feature.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert model.training is False  # the model's mode is left as it was


def test_bad_settings_are_user_errors(tmp_path):
    net = EmbeddingOf(reid_model("resnet"))
    with pytest.raises(UserError, match="input kind"):
        export_onnx(net, tmp_path / "x.onnx", image_size=SIZE, input_kind="int16")
    with pytest.raises(UserError, match="normalization"):
        export_onnx(net, tmp_path / "x.onnx", image_size=SIZE, normalization="zscore")
    with pytest.raises(UserError, match="modality"):
        EmbeddingOf(reid_model("resnet"), modality="depth")
