"""The fine-tuning presets as the references run them (AGW for RGB-IR, PASS_transreid for RGB),
checked against tables of the reference values written out here, plus the parts of the loop
that carry them: AGW's epoch length and evaluation schedule, the best / last selection, the
per-group timm cosine, the inits (ImageNet, PASS-reID, an export without non-local blocks) and
the bad-input refusals of fine-tuning and evaluation.

Sources: mangye16/Cross-Modal-Re-ID-baseline (``train.py``, ``utils.py``, ``model.py``,
``test.py``; the same in hansonchen1996/MMGL ``AGW/``) and CASIA-IVA-Lab/PASS-reID
``PASS_transreid`` (``configs/*/vit_{small,base}.yml``, ``config/defaults.py``,
``solver/scheduler_factory.py``, ``processor/processor.py``, ``datasets/make_dataloader.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch

from common.cli import run_cli
from common.errors import UserError
from models.registry import create_backbone
from models.reid import ReIDModel
from models.vit import to_pass_reid_state_dict
from models.weights import backbone_from_file, load_backbone_weights
from pipelines.samplers import CrossModalSampler, agw_epoch_length
from tests.torchvision_layout import torchvision_resnet50_shapes
from train.checkpointing import load_model_state
from train.evaluation.protocols import ProtocolResult
from train import finetune
from train.finetune import (
    PRESETS,
    evaluation_due,
    load_for_evaluation,
    lr_schedule,
    main,
    parameter_groups,
    resolve_config,
    run_finetune,
    training_views,
)

QUIET = ["--progress_bar", "false", "--tensorboard", "false"]

# --- AGW ---------------------------------------------------------------------------------------
# (setting, reference value, source)
AGW_REFERENCE = [
    ("arch", "resnet50_two_stream", "model.py embed_net: visible_module / thermal_module + shared base_resnet"),
    ("non_local", True, "train.py --method agw -> embed_net(no_local='on')"),
    ("image_size", (288, 144), "train.py --img_h 288 --img_w 144"),
    ("pad", 10, "train.py transforms.Pad(10) + RandomCrop"),
    ("flip_p", 0.5, "train.py RandomHorizontalFlip()"),
    ("erase_p", 0.0, "train.py: no random erasing"),
    ("normalization", "imagenet", "train.py Normalize(ImageNet mean, std)"),
    ("sampler", "cross_modal", "utils.py IdentitySampler: per id num_pos RGB + num_pos IR"),
    ("ids_per_batch", 8, "train.py --batch-size 8"),
    ("instances", 4, "train.py --num_pos 4"),
    ("triplet", "weighted", "train.py --method agw: TripletLoss_WRT"),
    ("label_smoothing", 0.0, "train.py nn.CrossEntropyLoss()"),
    ("epochs", 81, "train.py for epoch in range(start_epoch, 81 - start_epoch)"),
    ("epoch_length", "agw", "utils.py IdentitySampler: int(N / (batchSize * num_pos)) + 1, N = max(#RGB, #IR)"),
    ("lr", 0.1, "train.py --lr 0.1 (bottleneck + classifier)"),
    ("backbone_lr_factor", 0.1, "train.py: base params at 0.1 x lr"),
    ("weight_decay", 5e-4, "train.py optim.SGD(weight_decay=5e-4)"),
    ("weight_decay_bias", 5e-4, "train.py: one weight decay for all parameters"),
    ("momentum", 0.9, "train.py optim.SGD(momentum=0.9)"),
    ("nesterov", True, "train.py optim.SGD(nesterov=True)"),
    ("schedule", "agw_step", "train.py adjust_learning_rate"),
    ("warmup_epochs", 10.0, "train.py: lr * (epoch + 1) / 10 for epoch < 10"),
    ("milestones", (20, 50), "train.py: 0.1 x from 20, 0.01 x from 50"),
    ("eval_feature", "bn", "model.py: feat_fc at test time (the BN feature), test.py L2-normalises"),
    ("eval_schedule", "agw", "train.py: if epoch > 0 and epoch % 2 == 0"),
    ("eval_every", 2, "train.py: epoch % 2 == 0"),
    ("eval_trials", 10, "test.py: 10 trials"),
    ("select", "best_trial0", "train.py: best Rank-1 on the trial-0 gallery saved as _best.t"),
]


@pytest.mark.parametrize("preset, protocol", [("agw-sysu", "sysu"), ("agw-regdb", "regdb")])
def test_agw_presets_carry_the_reference_values(preset, protocol):
    config = PRESETS[preset]()
    assert {key: getattr(config, key) for key, _, _ in AGW_REFERENCE} == {key: value for key, value, _ in AGW_REFERENCE}
    assert config.protocol == protocol and config.batch_size == 64  # 8 x (4 + 4) images a step


def test_agw_tiny_keeps_the_code_path_of_the_recipe():
    tiny, full = PRESETS["agw-tiny"](), PRESETS["agw-sysu"]()
    assert tiny.non_local and tiny.epoch_length == "agw" and tiny.eval_schedule == "agw"
    assert (tiny.triplet, tiny.schedule, tiny.nesterov) == (full.triplet, full.schedule, full.nesterov)


def test_agw_epoch_length_by_hand():
    assert agw_epoch_length(22258, 11909, 8, 4) == 696  # SYSU-MM01 train + val: int(22258 / 32) + 1
    assert agw_epoch_length(2060, 2060, 8, 4) == 65  # RegDB, one trial: int(2060 / 32) + 1
    assert agw_epoch_length(30, 64, 2, 4) == 9  # N is the larger modality: int(64 / 8) + 1
    assert agw_epoch_length(32, 8, 8, 4) == 2  # a whole number still adds one: int(32 / 32) + 1


def test_cross_modal_sampler_gives_the_epoch_it_is_asked_for():
    # 6 ids, 5 RGB + 3 IR images each; P = 2, K = 2: 2 x (2 + 2) = 8 images a batch
    pid = torch.arange(6).repeat_interleave(8)
    modality = torch.tensor(([0] * 5 + [1] * 3) * 6)
    natural = CrossModalSampler(pid, modality, 8, 2)
    longer = CrossModalSampler(pid, modality, 8, 2, epoch_batches=len(natural) * 3 + 1)
    assert len(longer) == len(natural) * 3 + 1
    rows = list(longer)
    assert len(rows) == len(longer)
    for row in rows:
        rgb, ir = row[:4], row[4:]
        assert (modality[rgb] == 0).all() and (modality[ir] == 1).all()
        assert pid[rgb].tolist() == pid[ir].tolist() and len(set(pid[rgb].tolist())) == 2
    two = [CrossModalSampler(pid, modality, 8, 2, epoch_batches=5, rank=r, world=2) for r in range(2)]
    assert [len(s) for s in two] == [5, 5]  # every process runs AGW's count of steps


def test_agw_evaluation_schedule_by_hand():
    agw = PRESETS["agw-sysu"]()
    assert [e for e in range(81) if evaluation_due(agw, e)] == list(range(2, 81, 2))  # epoch > 0, epoch % 2 == 0
    counted = resolve_config("agw-sysu", ["--eval_schedule", "count", "--eval_every", "10"], shards="x")
    assert [e for e in range(81) if evaluation_due(counted, e)] == [9, 19, 29, 39, 49, 59, 69, 79]
    never = resolve_config("agw-sysu", ["--eval_every", "0", "--select", "last"], shards="x")
    assert not any(evaluation_due(never, e) for e in range(81))


# --- TransReID ----------------------------------------------------------------------------------
TRANSREID_REFERENCE = {
    "drop_path": 0.1,  # MODEL.DROP_PATH
    "neck": "multi",  # MODEL.MULTI_NECK True
    "normalization": "half",  # INPUT.PIXEL_MEAN = PIXEL_STD = 0.5
    "pad": 10, "flip_p": 0.5,  # INPUT.PADDING, PROB
    "erase_p": 0.5, "erase_mode": "pixel",  # INPUT.RE_PROB, timm RandomErasing(mode='pixel')
    "sampler": "identity", "ids_per_batch": 16, "instances": 4,  # IMS_PER_BATCH 64, NUM_INSTANCE 4
    "triplet": "soft", "label_smoothing": 0.0,  # NO_MARGIN True, IF_LABELSMOOTH 'off'
    "lr": 4e-4, "backbone_lr_factor": 1.0, "bias_lr_factor": 2.0,  # BASE_LR, BIAS_LR_FACTOR
    "weight_decay": 1e-4, "weight_decay_bias": 1e-4, "momentum": 0.9, "nesterov": False,
    "schedule": "timm_cosine", "epochs": 120, "warmup_epochs": 20,  # MAX_EPOCHS, WARMUP_EPOCHS
    "warmup_start": 0.01, "min_lr_factor": 0.002,  # scheduler_factory.py: warmup_lr_init, lr_min
    "eval_feature": "pre_bn",  # TEST.NECK_FEAT 'before' (FEAT_NORM 'yes': L2 in the evaluation)
    "protocol": "market",  # Market-1501 and MSMT17: same-camera matches removed
}
TRANSREID_PRESETS = {
    "transreid-market": ("vit_small", (256, 128)),
    "transreid-market-384": ("vit_small", (384, 128)),
    "transreid-msmt17": ("vit_small", (256, 128)),
    "transreid-msmt17-384": ("vit_small", (384, 128)),
    "transreid-vitb-market": ("vit_base", (256, 128)),
    "transreid-vitb-market-384": ("vit_base", (384, 128)),
    "transreid-vitb-msmt17": ("vit_base", (256, 128)),
    "transreid-vitb-msmt17-384": ("vit_base", (384, 128)),
}


@pytest.mark.parametrize("preset", sorted(TRANSREID_PRESETS))
def test_transreid_presets_carry_the_reference_values(preset):
    config = PRESETS[preset]()
    assert {key: getattr(config, key) for key in TRANSREID_REFERENCE} == TRANSREID_REFERENCE
    assert (config.arch, config.image_size) == TRANSREID_PRESETS[preset]
    assert config.batch_size == 64  # the ViT-B configs too


def test_transreid_views_are_timms_pixel_erasing():
    views = training_views(PRESETS["transreid-market"]())
    assert views.size == (256, 128) and views.pad == 10 and views.flip_p == 0.5
    assert (views.erase_p, views.erase_mode, views.erase_log_aspect) == (0.5, "pixel", True)
    assert views.erase_area == pytest.approx((0.02, 1 / 3)) and views.erase_aspect == pytest.approx((0.3, 1 / 0.3))
    agw = training_views(PRESETS["agw-sysu"]())
    assert agw.erase_p == 0.0 and agw.size == (288, 144)


def test_timm_cosine_per_group_by_hand():
    """timm's CosineLRScheduler as PASS_transreid builds it, stepped after every epoch: epoch e
    (0-based) trains at t = e; warm-up from 4e-6 and minimum 8e-7 for both groups."""
    config = PRESETS["transreid-market"]()
    weights, biases = lr_schedule(config, 3, 4e-4), lr_schedule(config, 3, 8e-4)
    assert weights.shape == (360,)
    per_epoch_w, per_epoch_b = weights[::3], biases[::3]
    assert (weights[0], weights[1], weights[2]) == (weights[0],) * 3  # constant within an epoch
    assert per_epoch_w[0] == pytest.approx(4e-6) and per_epoch_b[0] == pytest.approx(4e-6)
    assert per_epoch_w[10] == pytest.approx(4e-6 + 10 * (4e-4 - 4e-6) / 20)
    assert per_epoch_b[10] == pytest.approx(4e-6 + 10 * (8e-4 - 4e-6) / 20)
    for e in (20, 60, 119):
        c = (1 + math.cos(math.pi * e / 120)) / 2
        assert per_epoch_w[e] == pytest.approx(8e-7 + (4e-4 - 8e-7) * c)
        assert per_epoch_b[e] == pytest.approx(8e-7 + (8e-4 - 8e-7) * c)


def test_transreid_parameter_groups_weights_and_biases():
    config = resolve_config("transreid-tiny", shards="x")
    model = ReIDModel(create_backbone("vit_tiny", (64, 32)), 5, multi_neck=True)
    groups = parameter_groups(model, config)
    by_lr = {}
    for group in groups:
        by_lr.setdefault((group["base_lr"], group["weight_decay"]), 0)
        by_lr[(group["base_lr"], group["weight_decay"])] += len(group["params"])
    biases = sum(1 for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert by_lr[(8e-4, 1e-4)] == biases  # every trainable bias: 2 x lr, its own weight decay
    assert by_lr[(4e-4, 1e-4)] == sum(1 for p in model.parameters() if p.requires_grad) - biases


def test_multi_neck_model_layout_and_features():
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny", (64, 32))
    model = ReIDModel(backbone, 7, multi_neck=True).eval()
    keys = {k for k in model.state_dict() if not k.startswith("backbone.")}
    assert {k.rsplit(".", 1)[0] for k in keys} == {"neck.cls_bn", "neck.part_bns.0", "neck.part_bns.1",
                                                   "neck.part_bns.2", "neck.classifier"}
    images = torch.randn(4, 3, 64, 32)
    out = backbone(images)
    before = torch.cat([out.cls, out.parts.mean(dim=1)], dim=1)
    torch.testing.assert_close(model.embed(images, torch.zeros(4, dtype=torch.long), "pre_bn"), before)
    with pytest.raises(ValueError, match="PART"):
        ReIDModel(create_backbone("resnet_tiny"), 3, multi_neck=True)


# --- runs on tiny data --------------------------------------------------------------------------


def _shards(tmp_path_factory, layout: str, ids: int, images: int):
    from shards.build import build
    from shards.synthetic import generate

    base = tmp_path_factory.mktemp(layout)
    generate(layout, base / "data", ids=ids, images_per_id=images, workers=1)
    build(layout, base / "data", base / "shards", shard_size=64, workers=1)
    return base / "shards"


@pytest.fixture(scope="module")
def sysu_shards(tmp_path_factory):
    return _shards(tmp_path_factory, "sysu-mm01", ids=15, images=8)


@pytest.fixture(scope="module")
def market_shards(tmp_path_factory):
    return _shards(tmp_path_factory, "market1501", ids=10, images=6)


def tiny(shards, out, *overrides: str, preset: str = "agw-tiny"):
    return resolve_config(preset, [*QUIET, "--output_dir", str(out), *overrides], shards=str(shards))


def test_agw_epoch_length_in_a_run(sysu_shards, tmp_path):
    from shards.manifest import load_manifest

    counts = load_manifest(sysu_shards).splits["train"].modalities
    expected = int(max(counts["rgb"].images, counts["ir"].images) / (2 * 2)) + 1  # P = K = 2 in agw-tiny
    result = run_finetune(tiny(sysu_shards, tmp_path / "run", "--epochs", "1", "--steps_per_epoch", "0",
                               "--warmup_epochs", "0"))
    assert [h["step"] for h in result.history if h["kind"] == "train"] == [expected]


def _fake_result(r1: float, trials: int) -> list[ProtocolResult]:
    per_trial = [{"trial": t, "R1": r1 if t == 0 else 0.0, "mAP": 0.1, "mINP": 0.1} for t in range(trials)]
    return [ProtocolResult("sysu all-search", "sysu", list(range(trials)), [r1] * 20, 0.1, 0.1, 6, 4.0, per_trial)]


def test_best_on_trial0_and_last_are_both_reported(sysu_shards, tmp_path, monkeypatch, capsys):
    """Evaluations after epochs 2, 4, 6 (AGW's schedule, 7 epochs): trial-0 R1 0.5, 0.7, 0.7.
    The tie at the last epoch keeps epoch 4 (strict >); the best is re-loaded from its folder and
    evaluated with every trial, next to the last epoch."""
    scripted = iter([0.5, 0.7, 0.7, 0.9])  # the last value: the full evaluation of the best weights
    calls = []

    def fake_evaluate(accelerator, model, config, protocol, trials=None):
        weights = accelerator.unwrap_model(model).state_dict()["backbone.layer4.0.conv3.weight"].clone()
        calls.append((trials, weights))
        return _fake_result(next(scripted), trials or config.eval_trials)

    monkeypatch.setattr(finetune, "evaluate_model", fake_evaluate)
    out = tmp_path / "best"
    argv = ["--preset", "agw-tiny", "--shards", str(sysu_shards), "--init", "random", "--output_dir", str(out),
            *QUIET, "--select", "best_trial0", "--epochs", "7", "--steps_per_epoch", "1", "--eval_every", "2",
            "--milestones", "3,5", "--keep_last", "10"]
    assert run_cli(main, argv) == 0
    printed = capsys.readouterr().out
    assert "last epoch (epoch 6" in printed and "best R1 on trial 0 (test-selected, as the AGW code) (epoch 4" in printed
    assert [t for t, _ in calls] == [1, 1, 2, 2]  # trial 0 during training, every trial (eval_trials) at the end
    report = json.loads((out / "results.json").read_text())
    assert report["selected"] == "best_trial0"
    assert report["best_trial0"]["epoch"] == 4 and report["best_trial0"]["trial0_R1"] == 0.7
    assert report["best_trial0"]["label"] == "best R1 on trial 0 (test-selected, as the AGW code)"
    assert report["last"]["label"] == "last epoch" and report["last"]["epoch"] == 6
    assert report["last"]["results"][0]["R1"] == 0.7 and report["best_trial0"]["results"][0]["R1"] == 0.9
    assert report["results"] == report["best_trial0"]["results"]
    best, epoch4 = load_model_state(out / "best"), load_model_state(out / "checkpoints" / "step_00000005")
    for key in best:
        torch.testing.assert_close(best[key], epoch4[key], rtol=0, atol=0)
    torch.testing.assert_close(calls[-1][1], epoch4["backbone.layer4.0.conv3.weight"])  # evaluated the best
    # the best folder evaluates like any checkpoint
    loaded = load_for_evaluation(out / "best", device="cpu")
    assert loaded.size == (64, 32)


def test_select_last_tracks_no_best(sysu_shards, tmp_path):
    result = run_finetune(tiny(sysu_shards, tmp_path / "last", "--epochs", "1", "--steps_per_epoch", "1",
                               "--warmup_epochs", "0"))
    report = json.loads((tmp_path / "last" / "results.json").read_text())
    assert report["selected"] == "last" and "best_trial0" not in report and result.best == []
    assert not (tmp_path / "last" / "best").exists()


def _tiny_torchvision_file(path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ResNet state dict in torchvision's layout (keys and shapes of
    :func:`torchvision_resnet50_shapes`) at the tiny test width: one block per layer, every
    channel count / 8 (the stem's 3 input channels and the kernels kept)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_resnet50_shapes(fc=True).items():
        parts = key.split(".")
        if parts[0].startswith("layer") and parts[1] != "0":
            continue
        if key == "conv1.weight":
            shape = (shape[0] // 8, 3, *shape[2:])
        elif key == "fc.weight":
            shape = (shape[0], shape[1] // 8)
        elif len(shape) == 4:
            shape = (shape[0] // 8, shape[1] // 8, *shape[2:])
        elif len(shape) == 1 and key != "fc.bias":
            shape = (shape[0] // 8,)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    torch.save(state, path)
    return state


def test_imagenet_init_through_the_cli(sysu_shards, tmp_path):
    file = tmp_path / "resnet50-imagenet.pth"
    state = _tiny_torchvision_file(file)
    out = tmp_path / "imagenet"
    argv = ["--preset", "agw-tiny", "--shards", str(sysu_shards), "--init", f"imagenet:{file}", "--output_dir",
            str(out), *QUIET, "--lr", "0", "--epochs", "1", "--steps_per_epoch", "1", "--warmup_epochs", "0"]
    assert run_cli(main, argv) == 0
    trained = load_model_state(out / "checkpoints" / "step_00000001")
    for stem in ("rgb", "ir"):  # the ImageNet stem in both stems (lr 0: unchanged by the step)
        torch.testing.assert_close(trained[f"backbone.stems.{stem}.conv1.weight"], state["conv1.weight"])
        torch.testing.assert_close(trained[f"backbone.stems.{stem}.bn1.weight"], state["bn1.weight"])
    torch.testing.assert_close(trained["backbone.layer3.0.conv2.weight"], state["layer3.0.conv2.weight"])
    assert not any(k.startswith("backbone.fc") for k in trained)
    assert (trained["backbone.NL_2.0.W.1.weight"] == 0).all()  # non-local blocks: identity init kept
    assert json.loads((out / "results.json").read_text())["init"].startswith("ImageNet ResNet-50")


def test_pass_reid_checkpoint_init(market_shards, tmp_path):
    torch.manual_seed(3)
    source = create_backbone("vit_tiny", (64, 32))
    pass_keys = to_pass_reid_state_dict(source.state_dict())
    assert "part_token1" in pass_keys and "cls_pos" in pass_keys
    checkpoint = {"teacher": {**{f"backbone.{k}": v for k, v in pass_keys.items()},
                              "head.mlp.0.weight": torch.zeros(2, 2)},
                  "student": {}, "epoch": 100, "args": argparse.Namespace(arch="vit_small")}
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    out = tmp_path / "pass"
    result = run_finetune(tiny(market_shards, out, "--init", str(path), "--lr", "0", "--epochs", "1",
                               "--steps_per_epoch", "1", "--warmup_epochs", "0", "--drop_path", "0",
                               preset="transreid-tiny"))
    trained = load_model_state(result.checkpoint)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(trained[f"backbone.{key}"], value, msg=key)
    # the same file into a 96x32 model: the 4x2 patch grid resized to 6x2 (bilinear, as load_param)
    taller = run_finetune(tiny(market_shards, tmp_path / "taller", "--init", str(path), "--image_size", "96,32",
                               "--lr", "0", "--epochs", "1", "--steps_per_epoch", "1", "--warmup_epochs", "0",
                               preset="transreid-tiny"))
    pos = load_model_state(taller.checkpoint)["backbone.patch_pos_embed"]
    grid = source.patch_pos_embed.detach().reshape(1, 4, 2, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pos, expected.permute(0, 2, 3, 1).reshape(1, 12, -1))


def test_an_export_without_non_local_blocks_loads_into_them(tmp_path):
    torch.manual_seed(0)
    plain = create_backbone("resnet_tiny_two_stream")
    path = tmp_path / "mmgl.pth"
    torch.save(plain.state_dict(), path)
    with_nl = create_backbone("resnet_tiny_two_stream", non_local=True)
    left = load_backbone_weights(with_nl, path)
    assert left and all(k.startswith(("NL_2.", "NL_3.")) for k in left)
    assert left == sorted(k for k in with_nl.state_dict() if k.startswith("NL_"))  # exactly those
    torch.testing.assert_close(with_nl.state_dict()["layer2.0.conv1.weight"], plain.state_dict()["layer2.0.conv1.weight"])
    broken = {k: v for k, v in plain.state_dict().items() if k != "layer2.0.conv1.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="1 missing key"):
        load_backbone_weights(create_backbone("resnet_tiny_two_stream", non_local=True), tmp_path / "broken.pth")
    # a state dict WITH the blocks is rebuilt with them
    torch.save(with_nl.state_dict(), tmp_path / "nl.pth")
    rebuilt, name = backbone_from_file(tmp_path / "nl.pth")
    assert name == "resnet_tiny_two_stream" and rebuilt.non_local


# --- bad input (issue 14) -----------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["--sampler", "identity", "--instances", "1"], "positive pair"),
    (["--neck", "multi"], "needs a ViT"),
    (["--drop_path", "0.1"], "applies to a ViT"),
    (["--select", "best_trial0", "--eval_every", "0"], "periodic evaluations"),
    (["--sampler", "identity", "--epoch_length", "agw"], "cross_modal"),
    (["--arch", "vit_tiny", "--non_local", "true", "--neck", "single"], "is a ViT"),
])
def test_recipe_settings_that_do_not_fit_are_refused(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        tiny("x", tmp_path / "bad", *overrides).validate()


def test_imagenet_init_of_a_vit_is_refused(market_shards, tmp_path):
    with pytest.raises(UserError, match="ImageNet ResNet-50"):
        run_finetune(tiny(market_shards, tmp_path / "bad", "--init", "imagenet:x.pth", preset="transreid-tiny"))


def test_evaluate_another_architectures_weights_and_size(sysu_shards, tmp_path):
    run_finetune(tiny(sysu_shards, tmp_path / "run", "--epochs", "1", "--steps_per_epoch", "1", "--warmup_epochs", "0"))
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert load_for_evaluation(folder, device="cpu", size=(64, 32)).size == (64, 32)  # its own size
    with pytest.raises(UserError, match="fine-tuned at 64x32"):
        load_for_evaluation(folder, device="cpu", size=(96, 48))
    document = json.loads((folder / "finetune.json").read_text())
    document["config"]["non_local"] = False  # the saved weights have the non-local blocks
    (folder / "finetune.json").write_text(json.dumps(document))
    with pytest.raises(UserError, match="do not fit") as err:
        load_for_evaluation(folder, device="cpu")
    assert "\n" not in str(err.value) and "another architecture" in str(err.value)


def test_an_exported_vit_at_a_size_it_cannot_take_is_refused(tmp_path):
    torch.save(create_backbone("vit_tiny", (64, 32)).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(UserError, match="--size 60 30: .*patch size"):
        load_for_evaluation(tmp_path / "vit.pth", device="cpu", size=(60, 30))
    assert load_for_evaluation(tmp_path / "vit.pth", device="cpu", size=(96, 32)).size == (96, 32)


def test_an_older_run_config_keeps_the_settings_that_run_had(tmp_path):
    """A config.json written before the AGW / TransReID wiring lacks the new settings: they take
    the former behaviour (no non-local blocks, single neck, the sampler's epoch), not the
    default preset's recipe, so an old TransReID run's file still resolves."""
    config = resolve_config("transreid-tiny", shards="/data", init="random")
    old = {k: v for k, v in dataclasses.asdict(config).items()
           if k not in ("non_local", "drop_path", "neck", "erase_mode", "epoch_length", "eval_schedule", "select")}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**old, "schedule": "cosine"}))
    resolved = resolve_config(None, [], path)
    assert (resolved.non_local, resolved.neck, resolved.drop_path, resolved.erase_mode) == (False, "single", 0.0, "const")
    assert (resolved.epoch_length, resolved.eval_schedule, resolved.select) == ("sampler", "count", "last")
    resolved.validate()


def test_a_256x128_export_loads_into_a_384x128_vit(tmp_path):
    """A native ViT file pre-trained at 64x32 (a 4x2 patch grid) into a 96x32 model (6x2): the
    patch position embeddings resized bilinearly as PASS_transreid's loader, the rest as is."""
    torch.manual_seed(2)
    source = create_backbone("vit_tiny", (64, 32))
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    taller = create_backbone("vit_tiny", (96, 32))
    assert load_backbone_weights(taller, tmp_path / "vit.pth") == []
    grid = source.patch_pos_embed.detach().reshape(1, 4, 2, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(taller.patch_pos_embed.detach(), expected.permute(0, 2, 3, 1).reshape(1, 12, -1))
    torch.testing.assert_close(taller.cls_token.detach(), source.cls_token.detach())
