"""Weights in and out of the code bases users run (issue 12, parts C and D).

Each target's layout is written out here from its model definition, and each target's loader is
re-stated here as the rules it follows (what it unwraps, strips, skips, resizes, and what is
fatal), read from its code:

- TransReID (damo-cv/TransReID, ``model/backbones/vit_pytorch.py``): ``deit_small_patch16_224_TransReID``
  = ``TransReID(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True)``; parameters
  ``cls_token (1, 1, D)``, ``pos_embed (1, 1 + N, D)``, ``patch_embed.proj``, ``blocks``, ``norm``,
  ``fc (1000, D)`` (num_classes keeps its default 1000 in ``make_model``); ``sie_embed`` only with
  camera/view embeddings. ``load_param``: unwraps ``model`` then ``state_dict``; skips keys
  containing ``head`` or ``dist``; a ``pos_embed`` of another shape is resized assuming a SQUARE
  pre-training grid; then ``self.state_dict()[k].copy_(v)`` in a try whose except clause reads
  ``self.state_dict()[k]`` again: a key the model lacks raises KeyError (fatal), a shape mismatch
  is printed and skipped, missing keys keep their init.
- PASS_transreid (``PASS_transreid/model/backbones/vit_pytorch.py``): the same TransReID class
  with ``cls_token``, ``part_token1..3``, ``cls_pos``, ``part1..3_pos`` ``(1, 1, D)``, patch
  ``pos_embed (1, N, D)``, ``fc``. ``load_param``: unwraps ``model``, ``state_dict``, and a
  checkpoint's ``teacher`` (strips ``module.``, keeps only ``backbone.*``, strips ``backbone.``);
  skips ``head`` / ``dist`` / ``pre_logits`` keys; resizes a ``pos_embed`` of another shape
  bilinearly from an ``h x h / PRETRAIN_HW_RATIO`` grid; unknown keys fatal as above.
- timm: ``vit_small_patch16_224(img_size=(256, 128), num_classes=0)`` and
  ``resnet50(num_classes=0)`` loaded with ``load_state_dict(strict=True)``: the key sets must be
  equal and every shape must match.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from models.formats import (
    load_pass_reid_weights,
    read_checkpoint,
    read_safetensors,
    save_weights,
    to_pass_transreid_state,
    to_timm_state,
    to_transreid_state,
)
from models.resnet import resnet50, resnet_tiny_test
from models.vit import patch_grid_of, vit_small, vit_tiny_test
from common.errors import UserError
from torchvision_layout import torchvision_resnet50_shapes

D, DEPTH, HEADS = 384, 12, 6


def block_shapes(d: int = D, depth: int = DEPTH) -> dict[str, tuple[int, ...]]:
    """A timm-style pre-norm block with qkv bias and MLP ratio 4, ``depth`` times."""
    one = {
        "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,),
    }
    return {f"blocks.{i}.{k}": v for i in range(depth) for k, v in one.items()}


def vit_common(d: int = D) -> dict[str, tuple[int, ...]]:
    return {"patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,), "cls_token": (1, 1, d),
            "norm.weight": (d,), "norm.bias": (d,), **block_shapes(d)}


def timm_vit_small_shapes(grid=(16, 8)) -> dict[str, tuple[int, ...]]:
    """timm ``vit_small_patch16_224(img_size=(256, 128), num_classes=0)``: class token, pos_embed
    with the class row first, no head (Identity), no fc_norm / layer scale / qk norm (Identity)."""
    return {**vit_common(), "pos_embed": (1, 1 + grid[0] * grid[1], D)}


def transreid_deit_small_shapes(grid=(16, 8)) -> dict[str, tuple[int, ...]]:
    """TransReID's ``deit_small_patch16_224_TransReID`` without camera/view embeddings."""
    return {**timm_vit_small_shapes(grid), "fc.weight": (1000, D), "fc.bias": (1000,)}


def pass_transreid_shapes(grid=(16, 8)) -> dict[str, tuple[int, ...]]:
    """PASS_transreid's ``vit_small_patch16_224_TransReID`` (its own: dim 384, depth 12)."""
    tokens = {"cls_pos": (1, 1, D), **{f"part_token{k}": (1, 1, D) for k in (1, 2, 3)},
              **{f"part{k}_pos": (1, 1, D) for k in (1, 2, 3)}}
    return {**vit_common(), **tokens, "pos_embed": (1, grid[0] * grid[1], D), "fc.weight": (1000, D),
            "fc.bias": (1000,)}


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# --- the loaders, re-stated ------------------------------------------------------------------------

def transreid_load_param(model: dict[str, tuple[int, ...]], payload: dict, *, pass_variant: bool = False,
                         grid=(16, 8), hw_ratio: int = 2) -> set[str]:
    """What ``load_param`` of TransReID (or of PASS_transreid with ``pass_variant``) copies into
    a model with parameter shapes ``model``; raises KeyError where the reference crashes."""
    if "model" in payload:
        payload = payload["model"]
    if "state_dict" in payload:
        payload = payload["state_dict"]
    if pass_variant and "teacher" in payload:
        stripped = {k.replace("module.", ""): v for k, v in payload["teacher"].items()}
        payload = {k.replace("backbone.", ""): v for k, v in stripped.items() if k.startswith("backbone.")}
    skipped = ("head", "dist", "pre_logits") if pass_variant else ("head", "dist")
    copied = set()
    for k, v in payload.items():
        if any(s in k for s in skipped):
            continue
        shape = tuple(v.shape)
        if k == "pos_embed" and k in model and shape != model[k]:
            if pass_variant:  # h = int(sqrt(N * ratio)), w = h // ratio, then bilinear to the new grid
                n = shape[1]
                h = int(math.sqrt(n * hw_ratio))
                assert h * (h // hw_ratio) == n, "reshape fails in the reference"
                shape = (1, grid[0] * grid[1], shape[2])
            else:  # square old grid: the CLS row, then sqrt(N - 1) x sqrt(N - 1)
                side = int(math.sqrt(shape[1] - 1))
                assert side * side == shape[1] - 1, "reshape fails in the reference"
                shape = (1, 1 + grid[0] * grid[1], shape[2])
        if k not in model:
            raise KeyError(k)  # the except clause reads self.state_dict()[k] again
        if shape == model[k]:
            copied.add(k)
    return copied


def timm_strict(model: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)``: same keys, same shapes."""
    assert set(state) == set(model), (set(state) ^ set(model))
    assert all(tuple(state[k].shape) == model[k] for k in model)


@pytest.fixture(scope="module")
def native_vit() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return vit_small().state_dict()


# --- out ------------------------------------------------------------------------------------------

def test_transreid_export_loads_with_transreid_load_param(native_vit):
    state = to_transreid_state(native_vit)
    model = transreid_deit_small_shapes()
    assert transreid_load_param(model, state) == set(model) - {"fc.weight", "fc.bias"}
    assert torch.equal(state["pos_embed"], torch.cat([native_vit["cls_pos_embed"], native_vit["patch_pos_embed"]], 1))
    # the old export kept the [PART] keys: TransReID's load_param crashed on them
    with pytest.raises(KeyError, match="part_tokens"):
        transreid_load_param(model, {**state, "part_tokens": native_vit["part_tokens"]})


def test_timm_vit_export_loads_strictly(native_vit):
    state = to_timm_state(native_vit)
    timm_strict(timm_vit_small_shapes(), state)
    assert torch.equal(state["blocks.3.attn.qkv.weight"], native_vit["blocks.3.attn.qkv.weight"])


def test_timm_resnet_export_loads_strictly():
    native = resnet50().state_dict()
    state = to_timm_state(native)
    timm_strict(torchvision_resnet50_shapes(fc=False), state)  # timm's resnet50 names = torchvision's
    with pytest.raises(UserError, match="one stem"):
        to_timm_state(resnet_tiny_test(two_stream=True).state_dict())


def test_pass_transreid_export_loads_with_its_load_param_at_256_and_384(native_vit):
    state = to_pass_transreid_state(native_vit)
    model = pass_transreid_shapes()
    assert transreid_load_param(model, state, pass_variant=True) == set(model) - {"fc.weight", "fc.bias"}
    # the 384x128 recipe: the 16x8 patch grid is resized to 24x8 by the loader
    model_384 = pass_transreid_shapes(grid=(24, 8))
    assert transreid_load_param(model_384, state, pass_variant=True, grid=(24, 8)) == set(model_384) - {"fc.weight", "fc.bias"}
    for k in (1, 2, 3):
        assert torch.equal(state[f"part_token{k}"][0, 0], native_vit["part_tokens"][0, k - 1])
    with pytest.raises(UserError, match="3 \\[PART\\] tokens"):
        to_pass_transreid_state(vit_tiny_test(num_parts=2).state_dict())


@pytest.mark.parametrize("convert", [to_transreid_state, to_timm_state, to_pass_transreid_state, dict])
def test_safetensors_holds_the_same_tensors(native_vit, tmp_path, convert):
    state = convert(native_vit)
    path = tmp_path / "w.safetensors"
    save_weights(state, path, safetensors=True)
    tensors, metadata = read_safetensors(path)
    assert metadata == {} and set(tensors) == set(state)
    assert all(torch.equal(tensors[k], state[k]) for k in state)


# --- in: official PASS-reID weights ------------------------------------------------------------

def pass_layout_backbone(seed: int) -> dict[str, torch.Tensor]:
    """Random tensors in PASS's own ViT-S layout (``PASS/vision_transformer.py``), no fc."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g) for k, v in pass_transreid_shapes().items() if not k.startswith("fc.")}


def dino_heads(seed: int) -> dict[str, torch.Tensor]:
    """A few of PASS's DINOHead keys (``mlp_cls``, ``mlp_pt1``, ``last_layer_*``), tiny."""
    g = torch.Generator().manual_seed(seed)
    return {"mlp_cls.0.weight": torch.randn(8, D, generator=g), "mlp_pt1.0.weight": torch.randn(8, D, generator=g),
            "last_layer_cls.weight_g": torch.ones(16, 1), "last_layer_cls.weight_v": torch.randn(16, 8, generator=g)}


def main_pass_checkpoint(path: Path, teacher_ddp: bool = False) -> dict[str, torch.Tensor]:
    """A ``checkpoint.pth`` as ``PASS/main_pass.py`` writes it; returns the teacher backbone."""
    teacher_backbone, student_backbone = pass_layout_backbone(1), pass_layout_backbone(2)
    prefix = "module." if teacher_ddp else ""
    teacher = {f"{prefix}backbone.{k}": v for k, v in teacher_backbone.items()}
    teacher.update({f"{prefix}head.{k}": v for k, v in dino_heads(3).items()})
    student = {f"module.backbone.{k}": v for k, v in student_backbone.items()}
    student.update({f"module.head.{k}": v for k, v in dino_heads(4).items()})
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=5e-4)
    param.grad = torch.ones(3)
    optimizer.step()
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005, epochs=100,
                              height=256, width=128, local_crops_scale=(0.1, 0.8), data_path="/data/LUPerson",
                              use_fp16=True, seed=0, warmup_teacher_temp=0.04, gpu=0)
    torch.save({"student": student, "teacher": teacher, "optimizer": optimizer.state_dict(), "epoch": 100,
                "args": args, "dino_loss": {f"center_{t}": torch.zeros(1, 65536) for t in ("cls", "pt1", "pt2", "pt3")},
                "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                "growth_interval": 2000, "_growth_tracker": 12}}, path)
    return teacher_backbone


def assert_loaded(model, backbone: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for k in (1, 2, 3):
        assert torch.equal(state["part_tokens"][0, k - 1], backbone[f"part_token{k}"][0, 0])
        assert torch.equal(state["part_pos_embed"][0, k - 1], backbone[f"part{k}_pos"][0, 0])
    assert torch.equal(state["cls_pos_embed"], backbone["cls_pos"])
    assert torch.equal(state["cls_token"], backbone["cls_token"])
    assert torch.equal(state["blocks.11.mlp.fc2.weight"], backbone["blocks.11.mlp.fc2.weight"])


@pytest.mark.parametrize("teacher_ddp", [False, True])
def test_a_main_pass_checkpoint_loads_its_teacher(tmp_path, teacher_ddp):
    teacher = main_pass_checkpoint(tmp_path / "checkpoint.pth", teacher_ddp)
    model = vit_small()
    load_pass_reid_weights(model, tmp_path / "checkpoint.pth")
    assert_loaded(model, teacher)
    assert torch.equal(model.patch_pos_embed, teacher["pos_embed"])


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"model": s}, lambda s: {"state_dict": s}])
def test_the_converted_pass_transreid_file_loads(tmp_path, wrap):
    backbone = pass_layout_backbone(5)
    torch.save(wrap(backbone), tmp_path / "pass_vit_small_full.pth")
    model = vit_small()
    load_pass_reid_weights(model, tmp_path / "pass_vit_small_full.pth")
    assert_loaded(model, backbone)


def test_a_384x128_model_gets_the_position_embeddings_resized_bilinearly(tmp_path):
    backbone = pass_layout_backbone(6)
    torch.save(backbone, tmp_path / "w.pth")
    model = vit_small(img_size=(384, 128))
    load_pass_reid_weights(model, tmp_path / "w.pth")
    assert patch_grid_of(128) == (16, 8)
    old = backbone["pos_embed"].reshape(16, 8, D)
    new = model.patch_pos_embed.detach().reshape(24, 8, D)
    # Bilinear, align_corners=False, 16 -> 24 rows (columns unchanged): output row i samples
    # source y = (i + 0.5) * 16 / 24 - 0.5, clamped at 0, between rows floor(y) and floor(y) + 1.
    for i in (0, 1, 5, 12, 23):
        y = max((i + 0.5) * 16 / 24 - 0.5, 0.0)
        lo = int(math.floor(y))
        hi = min(lo + 1, 15)
        expected = (1 - (y - lo)) * old[lo] + (y - lo) * old[hi]
        assert torch.allclose(new[i], expected, atol=1e-5)
    assert_loaded(model, backbone)


class Payload:
    """An object a safe reader must not build."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_unsafe_or_foreign_files_are_one_line_errors(tmp_path, capsys):
    torch.save({"teacher": {}, "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="safely"):
        read_checkpoint(tmp_path / "evil.pth")
    assert "this ran" not in capsys.readouterr().out
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("not torch")
    with pytest.raises(UserError, match="cannot read weights"):
        read_checkpoint(tmp_path / "text.pth")
    # a timm state dict is not the PASS layout
    torch.save({k: torch.zeros(v) for k, v in timm_vit_small_shapes().items()}, tmp_path / "timm.pth")
    with pytest.raises(UserError, match="PASS-reID ViT layout"):
        load_pass_reid_weights(vit_small(), tmp_path / "timm.pth")
    # the right layout for another width does not fit
    torch.save(pass_layout_backbone(7), tmp_path / "s.pth")
    with pytest.raises(UserError, match="do not fit"):
        load_pass_reid_weights(vit_tiny_test(), tmp_path / "s.pth")


def test_the_checkpoint_args_namespace_is_read(tmp_path):
    main_pass_checkpoint(tmp_path / "checkpoint.pth")
    payload = read_checkpoint(tmp_path / "checkpoint.pth")
    assert isinstance(payload["args"], argparse.Namespace) and payload["args"].arch == "vit_small"
    assert payload["args"].local_crops_scale == (0.1, 0.8)


def test_pos_embed_grid_inference_refuses_a_non_grid():
    with pytest.raises(ValueError, match="grid"):
        patch_grid_of(130)
