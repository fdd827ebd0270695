"""Per-step schedules against hand-computed points."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import UserError
from train.config import TrainConfig
from train.methods.mmgl import MMGL, MMGLConfig
from train.pretrain import build_optimizer, make_schedules
from train.schedules import cosine_schedule, scaled_learning_rate, step_schedule, timm_cosine_epoch_schedule, warmup_constant_schedule


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


def test_timm_cosine_per_epoch_as_pass_transreid_runs_it_by_hand():
    """BASE_LR 4e-4, 120 epochs, 20 warm-up epochs from 0.01 x lr, lr_min 0.002 x lr, stepped
    per epoch (values worked out by hand from timm's CosineLRScheduler._get_lr(t = epoch))."""
    base, steps = 4e-4, 3
    lr = timm_cosine_epoch_schedule(base, epochs=120, steps_per_epoch=steps, warmup_epochs=20,
                                    warmup_start=0.01 * base, minimum=0.002 * base)
    assert lr.shape == (360,)
    per_epoch = lr[::steps]
    assert (lr.reshape(120, steps) == per_epoch[:, None]).all()  # constant within an epoch
    # warm-up: 4e-6 + e * (4e-4 - 4e-6) / 20 = 4e-6 + e * 1.98e-5
    assert per_epoch[0] == pytest.approx(4e-6)
    assert per_epoch[1] == pytest.approx(2.38e-5)
    assert per_epoch[10] == pytest.approx(2.02e-4)
    assert per_epoch[19] == pytest.approx(3.802e-4)
    # cosine over t / 120 from epoch 0: 8e-7 + 0.5 * (4e-4 - 8e-7) * (1 + cos(pi * t / 120))
    # t = 20: cos(pi / 6) = 0.8660254 -> 8e-7 + 1.996e-4 * 1.8660254 = 3.732587e-4 (below epoch 19's 3.802e-4)
    assert per_epoch[20] == pytest.approx(3.732587e-4, rel=1e-6)
    assert per_epoch[20] < per_epoch[19]
    # t = 60: cos(pi / 2) = 0 -> 8e-7 + 1.996e-4 = 2.004e-4
    assert per_epoch[60] == pytest.approx(2.004e-4)
    # t = 119: cos(119 pi / 120) = -0.99965732 -> 8e-7 + 1.996e-4 * 0.00034268 = 8.684e-7
    assert per_epoch[119] == pytest.approx(8.684e-7, rel=1e-3)


def test_timm_cosine_groups_share_the_warmup_start_and_the_minimum():
    """Biases (lr x 2 in the reference) warm up from and decay to the same absolute values."""
    base = 4e-4
    bias = timm_cosine_epoch_schedule(2 * base, epochs=120, steps_per_epoch=1, warmup_epochs=20,
                                      warmup_start=0.01 * base, minimum=0.002 * base)
    assert bias[0] == pytest.approx(4e-6)
    assert bias[10] == pytest.approx(4e-6 + 10 * (8e-4 - 4e-6) / 20)
    assert bias[60] == pytest.approx(8e-7 + 0.5 * (8e-4 - 8e-7))


def test_timm_cosine_past_its_cycle_stays_at_the_minimum():
    lr = timm_cosine_epoch_schedule(1.0, epochs=6, steps_per_epoch=1, warmup_epochs=0, warmup_start=0.0,
                                    minimum=0.1, cycle_epochs=4)
    assert lr.tolist() == pytest.approx([1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55,
                                         0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4)), 0.1, 0.1])


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
    optimizer = build_optimizer(MMGL(MMGLConfig(backbone="resnet_tiny_two_stream", image_size=(96, 48))), cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)


def test_the_step_schedule_refuses_a_fractional_warmup():
    with pytest.raises(UserError, match="whole epochs"):
        TrainConfig(shards="x", lr_schedule="step", warmup_epochs=0.5).validate()
    TrainConfig(shards="x", lr_schedule="cosine", warmup_epochs=0.5).validate()  # the cosine takes fractions
