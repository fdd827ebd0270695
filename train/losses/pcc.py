"""MMGL's part-aware cycle-contrastive (PCC) loss, vectorized over slots, parts and queries.

The paper gives the retrieval step, the positive pair and (in its pipeline figure) the part sets;
the rest is this project's choice, stated here (and in the README, "Reproducing the papers")
because the pre-training code was never published.

Inputs: the part features of a batch of ``B`` slots, one RGB and one IR image each (unpaired
identities, the SAME stripe permutation), ``rgb`` and ``ir`` ``(B, n, d)``: the ``n`` stripes of
each shuffled image, top to bottom. Every feature is L2-normalized here first. Soft nearest
retrieval of a query ``q`` over a set ``U``::

    q_U = sum_{u in U} softmax_u(<q, u> / t_r) u

``t_r`` is the retrieval temperature (``retrieval_temperature``, default 0.07, the paper's
contrastive temperature; the paper writes the weights as a softmax of the similarity and gives
no temperature): cosines of unit vectors lie in [-1, 1], and without one the softmax over a few
candidates is nearly uniform, so every query would retrieve about the set's mean.

Two definitions of the sets (:data:`PCC_SETS`):

``slot`` (the default, the paper's figure)
    For slot ``b``, ``U_rgb`` = the ``n`` stripes of the slot's shuffled RGB image and ``U_ir``
    = the ``n`` stripes of its shuffled IR image, all positions. Queries: every stripe of both
    images (``2n`` per slot). Each query retrieves ``q_ir`` from ``U_ir`` and ``q_rgb`` from
    ``U_rgb``; ``(q_ir, q_rgb)`` is the positive pair.

    Choices where the paper is silent:

    - *q stays in its own set*, as the figure draws it (the query stripe is one of the stripes of
      ``U_rgb``). An RGB query then retrieves mostly itself as ``q_rgb`` and the loss pulls its
      cross-modal neighbour ``q_ir`` towards it; an IR query the other way round.
    - *Cycle direction*: both. RGB stripes and IR stripes are queries alike.
    - *Negatives*: the retrieved features of the other queries OF THE SAME QUERY MODALITY in the
      whole batch (``B n - 1`` of them, other stripes of the same image included). Queries are
      grouped by modality because the RGB query at position ``j`` and the IR query at position
      ``j`` of one slot (the same body region under the shared permutation) retrieve nearly the
      same pair; as each other's negatives they would cap the loss at ``log 2``.
    - The loss is symmetric: the cross-entropy of each row (``q_ir(a)`` against all ``q_rgb(c)``
      of its group) and of each column, averaged over both directions, both groups and all
      queries. Temperature ``tau`` (default 0.07; the paper also tried 0.05).

``position`` (this project's earlier variant, kept as a named option)
    For each stripe index ``k`` separately, ``U_rgb`` = stripe ``k`` of every RGB image in the
    batch and ``U_ir`` = stripe ``k`` of every IR image; the query is excluded from its own
    modality's set (it would retrieve itself), so ``B >= 2``. Queries: all ``2B`` stripe-``k``
    features; negatives: the retrieved features of the other ``2B - 1`` queries of index ``k``;
    symmetric InfoNCE as above. At a fixed position, position carries no information, so the
    retrieval has to match what the stripes show across people.

PCC accuracy: the fraction of rows and columns (both directions) whose positive has the highest
logit.

Everything runs in float32 with autocast off, so the result does not depend on the caller's
mixed precision (bfloat16 matmuls of near-identical unit vectors would blur the logits).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_TAU = 0.07
DEFAULT_RETRIEVAL_TEMPERATURE = 0.07
#: The definitions of the retrieval sets (module docstring); ``slot`` is the paper's figure.
PCC_SETS = ("slot", "position")
PCCSets = Literal["slot", "position"]


class PCCOutput(NamedTuple):
    """loss: float32 scalar; accuracy: float32 scalar in [0, 1] (detached)."""

    loss: torch.Tensor
    accuracy: torch.Tensor


def _soft_retrieve(
    queries: torch.Tensor, keys: torch.Tensor, exclude: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """Softmax-weighted average of ``keys`` per query, batched over the leading dimension.

    queries: ``(G, Q, d)``; keys: ``(G, K, d)``; exclude: bool ``(Q, K)``, True where a key is
    left out for a query (the same in every group), or None. Returns ``(G, Q, d)``.
    """
    scores = torch.matmul(queries, keys.transpose(1, 2)) / temperature  # (G, Q, K)
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), keys)


def _check_parts(rgb: torch.Tensor, ir: torch.Tensor) -> None:
    if rgb.shape != ir.shape or rgb.ndim != 3:
        raise ValueError(f"rgb and ir must be (B, n, d) of one shape, got {tuple(rgb.shape)} and {tuple(ir.shape)}")


def slot_pcc_logits(
    rgb: torch.Tensor,
    ir: torch.Tensor,
    tau: float = DEFAULT_TAU,
    retrieval_temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE,
) -> torch.Tensor:
    """The InfoNCE logits of the ``slot`` definition (module docstring).

    rgb, ir: ``(B, n, d)`` stripe features of each slot's shuffled RGB and IR image; any float
             dtype (normalized here).
    returns: float32 ``(2, B n, B n)``: group 0 the RGB queries, group 1 the IR queries; query
             ``b n + j`` is stripe ``j`` of slot ``b``; ``logits[g, a, c] = <q_ir(a), q_rgb(c)> / tau``,
             positives on the diagonal.
    """
    _check_parts(rgb, ir)
    batch, parts, dim = rgb.shape
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        rgb_u = F.normalize(rgb.float(), dim=-1)
        ir_u = F.normalize(ir.float(), dim=-1)
        queries = torch.cat([rgb_u, ir_u], dim=1)  # (B, 2n, d): a slot's RGB stripes, then its IR ones
        q_ir = F.normalize(_soft_retrieve(queries, ir_u, None, retrieval_temperature), dim=-1)
        q_rgb = F.normalize(_soft_retrieve(queries, rgb_u, None, retrieval_temperature), dim=-1)
        # (B, 2, n, d) -> (2, B n, d): grouped by the query's modality
        q_ir = q_ir.reshape(batch, 2, parts, dim).transpose(0, 1).reshape(2, batch * parts, dim)
        q_rgb = q_rgb.reshape(batch, 2, parts, dim).transpose(0, 1).reshape(2, batch * parts, dim)
        return torch.matmul(q_ir, q_rgb.transpose(1, 2)) / tau


def position_pcc_logits(
    rgb: torch.Tensor,
    ir: torch.Tensor,
    tau: float = DEFAULT_TAU,
    retrieval_temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE,
) -> torch.Tensor:
    """The InfoNCE logits of the ``position`` definition (module docstring).

    rgb, ir: ``(B, n, d)`` part features of the batch's RGB and IR images, compared index by
             index, ``B >= 2``; any float dtype (normalized here).
    returns: float32 ``(n, 2B, 2B)``, ``logits[k, a, c] = <q_ir(a), q_rgb(c)> / tau``; queries
             ``0 .. B-1`` are the RGB parts, ``B .. 2B-1`` the IR parts; positives on the diagonal.
    """
    _check_parts(rgb, ir)
    batch = rgb.shape[0]
    if batch < 2:
        raise ValueError("position-wise PCC needs at least 2 slots: a query is excluded from its own modality's set")
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        # Part-major: (n, B, d), so every part index is its own retrieval and contrast problem.
        rgb_k = F.normalize(rgb.float(), dim=-1).transpose(0, 1)
        ir_k = F.normalize(ir.float(), dim=-1).transpose(0, 1)
        queries = torch.cat([rgb_k, ir_k], dim=1)  # (n, 2B, d)
        own = torch.eye(batch, dtype=torch.bool, device=rgb.device)
        none = torch.zeros_like(own)
        # RGB queries (rows 0..B-1) leave themselves out of the RGB set, IR queries of the IR set.
        q_rgb = _soft_retrieve(queries, rgb_k, torch.cat([own, none]), retrieval_temperature)
        q_ir = _soft_retrieve(queries, ir_k, torch.cat([none, own]), retrieval_temperature)
        q_rgb = F.normalize(q_rgb, dim=-1)
        q_ir = F.normalize(q_ir, dim=-1)
        return torch.matmul(q_ir, q_rgb.transpose(1, 2)) / tau


def pcc_from_logits(logits: torch.Tensor) -> PCCOutput:
    """Symmetric InfoNCE loss and accuracy from ``(G, Q, Q)`` logits with positives on the
    diagonal (either definition's logits; ``G`` groups of ``Q`` queries).

    loss = mean over groups and queries of ``(CE(row a, a) + CE(column a, a)) / 2``;
    accuracy = fraction of rows and columns whose diagonal entry is the maximum.
    """
    groups, queries, _ = logits.shape
    target = torch.arange(queries, device=logits.device).repeat(groups)
    rows = logits.reshape(groups * queries, queries)
    columns = logits.transpose(1, 2).reshape(groups * queries, queries)
    loss = 0.5 * (F.cross_entropy(rows, target) + F.cross_entropy(columns, target))
    with torch.no_grad():
        hits = torch.cat([rows.argmax(dim=1) == target, columns.argmax(dim=1) == target])
        accuracy = hits.float().mean()
    return PCCOutput(loss, accuracy)


_LOGITS = {"slot": slot_pcc_logits, "position": position_pcc_logits}


def part_cycle_contrastive(
    rgb: torch.Tensor,
    ir: torch.Tensor,
    tau: float = DEFAULT_TAU,
    retrieval_temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE,
    sets: PCCSets = "slot",
) -> PCCOutput:
    """The PCC loss and accuracy (module docstring).

    rgb, ir: ``(B, n, d)`` stripe features of each slot's shuffled RGB and IR image.
    sets: ``slot`` (the paper's figure) or ``position`` (:data:`PCC_SETS`).
    returns: :class:`PCCOutput` of float32 scalars.
    """
    if sets not in _LOGITS:
        raise ValueError(f"unknown PCC sets {sets!r}; expected one of {PCC_SETS}")
    return pcc_from_logits(_LOGITS[sets](rgb, ir, tau, retrieval_temperature))
