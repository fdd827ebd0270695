"""Samplers for the device cache: batch composition checked by naive counting, rank splits,
determinism and the errors for impossible settings."""

from collections import Counter

import numpy as np
import pytest
import torch

from pipelines.samplers import CrossModalSampler, IdentitySampler, PairSampler, RandomSampler
from common.errors import UserError


def labels(ids=20, seed=0, both=True):
    """pid / modality arrays: identities with 1..9 RGB and 1..6 IR images (some with fewer than K)."""
    rng = np.random.default_rng(seed)
    pid, mod = [], []
    for i in range(ids):
        n_rgb, n_ir = int(rng.integers(1, 10)), int(rng.integers(1, 7)) if both else 0
        pid += [100 + i] * (n_rgb + n_ir)
        mod += [0] * n_rgb + [1] * n_ir
    order = rng.permutation(len(pid))  # stored order is not grouped by identity
    return torch.tensor(pid)[order], torch.tensor(mod)[order]


def test_random_sampler_epoch_permutation_and_ranks():
    n, b = 103, 8
    per_rank = []
    for rank in range(2):
        s = RandomSampler(n, b, seed=3, rank=rank, world=2)
        batches = list(s)
        assert len(batches) == len(s) == n // (2 * b)
        assert all(x.shape == (b,) for x in batches)
        per_rank.append(torch.cat(batches))
    both = torch.cat(per_rank).tolist()
    assert len(set(both)) == len(both) == 2 * (n // 16) * 8  # disjoint, only the drop missing
    s = RandomSampler(n, b, seed=3)
    e0 = torch.cat(list(s))
    s.set_epoch(1)
    assert not torch.equal(e0, torch.cat(list(s)))
    s.set_epoch(0)
    assert torch.equal(e0, torch.cat(list(s)))


def test_random_sampler_without_drop_covers_everything():
    s = RandomSampler(103, 8, drop_last=False, seed=1, world=2, rank=0)
    t = RandomSampler(103, 8, drop_last=False, seed=1, world=2, rank=1)
    assert len(s) == len(t) == 7
    assert set(torch.cat(list(s)).tolist()) | set(torch.cat(list(t)).tolist()) == set(range(103))


def test_identity_sampler_p_ids_by_k():
    pid, _ = labels()
    p, k = 4, 4
    s = IdentitySampler(pid, p * k, k, seed=0)
    assert len(s) > 0
    seen = set()
    for idx in s:
        counts = Counter(pid[idx].tolist())
        assert len(counts) == p and all(c == k for c in counts.values())
        # identity-major layout: K consecutive images of one identity
        assert all(len(set(pid[idx[j * k : (j + 1) * k]].tolist())) == 1 for j in range(p))
        seen.update(idx.tolist())
    # identities with >= K images never repeat an image inside a group
    for idx in s:
        for j in range(p):
            group = idx[j * k : (j + 1) * k]
            if (pid == pid[group[0]]).sum() >= k:
                assert len(set(group.tolist())) == k
    assert len(seen) > 0.6 * len(pid)


def test_cross_modal_sampler_p_ids_by_k_rgb_plus_k_ir():
    pid, mod = labels()
    p, k = 4, 2
    s = CrossModalSampler(pid, mod, 2 * p * k, k, seed=1)
    assert len(s) > 0
    for idx in s:
        rgb, ir = idx[: p * k], idx[p * k :]
        assert (mod[rgb] == 0).all() and (mod[ir] == 1).all()
        c_rgb, c_ir = Counter(pid[rgb].tolist()), Counter(pid[ir].tolist())
        assert len(c_rgb) == p and set(c_rgb.values()) == {k}
        assert c_rgb == c_ir
        assert torch.equal(pid[rgb], pid[ir])  # same identity order in both blocks


def test_pair_sampler_slots_hold_one_rgb_and_one_ir():
    pid, mod = labels()
    n_rgb, n_ir = int((mod == 0).sum()), int((mod == 1).sum())
    b = 8
    s = PairSampler(mod, b, seed=2)
    assert len(s) == max(n_rgb, n_ir) // b
    rgb_all, ir_all = [], []
    for rgb, ir in s:
        assert rgb.shape == ir.shape == (b,)
        assert (mod[rgb] == 0).all() and (mod[ir] == 1).all()
        rgb_all += rgb.tolist()
        ir_all += ir.tolist()
    longer = rgb_all if n_rgb >= n_ir else ir_all
    assert len(set(longer)) == len(longer)  # the longer set is a permutation (no repeat)


@pytest.mark.parametrize("make", [
    lambda pid, mod, r: IdentitySampler(pid, 8, 4, seed=5, rank=r, world=2),
    lambda pid, mod, r: CrossModalSampler(pid, mod, 8, 2, seed=5, rank=r, world=2),
    lambda pid, mod, r: PairSampler(mod, 4, seed=5, rank=r, world=2),
])
def test_ranks_get_equal_disjoint_batches(make):
    pid, mod = labels(ids=30)
    a, b = make(pid, mod, 0), make(pid, mod, 1)
    assert len(a) == len(b) > 0
    ta, tb = a.epoch_table(), b.epoch_table()
    if isinstance(ta, tuple):
        ta, tb = ta[0], tb[0]
    rows_a, rows_b = {tuple(r) for r in ta.tolist()}, {tuple(r) for r in tb.tolist()}
    assert not rows_a & rows_b
    # the same seed and epoch give the same table (every rank draws the same global table)
    again = make(pid, mod, 0).epoch_table()
    assert torch.equal(ta, again[0] if isinstance(again, tuple) else again)


def test_impossible_settings_are_user_errors():
    pid, mod = labels(ids=5)
    with pytest.raises(UserError, match="not divisible"):
        IdentitySampler(pid, 10, 4)
    with pytest.raises(UserError, match="identities"):
        IdentitySampler(pid, 32, 4)  # needs 8 identities, has 5
    with pytest.raises(UserError, match="not divisible"):
        CrossModalSampler(pid, mod, 12, 4)
    with pytest.raises(UserError, match="infrared"):
        CrossModalSampler(pid, torch.zeros_like(mod), 8, 2)
    with pytest.raises(UserError, match="infrared"):
        PairSampler(torch.zeros_like(mod), 4)
    with pytest.raises(UserError, match="RGB"):
        PairSampler(torch.ones_like(mod), 4)
    with pytest.raises(UserError, match="too small"):
        RandomSampler(10, 8, world=2)
