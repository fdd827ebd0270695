"""PASS: part-aware self-supervised pre-training of a ViT with [PART] tokens (DESIGN.md section 5).

One training step (``make_views`` then ``forward``):

- views (:class:`pipelines.views.PASSViews`): per image, G = 2 global crops (256x128) and
  L = 9 local crops (128x64), 3 from each of the K = 3 overlapping horizontal regions,
  view-major. By default (``input="source"``, as PASS) they are cut from each image at its
  source resolution and aspect ratio: the source decodes onto a ``canvas_size`` canvas
  (shrinking only images larger than it) with the valid size per image
  (:mod:`pipelines.sources.canvas`); ``input="resize"`` resizes every image to ``image_size``
  first (this project's earlier behaviour: it distorts images that are not 2:1 and upsamples
  the local crops of small ones);
- student (ViT, drop path 0.1, + :class:`models.heads.TokenHeads`): one backbone pass over the
  ``G * B`` global views (CLS + all K parts) and one over the ``L * B`` local views with a
  per-view region tensor (CLS + PART_k of the view's region): one pass per resolution. The CLS
  head then runs once over the CLS tokens of all 11 views, and part head k once over PART_k of
  the 2 global views and of the 3 local views of region k;
- teacher (an EMA copy of the student, no drop path, no gradients): the global views only;
- loss (:class:`train.losses.dino.DINOLoss`, T = 1 + K token types): CLS over 11 student views,
  PART_k over 5, same view skipped, mean of the 44 terms; per-type centers updated after it.

Schedules (per step, computed once for the run, :mod:`train.schedules`): teacher temperature
(linear warm-up from ``warmup_teacher_temp``, then ``teacher_temp``), teacher EMA momentum
(cosine from ``teacher_momentum`` to 1). The last layer of every head (``weight_v``) gets no
update during the first ``freeze_last_layer_epochs`` epochs (its gradients are dropped before
the optimizer step, as DINO's ``cancel_gradients_last_layer``).

Presets: :data:`PASS_PRESETS` (``pass_vits_lup`` / ``pass_vitb_lup``: the paper's ViT-S/16 and
ViT-B/16 LUPerson runs; ``pass_tiny``: a CPU smoke run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Union

import numpy as np
import torch
from torch import nn

from models.heads import TokenHeads, TokenHeadsOutput
from models.registry import BackboneSpec, canonical_name, create_backbone
from models.vit import VisionTransformer
from pipelines.batch import Batch
from pipelines.views import PASSViewBatch, PASSViews
from common.errors import UserError
from train.settings import RunConfig, TrainConfig, setting
from train.losses.dino import DINOLoss
from train.methods.base import DataSpec, Method, Progress, StepOutput
from train.schedules import cosine_schedule, warmup_constant_schedule

#: The ViTs of :data:`models.registry.BACKBONES` PASS trains.
ARCHS = ("vit_small", "vit_base", "vit_tiny")


@dataclass
class PASSConfig:
    """PASS's own settings; defaults are the paper's (PASS-reID ``main_pass.py`` + ViT-S script)."""

    arch: Literal["vit_small", "vit_base", "vit_tiny"] = setting("vit_small", "backbone (models.registry): vit_small (ViT-S/16), vit_base (ViT-B/16), vit_tiny (tests)")
    image_size: tuple[int, int] = setting((256, 128), "global view size (H, W); the data size with input 'resize'")
    input: Literal["source", "resize"] = setting("source", "source: crops from each image at its source resolution and aspect ratio (PASS), on a canvas_size canvas; resize: every image resized to image_size first")
    canvas_size: tuple[int, int] = setting((512, 256), "input 'source': the largest (H, W) kept; larger images are shrunk to fit, aspect ratio kept")
    local_size: tuple[int, int] = setting((128, 64), "local view size (H, W)")
    global_scale: tuple[float, float] = setting((0.4, 1.0), "RandomResizedCrop area range of the global views")
    local_scale: tuple[float, float] = setting((0.1, 0.8), "RandomResizedCrop area range of the local views, in their region")
    region_starts: tuple[float, ...] = setting((0.0, 0.25, 0.5), "one region (and [PART] token) each")
    region_height: float = setting(0.5, "region height, fraction of the image height")
    locals_per_region: int = setting(3, "local views cut from each region")
    drop_path: float = setting(0.1, "stochastic depth of the student's last block (teacher: none)")
    out_dim: int = setting(65536, "DINO head output size")
    hidden_dim: int = setting(2048, "DINO head MLP width")
    bottleneck_dim: int = setting(256, "DINO head bottleneck before the weight-normalized layer")
    norm_last_layer: bool = setting(True, "freeze the norm (weight_g) of the heads' last layer")
    student_temp: float = setting(0.1, "tau_s")
    teacher_temp: float = setting(0.04, "tau_t after its warm-up")
    warmup_teacher_temp: float = setting(0.04, "start of the optional teacher-temperature warm-up")
    warmup_teacher_temp_epochs: float = setting(0.0, "epochs of the linear tau_t warm-up (0: none)")
    center_momentum: float = setting(0.9, "EMA momentum of the per-token centers")
    teacher_momentum: float = setting(0.996, "start of the cosine EMA schedule (ends at 1)")
    freeze_last_layer_epochs: int = setting(1, "epochs without updates of the heads' last layer")


class TokenNetwork(nn.Module):
    """A ViT with one DINO head per token type (student or teacher)."""

    def __init__(self, backbone: VisionTransformer, heads: TokenHeads) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def global_outputs(self, images: torch.Tensor, views: int) -> TokenHeadsOutput:
        """``(G * B, 3, H, W)`` global views -> cls ``(G, B, out)``, parts ``(K, G, B, out)``."""
        tokens = self.backbone(images)
        cls = self.heads.cls(tokens.cls).unflatten(0, (views, -1))
        parts = torch.stack([head(tokens.parts[:, k]) for k, head in enumerate(self.heads.parts)])
        return TokenHeadsOutput(cls, parts.unflatten(1, (views, -1)))


class PASS(Method):
    """The PASS method (module docstring). State: ``student.*``, ``teacher.*``, ``loss.center``."""

    name = "pass"

    def __init__(self, config: PASSConfig) -> None:
        super().__init__()
        self.config = config
        num_parts = len(config.region_starts)
        if config.arch not in ARCHS:
            raise UserError(f"unknown PASS architecture {config.arch!r}; expected one of: {', '.join(ARCHS)}")
        if num_parts < 1 or config.locals_per_region < 1:
            raise UserError("PASS needs at least one region and one local view per region")
        for name, size in (("image_size", config.image_size), ("local_size", config.local_size)):
            if size[0] % 16 or size[1] % 16:
                raise UserError(f"--method.{name} {size[0]}x{size[1]} must be a multiple of the patch size 16")
        try:
            self.views = PASSViews(
                global_size=config.image_size,
                local_size=config.local_size,
                global_scale=config.global_scale,
                local_scale=config.local_scale,
                region_starts=config.region_starts,
                region_height=config.region_height,
                locals_per_region=config.locals_per_region,
            )
        except ValueError as err:
            raise UserError(f"PASS views: {err}") from None
        self.student = self._network(config.drop_path)
        self.teacher = self._network(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.loss = DINOLoss(config.out_dim, 1 + num_parts, config.student_temp, config.center_momentum)
        # View indices of each region among the local views, as slices when contiguous (always,
        # with PASSViews' region-by-region order), so selecting them is a view, not a gather.
        self._region_views = [_as_index([v for v, r in enumerate(self.views.local_region) if r == k])
                              for k in range(num_parts)]
        # The region of each local view, (L,) int64, a buffer so that it moves with the method
        # and forward reads it without filling a cache (a compiled graph would guard on that).
        self.register_buffer("local_region", torch.tensor(self.views.local_region, dtype=torch.int64),
                             persistent=False)
        self._schedule_key: Optional[tuple[int, int]] = None
        self._momentum = np.empty(0)
        self._temperature = np.empty(0)
        self._current: dict[str, float] = {}

    def _network(self, drop_path: float) -> TokenNetwork:
        c = self.config
        num_parts = len(c.region_starts)
        backbone = create_backbone(c.arch, tuple(c.image_size), num_parts=num_parts, drop_path_rate=drop_path)
        heads = TokenHeads(backbone.embed_dim, num_parts, out_dim=c.out_dim, hidden_dim=c.hidden_dim,
                           bottleneck_dim=c.bottleneck_dim, norm_last_layer=c.norm_last_layer)
        return TokenNetwork(backbone, heads)

    # --- data -----------------------------------------------------------------------------------
    def data_spec(self) -> DataSpec:
        if self.config.input == "source":
            return DataSpec(size=tuple(self.config.canvas_size), sampler="random", fit="canvas")
        return DataSpec(size=tuple(self.config.image_size), sampler="random", fit="resize")

    @torch.no_grad()
    def make_views(self, batch: Batch, generator: torch.Generator) -> PASSViewBatch:
        return self.views(batch.images, generator, batch.valid)

    # --- step -----------------------------------------------------------------------------------
    def forward(self, views: PASSViewBatch) -> StepOutput:
        student_tokens = self._student_outputs(views)
        with torch.no_grad():
            teacher = self.teacher.global_outputs(views.global_views, views.num_global)
        out = self.loss(student_tokens, [teacher.cls, *teacher.parts])
        metrics = {"loss_cls": out.token_losses[0]}
        metrics.update({f"loss_part{k + 1}": out.token_losses[k + 1] for k in range(len(self._region_views))})
        return StepOutput(out.loss, metrics)

    def _student_outputs(self, views: PASSViewBatch) -> list[torch.Tensor]:
        """The student's head outputs per token type: CLS ``(G + L, B, out)`` (global views first,
        then local views in order), then for each region k PART_k ``(G + L_k, B, out)`` (the
        global views, then region k's local views)."""
        g, b = views.num_global, views.batch_size
        backbone, heads = self.student.backbone, self.student.heads
        glob = backbone(views.global_views)  # cls (G*B, E), parts (G*B, K, E)
        local = backbone(views.local_views, self._local_regions(views))  # cls (L*B, E), parts (L*B, 1, E)
        cls = heads.cls(torch.cat([glob.cls, local.cls])).unflatten(0, (-1, b))
        local_parts = local.parts[:, 0].unflatten(0, (-1, b))  # (L, B, E)
        parts = []
        for k, head in enumerate(heads.parts):
            tokens = torch.cat([glob.parts[:, k].unflatten(0, (g, b)), local_parts[self._region_views[k]]])
            parts.append(head(tokens))
        return [cls, *parts]

    def _local_regions(self, views: PASSViewBatch) -> torch.Tensor:
        """int64 ``(L * B,)``: the region of every local view row (view-major rows), made on
        the device from the ``local_region`` buffer (no host copy, nothing cached)."""
        return self.local_region[:, None].expand(-1, views.batch_size).reshape(-1)

    # --- schedules and bookkeeping ---------------------------------------------------------------
    def _schedules(self, progress: Progress) -> None:
        """Build the per-step momentum and temperature arrays for this run (once)."""
        key = (progress.total_steps, progress.steps_per_epoch)
        if self._schedule_key == key:
            return
        c = self.config
        epochs = max(1, progress.total_steps // max(1, progress.steps_per_epoch))
        self._momentum = cosine_schedule(c.teacher_momentum, 1.0, epochs, progress.steps_per_epoch)
        self._temperature = warmup_constant_schedule(
            c.warmup_teacher_temp, c.teacher_temp, epochs, progress.steps_per_epoch, c.warmup_teacher_temp_epochs
        )
        self._schedule_key = key

    def on_step_start(self, progress: Progress) -> None:
        self._schedules(progress)
        temperature = float(self._temperature[progress.step])
        self.loss.teacher_temp.fill_(temperature)
        self._current = {"teacher_temp": temperature, "teacher_momentum": float(self._momentum[progress.step])}

    def before_optimizer_step(self, progress: Progress) -> None:
        if progress.epoch < self.config.freeze_last_layer_epochs:
            for param in self.student.heads.last_layer_parameters():
                param.grad = None

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        """Teacher EMA: ``teacher = m * teacher + (1 - m) * student`` over every parameter."""
        self._schedules(progress)
        momentum = float(self._momentum[progress.step])
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def log_values(self) -> dict[str, float]:
        return dict(self._current)

    # --- export ---------------------------------------------------------------------------------
    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's ViT (DINO and PASS export the teacher), native :mod:`models.vit` keys."""
        return {k: v.detach() for k, v in self.teacher.backbone.state_dict().items()}

    def backbone_spec(self) -> BackboneSpec:
        c = self.config
        return BackboneSpec(c.arch,
                            {"num_parts": len(c.region_starts), "img_size": list(c.image_size)})


def _as_index(indices: list[int]) -> Union[slice, list[int]]:
    """``indices`` as a slice when they are consecutive."""
    if indices and indices == list(range(indices[0], indices[-1] + 1)):
        return slice(indices[0], indices[-1] + 1)
    return indices


# --- presets -------------------------------------------------------------------------------------
def pass_vits_lup() -> RunConfig:
    """The paper's ViT-S/16 run on LUPerson (8 GPUs x 128 images, 100 epochs, bf16).

    256x128 (global) and 128x64 (local) views, out_dim 65536, AdamW lr 5e-4 x 1024/256 after 10 warm-up epochs,
    cosine to 1e-6, weight decay 0.04 -> 0.4, per-tensor gradient clip 3.0, tau_s 0.1, tau_t 0.04,
    teacher momentum 0.996 -> 1, last layer frozen in epoch 0; bf16 autocast (the original
    used fp16 with a loss scaler: ``--precision fp16``)."""
    train = TrainConfig(
        epochs=100, batch_size=128, optimizer="adamw", lr=5e-4, lr_scaling="linear", min_lr=1e-6,
        warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, clip_mode="param",
        precision="bf16", output_dir="runs/pass_vits_lup", checkpoint_every_epochs=1, keep_last=3, log_every=50,
    )
    return RunConfig("pass", train, PASSConfig())


def pass_vitb_lup() -> RunConfig:
    """The paper's ViT-B/16 run on LUPerson (8 GPUs x 64 images, 100 epochs, bf16).

    As ``pass_vits_lup`` with a ViT-B/16 backbone and 64 images per GPU (``PASS/script/
    vit-b_full_lup-pass.sh``): AdamW lr 5e-4 x 512/256."""
    config = pass_vits_lup()
    train = dataclasses.replace(config.train, batch_size=64, output_dir="runs/pass_vitb_lup")
    return RunConfig("pass", train, PASSConfig(arch="vit_base"))


def pass_tiny() -> RunConfig:
    """A CPU smoke run of 10 steps (2-block ViT, 64x32 images, batch 8, float32).

    ViT dim 48 on 64x32 images (local views 32x16), heads 128 -> 64 -> 256; ``--max_steps 0``
    runs every epoch."""
    train = TrainConfig(
        epochs=2, max_steps=10, batch_size=8, lr=5e-4, warmup_epochs=0.5, min_lr=1e-6, precision="no",
        output_dir="runs/pass_tiny", checkpoint_every_epochs=1, keep_last=2, log_every=2,
    )
    method = PASSConfig(arch="vit_tiny", image_size=(64, 32), local_size=(32, 16), canvas_size=(128, 64),
                        out_dim=256, hidden_dim=128, bottleneck_dim=64)
    return RunConfig("pass", train, method)


PASS_PRESETS = {"pass_vits_lup": pass_vits_lup, "pass_vitb_lup": pass_vitb_lup, "pass_tiny": pass_tiny}


def upgrade_pass_config(values: dict) -> dict:
    """A saved PASS config of an older version, in today's fields (``arch`` vit_tiny_test is
    :mod:`models.registry`'s vit_tiny)."""
    values = dict(values)
    if "arch" in values:
        values["arch"] = canonical_name(values["arch"])
    return values
