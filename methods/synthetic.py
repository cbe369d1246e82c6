"""The synthetic set: the learned artefact a method optimises (images, labels and any learned
extras), an ``nn.Module`` whose ``state_dict`` is what a checkpoint stores. ``methods.base``
re-exports it (``from methods.base import SyntheticSet`` keeps working)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn


class SyntheticSet(nn.Module):
    """The learned artefact: synthetic images and their labels (class-major), and any learned
    extras a method adds. Its ``state_dict`` is what a checkpoint stores.

    Attributes:
        images: ``nn.Parameter`` (K*ipc, C, H, W) in the dataset's normalised (or ZCA) space.
        labels: buffer (K*ipc,) int64: ``ipc`` copies of class 0, then of class 1, ...
        num_classes: K.
        ipc: images per class.
        syn_lr: ``None``, or a learnable scalar ``nn.Parameter``: the step size trajectory
            matching learns (MTT's alpha); evaluation trains with it.
        label_logits: ``None``, or a learnable ``nn.Parameter`` (K*ipc, K) of soft-label logits
            (DATM); evaluation trains on ``softmax(label_logits)`` with soft cross-entropy.
        extras: names of the learned tensors add-ons added (:meth:`learn_extra`); each is an
            ``nn.Parameter`` attribute of that name (so it is in ``state_dict`` under its name).
        label_values: ``None``, or learnable real-valued labels ``nn.Parameter`` (K*ipc, K): the
            regression targets of kernel ridge regression (KIP ``--learn_labels``, FRePo
            ``--learn_label``), initialised at ``one_hot - 1/K``; evaluation fits them as they are
            (``--label_loss mse``).
        step_lr_raw: ``None``, or a learnable ``nn.Parameter`` (T,): one unconstrained value per
            training step of a learned step schedule (DD); the method that adds it maps it to
            step sizes (:meth:`DistillMethod.step_schedule`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, ipc: int):
        super().__init__()
        if images.shape[0] != num_classes * ipc or labels.shape[0] != images.shape[0]:
            raise ValueError(f"expected {num_classes}*{ipc} images and labels, got {images.shape[0]} and {labels.shape[0]}")
        self.images = nn.Parameter(images.detach().clone())
        self.register_buffer("labels", labels.detach().clone())
        self.num_classes = num_classes
        self.ipc = ipc
        self.syn_lr: Optional[nn.Parameter] = None
        self.label_logits: Optional[nn.Parameter] = None
        self.label_values: Optional[nn.Parameter] = None
        self.extras: Dict[str, nn.Parameter] = {}
        self.step_lr_raw: Optional[nn.Parameter] = None

    def learn_lr(self, value: float) -> nn.Parameter:
        """Add the learnable step size, initialised at ``value``; returns it."""
        self.syn_lr = nn.Parameter(torch.tensor(float(value), device=self.images.device))
        return self.syn_lr

    def learn_soft_labels(self, logits: torch.Tensor) -> nn.Parameter:
        """Add learnable soft-label logits (K*ipc, K); returns them.

        Raises:
            ValueError: ``logits`` is not (K*ipc, K).
        """
        if tuple(logits.shape) != (self.images.shape[0], self.num_classes):
            raise ValueError(f"soft labels must be ({self.images.shape[0]}, {self.num_classes}), got {tuple(logits.shape)}")
        self.label_logits = nn.Parameter(logits.detach().clone().to(self.images.device))
        return self.label_logits

    def learn_label_values(self, values: torch.Tensor) -> nn.Parameter:
        """Add learnable real-valued labels (K*ipc, K) (KIP's and FRePo's learned
        KRR targets); returns them.

        Raises:
            ValueError: ``values`` is not (K*ipc, K).
        """
        if tuple(values.shape) != (self.images.shape[0], self.num_classes):
            raise ValueError(f"label values must be ({self.images.shape[0]}, {self.num_classes}), got {tuple(values.shape)}")
        self.label_values = nn.Parameter(values.detach().clone().float().to(self.images.device))
        return self.label_values

    def learn_extra(self, name: str, value: torch.Tensor) -> nn.Parameter:
        """Add a learnable tensor of an add-on (any shape), initialised at ``value`` (copied to the
        images' device), as the parameter ``name`` (:attr:`extras`); returns it.

        Raises:
            ValueError: ``name`` is already an attribute of the set.
        """
        if name in self.extras or hasattr(self, name):
            raise ValueError(f"the synthetic set already has {name!r}")
        parameter = nn.Parameter(value.detach().clone().to(self.images.device))
        self.register_parameter(name, parameter)
        self.extras[name] = parameter
        return parameter

    def extra(self, name: str) -> Optional[nn.Parameter]:
        """The learned tensor ``name`` an add-on added (:meth:`learn_extra`), or ``None``."""
        return self.extras.get(name)

    def learn_step_schedule(self, raw: torch.Tensor) -> nn.Parameter:
        """Add the learnable per-step values (T,) of a step schedule (DD); returns them.

        Raises:
            ValueError: ``raw`` is not one-dimensional.
        """
        if raw.dim() != 1:
            raise ValueError(f"a step schedule holds one value per step, got shape {tuple(raw.shape)}")
        self.step_lr_raw = nn.Parameter(raw.detach().clone().to(self.images.device))
        return self.step_lr_raw

    def class_images(self, c: int) -> torch.Tensor:
        """(ipc, C, H, W) view of class ``c``'s images (gradients flow to ``images``)."""
        return self.images[c * self.ipc:(c + 1) * self.ipc]

    def targets(self) -> torch.Tensor:
        """Training targets: (K*ipc,) int64 class labels, (K*ipc, K) probabilities
        ``softmax(label_logits)`` when soft labels are learned, or the (K*ipc, K) real-valued
        ``label_values`` when those are learned (detached)."""
        if self.label_logits is not None:
            return torch.softmax(self.label_logits.detach(), dim=1)
        if self.label_values is not None:
            return self.label_values.detach()
        return self.labels

    def export_labels(self) -> torch.Tensor:
        """The labels a result file stores: the soft-label logits (DATM's ``labels_*.pt``
        format) or the real-valued label values (KIP) when learned, else the int64 class labels;
        detached, on the CPU."""
        labels = self.label_logits if self.label_logits is not None else self.label_values
        labels = labels if labels is not None else self.labels
        return labels.detach().cpu().clone()

    def label_kind(self) -> str:
        """What :meth:`export_labels` holds, for records: ``hard``, ``soft`` (logits) or
        ``learned real-valued``."""
        if self.label_logits is not None:
            return "soft"
        return "learned real-valued" if self.label_values is not None else "hard"

    @staticmethod
    def class_major_labels(num_classes: int, ipc: int, device=None) -> torch.Tensor:
        """(K*ipc,) int64 labels ``[0]*ipc + [1]*ipc + ...``."""
        return torch.arange(num_classes, device=device).repeat_interleave(ipc)
