"""The PASS method: teacher init, token routing (one backbone pass per resolution), the frozen
last layer, the teacher EMA and temperature schedules, weight-decay groups."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipelines.batch import Batch
from train.methods.base import Progress
from train.methods.pass_method import PASS, pass_tiny
from train.pretrain import parameter_groups

B = 2


def tiny_method(**changes) -> PASS:
    torch.manual_seed(0)
    return PASS(dataclasses.replace(pass_tiny().method_config, **changes))


def tiny_batch(b: int = B) -> Batch:
    images = torch.randint(0, 256, (b, 3, 64, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    minus = torch.full((b,), -1)
    return Batch(images, minus, minus, torch.zeros(b, dtype=torch.int64), torch.arange(b))


def progress(step: int, epoch: int = 0, total: int = 20, per_epoch: int = 10) -> Progress:
    return Progress(step=step, total_steps=total, epoch=epoch, steps_per_epoch=per_epoch)


def test_teacher_starts_as_the_student_without_gradients():
    method = tiny_method()
    for (name, s), (_, t) in zip(method.student.named_parameters(), method.teacher.named_parameters()):
        assert torch.equal(s, t), name
        assert not t.requires_grad
    assert method.student.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert all(m.drop_prob == 0 for m in method.teacher.modules() if type(m).__name__ == "DropPath")
    assert torch.count_nonzero(method.loss.center) == 0
    assert set(method.state_dict()) >= {"loss.center", "teacher.backbone.cls_token", "student.heads.cls.last_layer.weight_v"}


def test_one_backbone_pass_per_resolution_and_the_teacher_on_global_views_only():
    method = tiny_method()
    calls = {"student": [], "teacher": []}
    for role in calls:
        getattr(method, role).backbone.register_forward_hook(
            lambda module, args, out, role=role: calls[role].append((tuple(args[0].shape), len(args) > 1)))
    views = method.make_views(tiny_batch(), torch.Generator().manual_seed(0))
    method.on_step_start(progress(0))
    out = method(views)
    assert calls["student"] == [((2 * B, 3, 64, 32), False), ((9 * B, 3, 32, 16), True)]
    assert calls["teacher"] == [((2 * B, 3, 64, 32), False)]
    assert torch.isfinite(out.loss)
    assert set(out.metrics) == {"loss_cls", "loss_part1", "loss_part2", "loss_part3"}


def test_student_tokens_are_routed_to_their_views_and_heads():
    """Each row of the batched student outputs equals the network run on that view alone."""
    method = tiny_method(drop_path=0.0).eval()
    views = method.make_views(tiny_batch(), torch.Generator().manual_seed(0))
    outputs = method._student_outputs(views)
    backbone, heads = method.student.backbone, method.student.heads
    glob = views.global_views.unflatten(0, (2, B))
    local = views.local_views.unflatten(0, (9, B))
    with torch.no_grad():
        for v in range(2):
            tokens = backbone(glob[v])
            torch.testing.assert_close(outputs[0][v], heads.cls(tokens.cls), rtol=1e-4, atol=1e-5)
            for k in range(3):
                torch.testing.assert_close(outputs[1 + k][v], heads.parts[k](tokens.parts[:, k]), rtol=1e-4, atol=1e-5)
        for l, region in enumerate(views.local_region):
            tokens = backbone(local[l], region=region)
            torch.testing.assert_close(outputs[0][2 + l], heads.cls(tokens.cls), rtol=1e-4, atol=1e-5)
            row = 2 + l - 3 * region  # region k's locals follow the 2 global views in its part tensor
            torch.testing.assert_close(outputs[1 + region][row], heads.parts[region](tokens.parts[:, 0]),
                                       rtol=1e-4, atol=1e-5)
    assert [o.shape[0] for o in outputs] == [11, 5, 5, 5]


def test_last_layer_gets_no_update_during_the_first_epoch_only():
    method = tiny_method()
    views = method.make_views(tiny_batch(), 0)
    last = set(map(id, method.student.heads.last_layer_parameters()))
    for epoch, frozen in ((0, True), (1, False)):
        method.zero_grad(set_to_none=True)
        method.on_step_start(progress(10 * epoch, epoch))
        method(views).loss.backward()
        method.before_optimizer_step(progress(10 * epoch, epoch))
        for p in method.student.parameters():
            if p.requires_grad:
                assert (p.grad is None) == (frozen and id(p) in last)


def test_teacher_ema_follows_the_cosine_momentum_by_hand():
    method = tiny_method()
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    step, total = 7, 20
    method.on_step_start(progress(step, total=total))
    method.after_step(progress(step, total=total))
    m = 1.0 - (1.0 - 0.996) * (1 + math.cos(math.pi * step / total)) / 2
    assert method.log_values()["teacher_momentum"] == pytest.approx(m)
    for t0, t, s in zip(teacher_before, method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s)


def test_teacher_temperature_warmup():
    method = tiny_method(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=1)
    for step, expected in ((0, 0.04), (3, 0.05), (9, 0.07), (15, 0.07)):
        method.on_step_start(progress(step, step // 10))
        assert method.loss.teacher_temp.item() == pytest.approx(expected)
        assert method.log_values()["teacher_temp"] == pytest.approx(expected)


def test_weight_decay_groups_leave_out_biases_norms_and_frozen_parameters():
    method = tiny_method()
    decay, no_decay = parameter_groups(method)
    names = {id(p): n for n, p in method.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "student.backbone.part_tokens" in decayed and "student.backbone.patch_pos_embed" in decayed
    assert "student.backbone.blocks.0.attn.qkv.weight" in decayed
    assert "student.heads.cls.last_layer.weight_v" in decayed
    assert "student.backbone.blocks.0.attn.qkv.bias" in undecayed and "student.backbone.norm.weight" in undecayed
    assert not any(n.startswith("teacher.") or n.endswith("weight_g") for n in decayed | undecayed)
    assert no_decay["weight_decay"] == 0.0


def test_backbone_export_is_the_teacher_vit():
    method = tiny_method()
    with torch.no_grad():
        method.teacher.backbone.cls_token.fill_(3.0)
    state = method.backbone_state_dict()
    assert torch.equal(state["cls_token"], torch.full((1, 1, 48), 3.0))
    assert "part_tokens" in state and not any(k.startswith(("heads", "student")) for k in state)
    spec = method.backbone_spec()
    assert spec.name == "vit_tiny" and spec.kwargs == {"num_parts": 3, "img_size": [64, 32]}
