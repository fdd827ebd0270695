"""PASS and its TransReID fine-tuning like for like (issue 12, parts B and F): the multi-neck, drop
path, and every PASS preset / recipe against the reference values written out here.

The reference values were read from CASIA-IVA-Lab/PASS-reID: ``PASS/main_pass.py`` argument
defaults and ``PASS/script/vit-{s,b}_full_lup-pass.sh`` (pre-training);
``PASS_transreid/configs/*/vit_{small,base}.yml``, ``config/defaults.py``,
``solver/scheduler_factory.py``, ``solver/make_optimizer.py``, ``datasets/make_dataloader.py``,
``model/make_model.py`` and the ``run_pass_*.sh`` scripts (fine-tuning); results from its README.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.necks import PartTokenNeck
from models.vit import vit_base, vit_small
from train.methods.pass_method import PASS_PRESETS
from train.recipes import RECIPES

# --- pre-training: main_pass.py defaults + the two run scripts -----------------------------------
PASS_REFERENCE = {
    # preset: (arch, images per GPU x 8 GPUs, dim)
    "pass_vits_lup": ("vit_small", 128),
    "pass_vitb_lup": ("vit_base", 64),
}
PASS_SHARED = {
    "train.epochs": 100, "train.optimizer": "adamw", "train.lr": 5e-4, "train.lr_scaling": "linear",
    "train.min_lr": 1e-6, "train.warmup_epochs": 10, "train.weight_decay": 0.04, "train.weight_decay_end": 0.4,
    "train.clip_grad": 3.0, "train.clip_mode": "param",
    "method.image_size": (256, 128), "method.local_size": (128, 64), "method.global_scale": (0.4, 1.0),
    "method.local_scale": (0.1, 0.8), "method.locals_per_region": 3, "method.region_starts": (0.0, 0.25, 0.5),
    "method.region_height": 0.5, "method.drop_path": 0.1, "method.out_dim": 65536, "method.hidden_dim": 2048,
    "method.bottleneck_dim": 256, "method.norm_last_layer": True, "method.student_temp": 0.1,
    "method.teacher_temp": 0.04, "method.warmup_teacher_temp_epochs": 0, "method.center_momentum": 0.9,
    "method.teacher_momentum": 0.996, "method.freeze_last_layer_epochs": 1,
    # PASS crops from the original image: the source resolution, not a 256x128 resize
    "method.input": "source",
}


@pytest.mark.parametrize("preset", sorted(PASS_REFERENCE))
def test_pass_pretraining_presets_carry_the_reference_values(preset):
    config = PASS_PRESETS[preset]()
    arch, per_gpu = PASS_REFERENCE[preset]
    values = {**{f"train.{k}": v for k, v in vars(config.train).items()},
              **{f"method.{k}": v for k, v in vars(config.method_config).items()}}
    expected = {**PASS_SHARED, "method.arch": arch, "train.batch_size": per_gpu}
    assert {k: values[k] for k in expected} == expected


# --- fine-tuning: PASS_transreid -----------------------------------------------------------------
TRANSREID_REFERENCE = {
    "drop_path": 0.1, "ids_per_batch": 16, "instances": 4, "normalization": "half", "pad": 10, "flip_p": 0.5,
    "erase_p": 0.5, "erase_mode": "pixel", "erase_area": (0.02, 1 / 3), "erase_aspect": (0.3, 1 / 0.3),
    "erase_log_aspect": True, "multi_neck": True, "label_smoothing": 0.0, "triplet": "soft", "test_feature": "pre_bn",
    "optimizer": "sgd", "momentum": 0.9, "nesterov": False, "lr": 4e-4, "bias_lr_factor": 2.0,
    "weight_decay": 1e-4, "weight_decay_bias": 1e-4, "epochs": 120, "warmup_epochs": 20,
    "warmup_start_factor": 0.01, "min_lr_factor": 0.002, "pretrain_hw_ratio": 2,
}
#: preset: (arch, dataset, input size, published (mAP, Rank-1))
TRANSREID_RUNS = {
    "transreid-market": ("vit_small", "market", (256, 128), (92.2, 96.3)),
    "transreid-market-384": ("vit_small", "market", (384, 128), (92.6, 96.8)),
    "transreid-msmt17": ("vit_small", "msmt17", (256, 128), (69.1, 86.5)),
    "transreid-msmt17-384": ("vit_small", "msmt17", (384, 128), (71.7, 87.9)),
    "transreid-vitb-market": ("vit_base", "market", (256, 128), (93.0, 96.8)),
    "transreid-vitb-market-384": ("vit_base", "market", (384, 128), (93.3, 96.9)),
    "transreid-vitb-msmt17": ("vit_base", "msmt17", (256, 128), (71.8, 88.2)),
    "transreid-vitb-msmt17-384": ("vit_base", "msmt17", (384, 128), (74.3, 89.7)),
}


@pytest.mark.parametrize("name", sorted(TRANSREID_RUNS))
def test_transreid_recipes_carry_the_reference_values(name):
    recipe = RECIPES[name]
    arch, dataset, size, published = TRANSREID_RUNS[name]
    assert {k: getattr(recipe, k) for k in TRANSREID_REFERENCE} == TRANSREID_REFERENCE
    assert (recipe.arch, recipe.dataset, recipe.image_size, recipe.published[dataset]) == (arch, dataset, size, published)
    assert recipe.batch_size == 64  # IMS_PER_BATCH, the ViT-B configs included


def test_recipe_building_blocks_use_its_values():
    recipe = RECIPES["transreid-market-384"]
    views = recipe.views()
    assert views.size == (384, 128) and views.erase_mode == "pixel" and views.erase_log_aspect
    weights, biases = recipe.lr_schedule(10), recipe.lr_schedule(10, bias=True)
    assert weights.shape == (1200,)
    assert weights[0] == pytest.approx(4e-6) and biases[0] == pytest.approx(4e-6)
    # epoch 119: lr_min 8e-7 (0.002 x 4e-4, shared) + (peak - 8e-7) (1 + cos(119 pi / 120)) / 2
    tail = (1 + math.cos(119 * math.pi / 120)) / 2
    assert weights[-1] == pytest.approx(8e-7 + (4e-4 - 8e-7) * tail)
    assert biases[-1] == pytest.approx(8e-7 + (8e-4 - 8e-7) * tail)
    assert recipe.neck(384, 751).multi_neck


# --- drop path in the ViT -------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [vit_small, vit_base])
def test_drop_path_rises_linearly_to_its_rate_as_the_reference(factory):
    """TransReID: ``dpr = torch.linspace(0, drop_path_rate, depth)`` per block, both residuals."""
    model = factory(drop_path_rate=0.1)
    rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in model.blocks]
    expected = [round(0.1 * i / 11, 12) for i in range(12)]
    assert [round(a, 12) for a, _ in rates] == expected and all(a == b for a, b in rates)


# --- the multi-neck -------------------------------------------------------------------------------

def batch_norm_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d in training mode, written out: biased batch variance."""
    mean = x.mean(dim=0)
    var = ((x - mean) ** 2).mean(dim=0)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_multi_neck_is_cat_of_bn_cls_and_the_mean_of_per_part_bns():
    torch.manual_seed(0)
    neck = PartTokenNeck(dim=6, num_parts=3, num_classes=5)
    with torch.no_grad():  # distinct affine parameters: each token type must use its own BN
        neck.cls_bn.weight.fill_(0.5)
        for k, bn in enumerate(neck.part_bns):
            bn.weight.fill_(1.0 + k)
            bn.bias.fill_(0.1 * k)
    cls, parts = torch.randn(8, 6), torch.randn(8, 3, 6)
    out = neck(cls, parts)
    assert torch.allclose(out.before, torch.cat([cls, (parts[:, 0] + parts[:, 1] + parts[:, 2]) / 3], 1))
    bn_parts = [batch_norm_train(parts[:, k], neck.part_bns[k].weight, neck.part_bns[k].bias) for k in range(3)]
    after = torch.cat([batch_norm_train(cls, neck.cls_bn.weight, neck.cls_bn.bias), sum(bn_parts) / 3], 1)
    assert torch.allclose(out.after, after, atol=1e-5)
    assert torch.allclose(out.logits, after @ neck.classifier.weight.T, atol=1e-5)
    assert out.logits.shape == (8, 5)


def test_single_neck_normalises_the_fused_feature():
    neck = PartTokenNeck(dim=4, num_parts=3, num_classes=0, multi_neck=False)
    cls, parts = torch.randn(8, 4), torch.randn(8, 3, 4)
    out = neck(cls, parts)
    assert torch.allclose(out.after, batch_norm_train(out.before, neck.fused_bn.weight, neck.fused_bn.bias), atol=1e-5)
    assert out.logits is None


def test_neck_init_frozen_biases_and_eval_mode():
    neck = PartTokenNeck(dim=4, num_parts=2, num_classes=3)
    bns = [neck.cls_bn, *neck.part_bns]
    assert all(bn.weight.eq(1).all() and bn.bias.eq(0).all() and not bn.bias.requires_grad for bn in bns)
    assert 0.0005 < neck.classifier.weight.std() < 0.002  # N(0, 0.001)
    assert neck.classifier.bias is None
    neck.eval()  # running statistics (the initial 0 / 1): the neck is then the identity
    cls, parts = torch.randn(3, 4), torch.randn(3, 2, 4)
    out = neck(cls, parts)
    assert torch.allclose(out.after, out.before / (1 + 1e-5) ** 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="part tokens"):
        neck(cls, torch.randn(3, 3, 4))
