"""MMGL: self-supervised pre-training of a (two-stream) ResNet-50 from scratch on RGB-IR ReID data.

First public implementation (the paper's pre-training code was never published); every choice
the paper leaves open is stated where it is made: here, in :mod:`train.losses.permutation` and
:mod:`train.losses.pcc`.

One step, for a batch of ``B`` slots (``2B`` images: the ``B`` RGB images, then the ``B`` IR
images, from the ``pairs`` sampler; slot ``b`` pairs rows ``b`` and ``B + b``, unpaired
identities):

1. Views (:class:`pipelines.views.mmgl.MMGLViews`, on the device): resize 288x144, pad 10 +
   random crop, flip, ImageNet normalization, then the 6 horizontal stripes of both images of a
   slot are shuffled by the SAME random permutation ``perm[b]``.
2. Backbone: each modality through its own stem (two-stream; one shared stem in the one-stream
   variant), shared ``layer1`` .. ``layer4`` with last stride 1: ``(2B, 2048, 18, 9)``. The two
   halves of the batch are known to be RGB then IR, so each stem runs on its half directly (no
   data-dependent routing, no host synchronization).
3. Permutation recovery (:class:`models.heads.PermutationHead`): global average pool -> linear ->
   6x6 logits -> 20 log-space Sinkhorn iterations; loss = MSE against the ground-truth permutation
   matrix, by default the mean over all entries of the RGB and IR images together, as
   ``nn.MSELoss`` (:func:`train.losses.permutation.permutation_loss`; ``perm_reduction sum`` is
   this project's earlier sum over each matrix's entries).
4. PCC (:class:`models.heads.PartProjection` then :func:`train.losses.pcc.part_cycle_contrastive`):
   the map is pooled into 6 stripe features, projected 2048 -> 256 by a 1x1 conv (the figure: no
   normalization, no activation), and contrasted. Default (``pcc_sets slot``, the paper's
   figure): every stripe of a slot's two images is a query that retrieves softly from the
   stripes of the slot's shuffled RGB image and of its shuffled IR image; the two retrieved
   features are the positive pair. ``pcc_sets position`` is this project's earlier variant
   (retrieval over the stripes at the same position across the batch). The choices the paper
   leaves open are stated in :mod:`train.losses.pcc`.
5. loss = loss_perm + ``pcc_weight`` x loss_pcc (defaults: ``pcc_weight`` 0.5, ``tau`` 0.07,
   6 stripes; the paper found 0.3-0.5 best in 0.2-1.0, with the mean-reduced MSE).

Logged: ``loss_perm``, ``loss_pcc``, ``perm_acc`` (an image counts when all 6 rows are right;
RGB and IR images together), ``perm_acc_rgb``, ``perm_acc_ir``, ``perm_acc_stripe`` (the fraction
of rows right, over all stripes of both modalities; chance 1/6), ``pcc_acc``. Heads and losses
run in float32 under mixed precision (Sinkhorn in the head, the losses with autocast off).

A split without both modalities cannot be paired: :func:`pipelines.sources.make_source` refuses
it for the ``pairs`` sampler with a :class:`UserError`, from the manifest's counts, before any
image is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from models.heads import PartProjection, PermutationHead
from models.registry import BackboneSpec, create_backbone, legacy_mmgl_backbone
from models.resnet import ResNet, TwoStreamResNet
from pipelines.batch import Batch
from pipelines.views.mmgl import MMGLViewBatch, MMGLViews
from common.errors import UserError
from train.settings import RunConfig, TrainConfig, setting
from train.losses.pcc import (DEFAULT_RETRIEVAL_TEMPERATURE, DEFAULT_TAU, PCC_SETS, PCCSets,
                              part_cycle_contrastive)
from train.losses.permutation import (PERMUTATION_REDUCTIONS, PermutationReduction, permutation_correct,
                                      permutation_loss, stripe_accuracy)
from train.methods.base import DataSpec, Method, StepOutput

#: The ResNets of :data:`models.registry.BACKBONES` MMGL trains (the paper's: resnet50_two_stream).
BACKBONES = ("resnet50_two_stream", "resnet50", "resnet_narrow_two_stream", "resnet_narrow", "resnet_tiny_two_stream",
             "resnet_tiny")


@dataclass
class MMGLConfig:
    """MMGL's own settings; defaults are the paper's where it gives them (DESIGN.md section 5)."""

    backbone: Literal["resnet50_two_stream", "resnet50", "resnet_narrow_two_stream", "resnet_narrow",
                      "resnet_tiny_two_stream", "resnet_tiny"] = setting(
        "resnet50_two_stream", "backbone (models.registry): *_two_stream: RGB and IR stems, shared layer1..4 (AGW), "
        "else one shared stem; resnet_narrow: width 32, one block per layer, for CPUs; resnet_tiny: the width-8 test model")
    image_size: tuple[int, int] = setting((288, 144), "view size (H, W); H a multiple of 16 x num_stripes")
    num_stripes: int = setting(6, "horizontal stripes shuffled, and pooled into part features")
    part_dim: int = setting(256, "PCC part feature size (1x1 conv 2048 -> part_dim)")
    pcc_weight: float = setting(0.5, "lambda: loss = permutation + lambda x PCC (paper: 0.2-1.0, 0.3-0.5 best)")
    pcc_sets: PCCSets = setting("slot", "PCC retrieval sets: slot (the paper's figure: the stripes of the slot's "
                                "RGB and IR image) or position (same stripe position across the batch)")
    perm_reduction: PermutationReduction = setting("mean", "permutation MSE: mean over entries (nn.MSELoss, "
                                                   "published) or sum over each matrix's entries")
    tau: float = setting(DEFAULT_TAU, "InfoNCE temperature of PCC")
    retrieval_temperature: float = setting(DEFAULT_RETRIEVAL_TEMPERATURE, "softmax temperature of PCC's soft retrieval")
    sinkhorn_iterations: int = setting(20, "log-space Sinkhorn iterations of the permutation head")
    pad: int = setting(10, "zero padding before the random crop back to image_size")
    flip_p: float = setting(0.5, "horizontal flip probability")


class MMGL(Method):
    """The MMGL method (module docstring), built from an :class:`MMGLConfig`.
    State: ``backbone.*``, ``permutation_head.*``, ``part_projection.*``."""

    name = "mmgl"

    def __init__(self, config: MMGLConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.backbone not in BACKBONES:
            raise UserError(f"unknown MMGL backbone {c.backbone!r}; expected one of: {', '.join(BACKBONES)}")
        if c.num_stripes < 2 or c.image_size[0] % (16 * c.num_stripes):
            raise UserError(
                f"--method.image_size height {c.image_size[0]} must be a multiple of 16 x {c.num_stripes} stripes "
                f"= {16 * c.num_stripes} (at least 2 stripes), so that every stripe covers whole rows of the "
                "stride-16 feature map (288 and 96 work for 6 stripes)"
            )
        if c.pcc_sets not in PCC_SETS:
            raise UserError(f"unknown --method.pcc_sets {c.pcc_sets!r}; expected one of: {', '.join(PCC_SETS)}")
        if c.perm_reduction not in PERMUTATION_REDUCTIONS:
            raise UserError(f"unknown --method.perm_reduction {c.perm_reduction!r}; expected one of: "
                            f"{', '.join(PERMUTATION_REDUCTIONS)}")
        if c.tau <= 0 or c.retrieval_temperature <= 0:
            raise UserError(f"PCC temperatures must be positive, got tau={c.tau}, retrieval_temperature={c.retrieval_temperature}")
        self.backbone: ResNet | TwoStreamResNet = create_backbone(c.backbone)
        features = self.backbone.num_features
        self.permutation_head = PermutationHead(features, c.num_stripes, c.sinkhorn_iterations)
        self.part_projection = PartProjection(features, c.part_dim, c.num_stripes)
        self.views = MMGLViews(size=tuple(c.image_size), pad=c.pad, flip_p=c.flip_p, num_stripes=c.num_stripes)

    def data_spec(self) -> DataSpec:
        return DataSpec(size=self.views.size, sampler="pairs", images_per_slot=2)

    def make_views(self, batch: Batch, generator: torch.Generator) -> MMGLViewBatch:
        """``2B`` images (RGB half, then IR half, as the ``pairs`` sampler lays them out) -> views."""
        if len(batch) % 2:
            raise ValueError(f"an MMGL batch holds B RGB then B IR images, got an odd count {len(batch)}")
        half = len(batch) // 2
        if half < 2 and self.config.pcc_sets == "position":  # a user setting: say so before PCC fails
            raise UserError(f"MMGL with --method.pcc_sets position needs --batch_size of at least 2 slots (PCC "
                            f"leaves each query out of its own modality's set, so a slot needs another one), "
                            f"got {half}")
        return self.views(batch.images[:half], batch.images[half:], generator)

    def features(self, rgb: torch.Tensor, ir: torch.Tensor) -> torch.Tensor:
        """Backbone feature maps of both halves: ``(B, 3, H, W)`` x 2 -> ``(2B, C, H/16, W/16)``,
        RGB rows first. Each stem sees only its modality, so its BatchNorm statistics do too."""
        # Inputs follow the weights' memory format (the loop's --channels_last converts the weights).
        stem_weight = next(self.backbone.parameters())
        if stem_weight.is_contiguous(memory_format=torch.channels_last) and not stem_weight.is_contiguous():
            rgb = rgb.contiguous(memory_format=torch.channels_last)
            ir = ir.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_pair(rgb, ir)

    def forward(self, views: MMGLViewBatch) -> StepOutput:
        batch = views.perm.shape[0]
        features = self.features(views.rgb, views.ir)
        predicted = self.permutation_head(features).matrix  # (2B, n, n) float32
        perm = torch.cat([views.perm, views.perm])  # both images of a slot share the permutation
        target = views.permutation_matrix()
        loss_perm = permutation_loss(predicted, torch.cat([target, target]), self.config.perm_reduction)
        parts = self.part_projection(features)  # (2B, n, part_dim), stripes of the shuffled images
        pcc = part_cycle_contrastive(parts[:batch], parts[batch:], self.config.tau, self.config.retrieval_temperature,
                                     self.config.pcc_sets)
        loss = loss_perm + self.config.pcc_weight * pcc.loss
        with torch.no_grad():
            correct = permutation_correct(predicted, perm).float()
            metrics = {
                "loss_perm": loss_perm.detach(),
                "loss_pcc": pcc.loss.detach(),
                "perm_acc": correct.mean(),
                "perm_acc_rgb": correct[:batch].mean(),
                "perm_acc_ir": correct[batch:].mean(),
                "perm_acc_stripe": stripe_accuracy(predicted, perm),
                "pcc_acc": pcc.accuracy,
            }
        return StepOutput(loss, metrics)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Stems + ``layer1`` .. ``layer4`` in the native layout (``stems.rgb.conv1.weight``,
        ``layer1.0.conv1.weight``, ...; one-stream: torchvision's keys), without the heads."""
        return {key: value.detach().contiguous() for key, value in self.backbone.state_dict().items()}

    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec(self.config.backbone)


# --- presets -------------------------------------------------------------------------------------
def mmgl_sysu() -> RunConfig:
    """The paper's run on SYSU-MM01 (train + val ids: 22,258 RGB + 11,909 IR images): two-stream
    ResNet-50 from scratch, 288x144, 100 epochs.

    Optimizer, from the release (hansonchen1996/MMGL README: ``python train.py --dataset sysu
    --stream two --lr 0.1 --pcc --part``): lr 0.1, the SGD scale of the release's AGW code, whose
    optimizer and schedule are taken for everything the release does not say (``AGW/train.py``):
    SGD, momentum 0.9, Nesterov, weight decay 5e-4, the lr constant within an epoch, warm-up
    ``0.1 x (e + 1) / 10`` in epochs 0-9, 0.1 until epoch 19, 0.01 from 20, 0.001 from 50, no
    gradient clipping. The lr is not scaled with the batch (``lr_scaling none``), as the AGW code.

    Batch: 32 slots = 64 images (32 RGB + 32 IR) per step, the AGW code's 64 images per step
    (8 ids x (4 RGB + 4 IR)) for which lr 0.1 was set; the release gives no pre-training batch.
    An epoch pairs every RGB image once (the IR set is cycled): 22,258 // 32 = 695 steps.

    This project's own choices (README "Reproducing the papers"): bf16 autocast (heads and losses
    in float32) and channels_last for speed; no weight decay on biases and norm weights (the AGW
    code decays every parameter). The AdamW recipe is ``mmgl_sysu_adamw``.
    """
    train = TrainConfig(
        epochs=100, batch_size=32, optimizer="sgd", lr=0.1, lr_scaling="none", sgd_momentum=0.9, sgd_nesterov=True,
        lr_schedule="step", warmup_epochs=10, lr_milestones=(20, 50), lr_gamma=0.1, weight_decay=5e-4,
        weight_decay_end=5e-4, clip_grad=0.0, precision="bf16", channels_last=True, output_dir="runs/mmgl_sysu",
        checkpoint_every_epochs=5, keep_last=3, log_every=50,
    )
    return RunConfig("mmgl", train, MMGLConfig())


def mmgl_sysu_adamw() -> RunConfig:
    """mmgl_sysu with this project's AdamW recipe instead of the release's SGD: 64 slots (128
    images) per step, AdamW peak lr 2e-3 per 256 images after 5 warm-up epochs, cosine to 1e-6.

    Weight decay 0.05 (constant; none on biases and norms), per-tensor gradient clip 3.0. AdamW
    because the two terms' gradients differ in scale by orders of magnitude across the network
    (the Sinkhorn MSE reaches the backbone through a 36-way normalization) and Adam's
    per-parameter scaling makes the balance insensitive to that; 1e-3 at batch 128 is the usual
    AdamW rate for a ResNet-50 from scratch. Not the published setting: no comparison with
    mmgl_sysu has been measured yet.
    """
    train = TrainConfig(
        epochs=100, batch_size=64, optimizer="adamw", lr=2e-3, lr_scaling="linear", min_lr=1e-6,
        warmup_epochs=5, weight_decay=0.05, weight_decay_end=0.05, clip_grad=3.0, clip_mode="param",
        precision="bf16", channels_last=True, output_dir="runs/mmgl_sysu_adamw", checkpoint_every_epochs=5,
        keep_last=3, log_every=50,
    )
    return RunConfig("mmgl", train, MMGLConfig())


def mmgl_tiny() -> RunConfig:
    """A CPU smoke run: the width-8 two-stream test ResNet on 96x48 views (6 stripes of 16 rows,
    one row each of the 6x3 feature map), batch 16 slots, float32, 10 steps (``--max_steps 0``
    runs every epoch). AdamW at 3e-3 for its 32 images per step (lr 2.4e-2 per 256), the rate
    at which the tiny model's permutation accuracy rose in our CPU measurements."""
    train = TrainConfig(
        epochs=2, max_steps=10, batch_size=16, optimizer="adamw", lr=2.4e-2, lr_scaling="linear", min_lr=1e-5,
        warmup_epochs=0.0, weight_decay=0.05, weight_decay_end=0.05, clip_grad=0.0, precision="no",
        output_dir="runs/mmgl_tiny", checkpoint_every_epochs=1, keep_last=2, log_every=2,
    )
    return RunConfig("mmgl", train, MMGLConfig(backbone="resnet_tiny_two_stream", image_size=(96, 48)))


MMGL_PRESETS = {"mmgl_sysu": mmgl_sysu, "mmgl_sysu_adamw": mmgl_sysu_adamw, "mmgl_tiny": mmgl_tiny}


def upgrade_mmgl_config(values: dict) -> dict:
    """A saved MMGL config of an older version, in today's fields: the pair ``backbone``
    (resnet50 / narrow / tiny) + ``two_stream`` became one :mod:`models.registry` name."""
    values = dict(values)
    if "two_stream" in values:
        values["backbone"] = legacy_mmgl_backbone(values.get("backbone", "resnet50"), values.pop("two_stream"))
    return values


__all__ = ["BACKBONES", "MMGL", "MMGLConfig", "MMGL_PRESETS", "mmgl_sysu", "mmgl_sysu_adamw", "mmgl_tiny",
           "upgrade_mmgl_config"]
