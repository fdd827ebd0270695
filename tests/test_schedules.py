"""Per-step schedules against hand-computed points."""

from __future__ import annotations

import math

import pytest
import torch

from shards.errors import UserError
from train.config import TrainConfig
from train.methods.mmgl import MMGL, MMGLConfig
from train.pretrain import build_optimizer, make_schedules
from train.schedules import cosine_schedule, scaled_learning_rate, step_schedule, warmup_constant_schedule


def test_learning_rate_warmup_then_cosine_by_hand():
    # 4 epochs x 5 steps, 1 warm-up epoch: steps 0..4 ramp from 0 towards 1.0, steps 5..19 cosine to 0.1
    lr = cosine_schedule(1.0, 0.1, epochs=4, steps_per_epoch=5, warmup_epochs=1)
    assert len(lr) == 20
    assert lr[:5].tolist() == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert lr[5] == pytest.approx(1.0)
    # i steps into the 15-step cosine: 0.1 + 0.45 * (1 + cos(pi * i / 15))
    for i in (1, 7, 14):
        assert lr[5 + i] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * i / 15)))
    assert lr[12] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 15)))
    assert lr[-1] > 0.1 and lr[-1] == pytest.approx(0.1, abs=0.01)


def test_weight_decay_and_momentum_cosines_by_hand():
    wd = cosine_schedule(0.04, 0.4, epochs=2, steps_per_epoch=4)
    assert wd[0] == pytest.approx(0.04)
    assert wd[4] == pytest.approx(0.22)  # half way: the mean of both ends
    assert wd[2] == pytest.approx(0.4 - 0.36 * (1 + math.cos(math.pi / 4)) / 2 + 0.0)
    momentum = cosine_schedule(0.996, 1.0, epochs=1, steps_per_epoch=10)
    assert momentum[0] == pytest.approx(0.996)
    assert momentum[5] == pytest.approx(0.998)
    assert all(a < b for a, b in zip(momentum, momentum[1:]))


def test_teacher_temperature_warmup_then_constant_by_hand():
    temp = warmup_constant_schedule(0.04, 0.07, epochs=3, steps_per_epoch=2, warmup_epochs=2)
    assert temp.tolist() == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    assert warmup_constant_schedule(0.04, 0.04, 2, 3).tolist() == pytest.approx([0.04] * 6)


def test_fractional_warmup_and_linear_scaling():
    lr = cosine_schedule(2.0, 0.0, epochs=1, steps_per_epoch=8, warmup_epochs=0.5, warmup_start=1.0)
    assert lr[:4].tolist() == pytest.approx([1.0, 1.25, 1.5, 1.75])
    assert scaled_learning_rate(5e-4, 1024, "linear") == pytest.approx(2e-3)
    assert scaled_learning_rate(5e-4, 1024, "none") == pytest.approx(5e-4)


def agw_adjust_learning_rate(base: float, epoch: int) -> float:
    """The AGW code's schedule written out (mangye16/Cross-Modal-Re-ID-baseline train.py,
    ``adjust_learning_rate``; the same in hansonchen1996/MMGL AGW/train.py)."""
    if epoch < 10:
        return base * (epoch + 1) / 10
    if epoch < 20:
        return base
    if epoch < 50:
        return base * 0.1
    return base * 0.01


def test_step_schedule_is_agws_per_epoch_schedule():
    lr = step_schedule(0.1, epochs=81, steps_per_epoch=3, warmup_epochs=10, milestones=(20, 50), gamma=0.1)
    assert len(lr) == 81 * 3
    for epoch in range(81):
        assert lr[3 * epoch: 3 * epoch + 3].tolist() == pytest.approx([agw_adjust_learning_rate(0.1, epoch)] * 3)
    assert step_schedule(1.0, epochs=3, steps_per_epoch=1).tolist() == [1.0, 1.0, 1.0]  # no warm-up, no steps


def test_the_pretraining_loop_builds_the_step_schedule_and_nesterov_sgd():
    cfg = TrainConfig(shards="x", epochs=4, optimizer="sgd", lr=0.1, lr_scaling="none", lr_schedule="step",
                      warmup_epochs=2, lr_milestones=(3,), lr_gamma=0.5, sgd_nesterov=True,
                      weight_decay=5e-4, weight_decay_end=5e-4)
    schedules = make_schedules(cfg, steps_per_epoch=2, world=1, images_per_slot=2)
    assert schedules["lr"].tolist() == pytest.approx([0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])
    assert schedules["wd"].tolist() == pytest.approx([5e-4] * 8)
    optimizer = build_optimizer(MMGL(MMGLConfig(backbone="tiny", image_size=(96, 48))), cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)


def test_the_step_schedule_refuses_a_fractional_warmup():
    with pytest.raises(UserError, match="whole epochs"):
        TrainConfig(shards="x", lr_schedule="step", warmup_epochs=0.5).validate()
    TrainConfig(shards="x", lr_schedule="cosine", warmup_epochs=0.5).validate()  # the cosine takes fractions
