"""Models and heads: parameter counts and key layouts against figures worked out here from the
published architectures, ViT token selection against a sequence assembled by hand, two-stream
routing, Sinkhorn, and the heads against direct computations. Tiny configurations except where
only parameters are counted (built on the meta device, no memory, no forward pass)."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchvision_layout import torchvision_resnet50_shapes
from models.heads import DINOHead, PartProjection, PermutationHead, TokenHeads, sinkhorn
from models.resnet import resnet50, resnet50_two_stream, resnet_narrow, resnet_tiny_test
from models.vit import Attention, DropPath, vit_base, vit_small, vit_tiny_test



def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------- ResNet


def learnable(shapes: dict[str, tuple[int, ...]]) -> int:
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith(buffers))


def test_resnet50_keys_shapes_and_parameter_count_match_torchvision_without_fc():
    reference = torchvision_resnet50_shapes()
    # torchvision's documented count, 25,557,032, includes fc (2048 * 1000 + 1000 = 2,049,000).
    assert learnable(reference) == 25_557_032
    expected = {k: s for k, s in reference.items() if not k.startswith("fc.")}
    assert learnable(expected) == 25_557_032 - 2_049_000 == 23_508_032
    with torch.device("meta"):
        model = resnet50()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert list(model.state_dict())[:2] == ["conv1.weight", "bn1.weight"]  # torchvision's order
    assert n_params(model) == 23_508_032


def test_two_stream_keys_are_two_named_stems_plus_torchvision_layers():
    reference = torchvision_resnet50_shapes()
    stem = {k: s for k, s in reference.items() if k.startswith(("conv1.", "bn1."))}
    layers = {k: s for k, s in reference.items() if k.startswith("layer")}
    expected = {f"stems.{m}.{k}": s for m in ("rgb", "ir") for k, s in stem.items()} | layers
    with torch.device("meta"):
        model = resnet50_two_stream()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert n_params(model) == 23_508_032 + 64 * 3 * 49 + 2 * 64 == 23_517_568


def test_resnet50_last_stride_one_gives_18x9_at_288x144():
    model = resnet50().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 288, 144)).shape == (1, 2048, 18, 9)


@pytest.mark.parametrize("last_stride, grid", [(1, (18, 9)), (2, (9, 5))])
def test_tiny_resnet_output_grid(last_stride, grid):
    model = resnet_tiny_test(last_stride=last_stride)
    assert model(torch.randn(2, 3, 288, 144)).shape == (2, model.num_features, *grid)
    two = resnet_tiny_test(two_stream=True, last_stride=last_stride)
    assert two(torch.randn(3, 3, 288, 144), torch.tensor([0, 1, 0])).shape == (3, two.num_features, *grid)


def test_resnet_init():
    torch.manual_seed(0)
    model = resnet50()
    # Kaiming normal, fan_out: std sqrt(2 / (64 * 7 * 7)) for the stem conv.
    assert model.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 49)), rel=0.05)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    assert all(torch.all(b.bn3.weight == 1) for layer in (model.layer1, model.layer4) for b in layer)
    zero = resnet_tiny_test()
    zero._init_weights(zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for b in zero.layer2)


def test_two_stream_routing_hooks_nan_and_subsets():
    torch.manual_seed(0)
    model = resnet_tiny_test(two_stream=True).eval()
    images = torch.randn(6, 3, 64, 32)
    modality = torch.tensor([1, 0, 0, 1, 1, 0])
    rgb, ir = torch.tensor([1, 2, 5]), torch.tensor([0, 3, 4])

    seen = {}
    def record(name):
        return lambda module, inputs, output: seen.setdefault(name, []).append(inputs[0].clone())

    hooks = [model.stems[name].register_forward_hook(record(name)) for name in ("rgb", "ir")]
    with torch.no_grad():
        out = model(images, modality)
    for h in hooks:
        h.remove()
    # Each stem ran once, on exactly its modality's rows.
    assert len(seen["rgb"]) == len(seen["ir"]) == 1
    assert torch.equal(seen["rgb"][0], images[rgb]) and torch.equal(seen["ir"][0], images[ir])

    # Output in input order, equal to each subset run alone and to the stems applied by hand.
    with torch.no_grad():
        assert torch.allclose(out[rgb], model(images[rgb], modality[rgb]), atol=1e-5)
        assert torch.allclose(out[ir], model(images[ir], modality[ir]), atol=1e-5)
        stems = [model.stems["ir" if m else "rgb"] for m in modality]
        by_hand = torch.cat([model.forward_layers(stem(x[None])) for stem, x in zip(stems, images)])
    assert torch.allclose(out, by_hand, atol=1e-5)

    # An IR image never passes the RGB stem: poisoning it leaves IR outputs finite.
    with torch.no_grad():
        model.stems["rgb"].conv1.weight.fill_(float("nan"))
        poisoned = model(images, modality)
    assert torch.isfinite(poisoned[ir]).all() and torch.isnan(poisoned[rgb]).all()


def test_two_stream_single_modality_batch_and_bad_modality():
    model = resnet_tiny_test(two_stream=True)
    out = model(torch.randn(2, 3, 64, 32), torch.tensor([1, 1]))
    out.sum().backward()
    assert model.stems["rgb"].conv1.weight.grad is None and model.stems["ir"].conv1.weight.grad is not None
    with pytest.raises(ValueError, match="modality values"):
        model(torch.randn(2, 3, 64, 32), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 3, 64, 32), torch.tensor([0]))


def test_resnet_channels_last():
    torch.manual_seed(0)
    for model, extra in ((resnet_tiny_test(), ()), (resnet_tiny_test(two_stream=True), (torch.tensor([0, 1, 1]),))):
        model.eval()
        images = torch.randn(3, 3, 64, 32)
        with torch.no_grad():
            reference = model(images, *extra)
            model.to(memory_format=torch.channels_last)
            out = model(images.contiguous(memory_format=torch.channels_last), *extra)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, reference, atol=1e-5)


# ------------------------------------------------------------------------------------------ ViT


def vit_param_count(dim: int, depth: int, parts: int, positions: int, patch: int = 16) -> int:
    """Parameters of the PASS ViT by hand: patch conv, tokens, position embeddings, blocks, norm."""
    attn = (3 * dim * dim + 3 * dim) + (dim * dim + dim)  # qkv, proj
    mlp = (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim)  # fc1, fc2
    block = 2 * dim + attn + 2 * dim + mlp  # with norm1, norm2
    return (3 * patch * patch * dim + dim) + (1 + parts) * dim + positions * dim + depth * block + 2 * dim


def test_vit_parameter_counts():
    # timm's vit_small_patch16_224 has 22,050,664 parameters: remove its head (384 * 1000 + 1000)
    # and its 197 position embeddings, add PASS's 3 part tokens and 1 + 3 + 128 positions.
    pass_vits = 22_050_664 - (384 * 1000 + 1000) - 197 * 384 + 3 * 384 + (1 + 3 + 128) * 384
    assert pass_vits == vit_param_count(384, 12, 3, 1 + 3 + 128) == 21_641_856
    with torch.device("meta"):
        assert n_params(vit_small(num_parts=3, img_size=(256, 128))) == 21_641_856
        # timm's vit_base_patch16_224: 86,567,656 with a 768 * 1000 + 1000 head.
        pass_vitb = 86_567_656 - 769_000 - 197 * 768 + 3 * 768 + 132 * 768
        assert n_params(vit_base()) == pass_vitb == vit_param_count(768, 12, 3, 132)


def reference_tokens(model, images: torch.Tensor, part_ids: list[int]) -> torch.Tensor:
    """The token sequence assembled by hand from the model's parameters, then its blocks and norm."""
    d = model.embed_dim
    grid = F.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=16)  # (B, D, h, w)
    pos = model.patch_pos_embed.reshape(1, *model.grid_size, d).permute(0, 3, 1, 2)
    if grid.shape[-2:] != model.grid_size:
        pos = F.interpolate(pos, size=grid.shape[-2:], mode="bicubic", align_corners=False)
    patches = (grid + pos).flatten(2).transpose(1, 2)
    b = images.shape[0]
    cls = (model.cls_token + model.cls_pos_embed).expand(b, -1, -1)
    parts = (model.part_tokens[:, part_ids] + model.part_pos_embed[:, part_ids]).expand(b, -1, -1)
    x = torch.cat([cls, parts, patches], dim=1)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


def test_vit_global_and_local_token_selection():
    torch.manual_seed(0)
    model = vit_tiny_test().eval()
    glob, local = torch.randn(2, 3, 256, 128), torch.randn(4, 3, 128, 64)
    with torch.no_grad():
        out = model(glob)
        ref = reference_tokens(model, glob, [0, 1, 2])
        assert torch.allclose(out.cls, ref[:, 0], atol=1e-5)
        assert torch.allclose(out.parts, ref[:, 1:4], atol=1e-5)
        assert torch.allclose(out.patches, ref[:, 4:], atol=1e-5)
        for k in range(3):
            out = model(local, region=k)
            ref = reference_tokens(model, local, [k])
            assert torch.allclose(out.cls, ref[:, 0], atol=1e-5)
            assert torch.allclose(out.parts, ref[:, 1:2], atol=1e-5)
            assert torch.allclose(out.patches, ref[:, 2:], atol=1e-5)
        # Per-view regions in one batch: row b as if run alone with region[b].
        region = torch.tensor([2, 0, 1, 2])
        mixed = model(local, region=region)
        for b, k in enumerate(region.tolist()):
            alone = model(local[b : b + 1], region=k)
            assert torch.allclose(mixed.parts[b], alone.parts[0], atol=1e-5)
            assert torch.allclose(mixed.cls[b], alone.cls[0], atol=1e-5)


def test_vit_local_view_uses_only_its_part_token_and_position():
    model = vit_tiny_test().train()
    out = model(torch.randn(2, 3, 128, 64), region=1)
    (out.cls.sum() + out.parts.sum()).backward()
    for param in (model.part_tokens, model.part_pos_embed):
        used = param.grad.abs().sum(dim=-1)[0]
        assert used[1] > 0 and used[0] == 0 and used[2] == 0


def test_vit_shapes_and_errors():
    model = vit_tiny_test()
    out = model(torch.randn(2, 3, 256, 128))
    assert (out.cls.shape, out.parts.shape, out.patches.shape) == ((2, 48), (2, 3, 48), (2, 128, 48))
    assert model.forward_features(torch.randn(2, 3, 256, 128)).shape == (2, model.num_prefix_tokens + 128, 48)
    out = model(torch.randn(2, 3, 128, 64), region=2)
    assert (out.cls.shape, out.parts.shape, out.patches.shape) == ((2, 48), (2, 1, 48), (2, 32, 48))
    assert model.forward_features(torch.randn(2, 3, 128, 64), region=0).shape == (2, 2 + 32, 48)
    with pytest.raises(ValueError, match="multiple"):
        model(torch.randn(1, 3, 250, 128))
    with pytest.raises(ValueError, match="region"):
        model(torch.randn(1, 3, 128, 64), region=3)


def test_pos_embed_interpolation():
    model = vit_tiny_test()
    assert model.interpolate_patch_pos_embed((16, 8)) is model.patch_pos_embed
    # The shortcut changes nothing: bicubic resampling to the same size is the identity.
    grid = model.patch_pos_embed.detach().reshape(1, 16, 8, 48).permute(0, 3, 1, 2)
    same = F.interpolate(grid, size=(16, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(same, grid, atol=1e-6)
    assert model.interpolate_patch_pos_embed((8, 4)).shape == (1, 32, 48)
    # A constant embedding stays constant (bicubic weights sum to 1).
    with torch.no_grad():
        model.patch_pos_embed.fill_(0.5)
    assert torch.allclose(model.interpolate_patch_pos_embed((8, 4)), torch.full((1, 32, 48), 0.5), atol=1e-6)


def test_attention_matches_softmax_formula():
    torch.manual_seed(0)
    attn = Attention(48, 3)
    x = torch.randn(2, 7, 48)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    heads = []
    for h in range(3):  # 3 heads of 16 channels: scale 1 / sqrt(16)
        cols = slice(h * 16, (h + 1) * 16)
        heads.append(torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / 4.0, dim=-1) @ v[..., cols])
    assert torch.allclose(attn(x), attn.proj(torch.cat(heads, dim=-1)), atol=1e-5)


def test_drop_path_schedule_and_behaviour():
    model = vit_tiny_test(depth=4, drop_path_rate=0.3)
    assert [b.drop_path1.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    drop = DropPath(0.5).train()
    out = drop(torch.ones(1000, 4))
    assert set(out[:, 0].tolist()) <= {0.0, 2.0} and torch.all(out == out[:, :1])
    assert 0.4 < (out[:, 0] == 0).float().mean().item() < 0.6
    assert torch.equal(drop.eval()(torch.ones(3, 4)), torch.ones(3, 4))


def test_vit_init():
    torch.manual_seed(0)
    model = vit_tiny_test()
    assert model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.norm.weight == 1)
    assert model.patch_pos_embed.std().item() == pytest.approx(0.02, rel=0.1)


# ---------------------------------------------------------------------------------------- heads


def test_sinkhorn_doubly_stochastic():
    torch.manual_seed(0)
    # Unit-scale scores, as a freshly initialized head gives; sharply peaked random scores need
    # more iterations (the rows of a std-3 batch are still 3e-2 off after 20).
    matrix = sinkhorn(torch.randn(256, 6, 6), 20)
    assert torch.allclose(matrix.sum(-1), torch.ones(256, 6), atol=1e-3)
    assert torch.allclose(matrix.sum(-2), torch.ones(256, 6), atol=1e-3)
    assert torch.isfinite(sinkhorn(1000 * torch.randn(4, 6, 6))).all()  # log space: no overflow


def test_sinkhorn_recovers_permutation_from_confident_logits():
    torch.manual_seed(0)
    perms = torch.stack([torch.randperm(6) for _ in range(32)])
    target = F.one_hot(perms, 6).float()  # row i has its 1 at column perms[i]
    matrix = sinkhorn(8 * target + 0.5 * torch.randn(32, 6, 6), 20)
    assert torch.equal(matrix.argmax(-1), perms)
    assert torch.allclose(matrix, target, atol=0.05)


def test_permutation_head():
    torch.manual_seed(0)
    head = PermutationHead(in_dim=32, num_stripes=6, iterations=20)
    features = torch.randn(4, 32, 18, 9)
    out = head(features)
    assert out.matrix.shape == out.logits.shape == (4, 6, 6)
    pooled = features.flatten(2).mean(-1)
    assert torch.allclose(out.logits, (pooled @ head.fc.weight.T + head.fc.bias).reshape(4, 6, 6), atol=1e-5)
    assert torch.allclose(out.matrix.sum(-1), torch.ones(4, 6), atol=1e-3)
    assert torch.allclose(out.matrix.sum(-2), torch.ones(4, 6), atol=1e-3)


def test_permutation_head_under_bfloat16_autocast_stays_float32():
    head = PermutationHead(in_dim=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(4, 32, 18, 9))
    assert out.matrix.dtype == out.logits.dtype == torch.float32
    assert torch.allclose(out.matrix.sum(-1), torch.ones(4, 6), atol=1e-3)


def test_part_projection_against_stripe_means():
    """The figure's head: stripe means through one 1x1 conv (weight and bias), nothing after it."""
    torch.manual_seed(0)
    proj = PartProjection(in_dim=32, out_dim=16, num_parts=6)
    features = torch.randn(2, 32, 18, 9)
    out = proj(features)
    assert out.shape == (2, 6, 16)
    stripes = features.reshape(2, 32, 6, 3, 9).mean(dim=(3, 4)).transpose(1, 2)  # (B, 6, 32), top to bottom
    expected = stripes @ proj.conv.weight.reshape(16, 32).T + proj.conv.bias
    assert torch.allclose(out, expected, atol=1e-5)
    assert (out < 0).any()  # no ReLU before the cosine
    assert sorted(proj.state_dict()) == ["conv.bias", "conv.weight"]


def tiny_head_kwargs() -> dict:
    return {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


def test_dino_head_shape_direct_computation_and_frozen_norm():
    torch.manual_seed(0)
    head = DINOHead(48, **tiny_head_kwargs())
    x = torch.randn(5, 48)
    out = head(x)
    assert out.shape == (5, 64)
    v = head.last_layer.weight_v
    assert torch.allclose(out, F.normalize(head.mlp(x), dim=-1) @ (v / v.norm(dim=1, keepdim=True)).T, atol=1e-6)
    g = head.last_layer.weight_g
    assert g.shape == (64, 1) and torch.all(g == 1) and not g.requires_grad
    # Training moves the direction, never the norm: rows of the effective weight stay unit.
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    out.pow(2).sum().backward()
    assert g.grad is None and v.grad is not None
    optimizer.step()
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(64), atol=1e-6)
    assert not DINOHead(48, norm_last_layer=True, **tiny_head_kwargs()).last_layer.weight_g.requires_grad
    assert DINOHead(48, norm_last_layer=False, **tiny_head_kwargs()).last_layer.weight_g.requires_grad


def test_token_heads_count_independence_and_routing():
    torch.manual_seed(0)
    heads = TokenHeads(48, num_parts=3, **tiny_head_kwargs())
    assert len(heads.parts) == 3
    all_heads = [heads.cls, *heads.parts]
    weights = [h.mlp[0].weight for h in all_heads]
    assert len({w.data_ptr() for w in weights}) == 4  # separate parameters, not shared
    assert all(not torch.equal(weights[0], w) for w in weights[1:])  # separately initialized
    assert len(list(heads.last_layer_parameters())) == 4
    cls, parts = torch.randn(4, 48), torch.randn(4, 3, 48)
    out = heads(cls, parts)
    assert out.cls.shape == (4, 64) and out.parts.shape == (4, 3, 64)
    assert torch.allclose(out.cls, heads.cls(cls)) and torch.allclose(out.parts[:, 2], heads.parts[2](parts[:, 2]))
    local = torch.randn(4, 1, 48)
    assert torch.allclose(heads(cls, local, region=1).parts[:, 0], heads.parts[1](local[:, 0]))
    region = torch.tensor([2, 0, 2, 1])
    routed = heads(cls, local, region=region).parts
    assert routed.shape == (4, 1, 64)
    for b, k in enumerate(region.tolist()):
        assert torch.allclose(routed[b, 0], heads.parts[k](local[b, 0]), atol=1e-6)
    with pytest.raises(ValueError, match="region"):
        heads(cls, local, region=torch.tensor([0, 1, 2, 3]))


def test_narrow_resnet_is_the_same_network_at_width_32():
    """One bottleneck per layer at width 32: 4 x 8 x 32 = 1,024 output channels, 18x9 at 288x144;
    the fine-tuning code recognises it from the stem width of an export."""
    from models.weights import infer_arch

    two = resnet_narrow(two_stream=True).eval()
    with torch.no_grad():
        assert two(torch.randn(2, 3, 288, 144), torch.tensor([0, 1])).shape == (2, 1024, 18, 9)
    assert two.stems.rgb.conv1.weight.shape == (32, 3, 7, 7)
    assert infer_arch(two.state_dict()) == "resnet_narrow_two_stream"
    assert infer_arch(resnet_narrow().state_dict()) == "resnet_narrow"
    assert infer_arch(resnet_tiny_test(two_stream=True).state_dict()) == "resnet_tiny_two_stream"


def test_two_stream_routing_with_a_known_count_never_reads_the_device():
    """With ``rgb_count`` given, routing issues no op that copies a value to the host (nonzero,
    .item()/.tolist() = ``_local_scalar_dense``) and gives the rows of the counted routing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = resnet_tiny_test(two_stream=True)  # training mode: per-modality BatchNorm statistics
    images = torch.randn(6, 3, 64, 32)
    modality = torch.tensor([0, 0, 0, 1, 1, 1])[torch.tensor([3, 0, 4, 1, 5, 2])]
    counted = model(images, modality)
    stem_out = {}
    hook = model.stems["rgb"].register_forward_hook(lambda m, i, out: stem_out.setdefault("rgb", out.detach()))
    ops = Ops()
    with ops:
        known = model(images, modality, rgb_count=3)
    hook.remove()
    assert not {"nonzero", "_local_scalar_dense", "item"} & set(ops.names)
    torch.testing.assert_close(known, counted)
    # the RGB stem ran on the RGB rows alone, in input order (its BatchNorm saw only them)
    rgb = torch.tensor([i for i, m in enumerate(modality.tolist()) if m == 0])
    torch.testing.assert_close(stem_out["rgb"], model.stems["rgb"](images[rgb]).detach(), rtol=1e-4, atol=1e-5)
