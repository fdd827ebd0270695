"""The DINO self-distillation loss over several token types: PASS's loss (DESIGN.md section 5).

For each token type t (PASS: CLS, PART_1, PART_2, PART_3) the teacher's outputs on the G global
views are centered with that type's center ``c_t``, sharpened with the teacher temperature and
turned into targets; each target is compared with the student's output on every view of that
token type except the same view::

    term(t, g, v) = mean_b  sum_d  -softmax((T_t[g, b] - c_t) / tau_t)_d * log_softmax(S_t[v, b] / tau_s)_d

for teacher view g < G and student view v != g. The total is the plain mean over all the terms
of all token types. PASS: the CLS type has V = 11 student views (2 global + 9 local, 2 x 10 = 20
terms), each part type has V = 5 (the 2 global views and the 3 local views of its region, 2 x 4
= 8 terms): 44 terms. With a single token type this is DINO's loss.

After the loss, each center moves towards the mean of the teacher's outputs of its type over the
G views and the batch of every process (sum, all-reduce, divide by ``G * B * world``), with EMA
momentum ``center_momentum`` (0.9), as DINO's ``update_center``. The loss is computed in float32
whatever the autocast setting.

Memory: with ``out_dim`` 65,536 a student tensor of the CLS type is ``(11, B, 65536)``; written
the plain way (``log_softmax`` of the whole tensor in float32, one ``targets[g] * log_probs``
product per teacher view) the loss holds several float32 copies of it at once, and autograd keeps
the log-probabilities for backward. :class:`ViewCrossEntropy` uses the identity
``sum_d -q_d log_softmax(x)_d = logsumexp(x) - q . x`` (``sum_d q_d = 1``) one student view at a
time, and recomputes the softmax view by view in backward: it keeps only the student tensor (in
its own dtype) and the float32 targets, plus one ``(B, D)`` float32 view at a time.
``python -m benchmarks.dino_memory`` measures the peak against the plain form.

Compilation: the all-reduce and the in-place update of ``center`` run outside any compiled graph
(:meth:`DINOLoss._move_centers` is excluded from ``torch.compile``), so a compiled step neither
traces a collective nor guards on a mutated buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLossOutput(NamedTuple):
    """loss: scalar, the mean of all terms (differentiable). token_losses: ``(T,)`` detached, the
    mean of each token type's terms (for logs; ``loss`` weights them by their term counts)."""

    loss: torch.Tensor
    token_losses: torch.Tensor


class DINOLoss(nn.Module):
    """Cross-entropy between centered, sharpened teacher outputs and student outputs, per token type.

    Args:
        out_dim: D, the heads' output size.
        num_tokens: T, the number of token types (one center each).
        student_temp: tau_s.
        center_momentum: EMA momentum of the centers.

    Buffers: ``center`` ``(T, D)`` float32, zeros at first (saved with the model);
    ``teacher_temp`` scalar tau_t, set every step by the method from its schedule (a tensor, so
    that a compiled graph does not depend on its value; not saved).
    """

    def __init__(self, out_dim: int, num_tokens: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(num_tokens, out_dim))
        self.register_buffer("teacher_temp", torch.tensor(0.04), persistent=False)

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> DINOLossOutput:
        """
        Args:
            student: T tensors; ``student[t]`` ``(V_t, B, D)``: the student's outputs of token type
                t on V_t views, view-major. Its first G views are the global views, in the
                teacher's order (student view g and teacher view g are the same crop).
            teacher: T tensors ``(G, B, D)``: the teacher's outputs on the G global views.
        Returns :class:`DINOLossOutput`; updates ``center`` afterwards (module docstring).
        """
        if len(student) != len(teacher) or len(teacher) != self.center.shape[0]:
            raise ValueError(f"expected {self.center.shape[0]} token types, got {len(student)} student "
                             f"and {len(teacher)} teacher tensors")
        with torch.autocast(device_type=self.center.device.type, enabled=False):
            sums, counts = [], []
            for t, (s, q) in enumerate(zip(student, teacher)):
                total, count = self._token_terms(s, q.float().detach(), t)
                sums.append(total)
                counts.append(count)
            loss = torch.stack(sums).sum() / sum(counts)
        self.update_center(teacher)
        return DINOLossOutput(loss, torch.stack([s.detach() / c for s, c in zip(sums, counts)]))

    def _token_terms(self, student: torch.Tensor, teacher: torch.Tensor, t: int) -> tuple[torch.Tensor, int]:
        """Sum and number of the terms of token type ``t``: student ``(V, B, D)``, teacher ``(G, B, D)``."""
        views, globals_ = student.shape[0], teacher.shape[0]
        if views < globals_ or student.shape[1:] != teacher.shape[1:]:
            raise ValueError(f"token type {t}: student {tuple(student.shape)} does not start with the "
                             f"teacher's {tuple(teacher.shape)} global views")
        targets = F.softmax((teacher - self.center[t]) / self.teacher_temp, dim=-1)  # (G, B, D)
        per_view = ViewCrossEntropy.apply(student, targets, self.student_temp)  # (G, V)
        same_view = torch.eye(globals_, views, dtype=torch.bool, device=per_view.device)
        return per_view.masked_fill(same_view, 0.0).sum(), globals_ * views - globals_

    @torch.no_grad()
    def update_center(self, teacher: Sequence[torch.Tensor]) -> None:
        """EMA of each center towards its token type's teacher mean over views, batch and processes."""
        sums = torch.stack([q.float().sum(dim=(0, 1)) for q in teacher])  # (T, D)
        self._move_centers(sums, teacher[0].shape[0] * teacher[0].shape[1])

    @torch.compiler.disable
    @torch.no_grad()
    def _move_centers(self, sums: torch.Tensor, rows: int) -> None:
        """``center <- m * center + (1 - m) * all-reduced sums / (rows * world)``, eagerly (module
        docstring: a buffer mutated and a collective inside a compiled forward)."""
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            world = dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(sums / (rows * world), alpha=1.0 - self.center_momentum)


class ViewCrossEntropy(torch.autograd.Function):
    """Every teacher view against every student view, one student view at a time (module docstring).

    ``apply(student (V, B, D) any float dtype, targets (G, B, D) float32 rows summing to 1,
    student_temp)`` -> float32 ``(G, V)``: ``out[g, v] = mean_b sum_d -targets[g, b, d] *
    log_softmax(student[v, b] / student_temp)_d``. Gradients flow to ``student`` only (the
    targets are the teacher's, detached). Elementwise float32 throughout: a ``(G, V)`` matmul
    over ``B * D`` would run in TF32 on GPUs that allow it.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, targets: torch.Tensor, student_temp: float) -> torch.Tensor:
        views, batch = student.shape[0], student.shape[1]
        out = student.new_empty((targets.shape[0], views), dtype=torch.float32)
        for v in range(views):
            x = student[v].float() / student_temp  # (B, D), the only float32 copy alive
            lse = torch.logsumexp(x, dim=-1)  # (B,)
            for g in range(targets.shape[0]):
                out[g, v] = (lse - (targets[g] * x).sum(-1)).sum() / batch
        ctx.save_for_backward(student, targets)
        ctx.student_temp = student_temp
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, targets = ctx.saved_tensors
        tau, batch = ctx.student_temp, student.shape[1]
        grad_student = torch.empty_like(student)
        weights = grad.sum(0)  # (V,): d out[g, v] / d x sums the softmax once per teacher view
        for v in range(student.shape[0]):
            probs = torch.softmax(student[v].float() / tau, dim=-1)  # (B, D)
            pulled = sum(grad[g, v] * targets[g] for g in range(targets.shape[0]))  # (B, D)
            grad_student[v] = ((weights[v] * probs - pulled) / (batch * tau)).to(student.dtype)
        return grad_student, None, None
