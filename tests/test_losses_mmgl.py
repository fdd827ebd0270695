"""MMGL losses against hand-worked cases and a loop-by-loop reference written from the definitions
in :mod:`train.losses.permutation` and :mod:`train.losses.pcc`."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.losses.pcc import part_cycle_contrastive, pcc_logits
from train.losses.permutation import permutation_accuracy, permutation_correct, permutation_loss


# ----------------------------------------------------------------------------- permutation


def test_permutation_accuracy_hand_worked():
    perm = torch.tensor([[2, 0, 1], [0, 1, 2], [1, 2, 0], [0, 2, 1]])
    predicted = torch.tensor([
        # every row's argmax is perm's entry: correct
        [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.3, 0.4, 0.3]],
        # row 2 points at stripe 1 instead of 2: wrong
        [[0.9, 0.0, 0.1], [0.0, 0.8, 0.2], [0.1, 0.5, 0.4]],
        # rows 0 and 1 both point at stripe 2 (one of them right): wrong
        [[0.1, 0.3, 0.6], [0.0, 0.1, 0.9], [0.9, 0.0, 0.1]],
        # correct, scores need not be normalized
        [[5.0, -1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 2.0, 1.0]],
    ])
    assert permutation_correct(predicted, perm).tolist() == [True, False, False, True]
    assert permutation_accuracy(predicted, perm).item() == pytest.approx(0.5)


def test_permutation_loss_hand_computed():
    predicted = torch.tensor([[[0.7, 0.3], [0.3, 0.7]]] * 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    # image 0: 4 x 0.3^2 = 0.36; image 1: every entry is 0.7 off, 4 x 0.49 = 1.96; mean 1.16
    assert permutation_loss(predicted, target).item() == pytest.approx(1.16)
    uniform = torch.full((1, 6, 6), 1 / 6)
    assert permutation_loss(uniform, torch.eye(6)[None]).item() == pytest.approx(5.0)  # n - 1


def test_permutation_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        permutation_loss(torch.zeros(2, 3, 3), torch.zeros(2, 4, 4))


# ------------------------------------------------------------------------------------- PCC


def naive_pcc(rgb, ir, tau, t_r):
    """Loop-by-loop PCC from the documented definition: per part k, per query (RGB queries then
    IR queries), soft retrieval over each modality's part-k set without the query itself, then
    symmetric InfoNCE over the 2B queries of part k; accuracy over rows and columns."""
    b, n, _ = rgb.shape
    rgb, ir = F.normalize(rgb.double(), dim=-1), F.normalize(ir.double(), dim=-1)
    losses, hits = [], []
    for k in range(n):
        queries = [("rgb", i) for i in range(b)] + [("ir", i) for i in range(b)]
        q_ir, q_rgb = [], []
        for modality, i in queries:
            q = rgb[i, k] if modality == "rgb" else ir[i, k]
            for name, pool, out in (("ir", ir, q_ir), ("rgb", rgb, q_rgb)):
                candidates = [pool[j, k] for j in range(b) if not (name == modality and j == i)]
                weights = torch.softmax(torch.stack([q @ u / t_r for u in candidates]), 0)
                out.append(F.normalize(sum(w * u for w, u in zip(weights, candidates)), dim=0))
        m = len(queries)
        logits = [[q_ir[a] @ q_rgb[c] / tau for c in range(m)] for a in range(m)]
        for a in range(m):
            row = torch.stack(logits[a])
            col = torch.stack([logits[c][a] for c in range(m)])
            losses.append(0.5 * (-torch.log_softmax(row, 0)[a] - torch.log_softmax(col, 0)[a]))
            hits += [int(row.argmax()) == a, int(col.argmax()) == a]
    return torch.stack(losses).mean(), sum(hits) / len(hits)


@pytest.mark.parametrize("tau, t_r", [(0.07, 0.07), (0.05, 0.2), (1.0, 1.0)])
def test_pcc_matches_naive_loops(tau, t_r):
    g = torch.Generator().manual_seed(3)
    rgb = torch.randn(4, 3, 8, generator=g)
    ir = torch.randn(4, 3, 8, generator=g)
    out = part_cycle_contrastive(rgb, ir, tau=tau, retrieval_temperature=t_r)
    loss, acc = naive_pcc(rgb, ir, tau, t_r)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert out.accuracy.item() == pytest.approx(acc)


def test_pcc_excludes_the_query_from_its_own_modality():
    # Two RGB parts identical to a query would make q_rgb = q if the query were not left out:
    # with B = 2 each RGB query has exactly one RGB candidate, the other slot's.
    rgb = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    ir = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    logits = pcc_logits(rgb, ir, tau=1.0, retrieval_temperature=1e-3)  # hard retrieval
    # RGB query 0 = (1, 0) retrieves the RGB part of slot 1, (0, 1), and the IR part of slot 0,
    # (1, 0): its positive logit is their cosine, 0.
    assert logits[0, 0, 0].item() == pytest.approx(0.0, abs=1e-4)
    # Not left out, the query would retrieve itself: q_rgb = (1, 0) and the logit would be 1.


def test_pcc_values_and_gradients_are_finite_under_bfloat16_inputs():
    rgb = torch.randn(8, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    ir = torch.randn(8, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    out = part_cycle_contrastive(rgb, ir)
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    out.loss.backward()
    assert torch.isfinite(rgb.grad.float()).all() and torch.isfinite(ir.grad.float()).all()


def test_pcc_needs_two_slots():
    with pytest.raises(ValueError, match="at least 2"):
        part_cycle_contrastive(torch.randn(1, 6, 4), torch.randn(1, 6, 4))
