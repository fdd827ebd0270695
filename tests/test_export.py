"""Export of the teacher backbone: native round trip, the timm/TransReID and PASS-reID key
layouts (keys and shapes written out here), and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models.weights import load_backbone
from models.vit import Block, PatchEmbed, VisionTransformer
from pass_tiny_data import tiny_args, tiny_shards
from common.cli import run_cli
from common.errors import UserError
from train.checkpointing import load_model_state
from train.export import export, main as export_main
from train.pretrain import main as pretrain_main

D, N, K, DEPTH = 48, 8, 3, 2  # vit_tiny_test on 64x32: a 4x2 patch grid
BLOCK_SHAPES = {
    "norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
    "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
    "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,),
}
COMMON_SHAPES = {
    "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,), "cls_token": (1, 1, D),
    "norm.weight": (D,), "norm.bias": (D,),
    **{f"blocks.{i}.{k}": v for i in range(DEPTH) for k, v in BLOCK_SHAPES.items()},
}
TRANSREID_SHAPES = {**COMMON_SHAPES, "pos_embed": (1, 1 + N, D)}
PASS_REID_SHAPES = {
    **COMMON_SHAPES, "cls_pos": (1, 1, D), "pos_embed": (1, N, D),
    **{f"part_token{k}": (1, 1, D) for k in (1, 2, 3)}, **{f"part{k}_pos": (1, 1, D) for k in (1, 2, 3)},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    shards = tiny_shards(tmp_path_factory)
    folder = tmp_path_factory.mktemp("export") / "run"
    assert pretrain_main(tiny_args(shards, folder, "--max_steps", "2")) == 0
    return folder


def teacher_backbone(checkpoint: Path) -> dict[str, torch.Tensor]:
    prefix = "teacher.backbone."
    return {k[len(prefix):]: v for k, v in load_model_state(checkpoint).items() if k.startswith(prefix)}


def test_native_export_loads_back_equal_to_the_teacher(run, tmp_path):
    out = export(run, "native", tmp_path / "backbone.pth")  # a run folder: its latest checkpoint
    model = load_backbone(out)
    assert isinstance(model, VisionTransformer) and model.img_size == (64, 32) and model.num_parts == K
    expected = teacher_backbone(run / "checkpoints" / "step_00000002")
    assert model.state_dict().keys() == expected.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    payload = torch.load(out, weights_only=True)
    assert payload["source"]["method"] == "pass" and payload["source"]["step"] == 2


def test_transreid_layout(run, tmp_path):
    """TransReID's deit_small_patch16_224_TransReID layout: timm's keys without the [PART] keys
    (its load_param crashes on a key its model lacks; tests/test_formats.py re-states it)."""
    out = export(run / "checkpoints" / "step_00000002", "transreid", tmp_path / "vit.pth")
    state = torch.load(out, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == TRANSREID_SHAPES
    teacher = teacher_backbone(run / "checkpoints" / "step_00000002")
    assert torch.equal(state["pos_embed"][:, :1], teacher["cls_pos_embed"])
    assert torch.equal(state["pos_embed"][:, 1:], teacher["patch_pos_embed"])
    # a ViT in timm's layout (no part tokens) loads it strictly
    TimmLayoutViT().load_state_dict(state, strict=True)


class TimmLayoutViT(nn.Module):
    """The parameters of timm's / TransReID's ViT for the tiny size (names and shapes only)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(16, 3, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + N, D))
        self.blocks = nn.Sequential(*(Block(D, 3, 4.0, True, 0.0, 1e-6) for _ in range(DEPTH)))
        self.norm = nn.LayerNorm(D, eps=1e-6)


def test_timm_format_and_safetensors_output(run, tmp_path):
    pth = export(run, "timm", tmp_path / "vit.pth")
    st = export(run, "timm", tmp_path / "vit.safetensors")
    state = torch.load(pth, weights_only=True)
    TimmLayoutViT().load_state_dict(state, strict=True)
    tensors = load_file(str(st))
    assert set(tensors) == set(state) and all(torch.equal(tensors[k], state[k]) for k in state)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("fmt", ["native", "transreid", "pass_reid", "timm"])
def test_every_format_writes_safetensors(run, tmp_path, fmt):
    pth = export(run, fmt, tmp_path / "w.pth")
    st = export(run, fmt, tmp_path / "w.safetensors")
    reference = torch.load(pth, weights_only=True)
    tensors = load_file(str(st))
    reference = reference["state_dict"] if fmt == "native" else reference
    assert set(tensors) == set(reference) and all(torch.equal(tensors[k], reference[k]) for k in reference)
    if fmt == "native":  # the description travels in the metadata: load_backbone rebuilds the model
        model = load_backbone(st)
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_pass_reid_layout(run, tmp_path):
    out = export(run, "pass_reid", tmp_path / "pass.pth")
    state = torch.load(out, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == PASS_REID_SHAPES
    teacher = teacher_backbone(run / "checkpoints" / "step_00000002")
    for k in range(K):
        assert torch.equal(state[f"part_token{k + 1}"][0, 0], teacher["part_tokens"][0, k])
        assert torch.equal(state[f"part{k + 1}_pos"][0, 0], teacher["part_pos_embed"][0, k])


def test_cli_and_errors(run, tmp_path, capsys):
    assert run_cli(export_main, [str(run), "--format", "transreid", "--out", str(tmp_path / "a.pth")]) == 0
    assert (tmp_path / "a.pth").is_file()
    assert run_cli(export_main, [str(tmp_path / "missing"), "--out", str(tmp_path / "b.pth")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown export format"):
        export(run, "onnx", tmp_path / "c.pth")
    with pytest.raises(UserError, match="not a native export"):
        load_backbone(tmp_path / "a.pth")


def test_unwritable_out_is_a_one_line_error_and_leaves_no_temporary(run, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    assert run_cli(export_main, [str(run), "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert run_cli(export_main, [str(run), "--out", str(blocker / "backbone.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the export") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "exports"]  # no .tmp left behind
