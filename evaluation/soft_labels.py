"""The losses a student fits a teacher's logits with (``--soft_loss``), the mixed targets of a mixed
batch, and the AdamW + cosine schedule of SRe2L's validation. Knows no method and no teacher
loading: teacher logits arrive as tensors.

Sources: VILA-Lab/SRe2L ``validate/train_FKD.py`` (``kl``, AdamW, cosine); NUS-HPC-AI-Lab/DD-Ranking
(``sce`` with optional T², ``mse_gt``); G-VBSM / EDC (``mse_gt`` = MSE to the teacher's logits plus a
weighted cross-entropy on the class).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.protocol import SOFT_LOSSES


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
              loss: str = "kl", temperature: float = 20.0, t2: bool = False, mse_gt_weight: float = 0.1) -> torch.Tensor:
    """The batch-mean loss of student logits against teacher logits.

    * ``kl``: ``KLDiv(batchmean)(log_softmax(s / T), softmax(t / T))`` =
      ``sum_i sum_k p_ik (log p_ik - log q_ik) / B`` with ``p = softmax(t / T)``, ``q = softmax(s / T)``;
      no T² factor (SRe2L ``validate/train_FKD.py``).
    * ``sce``: ``-sum_i sum_k softmax(t_i / T)_k log_softmax(s_i / T)_k / B``, times T² when ``t2``
      (DD-Ranking's soft cross-entropy). Differs from ``kl`` by the teacher's entropy (same gradient
      without T²).
    * ``mse_gt``: ``mean_{i,k} (s_ik - t_ik)² + w · mean_i CE(s_i, y_i)`` on raw logits (no T),
      ``w = mse_gt_weight`` (G-VBSM 0.1, EDC 0.025).

    Args:
        student: (B, K) student logits.
        teacher: (B, K) teacher logits (any float dtype; used as float32).
        labels: (B,) int64 classes, or (B, K) probabilities: needed by ``mse_gt`` only.
        loss: one of :data:`SOFT_LOSSES`.
        temperature: T > 0 of ``kl`` and ``sce``.
        t2: multiply ``sce`` by T².
        mse_gt_weight: w of ``mse_gt``.

    Returns:
        A 0-d tensor.

    Raises:
        ValueError: unknown ``loss``; ``mse_gt`` without ``labels``.
    """
    teacher = teacher.to(student.dtype if student.dtype == torch.float64 else torch.float32)
    student = student.to(teacher.dtype)
    batch = student.shape[0]
    if loss == "kl":
        return F.kl_div(F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                        reduction="batchmean")
    if loss == "sce":
        value = -(F.softmax(teacher / temperature, dim=1) * F.log_softmax(student / temperature, dim=1)).sum() / batch
        return value * temperature ** 2 if t2 else value
    if loss == "mse_gt":
        if labels is None:
            raise ValueError("--soft_loss mse_gt needs the images' classes for its cross-entropy term")
        return F.mse_loss(student, teacher) + mse_gt_weight * F.cross_entropy(student, labels)
    raise ValueError(f"--soft_loss {loss!r}: expected one of {', '.join(SOFT_LOSSES)}")


def mixed(loss_fn, permutation: Optional[torch.Tensor], lam: float, *targets: Optional[torch.Tensor]) -> torch.Tensor:
    """``lam · loss_fn(*targets) + (1 - lam) · loss_fn(*(t[permutation] for t in targets))``: a loss
    against the targets of a mixed batch (CutMix / Mixup: image ``i`` holds ``lam`` of itself and
    ``1 - lam`` of image ``permutation[i]``). Every loss here is linear in its target
    probabilities / logits up to a constant, so this has the gradient of the loss against the mixed
    targets (for hard labels: the mixed one-hot targets of Yun et al. 2019 / Zhang et al. 2018).

    Args:
        loss_fn: ``loss_fn(*targets) -> 0-d tensor``.
        permutation: (B,) int64 positions within the batch, or ``None`` (no mixing: ``loss_fn(*targets)``).
        lam: the mixing coefficient in [0, 1].
        targets: (B, ...) tensors or ``None`` (passed through).
    """
    if permutation is None or lam >= 1.0:
        return loss_fn(*targets)
    swapped = [None if t is None else t[permutation.to(t.device)] for t in targets]
    return lam * loss_fn(*targets) + (1.0 - lam) * loss_fn(*swapped)


def cosine_factor(epoch: int, epochs: int) -> float:
    """The learning-rate factor of epoch ``epoch`` (0-based) of ``epochs``:
    ``0.5 · (1 + cos(pi · epoch / epochs))``, 0 past the end (SRe2L ``validate/train_FKD.py``'s
    ``LambdaLR`` with ``--cos``, stepped once per epoch: 1 in the first epoch, towards 0 at the end)."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) if epoch <= epochs else 0.0


def adamw_groups(net: nn.Module) -> List[dict]:
    """SRe2L's parameter groups (``validate/utils.py::get_parameters``): weights with more than one
    dimension decay, every other parameter (biases, normalisation) has weight decay 0."""
    decay, plain = [], []
    for name, param in net.named_parameters():
        (decay if "weight" in name and param.dim() > 1 else plain).append(param)
    return [{"params": decay}, {"params": plain, "weight_decay": 0.0}]


def make_adamw(net: nn.Module, lr: float = 1e-3, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """SRe2L's student optimiser: ``AdamW(adamw_groups(net), lr, weight_decay)`` (``--adamw_lr``,
    ``--adamw_weight_decay``; ``validate/train_FKD.py``)."""
    return torch.optim.AdamW(adamw_groups(net), lr=lr, weight_decay=weight_decay)
