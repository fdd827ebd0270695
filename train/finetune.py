"""Supervised ReID fine-tuning of a pre-trained (or randomly initialised) backbone, with periodic
evaluation under the dataset's protocol: ``python -m train.finetune`` / ``accelerate launch -m
train.finetune``, or :func:`run_finetune` from Python.

Recipes (presets; every field can be changed with ``--key value``)
------------------------------------------------------------------
``agw-sysu`` / ``agw-regdb`` -- RGB-IR, the AGW cross-modal baseline as MMGL ran it (``--method
agw`` of the AGW code; DESIGN.md section 5): two-stream ResNet-50 (RGB and IR stems, shared
layer1-4, last stride 1) with AGW's non-local blocks (2 in layer2, 3 in layer3, identity at init;
``--non_local false`` for the plain network), from an MMGL export, ImageNet or random init; GeM
pooling (p = 3, fixed) -> BNNeck (BatchNorm1d, bias frozen at 0) -> linear classifier without
bias (init N(0, 0.001)); loss = ID cross-entropy on the classifier logits + weighted-regularization
triplet on the pre-BN feature (``--triplet batch_hard --margin 0.3`` is AGW's "base" variant);
cross-modal identity sampler 8 ids x (4 RGB + 4 IR), an epoch of AGW's ``int(max(#RGB, #IR) / 32)
+ 1`` steps (``--epoch_length agw``); resize 288x144, pad 10 + random crop + flip, no random
erasing; SGD Nesterov momentum 0.9, weight decay 5e-4 on every parameter, lr 0.1 for BNNeck +
classifier and 0.01 for the backbone; per-epoch schedule x(e+1)/10 for epochs 0-9, x1 to 19,
x0.1 from 20, x0.01 from 50; 81 epochs. Test feature: the BN feature. Evaluated after epochs
2, 4, ..., 80 (``--eval_schedule agw``) on the trial-0 gallery; the best Rank-1 is kept
(``--select best_trial0``: ``best/``), and at the end the last epoch and that best are both
evaluated with every trial and reported side by side, labelled (the best is a test-set
selection, as the AGW code's published numbers).

``transreid-market`` (and ``-384``, ``transreid-msmt17[-384]``, ``transreid-vitb-*``) --
RGB, PASS_transreid's fine-tuning of a PASS ViT (:data:`train.recipes.RECIPES`): drop path 0.1;
feature ``cat(CLS, mean(PART_1..3))``; multi-neck (one BN per token type, the classifier on
``cat(BN(cls), mean_k BN_k(part_k))``; ``--neck single``: one BNNeck); ID cross-entropy (no label
smoothing) + soft-margin batch-hard triplet on the pre-BN feature; P x K sampler 16 x 4; 256x128
(384x128), mean = std = 0.5, pad 10 + crop + flip + timm's pixel-mode random erasing p 0.5; SGD
momentum 0.9 (no Nesterov), lr 4e-4, biases 2x lr, weight decay 1e-4 (biases too); timm's cosine
stepped per epoch (``--schedule timm_cosine``): 20 warm-up epochs from 4e-6, cosine on t/120 to
8e-7, the same absolute start and minimum for the bias group; 120 epochs. Test feature: the
pre-BN feature (``NECK_FEAT: before``), L2-normalised by the evaluation.

``agw-tiny`` / ``transreid-tiny`` -- the same code paths at toy size for tests and the CPU demo.

Evaluation: every ``eval_every`` epochs and at the end, with :func:`train.evaluation.protocols.evaluate`
(SYSU-MM01: all-search, ``eval_trials`` galleries; RegDB: the trained trial, both directions;
Market-style layouts: the market rule). Every process embeds its part of the test images
(:func:`train.runtime.gather_rows` collects them) and process 0 ranks, so with several processes no one waits
at a collective for a whole evaluation. The final table is printed once, after the bar closes.

Losses are checked every ``log_every`` steps, at epoch ends and before every checkpoint, as in
pre-training (:class:`train.runtime.LossCheck`): a non-finite loss stops the run
(:class:`train.runtime.NonFiniteLoss`; the command exits with status 3) naming the step and the
losses, and no checkpoint is written after it. Bad settings exit with status 2.

Outputs (``output_dir``): ``config.json``; ``checkpoints/step_N/`` (:mod:`train.checkpointing`:
``model.safetensors`` = :class:`models.reid.ReIDModel` state dict, optimizer, random states, the source's
position, ``trainer_state.json`` with the history, ``finetune.json`` = config + class count);
``metrics.jsonl`` (one JSON object per logged step / epoch / evaluation); ``tensorboard/``;
``results.json`` (final metrics: ``results`` of the reported model, ``last`` and, with ``--select
best_trial0``, ``best_trial0``); ``best/`` (the best trial-0 checkpoint's weights and documents).
A checkpoint folder, ``best/`` or the run folder is what ``python -m train.evaluate --checkpoint``
takes.

Initialisation (``--init``, :func:`models.initialisation.initialise_backbone`): ``random``;
``imagenet:PATH`` (a torchvision / timm ImageNet ResNet-50 state dict: ``fc`` dropped, the stem
into both stems, as AGW's baseline); an official PASS-reID file (a ``main_pass.py`` checkpoint's
``teacher`` or the converted PASS_transreid layout, read safely, position embeddings resized to
the run's size); or a backbone file with this project's module names (:mod:`models.weights`, as
``reid-export --format native`` writes), possibly nested under ``state_dict`` / ``model`` /
``backbone`` or prefixed ``backbone.`` / ``module.``. Every backbone weight must be present but
AGW's non-local blocks (an MMGL export has none: they keep their identity init, as AGW's
``strict=False`` load leaves them); other missing or unexpected keys are an error naming them.
Only the backbone is loaded; the neck and classifier start fresh.

Label-scarce fine-tuning (``--label_fraction F``): only ``round(F x training ids)`` identities,
drawn by ``--seed`` (:func:`labelled_ids`), are sampled and classified; the other training
images are unused here (a self-supervised pre-training may have seen them without labels).

On SYSU-layout shards ``results.json`` also holds ``same_modality``: RGB->RGB retrieval (other
camera) among the test identities' RGB images, a reference figure beside the protocol's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from common.cli import ArgumentParser, run_cli
from common.errors import UserError
from common.modality import MODALITY_CODE
from models.registry import backbone_entry, create_backbone
from models.reid import ReIDModel
from models.initialisation import initialise_backbone
from models.weights import backbone_from_file
from pipelines.samplers import CrossModalSampler, IdentitySampler, agw_epoch_length
from pipelines.sources import make_source
from pipelines.sources.base import seed_of
from pipelines.views.finetune import FinetuneViews
from shards.manifest import Manifest, load_manifest
from shards.remote import local_shards
from train.checkpointing import (
    CHECKPOINTS,
    MODEL_FILE,
    STATE_FILE,
    Checkpointer,
    load_model_state,
    read_json,
    resolve_checkpoint,
)
from train.evaluation.protocols import (
    PROTOCOLS,
    ProtocolResult,
    Ranking,
    Rerank,
    check_protocol,
    default_protocol,
    evaluate,
    format_table,
    same_modality,
)
from train.losses.triplet import batch_hard_triplet, weighted_regularized_triplet
from train.recipes import RECIPES, TransReIDRecipe
from train.runtime import (
    EXIT_STATUS_HELP,
    LossCheck,
    MetricsLogger,
    NonFiniteLoss,
    check_run_dir,
    gather_rows,
    make_accelerator,
    trackers_of,
    non_finite_exit,
)
from train.schedules import cosine_schedule, timm_cosine_epoch_schedule
from train.settings import (
    from_dict,
    parse_value,
    presets_help,
    read_config_file,
    setting,
    setting_pairs,
    settings_help,
    settings_tokens,
)

FORMAT = "reid-finetune/1"
DOCUMENT = "finetune.json"
CONFIG_FILE = "config.json"
#: The losses logged and checked every ``log_every`` steps, in this order.
LOSS_NAMES = ("loss", "id_loss", "triplet_loss")

# --------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------

#: The names of :data:`models.registry.BACKBONES` (a test checks they agree).
Arch = Literal["resnet50_two_stream", "resnet50", "resnet_narrow_two_stream", "resnet_narrow", "resnet_tiny_two_stream", "resnet_tiny", "vit_small", "vit_base",
               "vit_tiny"]


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (module docstring for the recipes)."""

    # data and model
    shards: str = setting("", "shard folder built by ``python -m shards build``")
    init: str = setting("random", "``random``, ``imagenet:PATH`` or a backbone / PASS-reID file (module docstring)")
    arch: Arch = setting("resnet50_two_stream", "backbone architecture")
    non_local: bool = setting(False, "ResNet: AGW's non-local blocks (2 in layer2, 3 in layer3, identity at init)")
    drop_path: float = setting(0.0, "ViT: stochastic depth, rising linearly over the blocks to this rate")
    neck: Literal["single", "multi"] = setting("single", "single: one BNNeck over the feature; multi (ViT): one BN "
                                               "per token type, PASS_transreid's multi-neck")
    image_size: tuple[int, int] = setting((288, 144), "training and test input, height,width")
    normalization: Literal["imagenet", "half"] = setting("imagenet", "input normalization: ImageNet mean/std, "
                                                         "or half (mean = std = 0.5, the PASS convention)")
    pad: int = setting(10, "zero padding before the random crop, in pixels")
    flip_p: float = setting(0.5, "probability of a horizontal flip")
    erase_p: float = setting(0.0, "probability of random erasing")
    erase_mode: Literal["const", "pixel"] = setting("const", "const: Zhong et al.'s erasing (area 2-40%, fill 0); "
                                                    "pixel: timm's (area 2%-1/3, log-uniform aspect, N(0,1) noise)")
    sampler: Literal["cross_modal", "identity"] = setting("cross_modal", "cross_modal: P ids x (K RGB + K IR); "
                                                          "identity: P ids x K images")
    ids_per_batch: int = setting(8, "P, identities per batch")
    instances: int = setting(4, "K, images per identity (per modality for the cross-modal sampler)")
    source: Literal["auto", "dali", "wds", "cache"] = setting("cache", "image source; identity samplers need the "
                                                              "cache (see pipelines.sources.make_source)")
    regdb_trial: int = setting(1, "RegDB: which trial's training identities to train on")
    label_fraction: float = setting(1.0, "train on the labels of this fraction of the training identities (the "
                                    "label-scarce setting; which ones: drawn by --seed, so equal seeds pick the "
                                    "same identities); 1: all")
    # loss
    triplet: Literal["weighted", "batch_hard", "soft"] = setting("weighted", "triplet loss: weighted-regularization "
                                                                 "(AGW), batch_hard with margin, or soft (batch-hard, "
                                                                 "soft margin)")
    margin: float = setting(0.3, "triplet margin (batch_hard only)")
    label_smoothing: float = setting(0.0, "label smoothing of the ID cross-entropy")
    triplet_weight: float = setting(1.0, "loss = ID cross-entropy + this x triplet")
    # optimizer and schedule
    epochs: int = setting(80, "epochs of the schedule")
    steps_per_epoch: int = setting(0, "0: the epoch of --epoch_length; else at most this many steps per epoch")
    epoch_length: Literal["sampler", "agw"] = setting("sampler", "sampler: about one pass over the images in groups of "
                                                      "K; agw: int(max(#RGB, #IR) / (P x K)) + 1 steps (AGW's count)")
    max_steps: int = setting(0, "stop after this many steps of the schedule (0: all)")
    lr: float = setting(0.1, "learning rate of BNNeck + classifier")
    backbone_lr_factor: float = setting(0.1, "backbone lr = lr x this")
    bias_lr_factor: float = setting(1.0, "bias lr = the group's lr x this")
    weight_decay: float = setting(5e-4, "SGD weight decay of the weights")
    weight_decay_bias: float = setting(5e-4, "SGD weight decay of the biases")
    momentum: float = setting(0.9, "SGD momentum")
    nesterov: bool = setting(True, "Nesterov momentum")
    schedule: Literal["agw_step", "cosine", "timm_cosine"] = setting(
        "agw_step", "agw_step: per-epoch warm-up then steps at the milestones; cosine: per-step warm-up then cosine; "
        "timm_cosine: timm's CosineLRScheduler stepped per epoch, every group from the same absolute warm-up start "
        "and minimum (TransReID)")
    warmup_epochs: float = setting(10.0, "epochs of learning-rate warm-up")
    milestones: tuple[int, int] = setting((20, 50), "agw_step: x0.1 from the first epoch, x0.01 from the second")
    warmup_start: float = setting(0.01, "cosine schedules: the warm-up starts at lr x this")
    min_lr_factor: float = setting(0.002, "cosine schedules: end at lr x this")
    clip_grad: float = setting(0.0, "global gradient-norm clip (0: off; neither recipe clips)")
    precision: Literal["no", "bf16", "fp16"] = setting("no", "autocast dtype through accelerate")
    seed: int = setting(0, "seeds the model init, the data order and the augmentations")
    # evaluation
    protocol: Optional[Literal["market", "sysu", "sysu-indoor", "sysu-multi", "sysu-indoor-multi", "regdb"]] = setting(
        None, "evaluation protocol (none: the shard layout's)")
    eval_every: int = setting(10, "epochs between evaluations (0: only at the end)")
    eval_schedule: Literal["count", "agw"] = setting("count", "count: after every eval_every-th epoch; agw: after "
                                                     "epoch e (0-based) when e > 0 and e % eval_every == 0")
    select: Literal["last", "best_trial0"] = setting(
        "last", "the reported model: last (the last epoch) or best_trial0 (the best Rank-1 of the periodic "
        "evaluations, on the trial-0 gallery: a test-set selection, as the AGW code); both are reported when "
        "best_trial0 is tracked")
    eval_trials: int = setting(10, "SYSU-MM01: random gallery trials")
    eval_feature: Literal["bn", "pre_bn"] = setting("bn", "test feature: after (bn) or before (pre_bn) the BNNeck")
    eval_flip: bool = setting(False, "average the features of each test image and its mirror")
    eval_batch_size: int = setting(128, "images per feature-extraction batch")
    eval_rerank: bool = setting(False, "k-reciprocal re-ranking of the evaluation's distances (Zhong et al. 2017)")
    rerank_k1: int = setting(20, "re-ranking k1 (the paper's 20)")
    rerank_k2: int = setting(6, "re-ranking k2 (the paper's 6)")
    rerank_lambda: float = setting(0.3, "re-ranking lambda, the weight of the original distance (the paper's 0.3)")
    # outputs
    output_dir: str = setting("runs/finetune", "run folder: config.json, metrics.jsonl, results.json, "
                                               "tensorboard/, checkpoints/")
    checkpoint_every_epochs: int = setting(1, "epochs between checkpoints (0: only at the end)")
    keep_last: int = setting(2, "complete checkpoints kept; older ones are deleted")
    log_every: int = setting(20, "steps between metric lines (also how often losses are checked)")
    tensorboard: bool = setting(True, "false: no tracker, whatever log_with says (metrics.jsonl only)")
    log_with: str = setting("tensorboard", "experiment trackers (accelerate's): tensorboard (in output_dir/tensorboard), "
                                           "wandb, mlflow, several comma-separated, or none")
    progress_bar: bool = setting(True, "tqdm bars for training and feature extraction (process 0)")

    @property
    def rerank(self) -> Rerank | None:
        """The evaluation's re-ranking settings (None: off)."""
        return Rerank(self.rerank_k1, self.rerank_k2, self.rerank_lambda) if self.eval_rerank else None

    @property
    def batch_size(self) -> int:
        """Images per process and step."""
        return self.ids_per_batch * self.instances * (2 if self.sampler == "cross_modal" else 1)

    def validate(self) -> None:
        """Refuse impossible settings with a :class:`UserError` before anything is built."""
        if not self.shards:
            raise UserError("no shard folder given: pass --shards DIR (built by `python -m shards build`)")
        at_least_one = {"epochs": self.epochs, "ids_per_batch": self.ids_per_batch, "instances": self.instances,
                        "eval_trials": self.eval_trials, "eval_batch_size": self.eval_batch_size,
                        "keep_last": self.keep_last, "log_every": self.log_every}
        for key, value in at_least_one.items():
            if value < 1:
                raise UserError(f"--{key} must be at least 1, got {value}")
        non_negative = {"lr": self.lr, "weight_decay": self.weight_decay, "warmup_epochs": self.warmup_epochs,
                        "steps_per_epoch": self.steps_per_epoch, "max_steps": self.max_steps, "pad": self.pad,
                        "eval_every": self.eval_every, "clip_grad": self.clip_grad, "margin": self.margin}
        for key, value in non_negative.items():
            if value < 0:
                raise UserError(f"--{key} must not be negative, got {value}")
        if self.ids_per_batch < 2:
            raise UserError("--ids_per_batch must be at least 2: the triplet loss needs two identities per batch")
        if self.instances < 2 and self.sampler != "cross_modal" and self.triplet_weight > 0:
            raise UserError("--instances must be at least 2: with one image per identity a batch has no positive "
                            "pair for the triplet loss (or set --triplet_weight 0)")
        if min(self.image_size) < 16:
            raise UserError(f"--image_size {self.image_size} is too small (at least 16 x 16)")
        if backbone_entry(self.arch).family == "vit" and (self.image_size[0] % 16 or self.image_size[1] % 16):
            raise UserError(f"--image_size {self.image_size}: a ViT needs multiples of its 16-pixel patch")
        Rerank(self.rerank_k1, self.rerank_k2, self.rerank_lambda)  # refuses bad values, used or not
        if not 0 < self.label_fraction <= 1:
            raise UserError(f"--label_fraction {self.label_fraction}: expected a fraction in (0, 1]")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"--warmup_epochs {self.warmup_epochs} is longer than the run ({self.epochs} epochs)")
        self._validate_recipe()

    def _validate_recipe(self) -> None:
        """Settings that only make sense together (DESIGN.md section 8: refused before training)."""
        family = backbone_entry(self.arch).family
        if self.non_local and family != "resnet":
            raise UserError(f"--non_local true adds AGW's blocks to a ResNet; --arch {self.arch} is a ViT")
        if not 0 <= self.drop_path < 1:
            raise UserError(f"--drop_path must be in [0, 1), got {self.drop_path}")
        if self.drop_path and family != "vit":
            raise UserError(f"--drop_path applies to a ViT; --arch {self.arch} is a ResNet")
        if self.neck == "multi" and family != "vit":
            raise UserError(f"--neck multi needs a ViT's [PART] tokens; --arch {self.arch} is a ResNet "
                            "(use --neck single)")
        if self.epoch_length == "agw" and self.sampler != "cross_modal":
            raise UserError("--epoch_length agw counts AGW's cross-modal batches; use it with --sampler cross_modal")
        if self.schedule == "timm_cosine" and self.warmup_epochs != int(self.warmup_epochs):
            raise UserError(f"--schedule timm_cosine moves once per epoch: --warmup_epochs must be a whole number, "
                            f"got {self.warmup_epochs}")
        if self.select == "best_trial0" and not self.eval_every:
            raise UserError("--select best_trial0 picks among the periodic evaluations: set --eval_every to 1 or more")

    @property
    def tracks_best(self) -> bool:
        """Whether the periodic evaluations select a best checkpoint (``select best_trial0``)."""
        return self.select == "best_trial0"


def _agw(**changes: Any) -> FinetuneConfig:
    """The AGW recipe (DESIGN.md section 5, ``--method agw`` of the AGW code, as MMGL ran it)."""
    base = FinetuneConfig(non_local=True, epoch_length="agw", epochs=81, eval_schedule="agw", eval_every=2,
                          select="best_trial0")
    return dataclasses.replace(base, **changes)


def _transreid(recipe: TransReIDRecipe = RECIPES["transreid-market"], **changes: Any) -> FinetuneConfig:
    """A PASS_transreid run (:data:`train.recipes.RECIPES`) as fine-tuning settings."""
    base = FinetuneConfig(
        arch=recipe.arch, image_size=recipe.image_size, drop_path=recipe.drop_path,
        neck="multi" if recipe.multi_neck else "single", normalization=recipe.normalization, pad=recipe.pad,
        flip_p=recipe.flip_p, erase_p=recipe.erase_p, erase_mode=recipe.erase_mode, sampler="identity",
        ids_per_batch=recipe.ids_per_batch, instances=recipe.instances, triplet=recipe.triplet,
        label_smoothing=recipe.label_smoothing, epochs=recipe.epochs, lr=recipe.lr, backbone_lr_factor=1.0,
        bias_lr_factor=recipe.bias_lr_factor, weight_decay=recipe.weight_decay,
        weight_decay_bias=recipe.weight_decay_bias, momentum=recipe.momentum, nesterov=recipe.nesterov,
        schedule="timm_cosine", warmup_epochs=recipe.warmup_epochs, warmup_start=recipe.warmup_start_factor,
        min_lr_factor=recipe.min_lr_factor, eval_every=20, eval_feature=recipe.test_feature, protocol="market",
        output_dir="runs/finetune-transreid")
    return dataclasses.replace(base, **changes)


_TINY = dict(image_size=(64, 32), pad=4, ids_per_batch=2, instances=2, epochs=2, steps_per_epoch=4,
             warmup_epochs=1, eval_every=0, eval_trials=2, eval_batch_size=64, log_every=2, keep_last=2)

def agw_sysu() -> FinetuneConfig:
    """AGW's RGB-IR recipe on SYSU-MM01: two-stream ResNet-50 with non-local blocks, 8 ids x
    (4 RGB + 4 IR), SGD Nesterov, lr 0.1 (backbone 0.01) with AGW's step schedule, 81 epochs of
    AGW's length (696 steps); evaluated every 2 epochs on the trial-0 gallery, the best Rank-1
    kept; both the last and that best reported with 10 trials; all-search protocol."""
    return _agw(protocol="sysu", output_dir="runs/finetune-agw-sysu")


def agw_regdb() -> FinetuneConfig:
    """AGW's RGB-IR recipe on RegDB, trained on the identities of trial ``regdb_trial`` and
    evaluated on its test identities, both directions (the best selected on visible->thermal)."""
    return _agw(protocol="regdb", output_dir="runs/finetune-agw-regdb")


def _transreid_preset(name: str) -> Callable[[], FinetuneConfig]:
    recipe = RECIPES[name]

    def preset() -> FinetuneConfig:
        return _transreid(recipe, output_dir=f"runs/finetune-{name}")

    size = "x".join(map(str, recipe.image_size))
    preset.__doc__ = (f"PASS_transreid's {recipe.arch} recipe on {recipe.dataset} at {size}: multi-neck, drop path "
                      f"{recipe.drop_path}, 16 ids x 4, timm cosine per epoch (peak {recipe.lr:g}, biases x "
                      f"{recipe.bias_lr_factor:g}), {recipe.epochs} epochs (train/recipes.py)")
    return preset


def agw_tiny() -> FinetuneConfig:
    """The AGW code path at toy size (width-8 two-stream ResNet with non-local blocks, 64x32, 2
    epochs of at most 4 steps, the last epoch reported): tests and the CPU demo."""
    return _agw(arch="resnet_tiny_two_stream", milestones=(1, 2), output_dir="runs/finetune-agw-tiny",
                select="last", **_TINY)


def transreid_tiny() -> FinetuneConfig:
    """The TransReID code path at toy size (2-block ViT, 64x32, 2 epochs of 4 steps): tests and
    the CPU demo."""
    return _transreid(arch="vit_tiny", **{**_TINY, "ids_per_batch": 4}, output_dir="runs/finetune-transreid-tiny")


PRESETS: dict[str, Callable[[], FinetuneConfig]] = {
    "agw-sysu": agw_sysu,
    "agw-regdb": agw_regdb,
    **{name: _transreid_preset(name) for name in RECIPES},
    "agw-tiny": agw_tiny,
    "transreid-tiny": transreid_tiny,
}


DEFAULT_PRESET = "agw-sysu"
#: Settings every run's ``config.json`` has held since the first version: a file with all of them
#: is a run's configuration (:func:`resolve_config`).
RUN_CONFIG_KEYS = frozenset({"shards", "init", "arch", "image_size", "sampler", "triplet", "schedule", "eval_feature",
                             "output_dir"})


def resolve_config(preset: Optional[str], overrides: list[str] = (), config_file: Optional[str | Path] = None,
                   **values: Any) -> FinetuneConfig:
    """The preset (``preset``, else the file's ``preset`` key, else :data:`DEFAULT_PRESET`), then
    the settings of ``config_file`` (JSON or YAML: a run's ``config.json`` or a hand-written
    ``key: value`` file), then keyword ``values``, then ``--key value`` ``overrides`` (typed as in
    :mod:`train.settings`; an unknown key or bad value is a :class:`UserError`)."""
    file_values = read_config_file(config_file) if config_file is not None else {}
    named = preset or file_values.pop("preset", None)
    preset = named or DEFAULT_PRESET
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; expected one of: {', '.join(PRESETS)}")
    # A run's config.json from before a setting existed: that setting keeps the value the run had
    # (the dataclass default, the former behaviour), not the default preset's newer recipe value.
    config = FinetuneConfig() if not named and RUN_CONFIG_KEYS <= set(file_values) else PRESETS[preset]()
    apply_settings(config, settings_tokens(file_values))
    config = dataclasses.replace(config, **values)
    apply_settings(config, list(overrides))
    return config


def apply_settings(config: FinetuneConfig, tokens: list[str]) -> None:
    """Set the ``--key value`` settings of ``tokens`` on ``config`` (dashes in keys count as
    underscores)."""
    for key, text in setting_pairs(tokens):
        name = key.replace("-", "_")
        setattr(config, name, parse_value(config, name, text, key))


def config_document(config: FinetuneConfig) -> str:
    """The run's ``config.json``: every setting, what ``--config`` reads back to the same config."""
    return json.dumps(dataclasses.asdict(config), indent=2) + "\n"


# --------------------------------------------------------------------------------------------
# Data: protocol, training identities, source
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The training split, its sampler and the pid -> class map (sorted ``pids`` ``(C,)``)."""

    split: str
    protocol: str
    pids: torch.Tensor
    sampler: Callable | str

    @property
    def num_classes(self) -> int:
        return int(self.pids.numel())


def training_data(config: FinetuneConfig, manifest: Manifest, rank: int, world: int) -> TrainingData:
    """Which split and identities to train on, checked against the sampler (DESIGN.md section 8)."""
    protocol = config.protocol or default_protocol(manifest)
    check_protocol(manifest, config.shards, protocol)
    if PROTOCOLS[protocol].trained_per_trial:
        trials = {t.trial: t for t in manifest.trials}
        if config.regdb_trial not in trials:
            raise UserError(f"--regdb_trial {config.regdb_trial} is not in the manifest (it has {sorted(trials)})")
        pids = torch.tensor(sorted(trials[config.regdb_trial].train_ids), dtype=torch.int64)
        if config.sampler != "cross_modal":
            raise UserError("RegDB fine-tuning uses --sampler cross_modal (the trial's identities are selected by it)")
        return TrainingData("all", protocol, pids, cross_modal_sampler(config, rank, world, pids))
    if not manifest.shards_of("train"):
        raise UserError(f"{config.shards} has no 'train' split to fine-tune on")
    pids = torch.tensor(labelled_ids(sorted(manifest.pid_to_label), config.label_fraction, config.seed),
                        dtype=torch.int64)
    if config.sampler == "cross_modal" and set(manifest.splits["train"].modalities) != {"rgb", "ir"}:
        have = ", ".join(manifest.splits["train"].modalities) or "none"
        raise UserError(f"the cross-modal sampler needs RGB and infrared training images; {config.shards} has: {have} "
                        "(use --sampler identity for RGB-only data)")
    if config.label_fraction < 1 and len(pids) < config.ids_per_batch:
        raise UserError(f"--label_fraction {config.label_fraction} keeps {len(pids)} identities, fewer than a batch's "
                        f"{config.ids_per_batch} (--ids_per_batch)")
    scarce = config.label_fraction < 1
    if config.sampler == "cross_modal" and (config.epoch_length == "agw" or scarce):
        # label-scarce: only the labelled identities' images are drawn (the others are the unlabelled pool)
        return TrainingData("train", protocol, pids, cross_modal_sampler(config, rank, world, pids if scarce else None))
    if not scarce:
        return TrainingData("train", protocol, pids, config.sampler)

    def labelled_sampler(cached):
        keep = torch.isin(cached.pid.cpu(), pids)
        return IdentitySampler(cached.pid.cpu(), config.batch_size, config.instances, seed=config.seed, rank=rank,
                               world=world, keep=keep)

    return TrainingData("train", protocol, pids, labelled_sampler)


def labelled_ids(pids: list[int], fraction: float, seed: int) -> list[int]:
    """The sorted training identities whose labels a label-scarce run uses: ``round(fraction x
    len(pids))`` of them (at least 2), drawn by ``random.Random(seed)``; all of them at 1."""
    if fraction >= 1:
        return list(pids)
    count = max(2, round(fraction * len(pids)))
    return sorted(random.Random(seed).sample(list(pids), count))


def cross_modal_sampler(config: FinetuneConfig, rank: int, world: int,
                        pids: Optional[torch.Tensor] = None) -> Callable[[Any], CrossModalSampler]:
    """The cross-modal sampler of the cached split, over the identities ``pids`` (all when None),
    its epoch AGW's count when ``epoch_length`` is ``agw`` (:func:`pipelines.samplers.agw_epoch_length`,
    N = max(#RGB, #IR) training images)."""

    def build(cached) -> CrossModalSampler:
        modality = cached.modality.cpu()
        if pids is not None:  # rows of other identities get a code the sampler ignores (neither 0 nor 1)
            modality = modality.masked_fill(~torch.isin(cached.pid.cpu(), pids), -1)
        epoch_batches = None
        if config.epoch_length == "agw":
            counts = [int((modality == MODALITY_CODE[m]).sum()) for m in ("rgb", "ir")]
            epoch_batches = agw_epoch_length(*counts, config.ids_per_batch, config.instances)
        return CrossModalSampler(cached.pid.cpu(), modality, config.batch_size, config.instances, seed=config.seed,
                                 rank=rank, world=world, epoch_batches=epoch_batches)

    return build


def class_labels(pids: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset pids ``(B,)`` -> class indices ``(B,)`` in the sorted ``known`` pids ``(C,)``, and
    a 0-d bool tensor, True when a pid is not in ``known``. The flag stays on the device (the
    loop checks it with the loss at logging steps): no host synchronization per step."""
    labels = torch.searchsorted(known, pids).clamp(max=known.numel() - 1)
    return labels, (known[labels] != pids).any()


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def parameter_groups(model: ReIDModel, config: FinetuneConfig) -> list[dict]:
    """SGD groups: backbone / head x weights / biases, each with its ``base_lr`` and decay."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name.startswith("backbone."), name.endswith("bias")), []).append(param)
    result = []
    for (in_backbone, is_bias), params in groups.items():
        lr = config.lr * (config.backbone_lr_factor if in_backbone else 1.0) * (config.bias_lr_factor if is_bias else 1.0)
        decay = config.weight_decay_bias if is_bias else config.weight_decay
        result.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": decay})
    return result


def lr_factors(config: FinetuneConfig, steps_per_epoch: int) -> np.ndarray:
    """Multiplier of ``lr`` at each step ``(epochs * steps_per_epoch,)``: the schedule of a group
    whose peak is ``lr`` (:func:`lr_schedule` divided by ``lr``).

    ``agw_step``: per epoch e, ``(e + 1) / warmup`` during the warm-up, then 1, 0.1 from
    ``milestones[0]``, 0.01 from ``milestones[1]``. ``cosine``: :func:`train.schedules.cosine_schedule`
    from ``warmup_start`` up to 1 over the warm-up, then down to ``min_lr_factor``, every step.
    ``timm_cosine``: :func:`train.schedules.timm_cosine_epoch_schedule`, once per epoch.
    """
    if config.schedule == "cosine":
        return cosine_schedule(1.0, config.min_lr_factor, config.epochs, steps_per_epoch, config.warmup_epochs,
                               config.warmup_start)
    if config.schedule == "timm_cosine":
        return lr_schedule(config, steps_per_epoch, config.lr) / config.lr
    epoch = np.arange(config.epochs * steps_per_epoch) // steps_per_epoch
    factor = np.where(epoch >= config.milestones[0], 0.1, 1.0)
    factor = np.where(epoch >= config.milestones[1], 0.01, factor)
    if config.warmup_epochs > 0:
        factor = np.where(epoch < config.warmup_epochs, (epoch + 1) / config.warmup_epochs, factor)
    return factor.astype(np.float64)


def lr_schedule(config: FinetuneConfig, steps_per_epoch: int, peak: float) -> np.ndarray:
    """The learning rate of a parameter group whose peak is ``peak``, at each step.

    ``timm_cosine`` (TransReID): every group warms up from the same absolute ``warmup_start x
    lr`` and decays to the same ``min_lr_factor x lr`` (the reference gives timm's scheduler
    absolute values), so a group with another peak (biases: 2 x lr) has its own curve between
    them. The other schedules scale one curve by the group's peak.
    """
    if config.schedule == "timm_cosine":
        return timm_cosine_epoch_schedule(peak, config.epochs, steps_per_epoch, int(config.warmup_epochs),
                                          config.warmup_start * config.lr, config.min_lr_factor * config.lr)
    return peak * lr_factors(config, steps_per_epoch)


def triplet_loss(config: FinetuneConfig, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if config.triplet == "weighted":
        return weighted_regularized_triplet(features, labels)
    return batch_hard_triplet(features, labels, margin=config.margin if config.triplet == "batch_hard" else None)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """``metrics``: the final evaluation of the reported model (``select``; process 0; ``[]`` on
    the others); ``history``: one entry per epoch (``kind: train``: mean losses, lr, images/s)
    and per evaluation (``kind: eval``: R1, mAP, mINP...), the curve data; ``checkpoint``: the
    last checkpoint folder (``train.evaluate --checkpoint`` takes it). With ``select
    best_trial0``: ``last`` and ``best`` are the full evaluations of the last epoch and of the
    best one (``best_epoch``, 0-based; ``best`` is ``[]`` when no periodic evaluation ran)."""

    metrics: list[ProtocolResult]
    history: list[dict]
    output_dir: Path
    checkpoint: Path
    seconds: float = 0.0
    selected: str = "last"
    last: list[ProtocolResult] = field(default_factory=list)
    best: list[ProtocolResult] = field(default_factory=list)
    best_epoch: Optional[int] = None

    def summary(self) -> dict[str, dict[str, float]]:
        return {r.setting: r.summary() for r in self.metrics}


class EpochMeter:
    """Running sums of the losses ``(3,)`` (on the device) and images since the epoch (or the
    resumed part of it) began: the means and images/s of the step lines and the epoch record."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(LOSS_NAMES), dtype=torch.float64, device=device)
        self.count, self.images, self.tick = 0, 0, time.perf_counter()

    def add(self, losses: torch.Tensor, images: int) -> None:
        self.sums += losses.double()
        self.count += 1
        self.images += images

    def means(self) -> list[float]:
        return (self.sums / max(self.count, 1)).tolist()

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.tick, 1e-9)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, accelerator, config: FinetuneConfig,
                  inputs: torch.Tensor, modality: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One SGD step on ready views ``(B, 3, H, W)``: ID cross-entropy on the BN logits + weighted
    triplet on the pre-BN feature. Returns the detached losses ``(3,)`` (:data:`LOSS_NAMES`)."""
    with accelerator.autocast():
        features, logits = model(inputs, modality)
        id_loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        tri_loss = triplet_loss(config, features.float(), labels)
        loss = id_loss + config.triplet_weight * tri_loss
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if config.clip_grad > 0:
        accelerator.clip_grad_norm_(model.parameters(), config.clip_grad)
    optimizer.step()
    return torch.stack([loss.detach(), id_loss.detach(), tri_loss.detach()]).float()


def check_pending(losses: LossCheck, unknown_pid: torch.Tensor) -> None:
    """Stop on a non-finite loss since the last check, as pre-training does (one transfer), or
    on a batch identity outside the training identities (a sampler bug)."""
    if bool(unknown_pid):
        raise RuntimeError("a training batch held an identity outside the training identities (a sampler bug)")
    losses.check()


def evaluate_model(accelerator, model: nn.Module, config: FinetuneConfig, protocol: str,
                   trials: Optional[int] = None) -> list[ProtocolResult]:
    """Evaluate on every process (each embeds its part of the test images; process 0 ranks and
    the others get ``[]``): no process waits for another's whole extraction at a collective,
    whose timeout a long evaluation could otherwise exceed. ``trials``: SYSU-MM01 galleries
    (default ``eval_trials``; 1 is the trial-0 gallery the AGW code selects on)."""
    module: ReIDModel = accelerator.unwrap_model(model)
    views = FinetuneViews(tuple(config.image_size), normalization=config.normalization)
    was_training = module.training
    module.eval()
    try:
        return evaluate(lambda v, m: module.embed(v, m, config.eval_feature), config.shards, protocol,
                        size=tuple(config.image_size), transform=views.eval_views,
                        trials=trials or config.eval_trials,
                        regdb_trials=[config.regdb_trial] if PROTOCOLS[protocol].trained_per_trial else None,
                        batch_size=config.eval_batch_size, device=accelerator.device, flip=config.eval_flip,
                        source="auto" if config.source == "cache" else config.source,
                        rank=accelerator.process_index, world=accelerator.num_processes,
                        gather=gather_rows(accelerator), progress=config.progress_bar,
                        ranking=Ranking(rerank=config.rerank))
    finally:
        module.train(was_training)


def evaluation_due(config: FinetuneConfig, epoch: int) -> bool:
    """Whether a periodic evaluation follows epoch ``epoch`` (0-based): ``count``: after every
    ``eval_every``-th epoch; ``agw``: ``epoch > 0 and epoch % eval_every == 0``, as the AGW
    code's ``train.py`` (epochs 2, 4, ..., 80 of ``range(0, 81)``)."""
    if not config.eval_every:
        return False
    if config.eval_schedule == "agw":
        return epoch > 0 and epoch % config.eval_every == 0
    return (epoch + 1) % config.eval_every == 0


def selection_rank1(results: list[ProtocolResult]) -> float:
    """The score the best checkpoint is selected by: Rank-1 of the first trial (SYSU-MM01: the
    trial-0 gallery; RegDB: the trained trial) of the first setting (RegDB: visible->thermal,
    AGW's test mode)."""
    return float(results[0].per_trial[0]["R1"])


# --------------------------------------------------------------------------------------------
# The best checkpoint (``select best_trial0``)
# --------------------------------------------------------------------------------------------

BEST = "best"
#: How the two reported models are labelled, in results.json and on the console.
LAST_LABEL = "last epoch"
BEST_LABEL = "best R1 on trial 0 (test-selected, as the AGW code)"


def save_best(folder: Path, module: ReIDModel, document: dict, info: dict) -> None:
    """Write the best model so far to ``folder`` (``model.safetensors``, ``finetune.json``,
    ``trainer_state.json`` = ``info``), replacing the previous one only once the new one is
    complete. ``reid-evaluate --checkpoint folder`` takes it."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp / MODEL_FILE))
    (tmp / DOCUMENT).write_text(json.dumps(document, indent=1) + "\n")
    (tmp / STATE_FILE).write_text(json.dumps(info, indent=1) + "\n")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def same_modality_of_model(accelerator, model: nn.Module, config: FinetuneConfig) -> Optional[dict]:
    """RGB->RGB (other camera) retrieval on SYSU-layout shards (a reference figure beside the
    protocol's; :func:`~train.evaluation.protocols.same_modality`), None for other layouts."""
    module: ReIDModel = accelerator.unwrap_model(model)
    views = FinetuneViews(tuple(config.image_size), normalization=config.normalization)
    was_training = module.training
    module.eval()
    try:
        return same_modality(lambda v, m: module.embed(v, m, config.eval_feature), config.shards,
                             size=tuple(config.image_size), transform=views.eval_views,
                             batch_size=config.eval_batch_size, device=accelerator.device, flip=config.eval_flip,
                             source="auto" if config.source == "cache" else config.source,
                             rank=accelerator.process_index, world=accelerator.num_processes,
                             gather=gather_rows(accelerator), progress=config.progress_bar)
    finally:
        module.train(was_training)


def _eval_line(results: list[ProtocolResult], epoch: int) -> str:
    """A periodic evaluation in one line (the full table is printed once, at the end)."""
    scores = "; ".join(f"{r.setting} R1 {100 * r.rank(1):.2f} mAP {100 * r.mAP:.2f}" for r in results)
    return f"evaluation after epoch {epoch + 1}: {scores}"


def _eval_record(results: list[ProtocolResult], epoch: int, step: int) -> dict:
    record: dict[str, Any] = {"kind": "eval", "epoch": epoch, "step": step}
    for r in results:
        tag = "" if len(results) == 1 else f"{r.setting.split()[-1]}/"
        record.update({f"{tag}{k}": v for k, v in r.summary().items()})
    record["setting"] = ", ".join(r.setting for r in results)
    return record


def build_backbone(config: FinetuneConfig) -> nn.Module:
    """The run's backbone at ``image_size``: ``arch`` with ``non_local`` (a ResNet) or
    ``drop_path`` (a ViT); :meth:`FinetuneConfig.validate` refuses either on the other family."""
    family = backbone_entry(config.arch).family
    kwargs: dict[str, Any] = {}
    if config.non_local and family == "resnet":
        kwargs["non_local"] = True
    if config.drop_path and family == "vit":
        kwargs["drop_path_rate"] = config.drop_path
    return create_backbone(config.arch, tuple(config.image_size), **kwargs)


def build_model(config: FinetuneConfig, num_classes: int) -> ReIDModel:
    multi = config.neck == "multi" and backbone_entry(config.arch).family == "vit"
    return ReIDModel(build_backbone(config), num_classes, multi_neck=multi)


def training_views(config: FinetuneConfig) -> FinetuneViews:
    """The training views: ``const`` erasing with Zhong et al.'s ranges, ``pixel`` with timm's
    (:func:`pipelines.views.finetune.transreid_views`' values)."""
    timm = config.erase_mode == "pixel"
    return FinetuneViews(tuple(config.image_size), pad=config.pad, flip_p=config.flip_p, erase_p=config.erase_p,
                         erase_area=(0.02, 1 / 3) if timm else (0.02, 0.4), erase_aspect=(0.3, 1 / 0.3),
                         normalization=config.normalization, erase_mode=config.erase_mode, erase_log_aspect=timm)


def run_finetune(config: FinetuneConfig, resume: Optional[str] = None) -> FinetuneResult:
    """Fine-tune, evaluate periodically and at the end; returns metrics and curve data.

    resume: ``None`` (a fresh run; ``output_dir`` must not hold checkpoints), ``latest`` (the run's
    last checkpoint, or a fresh start when there is none) or a checkpoint / run folder.
    Bad settings raise :class:`UserError` before any step.

    Linear, as :func:`train.pretrain.train`: configuration -> accelerator -> data -> model ->
    source -> optimizer and schedule -> resume -> steps (evaluation and checkpoints at epoch ends)
    -> the reported models' final evaluations.
    """
    started = time.perf_counter()
    config.validate()
    # a remote location (http(s)://, s3://, gs://, pipe:) is staged and verified on local disk
    config = dataclasses.replace(config, shards=str(local_shards(config.shards)))
    manifest = load_manifest(config.shards)
    out = Path(config.output_dir)
    checkpoint = check_run_dir(out, resume, latest_may_be_missing=True)
    trackers = trackers_of(config.log_with) if config.tensorboard else []
    accelerator = make_accelerator(out, config.precision, trackers=trackers)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    data = training_data(config, manifest, rank, world)
    set_seed(config.seed)
    model = build_model(config, data.num_classes)
    init = initialise_backbone(model.backbone, config.init)
    source = make_source(config.shards, data.split, batch_size=config.batch_size, size=tuple(config.image_size),
                         device=device, source=config.source, sampler=data.sampler, instances=config.instances,
                         seed=config.seed, rank=rank, world=world)
    steps_per_epoch = min(len(source), config.steps_per_epoch or len(source))
    total_steps = config.epochs * steps_per_epoch
    last_step = min(total_steps, config.max_steps) if config.max_steps else total_steps
    groups = parameter_groups(model, config)
    schedules = [lr_schedule(config, steps_per_epoch, group["base_lr"]) for group in groups]
    reference_lr = lr_schedule(config, steps_per_epoch, config.lr)  # logged: a group at the peak ``lr``
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(accelerator, out / CHECKPOINTS, config.keep_last, objects=[source])
    document = {"format": FORMAT, "config": dataclasses.asdict(config), "num_classes": data.num_classes,
                "protocol": data.protocol, "init": init}
    start, history, best = 0, [], None
    if checkpoint is not None:
        state = checkpointer.load(checkpoint)
        start, history, best = int(state["step"]), list(state.get("history", [])), state.get("best")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(config_document(config))
        if checkpoint is None:  # a fresh start: a best of an earlier attempt in this folder is not this run's
            shutil.rmtree(out / BEST, ignore_errors=True)
        if config.progress_bar:
            tqdm.write(f"init: {init}")
    if trackers:
        accelerator.init_trackers("finetune")
    log = MetricsLogger(accelerator, out, start, bool(trackers))
    losses = LossCheck(accelerator, LOSS_NAMES)
    views = training_views(config)
    pids = data.pids.to(device)
    unknown_pid = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(total=last_step, initial=start, unit="step", dynamic_ncols=True,
               disable=not (config.progress_bar and accelerator.is_main_process))
    model.train()
    results: list[ProtocolResult] = []
    evaluated = False
    batches, meter = None, EpochMeter(device)
    try:
        for step in range(start, last_step):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if in_epoch == 0 or batches is None:  # an epoch starts (or a resumed one continues)
                if in_epoch == 0:
                    source.set_epoch(epoch)
                batches, meter = iter(source), EpochMeter(device)
            batch = next(batches)
            generator = torch.Generator(device=device).manual_seed(seed_of(config.seed, step, rank))
            with torch.no_grad():
                inputs = views(batch.images, generator)
            for group, values in zip(optimizer.param_groups, schedules):
                group["lr"] = float(values[step])
            lr_now = float(reference_lr[step])
            labels, foreign = class_labels(batch.pid, pids)
            unknown_pid |= foreign
            step_losses = training_step(model, optimizer, accelerator, config, inputs, batch.modality, labels)
            losses.add(step, step_losses)
            meter.add(step_losses, len(batch) * world)
            done = step + 1
            if done % config.log_every == 0 or done == last_step:
                check_pending(losses, unknown_pid)
                means, rate = meter.means(), meter.images_per_s()
                log.write({"kind": "step", "step": done, "epoch": epoch, "lr": lr_now,
                           "loss": means[0], "id_loss": means[1], "triplet_loss": means[2],
                           "images_per_s": rate}, done)
                bar.set_postfix(loss=f"{means[0]:.3f}", img_s=f"{rate:.0f}", lr=f"{lr_now:.2e}")
            bar.update(1)
            finished, epoch_done = done == last_step, done % steps_per_epoch == 0
            if not (finished or epoch_done):
                continue
            check_pending(losses, unknown_pid)
            means = meter.means()
            history.append({"kind": "train", "epoch": epoch, "step": done, "loss": means[0], "id_loss": means[1],
                            "triplet_loss": means[2], "lr": lr_now, "images_per_s": meter.images_per_s()})
            log.write(history[-1], done)
            due = evaluation_due(config, epoch)
            if finished or due:
                # the selection evaluations score the trial-0 gallery only, as AGW; the last one is complete
                trials = 1 if config.tracks_best and not finished else config.eval_trials
                results, evaluated = evaluate_model(accelerator, model, config, data.protocol, trials), True
                if accelerator.is_main_process:
                    history.append(_eval_record(results, epoch, done))
                    log.write(history[-1], done)
                    if not finished:  # the final results are printed by the caller, once
                        tqdm.write(_eval_line(results, epoch))  # above the bar, when there is one
                    if config.tracks_best and due and (best is None or selection_rank1(results) > best["R1"]):
                        best = {"epoch": epoch, "step": done, "R1": selection_rank1(results)}
                        save_best(out / BEST, accelerator.unwrap_model(model), document, best)
                accelerator.wait_for_everyone()
            if finished or (config.checkpoint_every_epochs and (epoch + 1) % config.checkpoint_every_epochs == 0):
                check_pending(losses, unknown_pid)  # never a checkpoint after a non-finite loss
                checkpoint = checkpointer.save({"step": done, "epoch": epoch, "history": history, "best": best},
                                               {DOCUMENT: document})
    finally:
        bar.close()
    if not evaluated:  # resumed from a finished run: nothing left to train
        results = evaluate_model(accelerator, model, config, data.protocol)
    last, best_results, best_epoch = results, [], None
    if config.tracks_best:
        best_results, best_epoch = evaluate_best(accelerator, model, config, data.protocol, out / BEST, last_step,
                                                 last)
    selected = "best_trial0" if config.tracks_best and best_results else "last"
    same = same_modality_of_model(accelerator, model, config)
    seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        write_results(out / "results.json", config, init, last, best_results, best_epoch, Path(checkpoint), seconds,
                      history, same, data.num_classes)
    accelerator.end_training()
    return FinetuneResult(best_results if selected == "best_trial0" else last, history, out, Path(checkpoint), seconds,
                          selected, last, best_results, best_epoch)


def evaluate_best(accelerator, model: nn.Module, config: FinetuneConfig, protocol: str, folder: Path, last_step: int,
                  last: list[ProtocolResult]) -> tuple[list[ProtocolResult], Optional[int]]:
    """The full evaluation of the best checkpoint (``folder``, written by process 0; every
    process reads it) and its epoch; the last epoch's results when it is the best; ``([], None)``
    when no periodic evaluation ran."""
    accelerator.wait_for_everyone()
    if not (folder / STATE_FILE).is_file():
        return [], None
    info = read_json(folder / STATE_FILE)
    if int(info["step"]) == last_step:
        return last, int(info["epoch"])
    module: ReIDModel = accelerator.unwrap_model(model)
    module.load_state_dict(load_model_state(folder))
    return evaluate_model(accelerator, model, config, protocol, config.eval_trials), int(info["epoch"])


def write_results(path: Path, config: FinetuneConfig, init: str, last: list[ProtocolResult],
                  best: list[ProtocolResult], best_epoch: Optional[int], checkpoint: Path, seconds: float,
                  history: list[dict], same: Optional[dict] = None, labelled_ids: Optional[int] = None) -> None:
    """``results.json``: ``results`` (the reported model's, ``selected``), ``last`` and, when the
    best is tracked, ``best_trial0`` (its epoch, the trial-0 Rank-1 it was selected by, its folder),
    each labelled; ``same_modality`` (SYSU layouts: RGB->RGB of the last model, a reference figure)
    and ``labelled_ids`` (the identities whose labels were used)."""
    train_epochs = [h["epoch"] for h in history if h["kind"] == "train"]
    selected = "best_trial0" if config.tracks_best and best else "last"
    report: dict[str, Any] = {
        "selected": selected,
        "results": [r.to_dict() for r in (best if selected == "best_trial0" else last)],
        "last": {"label": LAST_LABEL, "epoch": train_epochs[-1] if train_epochs else None,
                 "checkpoint": str(checkpoint), "results": [r.to_dict() for r in last]},
        "checkpoint": str(checkpoint), "init": init, "seconds": seconds, "labelled_ids": labelled_ids}
    if same is not None:
        report["same_modality"] = {"setting": "RGB->RGB (other camera), gallery split", **same}
    if config.tracks_best:
        folder = path.parent / BEST
        info = read_json(folder / STATE_FILE) if (folder / STATE_FILE).is_file() else {}
        report["best_trial0"] = {"label": BEST_LABEL, "epoch": best_epoch, "trial0_R1": info.get("R1"),
                                 "checkpoint": str(folder) if info else None,
                                 "results": [r.to_dict() for r in best]}
        if selected == "best_trial0":
            report["checkpoint"] = str(folder)
    path.write_text(json.dumps(report, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# Loading for evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """What :mod:`train.evaluate` needs: ``embed(views, modality) -> (B, D)``, the input size and
    eval transform, the device, and the RegDB trial a fine-tuned model was trained on; and for an
    export of the test-time network (ONNX): the model, its test feature (``bn`` / ``pre_bn``) and
    input normalization."""

    path: Path
    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    size: tuple[int, int]
    transform: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    regdb_trial: Optional[int] = None
    description: str = ""
    extra: dict = field(default_factory=dict)
    model: Optional[nn.Module] = None
    feature: str = "bn"
    normalization: str = "imagenet"


def _finetune_checkpoint(path: Path) -> Optional[Path]:
    """The checkpoint folder ``path`` designates, when it is a fine-tuning run or checkpoint."""
    if not path.is_dir():
        return None
    folder = resolve_checkpoint(str(path), path)
    if not (folder / DOCUMENT).is_file():
        raise UserError(f"{folder} is a checkpoint, but not of a fine-tuning run (no {DOCUMENT}); "
                        "export its backbone with `reid-export` and pass the export")
    return folder


def load_for_evaluation(path: str | Path, device: str | torch.device | None = None,
                        size: Optional[tuple[int, int]] = None) -> LoadedModel:
    """A fine-tuning checkpoint (or run folder), or an exported backbone file, ready to embed.

    Fine-tuned: the recipe's test feature (``eval_feature``) at its ``image_size``. Backbone:
    its global feature (GeM for a ResNet, cat(CLS, mean PART) for a ViT) with the network's
    normalization (ImageNet for a ResNet, mean = std = 0.5 for a ViT, the PASS convention) at
    ``size`` (default: the network's :attr:`~models.registry.BackboneEntry.input_size`).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = _finetune_checkpoint(path)
    if folder is not None:
        document = read_json(folder / DOCUMENT)
        if document.get("format") != FORMAT:
            raise UserError(f"{folder / DOCUMENT} has format {document.get('format')!r}, expected {FORMAT!r}")
        config = from_dict(FinetuneConfig, document["config"])
        if size and tuple(size) != tuple(config.image_size):
            raise UserError(f"--size {size[0]} {size[1]}: {folder} was fine-tuned at {config.image_size[0]}x"
                            f"{config.image_size[1]} and is evaluated at that size; --size is for exported backbones")
        model = build_model(config, int(document["num_classes"]))
        try:
            model.load_state_dict(load_model_state(folder))
        except RuntimeError as err:  # weights of another architecture
            net = f"{config.arch}{', non-local' if config.non_local else ''}, {config.neck} neck"
            raise UserError(f"{folder}: its weights do not fit the {config.arch} model its config names ({net}), they "
                            f"come from another architecture ({_first_line(err)})") from None
        which, image_size, normalization = config.eval_feature, tuple(config.image_size), config.normalization
        protocol = document.get("protocol")
        regdb_trial = config.regdb_trial if protocol in PROTOCOLS and PROTOCOLS[protocol].trained_per_trial else None
        description = f"fine-tuned {config.arch} ({folder})"
    else:
        try:
            backbone, arch = backbone_from_file(path, size)
        except ValueError as err:  # a size the network cannot be built for (a ViT: its patch grid)
            raise UserError(f"--size {size[0]} {size[1]}: {err}" if size else f"{path}: {err}") from None
        entry = backbone_entry(arch)
        image_size = tuple(size) if size else entry.input_size
        check_eval_size(arch, image_size)
        model = ReIDModel(backbone, 1)
        which, normalization, regdb_trial = "pre_bn", entry.normalization, None
        description = f"exported {arch} backbone ({path})"
    model.to(device).eval()
    views = FinetuneViews(image_size, normalization=normalization)
    return LoadedModel(path, lambda v, m: model.embed(v, m, which), image_size, views.eval_views, device,
                       regdb_trial, description, model=model, feature=which, normalization=normalization)


def check_eval_size(arch: str, size: tuple[int, int]) -> None:
    """Refuse an input size an exported backbone cannot take (a ViT: multiples of its patch)."""
    if min(size) < 16:
        raise UserError(f"--size {size[0]} {size[1]} is too small (at least 16 x 16)")
    if backbone_entry(arch).family == "vit" and (size[0] % 16 or size[1] % 16):
        raise UserError(f"--size {size[0]} {size[1]}: a ViT needs multiples of its 16-pixel patch")


def _first_line(err: Exception) -> str:
    """The gist of a ``load_state_dict`` error (its first lines name the keys or shapes)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[1:2] or lines[:1])[:200]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m train.finetune",
        description="Fine-tune a pre-trained ReID backbone (MMGL ResNet for RGB-IR with the AGW recipe, PASS ViT "
                    "for RGB with the TransReID recipe) and evaluate it under the dataset's standard protocol. "
                    "Settings come from a preset, then from --key value overrides; `--help` with --preset lists "
                    "them with that preset's values. Several processes: accelerate launch -m train.finetune ...",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # --shards and --init are checked after --help, which needs neither
    parser.add_argument("--shards", metavar="DIR", help="shard folder built by `python -m shards build` (required), or an "
                                                        "http(s)://, s3://, gs:// or pipe: location of one: staged "
                                                        "on local disk (verified) first, then read like a local folder")
    parser.add_argument("--init", metavar="PATH", help="an exported backbone (.pt / .safetensors), an official PASS-reID "
                        "file, imagenet:PATH (a torchvision / timm ResNet-50), or `random` (required)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help=f"recipe (default: the --config file's, else {DEFAULT_PRESET})")
    parser.add_argument("--config", metavar="FILE",
                        help="settings from a JSON or YAML file (e.g. another run's config.json), applied after the "
                             "preset; --key value settings on the command line override it")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved configuration as JSON (the config.json of the run) and exit")
    parser.add_argument("--resume", default=None,
                        help="`latest` (this output_dir's last checkpoint) or a checkpoint / run folder")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and the settings, then exit")
    return parser


def help_text(parser: ArgumentParser, preset: str) -> str:
    """Usage, the recipes, and every setting with its meaning and the value of ``preset`` (the
    rendering of ``python -m train.pretrain --help``)."""
    return "\n".join([parser.format_help(), "presets:", presets_help(PRESETS),
                      f"\nsettings (values of preset {preset}):",
                      settings_help(PRESETS[preset](), skip=("shards", "init")), "\n" + EXIT_STATUS_HELP])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        print(help_text(parser, args.preset or DEFAULT_PRESET))
        return 0
    given = {k: v for k, v in (("shards", args.shards), ("init", args.init)) if v is not None}
    config = resolve_config(args.preset, overrides, args.config, **given)
    if args.print_config:
        print(config_document(config), end="")
        return 0
    if not config.shards or ("init" not in given and not (args.config and "init" in read_config_file(args.config))):
        raise UserError("pass --shards DIR (built by `python -m shards build`) and --init (an exported backbone, "
                        "imagenet:PATH or random), or a --config file that has them; see --help")
    try:
        result = run_finetune(config, resume=args.resume)
    except NonFiniteLoss as err:
        return non_finite_exit(err)
    if result.metrics:  # process 0; the bars are closed by now
        print(report_text(result))
        print(f"results: {result.output_dir / 'results.json'}")
    return 0


def report_text(result: FinetuneResult) -> str:
    """The final tables: the last epoch's, and with a tracked best both, side by side and labelled."""
    if not result.best:
        return f"{format_table(result.last or result.metrics)}\ncheckpoint: {result.checkpoint}"
    last_epoch = next((h["epoch"] for h in reversed(result.history) if h["kind"] == "train"), None)
    return "\n".join([
        f"{LAST_LABEL} (epoch {last_epoch}, 0-based):", format_table(result.last),
        f"checkpoint: {result.checkpoint}", "",
        f"{BEST_LABEL} (epoch {result.best_epoch}, 0-based):", format_table(result.best),
        f"checkpoint: {result.output_dir / BEST}", "",
        f"reported (--select): {LAST_LABEL if result.selected == 'last' else BEST_LABEL}"])


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
