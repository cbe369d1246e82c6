"""Training a student under the decoupled family's protocol: hard, soft or teacher labels
(``--labels``), a soft loss (``--soft_loss``), DC's SGD schedule or SRe2L's AdamW + cosine
(``--optimizer``), RandomResizedCrop views and CutMix / Mixup (``--student_aug``, ``--mix_type``).
:func:`train_and_test` trains one network: with every student setting at its default, by DC's
protocol (:mod:`evaluation.training`); otherwise by the student protocol of this module.

Sources: VILA-Lab/SRe2L ``validate/train_FKD.py`` (the student's loop over stored labels) and
``relabel/generate_soft_label.py``; LINs-lab/RDED ``validation/main.py`` (the teacher queried on
every mixed batch). Knows no method and no teacher loading: a teacher is a callable.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import progress
from evaluation.protocol import EvalConfig
from evaluation.soft_labels import cosine_factor, make_adamw, mixed, soft_loss
from evaluation.training import (EvaluationStopped, TrainingTerm, label_loss_sum, make_augmenter, sgd_schedule,
                                 test_accuracy, train_epoch)
from evaluation.views import Views, apply_views, draw_views
from precision import optimizer_step, scaled_backward

# A teacher: (B, C, H, W) images -> (B, K) logits (an ``nn.Module`` in eval mode, frozen).
Teacher = Callable[[torch.Tensor], torch.Tensor]


def student_epochs(cfg: EvalConfig) -> int:
    """How many epochs a student trains: ``cfg.epochs + 1`` under DC's SGD schedule (as today),
    ``cfg.epochs`` under AdamW + cosine (SRe2L's ``--epochs``). A relabel store must hold at least
    this many."""
    return cfg.epochs + 1 if cfg.optimizer == "sgd" else cfg.epochs


def multistep_factor(epoch: int, epochs: int) -> float:
    """The learning-rate factor of epoch ``epoch`` (0-based) of ``epochs`` under NCFM's schedule:
    ``0.5 ** m`` with ``m`` the milestones ``epochs // 5, 2 epochs // 5, 3 epochs // 5, 4 epochs // 5``
    passed (gszfwsb/NCFM ``condenser/evaluate.py``: ``MultiStepLR(gamma=0.5)`` stepped once per epoch)."""
    milestones = [k * epochs // 5 for k in range(1, 5)]
    return 0.5 ** sum(1 for milestone in milestones if epoch >= milestone)


def epoch_views(count: int, batch_size: int, im_size, cfg, generator: torch.Generator) -> Iterator[Views]:
    """The views of one epoch: a shuffle of the ``count`` images (``randperm`` from ``generator``),
    cut into batches of ``batch_size`` (the last may be smaller), each batch's views drawn right
    after the shuffle's (:func:`evaluation.views.draw_views`). Relabelling and the online teacher
    both walk an epoch with it, so the same seed gives the same batches and views."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield draw_views(order[start:start + batch_size], im_size, cfg, generator)


def query_teacher(teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
    """``teacher(images)`` without gradients, as float32 (B, K) logits."""
    with torch.no_grad():
        return teacher(images).float()


def train_student(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: EvalConfig,
                  generator: torch.Generator, *, teacher: Optional[Teacher] = None, soft_store=None,
                  on_epoch: Optional[Callable[[int], None]] = None,
                  should_stop: Optional[Callable[[], bool]] = None) -> float:
    """Train ``net`` under ``cfg``'s student settings; returns the last epoch's mean loss.

    Each epoch is a shuffle of the set in batches of ``cfg.batch_train`` with each batch's views
    (:func:`epoch_views`), or, with a relabel store, the store's batches, views and logits of that
    epoch. A batch is put through its views (:func:`evaluation.views.apply_views`; DC/DSA
    augmentation instead under ``student_aug='dc'``) and the loss is :func:`student_loss` against:

    * ``hard``: ``labels`` (N,) classes or (N, K) probabilities (or ``mse`` targets);
    * ``soft``: the store's fp16 logits of the batch, or ``labels`` as (N, K) per-image teacher logits
      (then mixed per image), with (N,) classes from their argmax for ``mse_gt``'s CE term;
    * ``teacher``: ``teacher(views)`` queried on every augmented batch (RDED).

    The optimiser is DC's SGD schedule (:func:`evaluation.training.sgd_schedule`) or
    AdamW(``adamw_lr``, ``adamw_weight_decay``) with lr ``adamw_lr · cosine_factor(e, epochs)`` in
    epoch ``e`` (:func:`evaluation.soft_labels.cosine_factor`), or ``adamw_lr · multistep_factor(e,
    epochs)`` under ``adamw_schedule='multistep'`` (:func:`multistep_factor`); :func:`student_epochs` epochs.

    Args:
        net: a fresh network (put in train mode).
        images: (N, C, H, W) on the network's device.
        labels: as above; under ``soft`` with a store, the (N,) classes.
        cfg: the protocol.
        generator: CPU generator of the shuffle, the views and the DC augmentation.
        teacher: the callable of ``teacher`` labels (on ``images``' device).
        soft_store: an ``evaluation.relabel.SoftLabelStore`` of these images.
        on_epoch, should_stop: as :func:`train_and_test`.

    Raises:
        ValueError: what the regime needs is missing or does not fit (see :func:`check_student_inputs`).
        EvaluationStopped: ``should_stop`` said so.
    """
    per_image, classes = check_student_inputs(images, labels, cfg, teacher, soft_store)
    net.train()
    device = images.device
    im_size = tuple(images.shape[2:])
    augmenter = make_augmenter(cfg.dsa_strategy, cfg.dc_aug) if cfg.student_aug == "dc" else None
    scaler = cfg.precision.grad_scaler(device)
    epochs = student_epochs(cfg)

    def run_epoch(optimizer: torch.optim.Optimizer, epoch: int) -> float:
        total, count = torch.zeros((), device=device), 0
        batches = (soft_store.batches(epoch) if soft_store is not None else
                   ((views, None) for views in epoch_views(images.shape[0], cfg.batch_train, im_size, cfg, generator)))
        for views, stored in batches:
            progress.tick()
            index = views.index.to(device)
            with torch.no_grad():
                x = apply_views(images[index], views)
                if augmenter is not None:
                    x = augmenter(x, generator)
            teacher_logits = None
            if cfg.labels == "teacher":
                teacher_logits = query_teacher(teacher, x)
            elif cfg.labels == "soft":
                teacher_logits = stored.to(device).float() if stored is not None else labels[index]
            y = classes[index] if classes is not None else labels[index]
            optimizer.zero_grad(set_to_none=True)
            with cfg.precision.autocast(device):
                out = net(x)
            loss = student_loss(out.float(), views, cfg, y, teacher_logits, per_image)
            scaled_backward(loss, scaler)
            optimizer_step(optimizer, scaler)
            total += loss.detach() * x.shape[0]
            count += x.shape[0]
        return float(total) / max(count, 1)

    if cfg.optimizer == "sgd":
        epoch_counter = iter(range(epochs))
        return sgd_schedule(list(net.parameters()), cfg, lambda optimizer: run_epoch(optimizer, next(epoch_counter)),
                            on_epoch, should_stop)
    optimizer = make_adamw(net, cfg.adamw_lr, cfg.adamw_weight_decay)
    loss = 0.0
    for epoch in range(epochs):
        if should_stop is not None and should_stop():
            raise EvaluationStopped
        for group in optimizer.param_groups:
            group["lr"] = cfg.adamw_lr * (multistep_factor(epoch, epochs) if cfg.adamw_schedule == "multistep"
                                          else cosine_factor(epoch, epochs))
        loss = run_epoch(optimizer, epoch)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return loss


def student_loss(out: torch.Tensor, views: Views, cfg: EvalConfig, y: torch.Tensor,
                 teacher_logits: Optional[torch.Tensor], per_image: bool) -> torch.Tensor:
    """The batch-mean loss of student logits ``out`` (B, K) on a batch with ``views``.

    * No teacher logits (``hard``): ``label_loss_sum(out, y) / B`` against the mixed targets
      (:func:`evaluation.soft_labels.mixed`).
    * Logits of the views themselves (``teacher``, a relabel store): :func:`soft_loss` against them
      as they are; ``mse_gt``'s CE term against the mixed classes.
    * Per-image logits (``soft`` from (N, K) ``label_syn``, ``per_image``): the loss against the
      mixed per-image logits and classes.

    Args:
        out: (B, K) float32; y: (B,) classes or (B, K) targets; teacher_logits: (B, K) or ``None``.
    """
    if teacher_logits is None:
        return mixed(lambda t: label_loss_sum(out, t, cfg.label_loss) / out.shape[0], views.permutation, views.lam, y)

    def loss(t, classes):
        return soft_loss(out, t, classes, loss=cfg.soft_loss, temperature=cfg.temperature, t2=cfg.soft_t2,
                         mse_gt_weight=cfg.mse_gt_weight)

    if per_image:
        return mixed(loss, views.permutation, views.lam, teacher_logits, y)
    if cfg.soft_loss != "mse_gt":
        return loss(teacher_logits, None)
    return (F.mse_loss(out, teacher_logits.float())
            + cfg.mse_gt_weight * mixed(lambda c: F.cross_entropy(out, c), views.permutation, views.lam, y))


def check_student_inputs(images: torch.Tensor, labels: torch.Tensor, cfg: EvalConfig, teacher: Optional[Teacher],
                         soft_store) -> Tuple[bool, Optional[torch.Tensor]]:
    """Check that the regime has what it needs; returns ``(per_image, classes)``: whether ``soft``
    labels are per-image logits, and the (N,) classes used by ``mse_gt`` (``None``: ``labels`` are them).

    Raises:
        ValueError: ``teacher`` labels without a teacher; ``soft`` labels with neither a store nor
            (N, K) float logits; a store of other images, epochs, batch size or views; labels that
            are neither (N,) nor (N, K).
    """
    count = images.shape[0]
    if cfg.labels == "teacher" and teacher is None:
        raise ValueError("--labels teacher needs a teacher (none was given)")
    if cfg.labels == "soft":
        if soft_store is not None:
            soft_store.check_replay(count, cfg, student_epochs(cfg))
            if labels.dim() != 1:
                raise ValueError("--labels soft with a relabel store needs the images' (N,) classes as labels")
            return False, None
        if labels.dim() != 2 or not labels.is_floating_point() or labels.shape[0] != count:
            raise ValueError(f"--labels soft needs a relabel store or ({count}, K) per-image teacher logits; got labels "
                             f"of shape {tuple(labels.shape)}")
        return True, labels.argmax(dim=1)
    if labels.shape[0] != count or labels.dim() not in (1, 2):
        raise ValueError(f"labels must be ({count},) or ({count}, K), got {tuple(labels.shape)}")
    return False, None


def train_and_test_student(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                           test_labels: torch.Tensor, cfg: EvalConfig, generator: torch.Generator, *,
                           teacher: Optional[Teacher] = None, soft_store=None,
                           on_epoch: Optional[Callable[[int], None]] = None,
                           should_stop: Optional[Callable[[], bool]] = None) -> float:
    """:func:`train_student`, then the test accuracy in [0, 1] (:func:`evaluation.training.test_accuracy`).

    Raises:
        FloatingPointError: the training loss became NaN or infinite.
        Otherwise as :func:`train_student`.
    """
    loss = train_student(net, images, labels, cfg, generator, teacher=teacher, soft_store=soft_store,
                         on_epoch=on_epoch, should_stop=should_stop)
    if not math.isfinite(loss):
        raise FloatingPointError(f"evaluation training loss became {loss}")
    return test_accuracy(net, test_images, test_labels, cfg.batch_test, cfg.tta_mode, cfg.deterministic, cfg.precision)


def train_and_test(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                   test_labels: torch.Tensor, cfg: EvalConfig, generator: torch.Generator,
                   term: Optional[TrainingTerm] = None, on_epoch: Optional[Callable[[int], None]] = None,
                   should_stop: Optional[Callable[[], bool]] = None, *, teacher: Optional[Callable] = None,
                   soft_store=None) -> float:
    """Train one network on a (synthetic) set with the DC protocol and return its test accuracy.

    When a student setting of ``cfg`` is not today's (``cfg.is_default_student`` false: soft or
    teacher labels, AdamW, crop views, a mix), the network is trained by
    :func:`train_and_test_student` instead, with ``teacher`` / ``soft_store``.

    Args:
        net: a freshly initialised network on the target device.
        images: (N, C, H, W) training images on that device (detached).
        labels: (N,) int64 or (N, K) soft labels; with ``cfg.label_loss='mse'`` (N, K) regression
            targets (:func:`evaluation.training.regression_targets`).
        test_images, test_labels: (M, C, H, W) and (M,), on any device.
        cfg: the protocol.
        generator: CPU generator for shuffling and augmentation.
        term: the set's :class:`evaluation.training.TrainingTerm` (e.g. feature labels), or ``None``: plain
            cross-entropy (see :func:`evaluation.training.train_epoch`).
        on_epoch: called as ``on_epoch(epochs_done)`` after each of the ``cfg.epochs + 1``
            epochs (progress display; it must not draw random numbers).
        should_stop: asked before every epoch; ``True`` abandons the training.
        teacher, soft_store: what ``teacher`` / ``soft`` labels need (see :func:`train_student`).

    Raises:
        FloatingPointError: the training loss became NaN or infinite.
        EvaluationStopped: ``should_stop`` said so.
        ValueError: a student protocol with a training term, or without what its labels need.
    """
    if not cfg.is_default_student:
        if term is not None:
            raise ValueError("a training term (feature labels) trains with today's protocol; it cannot be combined "
                             "with --labels soft/teacher, --optimizer adamw, --student_aug rrc/none or --mix_type")
        return train_and_test_student(net, images, labels, test_images, test_labels, cfg, generator, teacher=teacher,
                                      soft_store=soft_store, on_epoch=on_epoch, should_stop=should_stop)
    augmenter = make_augmenter(cfg.dsa_strategy, cfg.dc_aug)
    scaler = cfg.precision.grad_scaler(images.device)
    loss = sgd_schedule(
        list(net.parameters()), cfg,
        lambda optimizer: train_epoch(net, images, labels, optimizer, cfg.batch_train, generator, augmenter, term=term,
                                      precision=cfg.precision, scaler=scaler, label_loss=cfg.label_loss),
        on_epoch, should_stop)
    if not math.isfinite(loss):
        raise FloatingPointError(f"evaluation training loss became {loss}")
    return test_accuracy(net, test_images, test_labels, cfg.batch_test, cfg.tta_mode, cfg.deterministic,
                         cfg.precision)
