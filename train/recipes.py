"""The TransReID fine-tuning recipe of PASS (``PASS_transreid``) as data, for the fine-tuning presets.

Every value is the reference's, read from CASIA-IVA-Lab/PASS-reID: ``PASS_transreid/configs/
{market,msmt17}/vit_{small,base}.yml``, the defaults they leave alone (``config/defaults.py``),
the run scripts (``run_pass_vit_{small,base}_{Market,MSMT17}[_384].sh``: the 384 recipes only
change ``INPUT.SIZE_TRAIN/SIZE_TEST`` to 384x128), the solver (``solver/make_optimizer.py``,
``solver/scheduler_factory.py``), the loader and transforms (``datasets/make_dataloader.py``)
and the model (``model/make_model.py``, ``build_transformer_pass``). The building blocks that
carry them out: :func:`train.schedules.timm_cosine_epoch_schedule`,
:func:`pipelines.views.finetune.transreid_views`, :class:`models.necks.PartTokenNeck`,
:func:`models.formats.load_pass_reid_weights` and the ViT's ``drop_path_rate``.

``published`` holds the reference's results (``README.md`` of PASS-reID; mAP, Rank-1), for
comparing a run with them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from models.necks import PartTokenNeck
from pipelines.views.finetune import FinetuneViews, transreid_views
from train.schedules import timm_cosine_epoch_schedule


@dataclass(frozen=True)
class TransReIDRecipe:
    """One PASS_transreid fine-tuning run (module docstring); sizes are ``(H, W)``."""

    arch: str = "vit_small"  # TRANSFORMER_TYPE vit_small_patch16_224_TransReID: PASS_transreid's own dim-384 ViT-S
    dataset: str = "market"
    image_size: tuple[int, int] = (256, 128)  # INPUT.SIZE_TRAIN = SIZE_TEST
    pretrain_hw_ratio: int = 2  # MODEL.PRETRAIN_HW_RATIO: the init's 16x8 position grid
    drop_path: float = 0.1  # MODEL.DROP_PATH (linearly 0 .. 0.1 over the blocks)
    # data
    ids_per_batch: int = 16  # SOLVER.IMS_PER_BATCH 64 / DATALOADER.NUM_INSTANCE 4
    instances: int = 4
    normalization: str = "half"  # PIXEL_MEAN = PIXEL_STD = 0.5
    pad: int = 10
    flip_p: float = 0.5
    erase_p: float = 0.5  # INPUT.RE_PROB, timm RandomErasing(mode="pixel") with its defaults:
    erase_mode: str = "pixel"
    erase_area: tuple[float, float] = (0.02, 1 / 3)
    erase_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    erase_log_aspect: bool = True
    # model and losses
    multi_neck: bool = True  # MODEL.MULTI_NECK, FEAT_FUSION 'cat'
    label_smoothing: float = 0.0  # IF_LABELSMOOTH 'off'
    triplet: str = "soft"  # NO_MARGIN True: soft-margin batch-hard triplet on the pre-BN feature
    test_feature: str = "pre_bn"  # TEST.NECK_FEAT 'before', FEAT_NORM 'yes' (L2-normalised)
    # optimizer and schedule
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    lr: float = 4e-4  # SOLVER.BASE_LR, no linear scaling
    bias_lr_factor: float = 2.0
    weight_decay: float = 1e-4
    weight_decay_bias: float = 1e-4
    epochs: int = 120
    warmup_epochs: int = 20
    warmup_start_factor: float = 0.01  # warmup_lr_init = 0.01 x BASE_LR
    min_lr_factor: float = 0.002  # lr_min = 0.002 x BASE_LR
    precision: str = "fp16"  # torch.cuda.amp autocast + GradScaler in processor.py
    published: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.ids_per_batch * self.instances

    def views(self) -> FinetuneViews:
        """The training views at this recipe's size."""
        return transreid_views(self.image_size)

    def lr_schedule(self, steps_per_epoch: int, bias: bool = False) -> np.ndarray:
        """Per-step learning rate of the weights (or, ``bias``, of the biases): timm's cosine
        stepped per epoch, warm-up start and minimum shared by both groups."""
        peak = self.lr * (self.bias_lr_factor if bias else 1.0)
        return timm_cosine_epoch_schedule(peak, self.epochs, steps_per_epoch, self.warmup_epochs,
                                          self.warmup_start_factor * self.lr, self.min_lr_factor * self.lr)

    def neck(self, dim: int, num_classes: int, num_parts: int = 3) -> PartTokenNeck:
        return PartTokenNeck(dim, num_parts, num_classes, multi_neck=self.multi_neck)


def _recipe(**changes) -> TransReIDRecipe:
    return dataclasses.replace(TransReIDRecipe(), **changes)


#: The reference's runs by preset name (PASS-reID README tables: mAP, Rank-1).
RECIPES: dict[str, TransReIDRecipe] = {
    "transreid-market": _recipe(published={"market": (92.2, 96.3)}),
    "transreid-market-384": _recipe(image_size=(384, 128), published={"market": (92.6, 96.8)}),
    "transreid-msmt17": _recipe(dataset="msmt17", published={"msmt17": (69.1, 86.5)}),
    "transreid-msmt17-384": _recipe(dataset="msmt17", image_size=(384, 128), published={"msmt17": (71.7, 87.9)}),
    "transreid-vitb-market": _recipe(arch="vit_base", published={"market": (93.0, 96.8)}),
    "transreid-vitb-market-384": _recipe(arch="vit_base", image_size=(384, 128), published={"market": (93.3, 96.9)}),
    "transreid-vitb-msmt17": _recipe(arch="vit_base", dataset="msmt17", published={"msmt17": (71.8, 88.2)}),
    "transreid-vitb-msmt17-384": _recipe(arch="vit_base", dataset="msmt17", image_size=(384, 128),
                                         published={"msmt17": (74.3, 89.7)}),
}

__all__ = ["RECIPES", "TransReIDRecipe"]
