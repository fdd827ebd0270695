"""MMGL's part-aware cycle-contrastive (PCC) loss, vectorized over parts, queries and modalities.

The paper gives the retrieval step and the positive pair; the rest is this project's choice,
stated here (and in the README) because the pre-training code was never published.

Inputs: the part features of a batch of ``B`` slots, one RGB and one IR image each (unpaired
identities), ``rgb`` and ``ir`` ``(B, n, d)``. Part ``k`` is stripe ``k`` top to bottom; MMGL
passes the stripes of the shuffled images as they are, so index ``k`` is the same stripe
POSITION in every image (why, see :mod:`train.methods.mmgl`). Every feature is L2-normalized
here first.

Definition, for each part index ``k`` separately (part-aware: a stripe is only compared with
the stripes at the same index, never with the whole image or with other indices):

1. Queries: all ``2B`` part-``k`` features, the ``B`` RGB ones and then the ``B`` IR ones.
2. Soft nearest retrieval over each modality's part-``k`` set::

       q_ir  = sum_u softmax_u(<q, u> / t_r) u     over u in {ir[b, k]  : b},   minus q itself
       q_rgb = sum_u softmax_u(<q, u> / t_r) u     over u in {rgb[b, k] : b},   minus q itself

   A query is excluded from its own modality's set (otherwise the retrieval returns ``q``
   itself, and for an RGB query ``q_rgb = q``); nothing else is excluded -- in particular the
   other image of the query's own slot stays, since it shows another person. So an RGB query
   retrieves from ``B`` IR and ``B - 1`` RGB candidates, an IR query from ``B - 1`` IR and ``B``
   RGB ones; ``B >= 2`` is required. ``t_r`` is the retrieval temperature
   (``retrieval_temperature``, default 0.07, the paper's contrastive temperature): the cosine
   similarities of unit vectors lie in [-1, 1], and without a temperature the softmax over a
   batch is nearly uniform, so every query would retrieve about the set's mean.
3. Cycle: ``q -> q_ir`` and ``q -> q_rgb`` both start from the query, in both directions of
   modality (RGB queries and IR queries alike); the loss closes the cycle by pulling the
   retrieved IR and RGB features of the same query together.
4. InfoNCE on the L2-normalized retrieved features, temperature ``tau`` (default 0.07):
   ``logits[k, a, c] = <q_ir(a), q_rgb(c)> / tau`` over the ``2B`` queries of part ``k``. The
   positive of query ``a`` is ``(q_ir(a), q_rgb(a))``; the negatives are the retrieved features
   of the other ``2B - 1`` queries of the SAME part index ``k``. The loss is symmetric: the cross-entropy of each row
   (``q_ir(a)`` against all ``q_rgb(c)``) and of each column (``q_rgb(c)`` against all
   ``q_ir(a)``), averaged over both directions, the ``2B`` queries and the ``n`` parts.

PCC accuracy: the fraction of rows and columns (both directions, all parts) whose positive has
the highest logit.

Everything runs in float32 with autocast off, so the result does not depend on the caller's
mixed precision (bfloat16 matmuls of near-identical unit vectors would blur the logits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_TAU = 0.07
DEFAULT_RETRIEVAL_TEMPERATURE = 0.07


class PCCOutput(NamedTuple):
    """loss: float32 scalar; accuracy: float32 scalar in [0, 1] (detached)."""

    loss: torch.Tensor
    accuracy: torch.Tensor


def _soft_retrieve(queries: torch.Tensor, keys: torch.Tensor, exclude: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax-weighted average of ``keys`` per query.

    queries: ``(n, Q, d)``; keys: ``(n, K, d)``; exclude: bool ``(Q, K)``, True where a key is
    left out for a query (the same for every part). Returns ``(n, Q, d)``.
    """
    scores = torch.matmul(queries, keys.transpose(1, 2)) / temperature  # (n, Q, K)
    scores = scores.masked_fill(exclude, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), keys)


def pcc_logits(
    rgb: torch.Tensor,
    ir: torch.Tensor,
    tau: float = DEFAULT_TAU,
    retrieval_temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE,
) -> torch.Tensor:
    """The InfoNCE logits of PCC (module docstring, steps 1-4).

    rgb, ir: ``(B, n, d)`` part features of the batch's RGB and IR images, compared index by
             index; any float dtype (normalized here).
    returns: float32 ``(n, 2B, 2B)``, ``logits[k, a, c] = <q_ir(a), q_rgb(c)> / tau``; queries
             ``0 .. B-1`` are the RGB parts, ``B .. 2B-1`` the IR parts; positives on the diagonal.
    """
    if rgb.shape != ir.shape or rgb.ndim != 3:
        raise ValueError(f"rgb and ir must be (B, n, d) of one shape, got {tuple(rgb.shape)} and {tuple(ir.shape)}")
    batch = rgb.shape[0]
    if batch < 2:
        raise ValueError("PCC needs at least 2 slots: a query is excluded from its own modality's set")
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
    """Symmetric InfoNCE loss and accuracy from :func:`pcc_logits`' ``(n, Q, Q)`` logits.

    loss = mean over parts and queries of ``(CE(row a, a) + CE(column a, a)) / 2``;
    accuracy = fraction of rows and columns whose diagonal entry is the maximum.
    """
    parts, queries, _ = logits.shape
    target = torch.arange(queries, device=logits.device).repeat(parts)
    rows = logits.reshape(parts * queries, queries)
    columns = logits.transpose(1, 2).reshape(parts * queries, queries)
    loss = 0.5 * (F.cross_entropy(rows, target) + F.cross_entropy(columns, target))
    with torch.no_grad():
        hits = torch.cat([rows.argmax(dim=1) == target, columns.argmax(dim=1) == target])
        accuracy = hits.float().mean()
    return PCCOutput(loss, accuracy)


def part_cycle_contrastive(
    rgb: torch.Tensor,
    ir: torch.Tensor,
    tau: float = DEFAULT_TAU,
    retrieval_temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE,
) -> PCCOutput:
    """The PCC loss and accuracy (module docstring).

    rgb, ir: ``(B, n, d)``, ``B >= 2``, compared part index by part index.
    returns: :class:`PCCOutput` of float32 scalars.
    """
    return pcc_from_logits(pcc_logits(rgb, ir, tau, retrieval_temperature))
