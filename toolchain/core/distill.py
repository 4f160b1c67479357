"""Distillation losses: of the super-network's training (the ``kd`` and ``full`` strategies,
:mod:`toolchain.training`) and of the recovery of a point (:mod:`toolchain.recover`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, regression: bool, temperature: float = 1.0
                 ) -> torch.Tensor:
    """Classification: KL(teacher || student) on temperature-softened logits, scaled by T^2. Regression: MSE to the
    teacher's output."""
    if regression:
        return F.mse_loss(student.float(), teacher.float())
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t


def recovery_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, regression: bool,
                  alpha: float, temperature: float = 1.0) -> torch.Tensor:
    """``alpha`` x distillation + ``(1 - alpha)`` x label loss (only distillation without labels).

    Classification: KL(teacher || student) on temperature-softened logits (scaled by T^2) + cross-entropy.
    Regression: MSE to the teacher's output + MSE to the label."""
    kd = distill_loss(student, teacher, regression, temperature)
    if labels is None or alpha >= 1.0:
        return kd
    if regression:
        label = F.mse_loss(student.view(-1).float(), labels.view(-1).float())
    else:
        label = F.cross_entropy(student, labels.long())
    return alpha * kd + (1.0 - alpha) * label


def hidden_loss(student: tuple, teacher: tuple, kept_layers: tuple[int, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the student's hidden states (``output_hidden_states``: the embeddings, then
    each kept layer's output) and the teacher's at the same layers of the full network, over the real tokens of
    ``mask`` (batch x sequence) and averaged over those layers."""
    pairs = [(student[0], teacher[0])] + [(student[j + 1], teacher[i + 1]) for j, i in enumerate(kept_layers)]
    m = mask.unsqueeze(-1).float()
    denom = m.sum() * student[0].shape[-1]
    return sum(((s.float() - t.float()) ** 2 * m).sum() / denom for s, t in pairs) / len(pairs)
