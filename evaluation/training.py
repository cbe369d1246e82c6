"""Training and testing one network on an in-memory set: the label losses, the optimiser step, the
shuffled epoch, the test pass and the DC protocol's learning-rate schedule (VICO-UoE/
DatasetCondensation ``utils.py``: ``epoch('train')``, ``evaluate_synset``'s schedule). Knows no
method: a set's extra training signal reaches it as a :class:`TrainingTerm`."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, List, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import progress
from chunked import chunk_size, pass_size
from precision import FP32, Precision, optimizer_step, scaled_backward
from evaluation.protocol import EvalConfig, LABEL_LOSSES, TTA_MODES


Augmenter = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def make_augmenter(dsa_strategy: str = "", dc_aug: Optional["augment.DCAugParam"] = None,
                   dsa_param: Optional["augment.ParamDiffAug"] = None) -> Optional[Augmenter]:
    """Build the per-batch training augmentation of the DC family.

    Args:
        dsa_strategy: a DiffAugment strategy (``color_crop_cutout_flip_scale_rotate``); when
            non-empty, DSA is used in its non-siamese mode (one operation type per batch,
            per-sample parameters).
        dc_aug: DC's ``get_daparam`` setting, used when ``dsa_strategy`` is empty.
        dsa_param: DiffAugment magnitudes (defaults to ``ParamDiffAug()``).

    Returns:
        ``f(images, generator) -> images`` or ``None`` for no augmentation.
    """
    if dsa_strategy and augment.validate_strategy(dsa_strategy):
        param = dsa_param or augment.ParamDiffAug()
        return lambda x, g: augment.diff_augment(x, dsa_strategy, generator=g, param=param)
    if dc_aug is not None and dc_aug.strategy not in ("", "none", "None"):
        return lambda x, g: augment.dc_augment(x, dc_aug, generator=g)
    return None


def centred_one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Regression targets of class labels: ``one_hot(y) - 1/K`` (float32).

    Source: the KIP colab's ``one_hot(..., center=True)`` and ``nn_training.ipynb`` (MSE loss) of
    google-research/google-research ``kip/``; Nguyen, Chen, Lee, ICLR 2021, Sec. 2.

    Args:
        labels: (N,) int64 class indices in [0, K).
        num_classes: K.

    Returns:
        (N, K) float32: 1 - 1/K at the class, -1/K elsewhere.
    """
    return F.one_hot(labels.long(), num_classes).float() - 1.0 / num_classes


def regression_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """What the square label losses (``mse``, ``mse_sum``) fit: class indices (N,) become :func:`centred_one_hot` (N, K);
    real-valued (N, K) labels (learned by kernel ridge regression, KIP) are used as they are.

    Raises:
        ValueError: labels neither (N,) nor (N, K).
    """
    if labels.dim() == 1:
        return centred_one_hot(labels, num_classes)
    if labels.dim() == 2 and labels.shape[1] == num_classes:
        return labels.float()
    raise ValueError(f"labels must be ({labels.shape[0]},) or ({labels.shape[0]}, {num_classes}), got {tuple(labels.shape)}")


def label_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_loss: str = "cross_entropy") -> torch.Tensor:
    """The summed (not averaged) training loss of a batch.

    ``cross_entropy``: ``sum_i CE(logits_i, y_i)`` with class indices or (B, K) probabilities.
    ``mse``: ``sum_i 0.5 * mean_k (logits_ik - y_ik)^2`` against (B, K) regression targets
    (:func:`regression_targets`): the square loss the KIP papers' finite networks were trained with
    (google-research ``kip/nn_training.ipynb`` ``loss_type='mse'``, ``0.5 * mean`` over the batch
    and the K outputs; the caller divides by B).
    ``mse_sum``: ``sum_i 0.5 * ||logits_i - y_i||^2``, summed over the K outputs (FRePo
    ``mean_squared_loss``). Its gradient is K times ``mse``'s: with SGD at lr 0.01 and momentum 0.9,
    ConvNets fitting 10 images diverged on two of four seeds (docs/kernel-and-performance-matching.md).

    Args:
        logits: (B, K) network outputs.
        labels: (B,) int64, or (B, K) probabilities (cross-entropy) / regression targets (mse).
        label_loss: one of :data:`LABEL_LOSSES`.

    Raises:
        ValueError: unknown ``label_loss``.
    """
    if label_loss == "cross_entropy":
        return F.cross_entropy(logits, labels, reduction="sum")
    if label_loss == "mse":
        return 0.5 * ((logits - labels) ** 2).mean(dim=1).sum()
    if label_loss == "mse_sum":
        return 0.5 * ((logits - labels) ** 2).sum()
    raise ValueError(f"label loss {label_loss!r}: expected one of {', '.join(LABEL_LOSSES)}")


def accumulate_gradient(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        label_loss: str = "cross_entropy", precision: Precision = FP32,
                        scaler: Optional["torch.amp.GradScaler"] = None) -> torch.Tensor:
    """Add the gradient of the batch-mean loss (cross-entropy, or :func:`label_loss_sum`'s
    ``label_loss``) to every ``p.grad``.

    Without batch statistics every sample is computed independently, so the gradient is
    accumulated over cache-sized chunks (:func:`pass_size`) with the same result.

    Args:
        images: (B, C, H, W); labels: (B,) int64 or (B, K) probabilities (or regression targets
            with ``label_loss='mse'``).
        label_loss: one of :data:`LABEL_LOSSES`.
        precision: forward passes and the loss run under its autocast (``--amp``), backward outside.
        scaler: float16's ``GradScaler`` (:meth:`Precision.grad_scaler`): each chunk's loss is scaled.

    Returns:
        The batch's mean loss (a detached 0-d tensor on the device; no sync).
    """
    size = pass_size(net, images)
    total = torch.zeros((), device=images.device)
    for x_chunk, y_chunk in zip(images.split(size), labels.split(size)):
        with precision.autocast(images.device):
            loss = label_loss_sum(net(x_chunk), y_chunk, label_loss) / images.shape[0]
        scaled_backward(loss, scaler)
        total += loss.detach()
    return total


def sgd_step(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             optimizer: torch.optim.Optimizer, label_loss: str = "cross_entropy", precision: Precision = FP32,
             scaler: Optional["torch.amp.GradScaler"] = None) -> torch.Tensor:
    """One optimiser step on the batch-mean loss (gradient from :func:`accumulate_gradient`;
    cross-entropy unless ``label_loss`` says otherwise; ``precision`` and ``scaler`` as there; the
    step unscales and may skip, see :func:`precision.optimizer_step`).

    Returns:
        The batch's mean loss before the step (a detached 0-d tensor).
    """
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradient(net, images, labels, label_loss, precision, scaler)
    optimizer_step(optimizer, scaler)
    return loss


Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer], torch.Tensor]

class TrainingTerm(Protocol):
    """What a synthetic set may carry beyond images and labels that changes how networks are
    trained on it (an add-on's learned state, e.g. DRUPI's feature labels): the protocol calls
    :meth:`sgd_step` instead of its plain cross-entropy step and knows nothing else about it.
    """

    def check(self, net: nn.Module, images: torch.Tensor) -> None:
        """Raise ``ValueError`` early if the term does not fit ``net`` (e.g. feature shapes)."""

    def sgd_step(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                 optimizer: torch.optim.Optimizer, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One optimiser step on the batch ``images`` (B, C, H, W) at positions ``index`` (B,) of
        the set; returns the batch's mean loss before the step (detached 0-d tensor)."""


def train_epoch(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                batch_size: int, generator: torch.Generator, augmenter: Optional[Augmenter] = None,
                index: Optional[torch.Tensor] = None, step: Optional[Step] = None,
                term: Optional[TrainingTerm] = None, precision: Precision = FP32,
                scaler: Optional["torch.amp.GradScaler"] = None, label_loss: str = "cross_entropy") -> float:
    """Train ``net`` for one shuffled pass over an in-memory set (DC utils ``epoch('train')``).

    Args:
        net: the network (put in train mode).
        images: (N, C, H, W) on the network's device.
        labels: (N,) int64 class indices, or (N, K) float soft-label probabilities.
        optimizer: over ``net``'s parameters.
        batch_size: samples per step; the last batch may be smaller.
        generator: CPU generator for the shuffle and the augmentation.
        augmenter: applied to each batch under ``no_grad`` (see :func:`make_augmenter`).
        index: (M,) int64 indices of the subset to pass over (PAD's scheduled experts); all if ``None``.
        step: ``step(net, x, y, optimizer) -> loss``; default :func:`sgd_step` (GSAM experts pass theirs).
        term: a :class:`TrainingTerm` of the set (e.g. feature labels); each step is then its
            ``sgd_step`` on the batch and its positions (``step`` is not used). ``None`` (the
            default) leaves the loop exactly as without it.
        precision, scaler: ``--amp`` (see :func:`accumulate_gradient`); a custom ``step`` or a
            ``term`` runs its forward passes under ``precision``'s autocast as a whole, unscaled.
        label_loss: the loss of the default step (:func:`sgd_step`; :data:`LABEL_LOSSES`).

    Returns:
        The mean training loss over the epoch (a Python float; one device sync per epoch).
    """
    net.train()
    step = step or sgd_step
    count = images.shape[0] if index is None else int(index.numel())
    order = torch.randperm(count, generator=generator)
    if index is not None:
        order = index.cpu()[order]
    order = order.to(images.device)
    total = torch.zeros((), device=images.device)
    for start in range(0, count, batch_size):
        progress.tick()  # a progress line / a stop inside long epochs
        batch = order[start:start + batch_size]
        x, y = images[batch], labels[batch]
        if augmenter is not None:
            with torch.no_grad():
                x = augmenter(x, generator)
        if term is not None:
            with precision.autocast(images.device):
                total += term.sgd_step(net, x, y, batch, optimizer, generator) * x.shape[0]
        elif step is sgd_step:
            total += sgd_step(net, x, y, optimizer, label_loss, precision, scaler) * x.shape[0]
        else:
            with precision.autocast(images.device):
                total += step(net, x, y, optimizer) * x.shape[0]
    return float(total) / max(count, 1)


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` contains a BatchNorm layer (its statistics then span the whole batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())

# Images per test pass in deterministic mode, whatever ``batch_test`` is (on CPU, ``CPU_CHUNK``).
DETERMINISTIC_TEST_PASS = 500


@torch.no_grad()
def test_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
                  tta_mode: str = "", deterministic: bool = False, precision: Precision = FP32) -> float:
    """Top-1 accuracy in [0, 1] of ``net`` (put in eval mode) on a labelled set.

    Args:
        images: (N, C, H, W), moved batch by batch to the network's device.
        labels: (N,) int64.
        batch_size: images per forward pass on CUDA (on CPU, ``CPU_CHUNK``).
        tta_mode: ``""`` (none) or ``hflip``: test-time augmentation as DRUPI's ``--tta --tta_mode
            hflip`` (``DCmain3.0.py``): the prediction is the argmax of the mean of the softmax
            probabilities of the image and of its horizontal mirror (flip of the width axis).
        deterministic: pass ``DETERMINISTIC_TEST_PASS`` images at a time whatever ``batch_size``,
            so the accuracy does not depend on the test batch size (kernels chosen by batch shape).
        precision: ``--amp``: the forward passes run under its autocast.

    Raises:
        ValueError: unknown ``tta_mode``.
    """
    if tta_mode and tta_mode not in TTA_MODES:
        raise ValueError(f"--tta_mode {tta_mode!r}: expected one of {', '.join(TTA_MODES)}")
    net.eval()
    device = next(net.parameters()).device
    batch_size = chunk_size(device, DETERMINISTIC_TEST_PASS if deterministic else batch_size)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        with precision.autocast(device):
            if tta_mode == "hflip":
                scores = torch.softmax(net(x), dim=1) + torch.softmax(net(x.flip(-1)), dim=1)
            else:
                scores = net(x)
        correct += (scores.argmax(dim=1) == y).sum()
    return int(correct) / max(images.shape[0], 1)


@contextmanager
def deterministic_algorithms(enabled: bool = True):
    """Within the block: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN
    deterministic and not benchmarking, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless set) for
    deterministic cuBLAS (warn_only because some backward kernels DSA relies on,
    grid_sample and adaptive pooling, have no deterministic CUDA version). Restores the previous
    settings on exit; does nothing when ``enabled`` is false."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                cudnn.deterministic, cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        cudnn.deterministic, cudnn.benchmark = previous[2], previous[3]


class EvaluationStopped(Exception):
    """An evaluation was abandoned because its caller asked to stop (``should_stop``)."""


def sgd_schedule(parameters: List[torch.Tensor], cfg: EvalConfig, run_epoch: Callable[[torch.optim.Optimizer], object],
                       on_epoch: Optional[Callable[[int], None]], should_stop: Optional[Callable[[], bool]]) -> object:
    """The DC protocol's schedule: ``cfg.epochs + 1`` calls of ``run_epoch(optimizer)``, SGD with
    momentum and weight decay over ``parameters``, rebuilt with lr x0.1 after epoch
    ``cfg.epochs // 2 + 1``; returns the last epoch's loss.

    Raises:
        EvaluationStopped: ``should_stop`` said so (asked before every epoch).
    """
    lr = cfg.lr

    def make_optimizer(rate: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(parameters, lr=rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    optimizer = make_optimizer(lr)
    decay_after = cfg.epochs // 2 + 1
    loss = 0.0
    for epoch in range(cfg.epochs + 1):
        if should_stop is not None and should_stop():
            raise EvaluationStopped
        loss = run_epoch(optimizer)
        if epoch == decay_after:
            lr *= 0.1
            optimizer = make_optimizer(lr)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return loss
