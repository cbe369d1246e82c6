"""A class-balanced validation split held out of a dataset's training images (``distill.py
--select_on val``): the same number of images of every class, drawn once from a seeded
generator, removed from what distillation sees and used to choose the best-so-far synthetic set
instead of the test set.

The references choose their best set on test accuracy (GeorgeCazenavette/mtt-distillation and
NUS-HPC-AI-Lab/DATM ``distill.py``: ``acc_test_mean > best_acc``); a held-out split of the
training set is the usual remedy (e.g. Hastie, Tibshirani and Friedman, *The Elements of
Statistical Learning*, 2nd ed., section 7.2). This module knows no method.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .core import DatasetRecord


@dataclass(frozen=True)
class ValidationSplit:
    """A validation split of a training set.

    Attributes:
        images: (V, C, H, W) float32, in the record's space (normalised or ZCA-whitened), V = K * per_class.
        labels: (V,) int64, class-major (``per_class`` images of class 0, then of class 1, ...).
        indices: (V,) int64, the positions of the images in the full training set (``labels`` order).
        per_class: images held out per class.
        seed: the seed of the draw.
    """

    images: Tensor = field(repr=False)
    labels: Tensor = field(repr=False)
    indices: Tensor = field(repr=False)
    per_class: int
    seed: int

    def record(self) -> dict:
        """What ``results.json`` and the result files record: ``{per_class, count, seed, indices_sha256}``
        (the SHA-256 of the sorted indices as little-endian int64: the same split gives the same digest)."""
        digest = hashlib.sha256(torch.sort(self.indices).values.to(torch.int64).numpy().tobytes()).hexdigest()
        return {'per_class': self.per_class, 'count': int(self.indices.numel()), 'seed': self.seed,
                'indices_sha256': digest}


def split_validation(record: DatasetRecord, per_class: int, seed: int) -> tuple[DatasetRecord, ValidationSplit]:
    """Hold ``per_class`` training images of every class out of ``record``.

    The images of class k are drawn without replacement by ``torch.randperm`` of the class's
    positions, from a CPU generator seeded with ``seed`` (one generator, classes in order), so
    the split depends only on the training labels, ``per_class`` and ``seed``. The test set, the
    normalisation and the ZCA (fitted on the whole training set when the record was loaded) are
    left as they are.

    Args:
        record: the loaded dataset (training images (N, C, H, W), labels (N,)).
        per_class: images to hold out of every class, at least 1.
        seed: the seed of the draw.

    Returns:
        ``(the record without the split, the split)``: the remaining training images keep their
        order; the split is class-major.

    Raises:
        ValueError: ``per_class`` < 1, or not smaller than the smallest class (nothing would be left
            to distil from); the message names ``--val_per_class``.
    """
    counts = torch.bincount(record.labels_train, minlength=record.num_classes)
    smallest = int(counts.min())
    if per_class < 1 or per_class >= smallest:
        raise ValueError(f'--val_per_class {per_class}: expected 1 to {smallest - 1} (the smallest class of '
                         f'{record.name} has {smallest} training images, and some must be left to distil from)')
    generator = torch.Generator().manual_seed(seed)
    held = []
    for k in range(record.num_classes):
        positions = torch.nonzero(record.labels_train == k).flatten()
        held.append(positions[torch.randperm(len(positions), generator=generator)[:per_class]])
    indices = torch.cat(held)
    keep = torch.ones(len(record.labels_train), dtype=torch.bool)
    keep[indices] = False
    split = ValidationSplit(images=record.images_train[indices], labels=record.labels_train[indices],
                            indices=indices, per_class=per_class, seed=seed)
    remaining = dataclasses.replace(record, images_train=record.images_train[keep],
                                    labels_train=record.labels_train[keep])
    return remaining, split
