"""AGW's backbone extras: the non-local blocks (identity at init, the block's arithmetic, where
they run, their keys against AGW's ``embed_net`` layout written out here) and the ImageNet
initialization (against torchvision's key layout, written out in tests/torchvision_layout.py)."""

import pytest
import torch

from torchvision_layout import torchvision_resnet50_shapes
from models.imagenet import imagenet_backbone_state, load_imagenet
from models.nonlocal_block import NonLocal
from models.resnet import resnet50_two_stream, resnet_tiny_test, to_agw_state, to_torchvision_state
from common.errors import UserError

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def agw_non_local_shapes() -> dict[str, tuple[int, ...]]:
    """The non-local keys of AGW's ``embed_net(no_local='on')`` (mangye16/Cross-Modal-Re-ID-baseline
    model.py): ``non_layers = [0, 2, 3, 0]`` -> ``NL_2`` (2 blocks on 512 channels) and ``NL_3``
    (3 blocks on 1024), each ``Non_local(C)`` with inter channels ``2 // 2 = 1``: ``g`` a
    Sequential holding a 1x1 conv C -> 1, ``theta`` and ``phi`` 1x1 convs C -> 1, ``W`` a
    Sequential of a 1x1 conv 1 -> C and a BatchNorm2d(C); all convs with bias."""
    shapes = {}
    for name, count, c in (("NL_2", 2, 512), ("NL_3", 3, 1024)):
        for i in range(count):
            p = f"{name}.{i}"
            for conv in ("g.0", "theta", "phi"):
                shapes[f"{p}.{conv}.weight"] = (1, c, 1, 1)
                shapes[f"{p}.{conv}.bias"] = (1,)
            shapes[f"{p}.W.0.weight"] = (c, 1, 1, 1)
            shapes[f"{p}.W.0.bias"] = (c,)
            shapes.update({f"{p}.W.1.{k}": (() if k == "num_batches_tracked" else (c,)) for k in BN_KEYS})
    return shapes


def agw_backbone_shapes() -> dict[str, tuple[int, ...]]:
    """embed_net's backbone keys: the two stems, the shared layers, then the non-local blocks."""
    tv = torchvision_resnet50_shapes(fc=False)
    stem = {k: v for k, v in tv.items() if k.startswith(("conv1.", "bn1."))}
    out = {f"visible_module.visible.{k}": v for k, v in stem.items()}
    out.update({f"thermal_module.thermal.{k}": v for k, v in stem.items()})
    out.update({f"base_resnet.base.{k}": v for k, v in tv.items() if k.startswith("layer")})
    out.update(agw_non_local_shapes())
    return out


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


# -------------------------------------------------------------------------------- non-local


def test_two_stream_resnet50_with_non_local_exports_to_agws_layout():
    with torch.device("meta"):
        state = resnet50_two_stream(non_local=True).state_dict()
    assert shapes_of(to_agw_state(state)) == agw_backbone_shapes()
    assert {k: v for k, v in shapes_of(state).items() if k.startswith("NL_")} == agw_non_local_shapes()
    with pytest.raises(UserError, match="non-local"):
        to_torchvision_state(state, stem="rgb")


def conv1x1(conv: torch.nn.Conv2d, columns: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv on ``(C_in, N)`` columns: ``W (C_out, C_in) @ columns + b``."""
    return conv.weight.reshape(conv.weight.shape[0], -1) @ columns + conv.bias[:, None]


def naive_non_local(block: NonLocal, x: torch.Tensor) -> torch.Tensor:
    """AGW's Non_local.forward written out position by position: f[i, j] = theta_i . phi_j / N,
    y_i = sum_j f[i, j] g_j, z = W(y) + x (W: 1x1 conv then BN in eval mode)."""
    b, c, h, w = x.shape
    n = h * w
    out = torch.empty_like(x)
    for s in range(b):
        cols = x[s].reshape(c, n)
        theta, phi, g = conv1x1(block.theta, cols), conv1x1(block.phi, cols), conv1x1(block.g[0], cols)
        y = torch.zeros(theta.shape[0], n, dtype=x.dtype)
        for i in range(n):
            for j in range(n):
                y[:, i] += (theta[:, i] @ phi[:, j]) / n * g[:, j]
        wy = conv1x1(block.W[0], y)
        bn = block.W[1]
        wy = (wy - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps) * bn.weight[:, None] \
            + bn.bias[:, None]
        out[s] = (wy + cols).reshape(c, h, w)
    return out


def test_non_local_block_matches_agws_formula_written_out():
    torch.manual_seed(0)
    block = NonLocal(6, inter_channels=2).double().eval()
    with torch.no_grad():  # leave the identity init, so the test sees the attention path
        block.W[1].weight.uniform_(0.5, 1.5)
        block.W[1].bias.uniform_(-1, 1)
        block.W[1].running_mean.uniform_(-1, 1)
        block.W[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    assert torch.allclose(block(x), naive_non_local(block, x), atol=1e-10)


@pytest.mark.parametrize("train", [True, False])
def test_non_local_blocks_are_the_identity_at_init(train):
    torch.manual_seed(0)
    with_nl = resnet_tiny_test(two_stream=True, non_local=True)
    plain = resnet_tiny_test(two_stream=True)
    plain.load_state_dict({k: v for k, v in with_nl.state_dict().items() if not k.startswith("NL_")})
    for model in (with_nl, plain):
        model.train(train)
    images, modality = torch.randn(4, 3, 96, 48), torch.tensor([0, 1, 0, 1])
    assert torch.allclose(with_nl(images, modality), plain(images, modality), atol=1e-6)
    zero_bn = [v for k, v in with_nl.state_dict().items()
               if k.startswith("NL_") and k.endswith((".W.1.weight", ".W.1.bias"))]
    assert len(zero_bn) == 4 and all(torch.count_nonzero(v) == 0 for v in zero_bn)  # 2 blocks x (weight, bias)


def module_call_order(model, images, modality):
    """Names of the layer2/layer3 blocks and non-local blocks in the order they run."""
    calls = []
    for name, module in model.named_modules():
        if name.count(".") == 1 and name.startswith(("layer2.", "layer3.", "NL_")):
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    with torch.no_grad():
        model.eval()(images, modality)
    return calls


def test_non_local_blocks_run_where_agw_puts_them():
    # AGW's loop (embed_net.forward): a non-local block right after layer2 blocks
    # sorted([4 - 1, 4 - 2]) = [2, 3] and after layer3 blocks sorted([6 - 1, 6 - 2, 6 - 3]) = [3, 4, 5].
    expected = ["layer2.0", "layer2.1", "layer2.2", "NL_2.0", "layer2.3", "NL_2.1",
                "layer3.0", "layer3.1", "layer3.2", "layer3.3", "NL_3.0", "layer3.4", "NL_3.1", "layer3.5", "NL_3.2"]
    model = resnet50_two_stream(non_local=True)
    assert module_call_order(model, torch.randn(1, 3, 64, 32), torch.tensor([1])) == expected
    # the test-size model (one block per layer) keeps one block after layer2 and one after layer3
    tiny = resnet_tiny_test(two_stream=True, non_local=True)
    assert module_call_order(tiny, torch.randn(1, 3, 64, 32), torch.tensor([0])) == [
        "layer2.0", "NL_2.0", "layer3.0", "NL_3.0"]


# -------------------------------------------------------------------------------- ImageNet


def imagenet_file(tmp_path, fc=True, batches_tracked=True, wrap=None, prefix=""):
    """A torchvision-layout ResNet-50 state dict of distinct random values, saved as a file."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in torchvision_resnet50_shapes(fc=fc).items():
        if key.endswith("num_batches_tracked"):
            if batches_tracked:
                state[prefix + key] = torch.tensor(7)
        else:
            state[prefix + key] = torch.randn(shape, generator=g)
    path = tmp_path / "imagenet.pth"
    torch.save({wrap: state} if wrap else state, path)
    return path, {k.removeprefix(prefix): v for k, v in state.items()}


def test_imagenet_stem_goes_into_both_stems_and_fc_is_dropped(tmp_path):
    path, file_state = imagenet_file(tmp_path)
    model = resnet50_two_stream(non_local=True)
    nl_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("NL_")}
    load_imagenet(model, path)
    state = model.state_dict()
    for key, value in file_state.items():
        if key.startswith(("conv1.", "bn1.")):
            assert torch.equal(state[f"stems.rgb.{key}"], value) and torch.equal(state[f"stems.ir.{key}"], value)
        elif key.startswith("layer"):
            assert torch.equal(state[key], value)
        else:
            assert key.startswith("fc.") and not any(k.endswith(key) for k in state)
    assert state["stems.rgb.conv1.weight"].data_ptr() != state["stems.ir.conv1.weight"].data_ptr()
    assert all(torch.equal(state[k], v) for k, v in nl_before.items())  # the non-local blocks keep their init


def test_imagenet_conversion_keys_are_the_two_stream_backbones(tmp_path):
    _, file_state = imagenet_file(tmp_path)
    converted = imagenet_backbone_state(file_state)
    with torch.device("meta"):
        target = resnet50_two_stream().state_dict()
    assert shapes_of(converted) == shapes_of(target)
    one_stream = imagenet_backbone_state(file_state, two_stream=False)
    assert shapes_of(one_stream) == torchvision_resnet50_shapes(fc=False)


def test_timm_style_file_without_batch_counters_in_a_wrapper_loads(tmp_path):
    path, file_state = imagenet_file(tmp_path, batches_tracked=False, wrap="state_dict", prefix="module.")
    model = resnet50_two_stream()
    load_imagenet(model, path)
    assert torch.equal(model.state_dict()["stems.ir.bn1.running_var"], file_state["bn1.running_var"])


def test_wrong_files_are_one_line_errors(tmp_path):
    path, _ = imagenet_file(tmp_path)
    with pytest.raises(UserError, match="does not fit this backbone"):
        load_imagenet(resnet_tiny_test(two_stream=True), path)
    foreign = tmp_path / "vit.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 4), "fc.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(UserError, match="unexpected keys: cls_token"):
        load_imagenet(resnet50_two_stream(), foreign)
    with pytest.raises(UserError, match="does not exist"):
        load_imagenet(resnet50_two_stream(), tmp_path / "missing.pth")
