"""Per-iteration schedules, computed up front for the whole run as DINO's ``main_dino.py`` does.

Every schedule is a float64 numpy array with one value per optimizer step (``epochs *
steps_per_epoch`` entries); step ``i`` of the run reads entry ``i``. Computing them up front
makes a resumed run read exactly the values an uninterrupted run would have read, and makes the
curves easy to check and plot.

- :func:`cosine_schedule`: optional linear warm-up from ``warmup_start`` to ``base``, then a
  half cosine from ``base`` down (or up) to ``final``. The learning rate (warm-up 10 epochs, then
  cosine to ``min_lr``), the weight decay (0.04 -> 0.4, no warm-up) and the teacher momentum
  (0.996 -> 1, no warm-up) are all this shape.
- :func:`warmup_constant_schedule`: linear from ``start`` to ``value`` over the warm-up, then
  constant; the teacher temperature.
- :func:`timm_cosine_epoch_schedule`: timm's ``CosineLRScheduler`` stepped per epoch, the
  learning rate of the TransReID fine-tuning recipe (PASS_transreid).
- :func:`step_schedule`: the AGW code's learning rate (``adjust_learning_rate`` in
  mangye16/Cross-Modal-Re-ID-baseline ``train.py``): constant within an epoch, a warm-up of
  ``base * (e + 1) / warmup_epochs`` in epoch ``e``, then ``base`` times ``gamma`` per milestone
  passed.
"""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """``(epochs * steps_per_epoch,)`` values: linear warm-up, then cosine from ``base`` to ``final``.

    Warm-up covers the first ``round(warmup_epochs * steps_per_epoch)`` steps, going linearly
    from ``warmup_start`` (at step 0) towards ``base`` (reached at the first step after it).
    After it, step ``i`` of the ``n`` remaining steps is
    ``final + (base - final) * (1 + cos(pi * i / n)) / 2``: ``base`` at the first step after the
    warm-up, approaching ``final`` at the last one (which is ``final`` only in the limit, as
    in DINO).
    """
    total = int(epochs) * int(steps_per_epoch)
    warmup = min(total, int(round(warmup_epochs * steps_per_epoch)))
    ramp = warmup_start + (base - warmup_start) * np.arange(warmup) / max(warmup, 1)
    remaining = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * remaining / max(len(remaining), 1)))
    return np.concatenate([ramp, cosine]).astype(np.float64)


def warmup_constant_schedule(
    start: float, value: float, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0
) -> np.ndarray:
    """``(epochs * steps_per_epoch,)`` values: linear from ``start`` to ``value`` over the first
    ``round(warmup_epochs * steps_per_epoch)`` steps, then ``value``.

    The warm-up ramp includes both ends (``start`` at step 0, ``value`` at the last warm-up
    step), as DINO's ``np.linspace`` teacher-temperature warm-up does; DINO steps it once per
    epoch, here it moves every step.
    """
    total = int(epochs) * int(steps_per_epoch)
    warmup = min(total, int(round(warmup_epochs * steps_per_epoch)))
    ramp = np.linspace(start, value, warmup)
    return np.concatenate([ramp, np.full(total - warmup, value)]).astype(np.float64)


def step_schedule(
    base: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
) -> np.ndarray:
    """``(epochs * steps_per_epoch,)`` values, constant within each epoch (AGW's schedule).

    Epoch ``e`` gets ``base * (e + 1) / warmup_epochs`` while ``e < warmup_epochs``, then
    ``base * gamma ** k`` where ``k`` is the number of ``milestones`` (epoch indices) ``<= e``.
    AGW: ``warmup_epochs=10, milestones=(20, 50), gamma=0.1`` (0.1 x base in epoch 0, base in
    epochs 9-19, 0.1 x base in 20-49, 0.01 x base from 50).
    """
    values = [
        base * (e + 1) / warmup_epochs if e < warmup_epochs else base * gamma ** sum(e >= m for m in milestones)
        for e in range(int(epochs))
    ]
    return np.repeat(np.asarray(values, dtype=np.float64), int(steps_per_epoch))


def scaled_learning_rate(lr: float, total_batch: int, rule: str) -> float:
    """The peak learning rate for ``total_batch`` images per step: ``lr * total_batch / 256``
    under the ``linear`` rule (DINO, PASS), ``lr`` unchanged under ``none``."""
    if rule == "linear":
        return lr * total_batch / 256.0
    if rule == "none":
        return lr
    raise ValueError(f"unknown learning-rate scaling rule {rule!r}")


def timm_cosine_epoch_schedule(
    peak: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int,
    warmup_start: float,
    minimum: float,
    cycle_epochs: int | None = None,
) -> np.ndarray:
    """``(epochs * steps_per_epoch,)`` values of timm's ``CosineLRScheduler`` stepped once per
    epoch, as TransReID / PASS_transreid run it (``t_in_epochs=True``, one cycle, no warm-up
    prefix, no noise; ``solver/scheduler_factory.py`` and ``processor/processor.py``).

    Epoch ``e`` (0-based) trains with the value at ``t = e`` for all its steps:

    - ``t < warmup_epochs``: ``warmup_start + t * (peak - warmup_start) / warmup_epochs``;
    - else: ``minimum + (peak - minimum) * (1 + cos(pi * t / cycle_epochs)) / 2`` -- the cosine
      runs on ``t / cycle_epochs`` from epoch 0, not from the end of the warm-up, so the first
      epoch after it is already below ``peak`` (and below the last warm-up value for long
      warm-ups);
    - ``t >= cycle_epochs`` (past the one cycle): ``minimum``.

    ``cycle_epochs`` (timm's ``t_initial``) defaults to ``epochs``. ``warmup_start`` and
    ``minimum`` are absolute values: the reference passes ``0.01 x`` and ``0.002 x`` its BASE_LR
    to every parameter group, so a group with another peak (biases: ``2 x``) warms up from and
    decays to the same values as the others. (Why ``t = e``: the scheduler sets
    ``warmup_start`` when it is built, and ``scheduler.step(e)`` after epoch ``e`` of
    ``1..epochs`` sets the value of ``t = e`` for the next one.)
    """
    cycle = int(cycle_epochs or epochs)
    if cycle < 1 or epochs < 1 or steps_per_epoch < 1:
        raise ValueError("epochs, steps_per_epoch and cycle_epochs must be positive")
    t = np.arange(int(epochs), dtype=np.float64)
    ramp = warmup_start + t * (peak - warmup_start) / max(int(warmup_epochs), 1)
    cosine = minimum + 0.5 * (peak - minimum) * (1.0 + np.cos(math.pi * t / cycle))
    per_epoch = np.where(t < warmup_epochs, ramp, np.where(t < cycle, cosine, minimum))
    return np.repeat(per_epoch, int(steps_per_epoch)).astype(np.float64)
