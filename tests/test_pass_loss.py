"""The PASS / DINO loss against a naive loop-by-loop implementation written from DESIGN.md
section 5, and the center update against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses.dino import DINOLoss

G, L, K, B, D = 2, 9, 3, 3, 7
REGION = (0, 0, 0, 1, 1, 1, 2, 2, 2)
TAU_S, TAU_T = 0.1, 0.04


def naive_pass_loss(teacher_cls, teacher_parts, student_cls, student_parts_global, student_parts_local, centers):
    """DESIGN.md, term by term, sample by sample.

    teacher_cls (G, B, D); teacher_parts (G, B, K, D); student_cls (G + L, B, D);
    student_parts_global (G, B, K, D); student_parts_local (L, B, D) (PART of the view's region);
    centers (1 + K, D): CLS then PART_1..K.
    """

    def term(t, s, c):  # mean over the batch of sum_d -softmax((t - c)/tau_t) * log_softmax(s/tau_s)
        total = 0.0
        for b in range(t.shape[0]):
            q = [math.exp((t[b, d] - c[d]) / TAU_T) for d in range(D)]
            zq = sum(q)
            logz = math.log(sum(math.exp(s[b, d] / TAU_S) for d in range(D)))
            total += sum(-(q[d] / zq) * (s[b, d] / TAU_S - logz) for d in range(D))
        return float(total) / t.shape[0]

    terms = []
    for g in range(G):  # CLS: every student view but the same one
        for v in range(G + L):
            if v != g:
                terms.append(term(teacher_cls[g].double(), student_cls[v].double(), centers[0].double()))
    for k in range(K):
        views = [student_parts_global[v, :, k] for v in range(G)]
        views += [student_parts_local[l] for l in range(L) if REGION[l] == k]
        for g in range(G):
            for v, s in enumerate(views):
                if v != g:
                    terms.append(term(teacher_parts[g, :, k].double(), s.double(), centers[1 + k].double()))
    assert len(terms) == 44
    return sum(terms) / len(terms), terms


def random_outputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return r(G, B, D), r(G, B, K, D), r(G + L, B, D), r(G, B, K, D), r(L, B, D), 0.3 * r(1 + K, D)


def loss_inputs(teacher_cls, teacher_parts, student_cls, student_parts_global, student_parts_local):
    """The same outputs in DINOLoss's layout: one (V_t, B, D) tensor per token type."""
    student = [student_cls]
    teacher = [teacher_cls]
    for k in range(K):
        local_k = student_parts_local[[l for l in range(L) if REGION[l] == k]]
        student.append(torch.cat([student_parts_global[:, :, k], local_k]))
        teacher.append(teacher_parts[:, :, k])
    return student, teacher


def make_loss(centers):
    loss = DINOLoss(D, 1 + K, student_temp=TAU_S, center_momentum=0.9)
    loss.center.copy_(centers)
    loss.teacher_temp.fill_(TAU_T)
    return loss


def test_loss_matches_the_naive_term_by_term_loss_with_nonzero_centers():
    tc, tp, sc, spg, spl, centers = random_outputs()
    expected, terms = naive_pass_loss(tc, tp, sc, spg, spl, centers)
    out = make_loss(centers)(*loss_inputs(tc, tp, sc, spg, spl))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # per token type: CLS has terms[:20], part k terms[20 + 8k : 28 + 8k]
    per_type = [sum(terms[:20]) / 20] + [sum(terms[20 + 8 * k : 28 + 8 * k]) / 8 for k in range(K)]
    assert out.token_losses.tolist() == pytest.approx(per_type, rel=1e-5)


def test_loss_gradient_matches_the_naive_loss_gradient():
    tc, tp, sc, spg, spl, centers = random_outputs(1)
    student, teacher = loss_inputs(tc, tp, sc, spg, spl)
    student = [s.clone().requires_grad_(True) for s in student]
    make_loss(centers)(student, teacher).loss.backward()

    # the naive loss again, written with torch ops term by term so autograd can differentiate it
    ref = [s.detach().double().requires_grad_(True) for s in student]
    total, count = 0.0, 0
    for t in range(1 + K):
        q = torch.softmax((teacher[t].double() - centers[t].double()) / TAU_T, dim=-1)
        for g in range(G):
            for v in range(ref[t].shape[0]):
                if v != g:
                    total = total + (-(q[g] * torch.log_softmax(ref[t][v] / TAU_S, dim=-1)).sum(-1)).mean()
                    count += 1
    (total / count).backward()
    for s, r in zip(student, ref):
        torch.testing.assert_close(s.grad.double(), r.grad, rtol=1e-5, atol=1e-7)


def test_centers_move_after_the_loss_by_hand():
    tc, tp, sc, spg, spl, centers = random_outputs(2)
    loss = make_loss(centers)
    before = loss.center.clone()
    expected_loss, _ = naive_pass_loss(tc, tp, sc, spg, spl, before)
    out = loss(*loss_inputs(tc, tp, sc, spg, spl))
    # the loss used the old centers
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-5)
    # new center = 0.9 * old + 0.1 * mean over the 2 global views and the batch (one process)
    for d in range(D):
        mean_cls = sum(tc[g, b, d].item() for g in range(G) for b in range(B)) / (G * B)
        assert loss.center[0, d].item() == pytest.approx(0.9 * before[0, d].item() + 0.1 * mean_cls, abs=1e-6)
        for k in range(K):
            mean_k = sum(tp[g, b, k, d].item() for g in range(G) for b in range(B)) / (G * B)
            assert loss.center[1 + k, d].item() == pytest.approx(0.9 * before[1 + k, d].item() + 0.1 * mean_k,
                                                                 abs=1e-6)


def test_loss_is_float32_under_bfloat16_autocast():
    tc, tp, sc, spg, spl, centers = random_outputs(3)
    student, teacher = loss_inputs(tc, tp, sc, spg, spl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = make_loss(centers)([s.bfloat16() for s in student], [t.bfloat16() for t in teacher])
    assert out.loss.dtype == torch.float32
    expected, _ = naive_pass_loss(*(x.bfloat16().float() for x in (tc, tp, sc, spg, spl)), centers)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)


def test_mismatched_token_types_are_refused():
    tc, tp, sc, spg, spl, centers = random_outputs()
    student, teacher = loss_inputs(tc, tp, sc, spg, spl)
    with pytest.raises(ValueError, match="token types"):
        make_loss(centers)(student[:2], teacher[:2])
