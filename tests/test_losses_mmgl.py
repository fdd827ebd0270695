"""MMGL losses against hand-worked cases and a loop-by-loop reference written from the definitions
in :mod:`train.losses.permutation` and :mod:`train.losses.pcc`."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.losses.pcc import part_cycle_contrastive, position_pcc_logits, slot_pcc_logits
from train.losses.permutation import permutation_accuracy, permutation_correct, permutation_loss, stripe_accuracy


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


def test_stripe_accuracy_hand_worked():
    perm = torch.tensor([[2, 0, 1], [0, 1, 2]])
    predicted = torch.tensor([
        [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.3, 0.4, 0.3]],  # 3 rows right
        [[0.9, 0.0, 0.1], [0.0, 0.8, 0.2], [0.1, 0.5, 0.4]],  # rows 0 and 1 right, row 2 wrong
    ])
    assert stripe_accuracy(predicted, perm).item() == pytest.approx(5 / 6)
    assert permutation_accuracy(predicted, perm).item() == pytest.approx(0.5)


def naive_mse(predicted, target):
    """nn.MSELoss's default written out: the mean of the squared differences over every entry."""
    total, count = 0.0, 0
    for image_p, image_t in zip(predicted.tolist(), target.tolist()):
        for row_p, row_t in zip(image_p, image_t):
            for p, t in zip(row_p, row_t):
                total += (p - t) ** 2
                count += 1
    return total / count


def test_permutation_loss_is_the_mean_over_entries_by_default():
    predicted = torch.tensor([[[0.7, 0.3], [0.3, 0.7]]] * 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    # image 0: 4 x 0.3^2 = 0.36; image 1: 4 x 0.7^2 = 1.96; 8 entries: (0.36 + 1.96) / 8 = 0.29
    assert permutation_loss(predicted, target).item() == pytest.approx(0.29)
    assert permutation_loss(predicted, target).item() == pytest.approx(torch.nn.MSELoss()(predicted, target).item())
    g = torch.Generator().manual_seed(0)
    random = torch.rand(3, 6, 6, generator=g)
    perms = torch.eye(6)[torch.stack([torch.randperm(6, generator=g) for _ in range(3)])]
    assert permutation_loss(random, perms).item() == pytest.approx(naive_mse(random, perms), rel=1e-6)
    uniform = torch.full((1, 6, 6), 1 / 6)
    assert permutation_loss(uniform, torch.eye(6)[None]).item() == pytest.approx(5 / 36)  # (n - 1) / n^2


def test_permutation_loss_sum_option_sums_each_matrix_and_averages_images():
    predicted = torch.tensor([[[0.7, 0.3], [0.3, 0.7]]] * 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    # image 0: 0.36; image 1: 1.96; mean over the 2 images 1.16
    assert permutation_loss(predicted, target, "sum").item() == pytest.approx(1.16)
    uniform = torch.full((1, 6, 6), 1 / 6)
    assert permutation_loss(uniform, torch.eye(6)[None], "sum").item() == pytest.approx(5.0)  # n - 1
    with pytest.raises(ValueError, match="reduction"):
        permutation_loss(predicted, target, "max")


def test_permutation_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        permutation_loss(torch.zeros(2, 3, 3), torch.zeros(2, 4, 4))


# ------------------------------------------------------------------------------------- PCC


def soft_nn(q, candidates, t_r):
    """The paper's soft nearest retrieval, one candidate at a time: sum_u softmax(<q,u>/t_r) u."""
    weights = torch.softmax(torch.stack([q @ u / t_r for u in candidates]), 0)
    return sum(w * u for w, u in zip(weights, candidates))


def symmetric_info_nce(pairs, tau):
    """Loop-by-loop InfoNCE over a list of (a, c) positive pairs: each a against every c (rows)
    and each c against every a (columns). Returns per-query losses and hits."""
    m = len(pairs)
    logits = [[pairs[a][0] @ pairs[c][1] / tau for c in range(m)] for a in range(m)]
    losses, hits = [], []
    for a in range(m):
        row = torch.stack(logits[a])
        col = torch.stack([logits[c][a] for c in range(m)])
        losses.append(0.5 * (-torch.log_softmax(row, 0)[a] - torch.log_softmax(col, 0)[a]))
        hits += [int(row.argmax()) == a, int(col.argmax()) == a]
    return losses, hits


def naive_slot_pcc(rgb, ir, tau, t_r):
    """The slot definition from the pcc module's docstring, written loop by loop: for each slot,
    every stripe of its RGB and IR image is a query q; q_ir = soft NN over the slot's IR stripes
    (all positions), q_rgb over its RGB stripes (q itself included); InfoNCE with the queries of
    the same query modality across the batch as negatives, symmetric, averaged over everything."""
    b, n, _ = rgb.shape
    rgb, ir = F.normalize(rgb.double(), dim=-1), F.normalize(ir.double(), dim=-1)
    losses, hits = [], []
    for modality in ("rgb", "ir"):
        pairs = []
        for slot in range(b):
            u_rgb = [rgb[slot, j] for j in range(n)]
            u_ir = [ir[slot, j] for j in range(n)]
            for j in range(n):
                q = u_rgb[j] if modality == "rgb" else u_ir[j]
                pairs.append((F.normalize(soft_nn(q, u_ir, t_r), dim=0), F.normalize(soft_nn(q, u_rgb, t_r), dim=0)))
        group_losses, group_hits = symmetric_info_nce(pairs, tau)
        losses += group_losses
        hits += group_hits
    return torch.stack(losses).mean(), sum(hits) / len(hits)


def naive_position_pcc(rgb, ir, tau, t_r):
    """The position definition, loop by loop: per part k, per query (RGB queries then IR
    queries), soft retrieval over each modality's part-k set without the query itself, then
    symmetric InfoNCE over the 2B queries of part k; accuracy over rows and columns."""
    b, n, _ = rgb.shape
    rgb, ir = F.normalize(rgb.double(), dim=-1), F.normalize(ir.double(), dim=-1)
    losses, hits = [], []
    for k in range(n):
        queries = [("rgb", i) for i in range(b)] + [("ir", i) for i in range(b)]
        pairs = []
        for modality, i in queries:
            q = rgb[i, k] if modality == "rgb" else ir[i, k]
            retrieved = {}
            for name, pool in (("ir", ir), ("rgb", rgb)):
                candidates = [pool[j, k] for j in range(b) if not (name == modality and j == i)]
                retrieved[name] = F.normalize(soft_nn(q, candidates, t_r), dim=0)
            pairs.append((retrieved["ir"], retrieved["rgb"]))
        part_losses, part_hits = symmetric_info_nce(pairs, tau)
        losses += part_losses
        hits += part_hits
    return torch.stack(losses).mean(), sum(hits) / len(hits)


@pytest.mark.parametrize("tau, t_r", [(0.07, 0.07), (0.05, 0.2), (1.0, 1.0)])
def test_slot_pcc_matches_naive_loops(tau, t_r):
    g = torch.Generator().manual_seed(3)
    rgb = torch.randn(3, 4, 8, generator=g)
    ir = torch.randn(3, 4, 8, generator=g)
    out = part_cycle_contrastive(rgb, ir, tau=tau, retrieval_temperature=t_r)  # slot is the default
    loss, acc = naive_slot_pcc(rgb, ir, tau, t_r)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert out.accuracy.item() == pytest.approx(acc)


@pytest.mark.parametrize("tau, t_r", [(0.07, 0.07), (0.05, 0.2), (1.0, 1.0)])
def test_position_pcc_matches_naive_loops(tau, t_r):
    g = torch.Generator().manual_seed(3)
    rgb = torch.randn(4, 3, 8, generator=g)
    ir = torch.randn(4, 3, 8, generator=g)
    out = part_cycle_contrastive(rgb, ir, tau=tau, retrieval_temperature=t_r, sets="position")
    loss, acc = naive_position_pcc(rgb, ir, tau, t_r)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert out.accuracy.item() == pytest.approx(acc)


def test_slot_pcc_retrieves_within_the_slot_and_keeps_the_query():
    # Two slots of 2 orthogonal stripes. Hard retrieval (t_r -> 0): an RGB query keeps itself as
    # q_rgb (it is in its own set) and retrieves the IR stripe of ITS slot that points its way.
    rgb = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    ir = torch.tensor([[[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0], [0.8, 0.0, 0.6]]])
    logits = slot_pcc_logits(rgb, ir, tau=1.0, retrieval_temperature=1e-3)
    # RGB query (slot 0, stripe 0) = e0: q_rgb = e0 itself, q_ir = (0.6, 0.8, 0) (slot 0's IR
    # stripe 0, cosine 0.6; slot 1's (0.8, 0, 0.6) is not a candidate): the positive logit 0.6.
    assert logits[0, 0, 0].item() == pytest.approx(0.6, abs=1e-4)
    # IR query (slot 1, stripe 1) = (0.8, 0, 0.6): q_ir = itself; q_rgb = slot 1's RGB stripe
    # with the largest cosine, e0 (0.8) over e2 (0.6): the positive logit 0.8.
    assert logits[1, 3, 3].item() == pytest.approx(0.8, abs=1e-4)
    # a negative: RGB query (slot 0, stripe 0)'s q_ir against RGB query (slot 1, stripe 0)'s
    # q_rgb = e2 (itself): <(0.6, 0.8, 0), e2> = 0
    assert logits[0, 0, 2].item() == pytest.approx(0.0, abs=1e-4)


def test_position_pcc_excludes_the_query_from_its_own_modality():
    # Two RGB parts identical to a query would make q_rgb = q if the query were not left out:
    # with B = 2 each RGB query has exactly one RGB candidate, the other slot's.
    rgb = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    ir = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    logits = position_pcc_logits(rgb, ir, tau=1.0, retrieval_temperature=1e-3)  # hard retrieval
    # RGB query 0 = (1, 0) retrieves the RGB part of slot 1, (0, 1), and the IR part of slot 0,
    # (1, 0): its positive logit is their cosine, 0.
    assert logits[0, 0, 0].item() == pytest.approx(0.0, abs=1e-4)
    # Not left out, the query would retrieve itself: q_rgb = (1, 0) and the logit would be 1.


@pytest.mark.parametrize("sets", ["slot", "position"])
def test_pcc_values_and_gradients_are_finite_under_bfloat16_inputs(sets):
    rgb = torch.randn(8, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    ir = torch.randn(8, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    out = part_cycle_contrastive(rgb, ir, sets=sets)
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    out.loss.backward()
    assert torch.isfinite(rgb.grad.float()).all() and torch.isfinite(ir.grad.float()).all()


def test_position_pcc_needs_two_slots_and_slot_pcc_does_not():
    with pytest.raises(ValueError, match="at least 2"):
        part_cycle_contrastive(torch.randn(1, 6, 4), torch.randn(1, 6, 4), sets="position")
    assert math.isfinite(part_cycle_contrastive(torch.randn(1, 6, 4), torch.randn(1, 6, 4)).loss.item())
    with pytest.raises(ValueError, match="unknown PCC sets"):
        part_cycle_contrastive(torch.randn(2, 6, 4), torch.randn(2, 6, 4), sets="region")
