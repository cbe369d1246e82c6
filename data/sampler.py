"""Per-class sampling of real training images.

Source: the "real-data cache" of VICO-UoE/DatasetCondensation (``main.py``/``main_DM.py``; copied
by DataDAM, CAFE, MTT, DATM, PAD): the whole training set is kept as one tensor with per-class index
lists, and ``get_images(c, n)`` returns n images of class c from a random permutation (no
replacement within a call). Synthetic labels are class-major: ipc copies of class 0, then class 1...

Unlike the references, randomness comes only from a caller-supplied CPU ``torch.Generator``
(``torch.randperm(..., generator=g)``), so the global RNG never moves and runs are reproducible.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .core import DatasetError, DatasetRecord

__all__ = ['RealSampler', 'sample_random_real']


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f'generator must be a torch.Generator, got {type(generator).__name__}')
    if generator.device.type != 'cpu':
        raise ValueError(f'generator must be a CPU torch.Generator, got one on {generator.device}')


class RealSampler:
    """The training set on one device, with per-class index tensors for random draws.

    Attributes:
        images: (N, C, H, W) training images on ``device`` (moved once, at construction).
        labels: (N,) int64 labels on ``device``.
        num_classes: K.
        device: where images, labels and returned tensors live.
        class_counts: K ints, the number of training images of each class.
    """

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int,
                 device: torch.device | str) -> None:
        """Move the training set to ``device`` once and index it by class.

        Args:
            images: (N, C, H, W) training images (normalised or whitened).
            labels: (N,) integer labels in [0, num_classes).
            num_classes: K.
            device: target device, e.g. ``'cuda'`` or ``torch.device('cpu')``.

        Raises:
            ValueError: shapes disagree, or a label is outside [0, num_classes).
        """
        if images.ndim != 4:
            raise ValueError(f'images must be (N, C, H, W), got shape {tuple(images.shape)}')
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f'labels must be ({images.shape[0]},), got shape {tuple(labels.shape)}')
        labels_cpu = labels.detach().to('cpu', torch.int64)
        if labels_cpu.numel() and (int(labels_cpu.min()) < 0 or int(labels_cpu.max()) >= num_classes):
            raise ValueError(f'labels span [{int(labels_cpu.min())}, {int(labels_cpu.max())}], '
                             f'outside [0, {num_classes - 1}]')
        self.device = torch.device(device)
        self.num_classes = int(num_classes)
        self.images = images.detach().to(self.device)
        self.labels = labels_cpu.to(self.device)
        counts = torch.bincount(labels_cpu, minlength=self.num_classes)
        order = torch.argsort(labels_cpu, stable=True)
        self.class_counts: list[int] = counts.tolist()
        self._class_indices: list[Tensor] = [
            chunk.to(self.device) for chunk in order.split(self.class_counts)]

    def __len__(self) -> int:
        """Number of training images N."""
        return int(self.labels.shape[0])

    def get_images(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """Draw n distinct random images of class c.

        Args:
            c: class index in [0, K).
            n: how many images; clamped to the class size (a request larger than the class
                returns the whole class in random order).
            generator: CPU generator, the only source of randomness.

        Returns:
            (min(n, class_counts[c]), C, H, W) images on ``device`` (a fresh tensor, safe to modify).

        Raises:
            ValueError: ``c`` out of range, ``n`` negative, or a non-CPU generator.
        """
        if not 0 <= c < self.num_classes:
            raise ValueError(f'class index {c} outside [0, {self.num_classes - 1}]')
        if n < 0:
            raise ValueError(f'n must be >= 0, got {n}')
        _check_generator(generator)
        count = self.class_counts[c]
        picks = torch.randperm(count, generator=generator)[:min(n, count)]
        return self.images[self._class_indices[c][picks.to(self.device)]]

    def get_images_all(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw n images of every class, class-major (class 0 first).

        Args:
            n: images per class, clamped per class to its size as in :meth:`get_images`.
            generator: CPU generator, the only source of randomness.

        Returns:
            images (sum_c min(n, class_counts[c]), C, H, W) and int64 labels of the same length,
            both on ``device``; K*n rows when every class has at least n images.
        """
        images, labels = [], []
        for c in range(self.num_classes):
            drawn = self.get_images(c, n, generator)
            images.append(drawn)
            labels.append(torch.full((drawn.shape[0],), c, dtype=torch.int64, device=self.device))
        return torch.cat(images), torch.cat(labels)


def sample_random_real(source: DatasetRecord | RealSampler, ipc: int,
                       generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Class-balanced random real images: the random baseline and ``--init real``.

    Args:
        source: a :class:`~data.core.DatasetRecord` (its training set is sampled where it lives,
            without a copy of the whole set) or a :class:`RealSampler`.
        ipc: images per class.
        generator: CPU generator, the only source of randomness.

    Returns:
        images (K*ipc, C, H, W) and int64 labels (K*ipc,) in class-major order (ipc images of class
        0, then class 1, ...), on the source's device.

    Raises:
        DatasetError: some class has fewer than ``ipc`` training images.
        ValueError: ``ipc`` < 1.
    """
    if ipc < 1:
        raise ValueError(f'ipc must be >= 1, got {ipc}')
    if isinstance(source, DatasetRecord):
        sampler = RealSampler(source.images_train, source.labels_train, source.num_classes,
                              source.images_train.device)
    else:
        sampler = source
    short = [c for c, count in enumerate(sampler.class_counts) if count < ipc]
    if short:
        raise DatasetError(f'ipc={ipc} exceeds the training images of class(es) {short[:10]} '
                           f'(sizes {[sampler.class_counts[c] for c in short[:10]]})')
    return sampler.get_images_all(ipc, generator)
