"""Index samplers for the device cache: each yields index batches into the cached split.

Every sampler draws a whole epoch at once from ``(seed, epoch)`` -- the same on every rank --
as a ``(global_batches, B)`` index table, vectorized with torch (per-identity loops only at
epoch start), then rank ``r`` of ``world`` takes rows ``r, r + world, ...`` of the first
``world * (global_batches // world)`` rows: ranks see disjoint batches and all get the same
number, ``len(sampler)``. ``set_epoch(e)`` selects the epoch; iterating yields that epoch's
batches for this rank. ``state_dict()`` holds the seed and epoch (the position inside an epoch is
kept by the source, which skips consumed batches; drawing a table is cheap).

Samplers
--------
* :class:`RandomSampler`: a permutation per epoch; ``drop_last=True`` drops the last
  ``n mod (world*B)`` images of the permutation (different ones each epoch), ``drop_last=False``
  pads by wrapping around the permutation so that every image is seen.
* :class:`IdentitySampler`: P identities x K images (``batch_size = P*K``), torchreid-style.
  Each identity contributes ``max(1, n_id // K)`` groups of K distinct images per pass; an
  identity with fewer than K images is sampled with replacement (all its images, then random
  repeats). An epoch is ``R = ceil(sum_groups / n_ids)`` rounds (about one pass over the
  images, every identity equally often); in each round the identities
  are permuted and cut into batches of P (the ``n_ids mod P`` left over sit that round out), so a
  batch never holds an identity twice. Batch layout: identity-major, K consecutive images each.
* :class:`CrossModalSampler`: the AGW identity sampler, P identities x (K RGB + K IR)
  (``batch_size = 2*P*K``); only identities with both modalities take part. Batch layout: first
  the ``P*K`` RGB indices (identity-major), then the ``P*K`` IR indices of the same identities in
  the same order.
* :class:`PairSampler`: MMGL pairing, ``B`` slots each holding one RGB and one IR image of any
  identities (unpaired): a permutation of the RGB set and one of the IR set, the shorter cycled
  (fresh permutations) to the length of the longer. Yields ``(rgb_idx, ir_idx)``, each ``(B,)``.

Impossible settings raise :class:`UserError` at construction, before any training step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from common.errors import UserError
from common.modality import MODALITY_CODE

RGB, IR = MODALITY_CODE["rgb"], MODALITY_CODE["ir"]


def _generator(seed: int, epoch: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, salt]).generate_state(1, np.uint64)[0] >> 1))
    return g


def _as_long(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.cpu()).long()


class Sampler:
    """Common part: seed/epoch/rank handling and the rank split of an epoch's table."""

    salt = 0

    def __init__(self, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"rank {rank} is not valid for {world} processes")
        self.batch_size, self.seed, self.rank, self.world = int(batch_size), int(seed), rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _table(self, g: torch.Generator):
        """The epoch's global ``(batches, B)`` table (a tuple of tables for pairs)."""
        raise NotImplementedError

    def _global_batches(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._global_batches() // self.world

    def epoch_table(self, epoch: int | None = None):
        """This rank's ``(len(self), B)`` index table for ``epoch`` (default: the current one)."""
        table = self._table(_generator(self.seed, self.epoch if epoch is None else epoch, self.salt))
        n = len(self)
        pick = lambda t: t[: n * self.world][self.rank :: self.world]  # noqa: E731
        return tuple(pick(t) for t in table) if isinstance(table, tuple) else pick(table)

    def __iter__(self) -> Iterator:
        table = self.epoch_table()
        if isinstance(table, tuple):
            yield from zip(*table)
        else:
            yield from table

    def state_dict(self) -> dict:
        return {"sampler": type(self).__name__, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def _check_len(self) -> None:
        if len(self) == 0:
            raise UserError(
                f"{type(self).__name__} gives no batch per process with batch size {self.batch_size} "
                f"and {self.world} process(es): the split is too small; lower the batch size"
            )


class RandomSampler(Sampler):
    """A random permutation per epoch (module docstring)."""

    salt = 1

    def __init__(self, n: int, batch_size: int, *, drop_last: bool = True, seed: int = 0, rank: int = 0, world: int = 1):
        super().__init__(batch_size, seed=seed, rank=rank, world=world)
        if n < 1:
            raise UserError("the split is empty")
        self.n, self.drop_last = int(n), drop_last
        self._check_len()

    def _global_batches(self) -> int:
        per = self.world * self.batch_size
        rows = self.n // per if self.drop_last else -(-self.n // per)
        return rows * self.world

    def _table(self, g):
        perm = torch.randperm(self.n, generator=g)
        need = self._global_batches() * self.batch_size
        if need > self.n:
            perm = perm.repeat(-(-need // self.n))
        return perm[:need].view(-1, self.batch_size)


def _groups(members: torch.Tensor, k: int, rounds: int, g: torch.Generator) -> torch.Tensor:
    """``(rounds, k)`` indices of one identity: groups of k distinct images from successive
    permutations (remainders dropped), or all images + random repeats when fewer than k."""
    n = len(members)
    if n < k:
        out = torch.empty((rounds, k), dtype=torch.long)
        for r in range(rounds):
            extra = members[torch.randint(n, (k - n,), generator=g)]
            out[r] = torch.cat([members, extra])[torch.randperm(k, generator=g)]
        return out
    per_perm = n // k
    perms = -(-rounds // per_perm)
    rows = torch.stack([members[torch.randperm(n, generator=g)[: per_perm * k]] for _ in range(perms)])
    return rows.view(-1, k)[:rounds]


def _pid_members(pid: torch.Tensor, mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    idx = torch.arange(len(pid)) if mask is None else torch.nonzero(mask).flatten()
    p = pid[idx]
    order = torch.argsort(p, stable=True)
    idx, p = idx[order], p[order]
    ids, counts = torch.unique_consecutive(p, return_counts=True)
    return {int(i): m for i, m in zip(ids.tolist(), torch.split(idx, counts.tolist()))}


def _round_batches(tables: list[torch.Tensor], p: int, g: torch.Generator) -> torch.Tensor:
    """Rounds of identity permutations cut into P-identity batches.

    ``tables``: per modality, ``(n_ids, R, K)``; returns ``(R * (n_ids // P), len(tables)*P*K)``
    with the modalities' blocks side by side (identity-major inside a block)."""
    n_ids, rounds, k = tables[0].shape
    per_round = n_ids // p
    order = torch.stack([torch.randperm(n_ids, generator=g)[: per_round * p] for _ in range(rounds)])  # (R, per*P)
    r_idx = torch.arange(rounds).unsqueeze(1).expand_as(order)
    blocks = [t[order, r_idx].view(rounds * per_round, p * k) for t in tables]  # t[ids, round] -> (R, per*P, K)
    return torch.cat(blocks, dim=1)


class IdentitySampler(Sampler):
    """P identities x K images per batch (module docstring)."""

    salt = 2

    def __init__(self, pid, batch_size: int, instances: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 keep=None):
        """keep: optional bool ``(N,)``; only these rows are drawn (e.g. the labelled identities)."""
        super().__init__(batch_size, seed=seed, rank=rank, world=world)
        k = int(instances)
        if k < 1 or batch_size % k:
            raise UserError(f"batch size {batch_size} is not divisible by {k} instances per identity")
        self.k, self.p = k, batch_size // k
        self.members = _pid_members(_as_long(pid), None if keep is None else torch.as_tensor(keep, dtype=torch.bool))
        if len(self.members) < self.p:
            raise UserError(
                f"a batch needs {self.p} identities ({batch_size} / {k} instances) but the split has "
                f"only {len(self.members)}; lower the batch size or the instances per identity"
            )
        groups = sum(max(1, len(m) // k) for m in self.members.values())
        self.rounds = max(1, -(-groups // len(self.members)))
        self._check_len()

    def _global_batches(self) -> int:
        return self.rounds * (len(self.members) // self.p)

    def _table(self, g):
        table = torch.stack([_groups(m, self.k, self.rounds, g) for m in self.members.values()])
        return _round_batches([table], self.p, g)


def agw_epoch_length(rgb_images: int, ir_images: int, ids_per_batch: int, instances: int) -> int:
    """Iterations of one AGW epoch: ``int(N / (P * K)) + 1`` with ``N = max(#RGB, #IR)``
    (``IdentitySampler`` in mangye16/Cross-Modal-Re-ID-baseline ``utils.py``: P ids x K images per
    modality; SYSU-MM01: ``int(22258 / 32) + 1 = 696``)."""
    return int(max(rgb_images, ir_images) / (ids_per_batch * instances)) + 1


class CrossModalSampler(Sampler):
    """P identities x (K RGB + K IR) per batch, the AGW identity sampler (module docstring).
    ``epoch_batches``: batches per process and epoch (default: about one pass, module docstring)."""

    salt = 3

    def __init__(self, pid, modality, batch_size: int, instances: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 epoch_batches: int | None = None):
        super().__init__(batch_size, seed=seed, rank=rank, world=world)
        k = int(instances)
        if k < 1 or batch_size % (2 * k):
            raise UserError(
                f"batch size {batch_size} is not divisible by 2 x {k} (K RGB + K IR images per identity)"
            )
        self.k, self.p = k, batch_size // (2 * k)
        pid, modality = _as_long(pid), _as_long(modality)
        rgb, ir = _pid_members(pid, modality == RGB), _pid_members(pid, modality == IR)
        if not rgb or not ir:
            missing = "RGB" if not rgb else "infrared"
            raise UserError(f"the cross-modal sampler needs RGB and infrared images; the split has no {missing} image")
        both = sorted(set(rgb) & set(ir))
        if len(both) < self.p:
            raise UserError(
                f"a batch needs {self.p} identities with both RGB and infrared images ({batch_size} / "
                f"(2 x {k})) but the split has only {len(both)}; lower the batch size or the instances"
            )
        self.rgb = [rgb[i] for i in both]
        self.ir = [ir[i] for i in both]
        groups = sum(max(1, len(m) // k) for m in self.rgb + self.ir)
        self.rounds = max(1, -(-groups // (2 * len(both))))
        self.epoch_batches = epoch_batches
        if epoch_batches is not None:
            if epoch_batches < 1:
                raise UserError(f"an epoch needs at least one batch, got {epoch_batches}")
            self.rounds = -(-epoch_batches * world // (len(self.rgb) // self.p))
        self._check_len()

    def _global_batches(self) -> int:
        if self.epoch_batches is not None:
            return self.epoch_batches * self.world
        return self.rounds * (len(self.rgb) // self.p)

    def _table(self, g):
        t_rgb = torch.stack([_groups(m, self.k, self.rounds, g) for m in self.rgb])
        t_ir = torch.stack([_groups(m, self.k, self.rounds, g) for m in self.ir])
        return _round_batches([t_rgb, t_ir], self.p, g)


class PairSampler(Sampler):
    """MMGL pairing: B slots of (one RGB, one IR) image, identities unpaired (module docstring)."""

    salt = 4

    def __init__(self, modality, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1):
        super().__init__(batch_size, seed=seed, rank=rank, world=world)
        modality = _as_long(modality)
        self.rgb = torch.nonzero(modality == RGB).flatten()
        self.ir = torch.nonzero(modality == IR).flatten()
        if len(self.rgb) == 0 or len(self.ir) == 0:
            missing = "RGB" if len(self.rgb) == 0 else "infrared"
            raise UserError(
                f"MMGL pairs an RGB and an infrared image in each batch slot; the split has no {missing} "
                "image (use a multi-modal dataset such as SYSU-MM01 or RegDB)"
            )
        self.length = max(len(self.rgb), len(self.ir))
        self._check_len()

    def _global_batches(self) -> int:
        return (self.length // self.batch_size // self.world) * self.world

    def _table(self, g):
        def cycled(members: torch.Tensor) -> torch.Tensor:
            reps = -(-self.length // len(members))
            return torch.cat([members[torch.randperm(len(members), generator=g)] for _ in range(reps)])[: self.length]

        need = self._global_batches() * self.batch_size
        return cycled(self.rgb)[:need].view(-1, self.batch_size), cycled(self.ir)[:need].view(-1, self.batch_size)


SAMPLERS = {"random": RandomSampler, "identity": IdentitySampler, "cross_modal": CrossModalSampler, "pairs": PairSampler}

__all__ = ["CrossModalSampler", "IdentitySampler", "PairSampler", "RandomSampler", "SAMPLERS", "Sampler", "agw_epoch_length"]
