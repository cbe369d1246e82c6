"""What a row of a comparison is trained on under each label regime (``evaluation.LABEL_REGIMES``):
the labels passed to ``evaluation.evaluate_synset`` and the teacher or relabel store beside them.

* ``hard``: the row's own labels (today's protocol: class indices, or a set's learned (N, K) labels).
* ``teacher``: the class labels, with the teacher queried online on every augmented batch (RDED's
  evaluation, LINs-lab/RDED ``validation/main.py``).
* ``soft``: the teacher's soft labels, made the same way for every row so that a set and random
  real images are compared like with like: under views the relabel store can record
  (``student_aug`` ``rrc`` or ``none``) a relabel store of the row's own images drawn from the
  row's seed (VILA-Lab/SRe2L ``relabel/generate_soft_label.py``; ``evaluation.relabel``, as
  ``distill.py`` evaluates); under DC/DSA augmentation, whose draws are not recorded, the teacher's
  (N, K) logits of each image (DD-Ranking's ``soft_label_mode='S'``, ``_generate_soft_labels``).

Knows no command line and no method; the teacher is a plain callable (``pretrained.teachers.Teacher``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import evaluation


@dataclass
class LabelInputs:
    """What one evaluation of a row under a regime gets.

    Attributes:
        labels: (N,) int64 classes or (N, K) float (the set's own labels under ``hard``; the
            teacher's per-image logits under ``soft`` without a store).
        extra: keyword arguments of ``evaluation.evaluate_synset`` (``teacher=`` / ``soft_store=``).
        kind: what the labels are, for the table's ``labels`` column (``soft (teacher, per crop and
            epoch)`` ...); ``None`` under ``hard`` (the row's own label kind is kept).
        mb_per_epoch: megabytes one epoch of the relabel store holds (``None`` without a store).
    """

    labels: torch.Tensor
    extra: dict = field(default_factory=dict)
    kind: Optional[str] = None
    mb_per_epoch: Optional[float] = None


def class_labels(labels: torch.Tensor) -> torch.Tensor:
    """(N,) int64 classes of (N,) class labels or of (N, K) soft labels (their argmax)."""
    return labels.long() if labels.dim() == 1 else labels.argmax(dim=1)


@torch.no_grad()
def per_image_logits(teacher: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     batch_size: int = 256) -> torch.Tensor:
    """The teacher's logits of each image, unaugmented: (N, C, H, W) -> (N, K) float32, in batches
    of ``batch_size`` (DD-Ranking ``soft_label.py`` ``_generate_soft_labels``).

    Raises:
        ValueError: the teacher does not return (B, K) logits.
    """
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        logits = teacher(batch)
        if logits.dim() != 2 or logits.shape[0] != batch.shape[0]:
            raise ValueError(f"the teacher returned shape {tuple(logits.shape)} for {batch.shape[0]} images, "
                             "not (B, K) logits")
        out.append(logits.float())
    return torch.cat(out)


def label_inputs(cfg: "evaluation.EvalConfig", images: torch.Tensor, labels: torch.Tensor,
                 teacher: Optional[Callable] = None, seed: int = 0) -> LabelInputs:
    """The :class:`LabelInputs` of ``images`` / ``labels`` under ``cfg.labels`` (module docstring).

    Args:
        cfg: the row's protocol for one evaluation network (its ``labels`` is the regime).
        images: (N, C, H, W) the row's images, on the teacher's device.
        labels: (N,) classes or (N, K) labels as the row holds them.
        teacher: ``teacher(x (B, C, H, W)) -> (B, K)`` logits (needed under ``soft`` and ``teacher``).
        seed: the seed of the relabel store's draw (the evaluation's seed).

    Raises:
        ValueError: ``soft`` or ``teacher`` labels without a teacher; a teacher that does not
            return (B, K) logits.
    """
    if cfg.labels == "hard":
        return LabelInputs(labels)
    if teacher is None:
        raise ValueError(f"--labels {cfg.labels} needs a teacher (none was given or recorded)")
    classes = class_labels(labels)
    if cfg.labels == "teacher":
        return LabelInputs(classes, {"teacher": teacher}, "teacher (online)")
    if cfg.student_aug == "dc":
        return LabelInputs(per_image_logits(teacher, images.detach(), cfg.batch_train), {},
                           "soft (teacher logits per image)")
    store = evaluation.relabel(images.detach(), teacher, epochs=evaluation.student_epochs(cfg),
                               batch_size=cfg.batch_train, cfg=cfg, seed=seed)
    return LabelInputs(classes, {"soft_store": store}, "soft (teacher, per crop and epoch)", store.mb_per_epoch)
