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
                total, count = self._token_terms(s.float(), q.float().detach(), t)
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
        log_probs = F.log_softmax(student / self.student_temp, dim=-1)  # (V, B, D)
        # One teacher view at a time against all student views at once: elementwise in float32
        # (a (G, V) matmul over B * D would run in TF32 on GPUs that allow it).
        per_view = torch.stack([-(targets[g] * log_probs).sum(-1).mean(-1) for g in range(globals_)])  # (G, V)
        same_view = torch.eye(globals_, views, dtype=torch.bool, device=per_view.device)
        return per_view.masked_fill(same_view, 0.0).sum(), globals_ * views - globals_

    @torch.no_grad()
    def update_center(self, teacher: Sequence[torch.Tensor]) -> None:
        """EMA of each center towards its token type's teacher mean over views, batch and processes."""
        sums = torch.stack([q.float().sum(dim=(0, 1)) for q in teacher])  # (T, D)
        rows = teacher[0].shape[0] * teacher[0].shape[1]
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            world = dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(sums / (rows * world), alpha=1.0 - self.center_momentum)
