"""The method contract: everything the shared pre-training loop needs from a method.

The loop (:mod:`train.pretrain`) owns data, optimizer, schedules of the learning rate and weight
decay, mixed precision, checkpoints and logging. A method owns its models, its views, its loss
and its per-step bookkeeping (EMA teacher, centers, temperature schedules). One training step is:

    views = method.make_views(batch, generator)        # on the device, no grad, Kornia
    method.on_step_start(progress)                      # method schedules for this step
    out = model(views)                                  # model = accelerate-prepared method
    accelerator.backward(out.loss)
    method.before_optimizer_step(progress)              # e.g. drop frozen layers' gradients
    clip; optimizer.step()
    method.after_step(progress)                         # EMA teacher, etc.

A method is an ``nn.Module``: the loop hands it to ``accelerator.prepare`` (DDP wraps it on
several processes) and checkpoints its ``state_dict`` (so a teacher, centers and any buffer a
method registers are saved and restored with it). Parameters that must not be trained
(an EMA teacher) have ``requires_grad=False``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from models.registry import BackboneSpec
from pipelines.batch import Batch


@dataclass(frozen=True)
class DataSpec:
    """What a method needs from the data pipeline (:func:`pipelines.sources.make_source`).

    size:    ``(H, W)`` the source decodes and resizes every image to (``fit="resize"``), or the
             canvas that bounds the source resolution (``fit="canvas"``)
    fit:     :data:`pipelines.sources.canvas.FIT_MODES`: ``resize`` to ``size``, or ``canvas``
             (each image at its source resolution and aspect ratio, its valid size in the Batch)
    sampler: the source's sampler (``random``; ``pairs`` for MMGL's RGB/IR slots, which needs
             the device cache)
    images_per_slot: images per batch slot (2 for ``pairs``: a batch of ``B`` slots holds the
             ``B`` RGB images, then the ``B`` IR images); the loop's images/s counts images
    """

    size: tuple[int, int]
    sampler: str = "random"
    fit: str = "resize"
    images_per_slot: int = 1


@dataclass(frozen=True)
class Progress:
    """Where training stands at the current step (0-based ``step`` < ``total_steps``)."""

    step: int
    total_steps: int
    epoch: int
    steps_per_epoch: int

    @property
    def fraction(self) -> float:
        """Progress through the run in [0, 1)."""
        return self.step / max(1, self.total_steps)


@dataclass
class StepOutput:
    """A training forward's result: the scalar loss to back-propagate, and detached scalar
    metrics to log (e.g. ``loss_cls``, ``perm_acc``), averaged over the local batch."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module, ABC):
    """A pre-training method (see the module docstring for the step it takes part in)."""

    #: The ``--method`` name.
    name: ClassVar[str]

    @abstractmethod
    def data_spec(self) -> DataSpec:
        """The image size and sampler this method's batches need."""

    @abstractmethod
    def make_views(self, batch: Batch, generator: torch.Generator) -> Any:
        """The method's views of ``batch``, made on the batch's device in batch (Kornia), without
        gradients, reproducible from ``generator``. The result is passed to :meth:`forward`."""

    @abstractmethod
    def forward(self, views: Any) -> StepOutput:
        """Run the trained networks on ``views`` and return the loss (training mode)."""

    def on_step_start(self, progress: Progress) -> None:
        """Set per-step method schedules (teacher temperature, frozen last layer) before forward."""

    def before_optimizer_step(self, progress: Progress) -> None:
        """Act on the gradients after backward (already averaged across processes), before
        clipping and the optimizer step: e.g. set a frozen layer's ``.grad`` to None so the
        optimizer leaves it untouched (DINO's ``cancel_gradients_last_layer``). Optional."""

    def after_step(self, progress: Progress) -> None:
        """Update what follows the optimizer step (EMA teacher, ...); called on every process."""

    def log_values(self) -> dict[str, float]:
        """Host-side values of the method's schedules at the current step (teacher momentum,
        temperature) for the metrics log; read at logging steps only. Optional."""
        return {}

    def backbone_spec(self) -> Optional[BackboneSpec]:
        """How to rebuild the exported backbone (:meth:`backbone_state_dict`) without this
        method (a :mod:`models.registry` name and its keyword arguments), stored with an export
        so that it can be loaded back. Optional."""
        return None

    def no_weight_decay(self, name: str, parameter: nn.Parameter) -> bool:
        """Whether a trainable parameter is exempt from weight decay: biases and other 1-D
        parameters (norm weights), as DINO and PASS do (tokens and position embeddings, 3-D,
        are decayed there too)."""
        return parameter.ndim <= 1 or name.endswith(".bias")

    @abstractmethod
    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone to export (teacher for PASS, the ResNet for MMGL), without heads, in the
        project's native key layout; :mod:`models.export` converts it to other layouts."""
