"""Shared machinery: seeding, device choice, the one training loop and evaluation protocol,
checkpoint files, image grids and the saved-result format.

Everything a method or a command-line script needs that is neither a network (``networks.py``),
an augmentation (``augment.py``) nor a dataset (``data/``). Nothing here knows about any
distillation method or about argparse.

The evaluation protocol (:func:`evaluate_synset`) follows the DC family of reference
implementations (Zhao et al., "Dataset Condensation with Gradient Matching", ICLR 2021,
``utils.evaluate_synset``): a fresh random network, SGD with momentum 0.9 and weight decay 5e-4,
learning rate x0.1 after epoch ``epochs // 2 + 1`` with a new optimiser, ``epochs + 1`` epochs in
total, augmentation on every training batch, one test at the end.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import augment
import distributed
import networks
import stacking
from data import PlainDataError, load_plain
from precision import FP32, Precision, optimizer_step, scaled_backward

logger = logging.getLogger(__name__)

# Version of the checkpoint layout written by :func:`save_checkpoint`.
CHECKPOINT_VERSION = 1


class UserError(Exception):
    """A mistake in what the user asked for (a flag value, a file); scripts print it on one line."""


# --------------------------------------------------------------------------------------------
# Seeds, generators, devices
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) global RNGs once.

    Args:
        seed: any integer; the scripts use ``--seed + experiment index``.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded with ``seed``.

    All sampling of real images and augmentation parameters draws from such generators (on the
    CPU, then moved), so the global RNG is never reseeded.
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a ``--device`` value into a ``torch.device``, once per script.

    Args:
        spec: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        UserError: the value is not one of those, or asks for CUDA on a machine without it.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise UserError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def rng_state() -> dict:
    """Capture the global RNG states (python, numpy, torch CPU, CUDA) for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Progress of long stages
# --------------------------------------------------------------------------------------------
# Seconds between two progress lines when no terminal shows a bar (:class:`Progress`).
PROGRESS_EVERY_S = 30.0
# Progress lines go here; scripts that log only warnings keep this logger at INFO.
progress_logger = logging.getLogger(__name__ + ".progress")
# A progress line: tqdm's meter without the bar.
PROGRESS_LINE = "{desc}: {percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _BarSafeHandler(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``, so that a log line printed while a
    bar is open does not land inside the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must not raise (as logging.StreamHandler.emit)
            self.handleError(record)


def _route_console_through_tqdm() -> List[Tuple[logging.Handler, logging.Handler]]:
    """Swap the root logger's console handlers (stdout / stderr) for :class:`_BarSafeHandler`s
    with the same level, formatter and filters; returns ``(original, replacement)`` pairs."""
    swapped = []
    for position, handler in enumerate(logging.root.handlers):
        if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, _BarSafeHandler)
                and handler.stream in (sys.stdout, sys.stderr)):
            safe = _BarSafeHandler(handler.stream)
            safe.setLevel(handler.level)
            safe.setFormatter(handler.formatter)
            for log_filter in handler.filters:
                safe.addFilter(log_filter)
            logging.root.handlers[position] = safe
            swapped.append((handler, safe))
    return swapped


class Progress:
    """Progress of a long stage (evaluation, distillation, experts, original models ...).

    On a terminal (tqdm's own test, ``file.isatty()``) a tqdm bar is drawn, and while it is open
    console log lines are written through ``tqdm.write`` so that they do not break it. Without a
    terminal (batch jobs, pipes, pytest) an INFO line goes to :data:`progress_logger` once
    ``log_every_s`` seconds have passed since the previous one, each time a further
    ``log_fraction`` of ``total`` is done (when given), and at the end; the line is tqdm's meter
    without the bar
    (:data:`PROGRESS_LINE`), e.g.
    ``evaluation ConvNet: 41% 2050/5005 [00:41<00:59, 49.64epoch/s, network 2/5, epoch 49/1001]``.

    It only counts and prints: no random number is drawn and nothing is synchronised. Under
    torchrun only rank 0 shows it (``distributed.is_main``); the other ranks count silently.

    Args:
        total: units of work in the stage (e.g. epochs of all networks).
        desc: what runs (the bar's and every line's prefix).
        unit: name of one unit (``epoch``, ``it``); the rate is given per unit.
        initial: units already done before this process (a resumed run); the rate counts only new ones.
        log_every_s: seconds between lines without a terminal (0: a line per update); ``None``:
            :data:`PROGRESS_EVERY_S`.
        log_fraction: also a line each time another such fraction of ``total`` is done (the
            distillation loop logs every 5 %); ``None``: by time only.
        leave: keep the bar on screen when closed (``False`` for bars inside another stage).
        file: the bar's stream (default ``sys.stderr``); whether it is a terminal decides.
        bar: ``True``/``False`` forces the bar / the log lines; ``None`` decides by ``file``.

    Use as a context manager (``with Progress(...) as progress:``) or call :meth:`close`.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0,
                 log_every_s: Optional[float] = None, log_fraction: Optional[float] = None, leave: bool = True,
                 file=None, bar: Optional[bool] = None):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.log_every_s = PROGRESS_EVERY_S if log_every_s is None else log_every_s
        self.log_fraction = log_fraction
        self.n = self.logged_n = initial
        self.postfix = ""
        # Under torchrun only rank 0 draws a bar or logs progress lines (``distributed.is_main``).
        self.silent = not distributed.is_main()
        self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=file,
                        dynamic_ncols=True, disable=True if self.silent else (None if bar is None else not bar))
        self.start = self.logged_at = time.monotonic()
        self._swapped = [] if self.bar.disable else _route_console_through_tqdm()
        self.closed = False

    @property
    def logs(self) -> bool:
        """Whether progress goes to log lines (no terminal) rather than to a bar."""
        return self.bar.disable

    def update(self, n: int = 1, postfix: Optional[str] = None) -> None:
        """Count ``n`` more units done; ``postfix`` (e.g. ``"network 2/5, epoch 49/1001"`` or
        ``"loss=0.1234, acc=45.10%"``) replaces the text shown after the rate."""
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if not self.logs:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        if self.silent:
            return
        now = time.monotonic()
        step = self.total * self.log_fraction if self.log_fraction and self.total else 0
        crossed = step > 0 and math.floor(self.n / step) > math.floor(self.logged_n / step)
        if now - self.logged_at >= self.log_every_s or crossed or self.n == self.total:
            self.log(now)

    def line(self, now: Optional[float] = None) -> str:
        """The progress line as logged (:data:`PROGRESS_LINE`)."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        return tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix or None, initial=self.initial, bar_format=PROGRESS_LINE)

    def log(self, now: Optional[float] = None) -> None:
        """Log the progress line now."""
        now = time.monotonic() if now is None else now
        progress_logger.info(self.line(now))
        self.logged_n, self.logged_at = self.n, now

    def close(self) -> None:
        """Close the bar (console logging goes back to its handlers), or log the last line if
        work was done since the previous one. Calling it again does nothing."""
        if self.closed:
            return
        self.closed = True
        if not self.logs:
            self.bar.close()
            for original, safe in self._swapped:
                if safe in logging.root.handlers:
                    logging.root.handlers[logging.root.handlers.index(safe)] = original
        elif self.n != self.logged_n and not self.silent:
            self.log()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Training and testing networks
# --------------------------------------------------------------------------------------------
# Images per forward pass for work that does not depend on the batch composition (real-image
# gradients of a network whose BatchNorm is frozen, embeddings, test accuracy). On CPU a small
# chunk keeps a ConvNet's activations in the last-level cache: on the 2-core development machine
# (32 MiB L3) a real-gradient pass over 256 Fashion-MNIST images took 0.68-0.77 s in chunks of 32
# against 1.0 s in one batch, and testing 0.88 s against 1.55 s per 1000 images. On CUDA the
# whole batch is one pass.
CPU_CHUNK = 32


def chunk_size(device: torch.device, full: int) -> int:
    """Images per pass on ``device`` for a batch of ``full`` (see ``CPU_CHUNK``)."""
    return min(full, CPU_CHUNK) if device.type == "cpu" else max(full, 1)


def batch_dependent(net: nn.Module) -> bool:
    """Whether ``net``'s output for one image depends on the rest of the batch, i.e. it has a
    BatchNorm layer in training mode (batch statistics). Frozen (eval-mode) BatchNorm is per-sample."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def pass_size(net: nn.Module, images: torch.Tensor) -> int:
    """Images per forward pass for ``net`` on ``images`` (N, C, H, W): the whole batch when the
    network is batch-dependent (:func:`batch_dependent`), else ``chunk_size``. Chunking then gives
    the same result as one pass."""
    return images.shape[0] if batch_dependent(net) else chunk_size(images.device, images.shape[0])


def param_grads(net: nn.Module, params: Sequence[torch.Tensor], images: torch.Tensor,
                labels: torch.Tensor) -> list:
    """Detached gradients of the mean cross-entropy of ``net`` on a batch w.r.t. ``params``.

    Computed chunk by chunk (:func:`pass_size`) as ``sum_chunks grad(sum CE) / N``, which equals
    the gradient of the batch mean up to float summation order (one pass when BatchNorm is in
    training mode).

    Args:
        net: the network.
        params: the parameters to differentiate (usually ``list(net.parameters())``).
        images: (N, C, H, W).
        labels: (N,) int64.

    Returns:
        One gradient tensor per parameter, shaped like it.
    """
    size = pass_size(net, images)
    total = None
    for x, y in zip(images.split(size), labels.split(size)):
        grads = torch.autograd.grad(F.cross_entropy(net(x), y, reduction="sum"), params)
        total = list(grads) if total is None else [t.add_(g) for t, g in zip(total, grads)]
    return [t.div_(images.shape[0]).detach() for t in total]


@torch.no_grad()
def embed_in_chunks(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``net.embed`` of a batch without gradients, in :func:`pass_size` chunks.

    Args:
        images: (N, C, H, W).

    Returns:
        (N, D) embeddings.
    """
    return torch.cat([net.embed(x) for x in images.split(pass_size(net, images))])
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


# How a network trained on a set is fitted to its labels (``EvalConfig.label_loss``, ``--label_loss``).
LABEL_LOSSES = ("cross_entropy", "mse")


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
    """What the ``mse`` label loss fits: class indices (N,) become :func:`centred_one_hot` (N, K);
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
    ``mse``: ``sum_i 0.5 * ||logits_i - y_i||^2`` against (B, K) regression targets
    (:func:`regression_targets`): the square loss the KIP paper's finite networks were trained with
    (google-research ``kip/nn_training.ipynb`` ``loss_type='mse'``, whose ``0.5 * mean`` also
    averages over the K outputs; summing over them keeps the gradient's scale near the
    cross-entropy's, so the same ``--lr_net`` fits both).

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


TTA_MODES = ("hflip",)

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


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol of the DC family (VICO-UoE/DatasetCondensation ``utils.py``
    ``evaluate_synset``; docs/reference-notes.md, *Evaluation protocol*).

    Attributes:
        epochs: ``--epoch_eval_train``; ``epochs + 1`` epochs are run, the lr drops x0.1 after
            epoch ``epochs // 2 + 1`` and the optimiser (with its momentum) is rebuilt.
        lr: ``--lr_net``, the SGD learning rate (MTT-style methods pass their learned lr).
        batch_train: ``--batch_train``, synthetic images per step.
        momentum: SGD momentum (0.9 in every reference).
        weight_decay: SGD weight decay (5e-4 in every reference).
        dsa_strategy: DiffAugment strategy; empty means DC augmentation (or none).
        dc_aug: DC's ``get_daparam`` setting, used when ``dsa_strategy`` is empty.
        batch_test: test images per forward pass (does not change the result).
        tta_mode: ``""`` or ``hflip``: test-time augmentation (:func:`test_accuracy`; ``--tta``).
        deterministic: ``--deterministic``: deterministic kernels while training and testing
            (:func:`deterministic_algorithms`) and a test pass size independent of ``batch_test``.
        stacked_eval: ``--stacked_eval``: ``on`` trains the networks of one evaluation together
            (``stacking``), ``off`` one after another, ``auto`` picks the faster
            (:func:`eval_path`). The accuracies are the same up to float rounding.
        label_loss: ``--label_loss``: ``cross_entropy`` (hard or soft labels) or ``mse`` (square
            loss on :func:`regression_targets`: centred one-hot, or the set's real-valued labels).
        precision: ``--amp`` (:class:`precision.Precision`): forward passes of training and
            testing under autocast, float16 with a ``GradScaler``. An execution choice like the
            device: recorded with the result, not saved with the set's protocol.
    """

    epochs: int = 300
    lr: float = 0.01
    batch_train: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa_strategy: str = ""
    dc_aug: Optional["augment.DCAugParam"] = None
    batch_test: int = 1000
    tta_mode: str = ""
    deterministic: bool = False
    stacked_eval: str = "auto"
    label_loss: str = "cross_entropy"
    precision: Precision = FP32

    def __post_init__(self) -> None:
        if self.stacked_eval not in STACKED_EVAL_CHOICES:
            raise ValueError(f"--stacked_eval {self.stacked_eval!r}: expected one of {', '.join(STACKED_EVAL_CHOICES)}")

    def describe(self) -> dict:
        """A JSON-ready record of the protocol, written beside every result (``tta`` and
        ``deterministic`` only when set)."""
        record = {
            "epochs": self.epochs, "lr": self.lr, "batch_train": self.batch_train, "optimizer": "SGD",
            "momentum": self.momentum, "weight_decay": self.weight_decay,
            "lr_schedule": f"x0.1 after epoch {self.epochs // 2 + 1}, optimiser rebuilt",
            "augmentation": (f"DSA {self.dsa_strategy}" if self.dsa_strategy else
                             f"DC {self.dc_aug.strategy}" if self.dc_aug is not None else "none"),
            "label_loss": self.label_loss,
        }
        if self.tta_mode:
            record["tta"] = f"{self.tta_mode} (mean of softmax probabilities)"
        if self.deterministic:
            record["deterministic"] = True
        if self.precision.enabled:
            record["amp"] = self.precision.describe()
        return record


@dataclass(frozen=True)
class EvalProtocol:
    """The one evaluation-protocol resolver: what a synthetic set is trained with, before the
    evaluation network is known. :meth:`resolve` turns it into the :class:`EvalConfig` of one
    network (DC ``get_daparam`` augmentation depends on it); it is saved with every set
    (``meta['protocol']``, :meth:`as_dict`) so that ``evaluate.py`` replays exactly the protocol
    ``distill.py`` evaluated with, unless flags override a field.

    It knows no method: the distillation layer fills ``epochs_augmented`` / ``epochs_plain`` from
    the method's reference defaults (DC/DSA 1000 with augmentation, else 300; CAFE 1000 / 600;
    DataDAM 1800; DM and the trajectory-matching family 1000) or from ``--epoch_eval_train``.

    Attributes:
        epochs_augmented: ``--epoch_eval_train`` when training is augmented (DSA, or an active DC
            augmentation).
        epochs_plain: ``--epoch_eval_train`` without augmentation.
        lr: SGD learning rate (``--lr_net``) unless the set learned a step size.
        batch_train: ``--batch_train``.
        dsa_strategy: DiffAugment strategy ("" : DC's ``get_daparam`` augmentation or none).
        tta_mode, deterministic, stacked_eval, label_loss: see :class:`EvalConfig` (the distillation
            layer fills ``label_loss`` from the method's default, e.g. ``mse`` for KIP, or ``--label_loss``).
    """

    epochs_augmented: int = 1000
    epochs_plain: int = 300
    lr: float = 0.01
    batch_train: int = 256
    dsa_strategy: str = ""
    tta_mode: str = ""
    deterministic: bool = False
    stacked_eval: str = "auto"
    label_loss: str = "cross_entropy"

    def resolve(self, dataset: str, model: str, model_eval: str, ipc: int,
                learned_lr: Optional[float] = None, precision: Precision = FP32) -> EvalConfig:
        """The :class:`EvalConfig` of evaluation network ``model_eval``.

        Args:
            dataset: dataset name (DC's augmentation choice depends on it).
            model: the network the set was distilled with.
            model_eval: the network being trained.
            ipc: images per class.
            learned_lr: a step size learned with the set (trajectory matching), used instead of ``lr``.
            precision: ``--amp`` of this run (:attr:`EvalConfig.precision`).

        Raises:
            FloatingPointError: ``learned_lr`` is not a positive finite number (the learned step
                size diverged; SGD cannot train with it).
        """
        if learned_lr is not None and not (math.isfinite(float(learned_lr)) and float(learned_lr) > 0):
            raise FloatingPointError(f"the step size learned with the set is {float(learned_lr):.4g}, not a positive "
                                     "number, so no network can be trained with it (it diverged: lower --lr_lr)")
        dc_aug = None if self.dsa_strategy else augment.get_daparam(dataset, model, model_eval, ipc)
        augmented = bool(self.dsa_strategy) or (dc_aug is not None and dc_aug.strategy not in ("", "none", "None"))
        return EvalConfig(epochs=self.epochs_augmented if augmented else self.epochs_plain,
                          lr=float(learned_lr) if learned_lr is not None else self.lr, batch_train=self.batch_train,
                          dsa_strategy=self.dsa_strategy, dc_aug=dc_aug, tta_mode=self.tta_mode,
                          deterministic=self.deterministic, stacked_eval=self.stacked_eval,
                          label_loss=self.label_loss, precision=precision)

    def with_epochs(self, epochs: Optional[int]) -> "EvalProtocol":
        """This protocol with both epoch counts set to ``epochs`` (unchanged when ``None``)."""
        return self if epochs is None else dataclasses.replace(self, epochs_augmented=epochs, epochs_plain=epochs)

    def as_dict(self) -> dict:
        """JSON-ready record (``meta['protocol']`` of a result file)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "EvalProtocol":
        """Inverse of :meth:`as_dict`; unknown keys are ignored (a newer file), missing ones default."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate_synset`: accuracies in [0, 1], training seconds and how the
    networks were trained (``path``: ``stacked`` or ``sequential``; ``path_note``: why, when the
    choice was not ``--stacked_eval on`` honoured, e.g. a fallback)."""

    model: str
    accs: list = field(default_factory=list)
    train_time_s: float = 0.0
    path: str = ""
    path_note: str = ""

    @property
    def acc_mean(self) -> float:
        """Mean accuracy in [0, 1] (NaN when empty)."""
        return float(np.mean(self.accs)) if self.accs else float("nan")

    @property
    def acc_std(self) -> float:
        """Population standard deviation of the accuracies (as the references report)."""
        return float(np.std(self.accs)) if self.accs else float("nan")

    def as_dict(self) -> dict:
        """JSON-ready ``{"mean", "std", "accs", "train_time_s"}``, with ``eval_path`` (and
        ``eval_path_note``) when known."""
        record = {"mean": self.acc_mean, "std": self.acc_std, "accs": list(self.accs),
                  "train_time_s": self.train_time_s}
        if self.path:
            record["eval_path"] = self.path
        if self.path_note:
            record["eval_path_note"] = self.path_note
        return record


class EvaluationStopped(Exception):
    """An evaluation was abandoned because its caller asked to stop (``should_stop``)."""


def train_and_test(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                   test_labels: torch.Tensor, cfg: EvalConfig, generator: torch.Generator,
                   term: Optional[TrainingTerm] = None, on_epoch: Optional[Callable[[int], None]] = None,
                   should_stop: Optional[Callable[[], bool]] = None) -> float:
    """Train one network on a (synthetic) set with the DC protocol and return its test accuracy.

    Args:
        net: a freshly initialised network on the target device.
        images: (N, C, H, W) training images on that device (detached).
        labels: (N,) int64 or (N, K) soft labels; with ``cfg.label_loss='mse'`` (N, K) regression
            targets (:func:`regression_targets`).
        test_images, test_labels: (M, C, H, W) and (M,), on any device.
        cfg: the protocol.
        generator: CPU generator for shuffling and augmentation.
        term: the set's :class:`TrainingTerm` (e.g. feature labels), or ``None``: plain
            cross-entropy (see :func:`train_epoch`).
        on_epoch: called as ``on_epoch(epochs_done)`` after each of the ``cfg.epochs + 1``
            epochs (progress display; it must not draw random numbers).
        should_stop: asked before every epoch; ``True`` abandons the training.

    Raises:
        FloatingPointError: the training loss became NaN or infinite.
        EvaluationStopped: ``should_stop`` said so.
    """
    augmenter = make_augmenter(cfg.dsa_strategy, cfg.dc_aug)
    scaler = cfg.precision.grad_scaler(images.device)
    loss = _train_on_schedule(
        list(net.parameters()), cfg,
        lambda optimizer: train_epoch(net, images, labels, optimizer, cfg.batch_train, generator, augmenter, term=term,
                                      precision=cfg.precision, scaler=scaler, label_loss=cfg.label_loss),
        on_epoch, should_stop)
    if not math.isfinite(loss):
        raise FloatingPointError(f"evaluation training loss became {loss}")
    return test_accuracy(net, test_images, test_labels, cfg.batch_test, cfg.tta_mode, cfg.deterministic,
                         cfg.precision)


def _train_on_schedule(parameters: List[torch.Tensor], cfg: EvalConfig, run_epoch: Callable[[torch.optim.Optimizer], object],
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


def train_and_test_stacked(nets: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                           test_images: torch.Tensor, test_labels: torch.Tensor, cfg: EvalConfig,
                           generators: Sequence[torch.Generator], on_epoch: Optional[Callable[[int], None]] = None,
                           should_stop: Optional[Callable[[], bool]] = None) -> List[float]:
    """:func:`train_and_test` for N networks of one architecture at once (``stacking``).

    Network k trains from its own initialisation and draws its data order and augmentation from
    ``generators[k]`` exactly as :func:`train_and_test` would with that generator, so the
    accuracies equal N separate calls up to float rounding (batched kernels sum in another order).

    Args:
        nets: N freshly initialised networks of one architecture on the target device.
        images: (M, C, H, W) training images on that device; labels: (M,) int64 or (M, K).
        test_images, test_labels: (T, C, H, W) and (T,), on any device.
        cfg: the protocol.
        generators: N CPU generators.
        on_epoch: called as ``on_epoch(epochs_done)`` after each epoch (of all N networks).
        should_stop: asked before every epoch; ``True`` abandons the training.

    Returns:
        N test accuracies in [0, 1].

    Raises:
        FloatingPointError: a network's training loss became NaN or infinite.
        EvaluationStopped: ``should_stop`` said so.
    """
    stack = stacking.StackedNetworks(nets)
    count = stack.count
    cpu = images.device.type == "cpu"
    chunk = max(1, CPU_CHUNK // count) if cpu else None  # per network; CPU: a cache-sized pass in all

    def step(s: stacking.StackedNetworks, x: torch.Tensor, y: torch.Tensor,
             optimizer: torch.optim.Optimizer) -> torch.Tensor:
        return stacking.sgd_step(s, x, y, optimizer, chunk)

    def augmenter(x: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        return stacking.augment_stacked(x, gens, cfg.dsa_strategy, cfg.dc_aug)

    def run_epoch(optimizer: torch.optim.Optimizer) -> torch.Tensor:
        with cfg.precision.autocast(images.device):  # bfloat16 only: eval_path keeps float16 sequential
            return stacking.train_epoch(stack, images, labels, optimizer, cfg.batch_train, generators, augmenter, step)

    losses = _train_on_schedule(stack.parameters(), cfg, run_epoch, on_epoch, should_stop)
    losses = torch.as_tensor(losses).cpu()
    if not bool(torch.isfinite(losses).all()):
        bad = next(float(v) for v in losses if not math.isfinite(float(v)))
        raise FloatingPointError(f"evaluation training loss became {bad}")
    size = chunk_size(images.device, DETERMINISTIC_TEST_PASS if cfg.deterministic else cfg.batch_test)
    per_pass = size if cpu else max(1, size // count)  # CUDA: about one network's pass of activations
    if cfg.tta_mode and cfg.tta_mode not in TTA_MODES:
        raise ValueError(f"--tta_mode {cfg.tta_mode!r}: expected one of {', '.join(TTA_MODES)}")
    with cfg.precision.autocast(images.device):
        return stacking.test_accuracies(stack, test_images, test_labels, per_pass, cfg.tta_mode)


STACKED_EVAL_CHOICES = ("auto", "on", "off")
# Networks that --stacked_eval auto trains one at a time even on CUDA: large enough that one
# network's step fills the device (and N of them would hold N times the activations).
SEQUENTIAL_ON_AUTO = ("VGG", "ResNet")


def eval_path(stacked_eval: str, model: str, device: torch.device, num_networks: int,
              term: Optional[TrainingTerm] = None, label_loss: str = "cross_entropy",
              precision: Precision = FP32) -> Tuple[bool, str]:
    """Whether :func:`evaluate_synset` trains its networks together (``stacking``) and why not.

    ``on`` stacks whenever it can; ``off`` never; ``auto`` stacks on CUDA unless ``model`` is one
    of :data:`SEQUENTIAL_ON_AUTO`, and trains one network at a time on CPU, where stacking was
    measured slower (docs/results.md, *Stacked evaluation*). A set's training term (feature
    labels), a label loss other than cross-entropy (``mse``), float16 autocast (its gradient
    scaler is per network) and a single network always go one at a time; bfloat16 stacks.

    Returns:
        ``(stacked, note)``; the note is empty when the setting was followed as asked.
    """
    if stacked_eval == "off":
        return False, ""
    if term is not None:
        return False, "sequential: the set's training term (feature labels) trains one network at a time"
    if label_loss != "cross_entropy":
        return False, f"sequential: --label_loss {label_loss} trains one network at a time"
    if precision.amp == "fp16":
        return False, f"sequential: --amp {precision.amp} trains one network at a time (per-network gradient scaling)"
    if num_networks < 2:
        return False, "sequential: one network" if stacked_eval == "on" else ""
    if stacked_eval == "on":
        return True, ""
    if device.type == "cpu":
        return False, "auto: sequential on CPU (measured faster)"
    if model.startswith(SEQUENTIAL_ON_AUTO):
        return False, f"auto: sequential for the large network {model}"
    return True, "auto: stacked"


def evaluate_synset(image_syn: torch.Tensor, label_syn: torch.Tensor, model: str, num_classes: int,
                    test_images: torch.Tensor, test_labels: torch.Tensor, cfg: EvalConfig, *,
                    num_eval: int = 1, device: Optional[torch.device] = None, seed: int = 0,
                    term: Optional[TrainingTerm] = None, progress: bool = True,
                    should_stop: Optional[Callable[[], bool]] = None,
                    indices: Optional[Sequence[int]] = None) -> EvalResult:
    """Train ``num_eval`` fresh ``model`` networks on a synthetic set; report their test accuracy.

    The one evaluation routine of the toolkit, shared by ``distill.py`` and ``evaluate.py``.
    Network ``k`` is initialised and trained from seed ``seed + k`` inside a forked RNG, so the
    caller's global RNG stream is left where it was and the result does not depend on when the
    evaluation runs. Its initialisation is drawn from the global RNG seeded with ``seed + k``, its
    data order and augmentation from ``make_generator(seed + k)``, whichever path trains it:
    one network after another (:func:`train_and_test`) or all together (:func:`train_and_test_stacked`,
    ``cfg.stacked_eval``, :func:`eval_path`); an architecture ``torch.func.vmap`` cannot batch falls
    back to the former, and the result says which path ran (``path``, ``path_note``).

    Args:
        image_syn: (N, C, H, W) synthetic images in the dataset's normalised (or ZCA) space.
        label_syn: (N,) int64 labels or (N, K) soft labels (probabilities); with
            ``cfg.label_loss='mse'``, class indices become centred one-hot targets and (N, K)
            labels are real-valued regression targets (:func:`regression_targets`).
        model: a network name from ``networks.list_networks()``.
        num_classes: K.
        test_images, test_labels: the real test set, (M, C, H, W) and (M,).
        cfg: the protocol (epochs, lr, augmentation ...).
        num_eval: number of independently initialised networks (indices ``0 .. num_eval - 1``).
        device: where to train (default: the device of ``image_syn``).
        seed: base seed.
        term: what the set carries beyond images and labels that changes training (an add-on's
            :class:`TrainingTerm`, on ``device``), checked against the first network; ``None``
            is the plain protocol.
        progress: show progress over networks and epochs (:class:`Progress`: a bar on a
            terminal, else a log line every :data:`PROGRESS_EVERY_S` seconds and at the end).
            It does not change the result.
        should_stop: asked before every epoch of every network; ``True`` abandons the evaluation
            (a stop requested by a signal).
        indices: which of the ``num_eval`` networks to train (network ``k`` always from seed
            ``seed + k``, whoever trains it); default all, ``0 .. num_eval - 1``; the accuracies
            come in this order. :func:`evaluate_synset_sharded` spreads them over torchrun's ranks.

    Returns:
        An :class:`EvalResult` with one accuracy in [0, 1] per network of ``indices``, in that order.

    Raises:
        KeyError: unknown ``model``.
        ValueError: ``term`` does not fit ``model`` (:meth:`TrainingTerm.check`); a ``term`` with a
            label loss other than cross-entropy; labels that do not fit ``cfg.label_loss``.
        FloatingPointError: a training loss became NaN or infinite.
        EvaluationStopped: ``should_stop`` said so.
    """
    device = device or image_syn.device
    images = image_syn.detach().to(device)
    labels = label_syn.detach().to(device)
    if cfg.label_loss not in LABEL_LOSSES:
        raise ValueError(f"label loss {cfg.label_loss!r}: expected one of {', '.join(LABEL_LOSSES)}")
    if cfg.label_loss == "mse":
        if term is not None:
            raise ValueError("a training term (feature labels) trains with cross-entropy; it cannot use --label_loss mse")
        labels = regression_targets(labels, num_classes)
    channel, im_size = images.shape[1], tuple(images.shape[2:])
    runs = list(range(num_eval)) if indices is None else [int(k) for k in indices]
    result = EvalResult(model=model)
    start = time.perf_counter()
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    epochs = cfg.epochs + 1

    def fresh_network(run: int) -> nn.Module:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed + run)
            return networks.get_network(model, channel, num_classes, im_size, device=device)

    stacked, note = eval_path(cfg.stacked_eval, model, device, len(runs), term, cfg.label_loss, cfg.precision)
    nets = []
    if stacked:
        nets = [fresh_network(run) for run in runs]
        try:
            with deterministic_algorithms(cfg.deterministic):
                stacking.check_stackable(nets[0], images, labels)
        except stacking.StackingUnsupported as error:
            stacked, nets = False, []
            note = f"sequential: {model} cannot be stacked ({error})"
    result.path, result.path_note = ("stacked" if stacked else "sequential"), note
    shown = Progress(len(runs) * epochs, f"evaluation {model}", unit="epoch", leave=False) if progress else None
    with shown or nullcontext():
        if stacked:
            def on_all_epochs(done: int) -> None:
                shown.update(len(runs), f"{len(runs)} networks together, epoch {done}/{epochs}")

            with torch.random.fork_rng(devices=fork_devices), deterministic_algorithms(cfg.deterministic):
                result.accs = train_and_test_stacked(nets, images, labels, test_images, test_labels, cfg,
                                                     [make_generator(seed + run) for run in runs],
                                                     on_epoch=on_all_epochs if progress else None,
                                                     should_stop=should_stop)
        for position, run in enumerate([] if stacked else runs):
            def on_epoch(done: int, network: int = position + 1) -> None:
                shown.update(1, f"network {network}/{len(runs)}, epoch {done}/{epochs}")

            with torch.random.fork_rng(devices=fork_devices), deterministic_algorithms(cfg.deterministic):
                torch.manual_seed(seed + run)
                net = networks.get_network(model, channel, num_classes, im_size, device=device)
                if term is not None and position == 0:
                    term.check(net, images)
                acc = train_and_test(net, images, labels, test_images, test_labels, cfg, make_generator(seed + run),
                                     term=term, on_epoch=on_epoch if progress else None,
                                     should_stop=should_stop)
            result.accs.append(acc)
    result.train_time_s = time.perf_counter() - start
    return result


@dataclass(frozen=True)
class StepSchedule:
    """A learned training schedule, as plain data: step ``t`` is one plain gradient step
    ``theta <- theta - lrs[t] * grad CE(net(images[batches[t]]), labels[batches[t]])`` (no momentum,
    no weight decay), the steps taken in order from a fresh network. It knows no method; DD
    (Wang et al., "Dataset Distillation", 2018, Algorithm 1; SsnL/dataset-distillation
    ``basics.py::train_steps_inplace``) learns one.

    Attributes:
        lrs: T step sizes (floats > 0).
        batches: T tuples of indices into the set's images (each step's batch).
        epochs: how many passes over the distinct batches the T steps make (a record for the
            summary; the steps themselves are ``lrs`` / ``batches``).
    """

    lrs: Tuple[float, ...]
    batches: Tuple[Tuple[int, ...], ...]
    epochs: int = 1

    def __post_init__(self):
        if len(self.lrs) != len(self.batches) or not self.lrs:
            raise ValueError(f"a step schedule needs one batch per step size, got {len(self.lrs)} step sizes and "
                             f"{len(self.batches)} batches")

    def check(self, num_images: int) -> None:
        """Raise ``ValueError`` when a batch index is outside ``[0, num_images)`` or a step size is not finite."""
        for step, batch in enumerate(self.batches):
            if not batch or min(batch) < 0 or max(batch) >= num_images:
                raise ValueError(f"step {step} of the schedule uses images outside 0..{num_images - 1}")
        if not all(math.isfinite(lr) for lr in self.lrs):
            raise ValueError("the schedule holds a step size that is NaN or infinite")

    def as_dict(self) -> dict:
        """JSON-ready ``{"lrs", "batches", "epochs"}`` (``meta['step_schedule']`` of a result file)."""
        return {"lrs": [float(lr) for lr in self.lrs], "batches": [list(map(int, b)) for b in self.batches],
                "epochs": int(self.epochs)}

    @classmethod
    def from_dict(cls, record: dict) -> "StepSchedule":
        """Inverse of :meth:`as_dict`.

        Raises:
            ValueError: a missing key or inconsistent lengths.
        """
        try:
            return cls(lrs=tuple(float(lr) for lr in record["lrs"]),
                       batches=tuple(tuple(int(i) for i in batch) for batch in record["batches"]),
                       epochs=int(record.get("epochs", 1)))
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a step schedule ({error})") from None

    def describe(self) -> dict:
        """A JSON-ready record of the protocol (``results.json``)."""
        return {"protocol": "learned step schedule", "steps": len(self.lrs), "epochs": self.epochs,
                "batch": len(self.batches[0]), "optimizer": "plain gradient steps (no momentum, no weight decay)",
                "lrs": [round_significant(lr, 4) for lr in self.lrs], "augmentation": "none"}


def train_on_schedule(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, schedule: StepSchedule) -> float:
    """Train ``net`` (train mode) by the steps of ``schedule`` on ``images`` (N, C, H, W) with
    ``labels`` (N,) int64 or (N, K) probabilities; returns the last step's loss (a Python float).

    Raises:
        FloatingPointError: the loss became NaN or infinite.
    """
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    loss = torch.zeros(())
    for lr, batch in zip(schedule.lrs, schedule.batches):
        index = torch.as_tensor(batch, dtype=torch.long, device=images.device)
        loss = F.cross_entropy(net(images[index]), labels[index])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param.sub_(lr * grad)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"training on the step schedule: loss became {value}")
    return value


def evaluate_schedule(image_syn: torch.Tensor, label_syn: torch.Tensor, model: str, num_classes: int,
                      test_images: torch.Tensor, test_labels: torch.Tensor, schedule: StepSchedule, *,
                      num_eval: int = 1, device: Optional[torch.device] = None, seed: int = 0,
                      batch_test: int = 1000, tta_mode: str = "", deterministic: bool = False) -> EvalResult:
    """Train ``num_eval`` fresh ``model`` networks by a learned step schedule (:func:`train_on_schedule`)
    and report their test accuracy: DD's own evaluation (SsnL/dataset-distillation ``basics.py``
    ``evaluate_steps`` with ``--test_nets_type unknown_init --test_distilled_lrs loaded``).

    Network ``k`` is initialised from seed ``seed + k`` inside a forked RNG, as in :func:`evaluate_synset`.

    Args:
        image_syn: (N, C, H, W) images; label_syn: (N,) int64 or (N, K) probabilities.
        model, num_classes, test_images, test_labels, num_eval, device, seed: as :func:`evaluate_synset`.
        schedule: the steps (:class:`StepSchedule`).
        batch_test, tta_mode, deterministic: as :class:`EvalConfig`.

    Raises:
        KeyError: unknown ``model``.
        ValueError: the schedule does not fit the images (:meth:`StepSchedule.check`).
        FloatingPointError: a training loss became NaN or infinite.
    """
    device = device or image_syn.device
    images, labels = image_syn.detach().to(device), label_syn.detach().to(device)
    schedule.check(images.shape[0])
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    result = EvalResult(model=model)
    start = time.perf_counter()
    for run in range(num_eval):
        with torch.random.fork_rng(devices=fork_devices), deterministic_algorithms(deterministic):
            torch.manual_seed(seed + run)
            net = networks.get_network(model, images.shape[1], num_classes, tuple(images.shape[2:]), device=device)
            train_on_schedule(net, images, labels, schedule)
            result.accs.append(test_accuracy(net, test_images, test_labels, batch_test, tta_mode, deterministic))
    result.train_time_s = time.perf_counter() - start
    return result
def evaluate_synset_sharded(image_syn: torch.Tensor, label_syn: torch.Tensor, model: str, num_classes: int,
                            test_images: torch.Tensor, test_labels: torch.Tensor, cfg: EvalConfig, *,
                            num_eval: int = 1, should_stop: Optional[Callable[[], bool]] = None,
                            **kwargs) -> EvalResult:
    """:func:`evaluate_synset` with its ``num_eval`` networks spread over torchrun's ranks
    (``distributed.shard``, round robin); every rank returns all accuracies in network order.

    Network ``k`` is trained from seed ``seed + k`` whichever rank trains it, so the accuracies
    do not depend on the number of processes; with one process this is :func:`evaluate_synset`.
    Every rank must call it with the same arguments. ``train_time_s`` is this rank's wall time.
    A stop (``should_stop``) seen by any rank abandons the evaluation on every rank.

    Raises:
        EvaluationStopped: ``should_stop`` said so on some rank.
        Otherwise as :func:`evaluate_synset`.
    """
    if distributed.world_size() == 1:
        return evaluate_synset(image_syn, label_syn, model, num_classes, test_images, test_labels, cfg,
                               num_eval=num_eval, should_stop=should_stop, **kwargs)
    start = time.perf_counter()
    mine = distributed.shard(num_eval)
    stopped, accs = False, []
    try:
        accs = evaluate_synset(image_syn, label_syn, model, num_classes, test_images, test_labels, cfg,
                               num_eval=num_eval, should_stop=should_stop, indices=mine, **kwargs).accs
    except EvaluationStopped:
        stopped = True
    if distributed.any_flag(stopped):
        raise EvaluationStopped
    merged = distributed.gather_units(dict(zip(mine, accs)))
    return EvalResult(model=model, accs=[merged[k] for k in range(num_eval)],
                      train_time_s=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Files: checkpoints, results, pictures
# --------------------------------------------------------------------------------------------
def check_flag_ranges(values: object, at_least_one: Sequence[str] = (), positive: Sequence[str] = (),
                      non_negative: Sequence[str] = ()) -> None:
    """Check the named attributes of ``values`` (a config whose fields are flag names).

    Raises:
        UserError: ``--NAME must be at least 1 / positive / >= 0, got V`` for the first value out of range.
    """
    for name in at_least_one:
        if getattr(values, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(values, name)}")
    for name in positive:
        if not getattr(values, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(values, name)}")
    for name in non_negative:
        if not getattr(values, name) >= 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(values, name)}")


def numbered_entries(directory: str, pattern: "re.Pattern", require: Optional[str] = None) -> List[Tuple[int, str]]:
    """``(n, path)`` of the entries of ``directory`` whose name matches ``pattern`` (group 1 is the
    number ``n``), sorted by ``n``; with ``require``, only entries holding that file. Empty when the
    directory does not exist (numbered chunks of a buffer, ``index_{i}`` model folders)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        path = os.path.join(directory, name)
        if match and (require is None or os.path.isfile(os.path.join(path, require))):
            found.append((int(match.group(1)), path))
    return sorted(found)


def config_differences(saved: dict, current: dict, flag_names: Optional[dict] = None) -> List[str]:
    """The toolkit's one resume-compatibility check: ``'--flag saved → current'`` for every key
    whose value differs between a saved and the current flat configuration (run checkpoints,
    expert buffers, original models); empty when they agree. ``flag_names`` maps a key to its
    flag's name where they differ (``iterations`` is ``--Iteration``)."""
    names = flag_names or {}
    keys = list(dict.fromkeys([*current, *saved]))
    return [f"--{names.get(key, key)} {saved.get(key)!r} → {current.get(key)!r}"
            for key in keys if saved.get(key) != current.get(key)]


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """The toolkit's one atomic writer: ``write(tmp)`` writes a temporary file beside ``path``,
    which then replaces ``path`` (``os.replace``), so a run killed while saving never leaves a
    half-written file. The parent directory is created if needed; on an error the temporary file
    is removed and the previous ``path`` is left as it was.

    Raises:
        OSError: one line, ``cannot write PATH (reason)``, saying whether the previous file is intact.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:160]
        kept = "; the previous file is intact" if os.path.exists(path) else ""
        raise OSError(f"cannot write {path} ({reason}){kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


TEMPORARY = re.compile(r"\.tmp(\d+)$")


def remove_stale_temporaries(directory: str) -> List[str]:
    """Delete the temporary files :func:`atomic_write` leaves when its process was killed while
    writing (``NAME.tmpPID`` whose process no longer runs); returns their paths."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        match = TEMPORARY.search(name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path = os.path.join(directory, name)
        os.remove(path)
        removed.append(path)
    return removed


def atomic_save(obj: object, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_write`."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)
    atomic_write(path, write)


def write_json(path: str, obj: object) -> None:
    """Write ``obj`` as indented JSON (and a final newline) through :func:`atomic_write`."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path: str, **state) -> None:
    """Write ``{'version': CHECKPOINT_VERSION, **state}`` atomically (temporary file, then rename)."""
    atomic_save({"version": CHECKPOINT_VERSION, **state}, path)


def _checkpoint_globals() -> list:
    """The only non-tensor types a checkpoint of ours holds beyond plain Python values: numpy's
    global RNG state (a uint32 array), allowed explicitly for ``torch.load(weights_only=True)``."""
    multiarray = getattr(np, "_core", getattr(np, "core", None)).multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        UserError: the file is missing, unreadable or of another layout version.
    """
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        state = load_plain(path, "checkpoint", _checkpoint_globals())
    except PlainDataError as error:  # a truncated or foreign file, or one that would run code
        raise UserError(f"--resume: {error}") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"--resume: {path} is not a checkpoint of this toolkit (layout version {CHECKPOINT_VERSION})")
    return state


GRID_PADDING = 2  # pixels between the images of a grid
CAPTION_COLUMNS = 10  # classes per line of a captioned one-image-per-class grid
LABEL_CHARS = 24  # class names longer than this are shortened with an ellipsis


def save_image_grid(images: torch.Tensor, path: str, nrow: int, min_side: int = 56, *,
                    class_names: Optional[Sequence[Optional[str]]] = None, title: Optional[str] = None) -> None:
    """Save pixel-space images in [0, 1] as one PNG grid, one class per row when ``nrow = ipc``
    (with ``nrow = 1``, i.e. one image per class, all classes go in one row instead).

    Without ``class_names`` and ``title`` the file is torchvision's ``save_image`` grid (black
    padding), as before. With either, the grid is drawn with matplotlib (Agg, no pyplot state;
    white padding, pixels drawn 1:1 at 100 dpi) and the labels sit outside the images:

    * ``class_names`` and ``nrow > 1``: one class per row, its name at the left of the row
      (images must be class-major: the ``nrow`` images of class 0, then class 1, ...).
    * ``class_names`` and ``nrow == 1`` (one image per class): the classes wrap into lines of
      ``CAPTION_COLUMNS`` images, each captioned with its name below it (one long row with
      names at its left would be unreadable for 10 or more classes).
    * ``title``: one line above the grid (``distill.py``: method, dataset, ipc, experiment,
      iteration).

    Grey images (C = 1) are drawn with a grey colour map, RGB (C = 3) as they are. Names longer
    than ``LABEL_CHARS`` characters are shortened; an empty or ``None`` name becomes ``class k``.

    Args:
        images: (N, C, H, W), C in {1, 3}, pixel values in [0, 1] (use
            ``DatasetRecord.denormalize`` first; values outside are clipped).
        path: the ``.png`` file (written atomically, :func:`atomic_write`).
        nrow: images per row (``ipc`` for a synthetic set).
        min_side: images smaller than this are enlarged by an integer factor (nearest
            neighbour) so that small sets stay legible.
        class_names: one name per class, K = N / nrow entries (``DatasetRecord.class_names``).
        title: a line above the grid.

    Raises:
        ValueError: ``class_names`` has not N / ``nrow`` entries.
        OSError: the file cannot be written (one line, :func:`atomic_write`).
    """
    from torchvision.utils import make_grid, save_image

    images = images.detach().float().cpu().clamp(0, 1)
    per_row = nrow if nrow > 1 else images.shape[0]
    if class_names is not None:
        if nrow < 1 or len(class_names) * nrow != images.shape[0]:
            raise ValueError(f"save_image_grid: {len(class_names)} class names x nrow {nrow} != "
                             f"{images.shape[0]} images")
        class_names = [_short_label(name, k) for k, name in enumerate(class_names)]
    factor = max(1, -(-min_side // images.shape[-2]))
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode="nearest")
    if class_names is None and title is None:
        atomic_write(path, lambda tmp: save_image(images, tmp, nrow=per_row, padding=GRID_PADDING, format="png"))
        return
    pad, (height, width) = GRID_PADDING, images.shape[-2:]
    captions = []  # (x, y, text) in canvas pixels
    if class_names is not None and nrow == 1:
        font_px = 8 * 100 / 72  # 8 pt at 100 dpi
        gap = max(pad, int(0.7 * font_px * max(len(n) for n in class_names)) - width + 6)
        band = int(1.6 * font_px)
        cols = min(len(class_names), CAPTION_COLUMNS)
        lines = -(-len(class_names) // cols)
        canvas = torch.ones(images.shape[1], lines * (height + band + pad) + pad, cols * (width + gap) + gap)
        for k, name in enumerate(class_names):
            top, left = pad + (k // cols) * (height + band + pad), gap + (k % cols) * (width + gap)
            canvas[:, top:top + height, left:left + width] = images[k]
            captions.append((left + width / 2, top + height + band / 2, name))
    else:
        canvas = make_grid(images, nrow=per_row, padding=pad, pad_value=1.0)
        if images.shape[1] == 1:
            canvas = canvas[:1]  # make_grid repeats a grey channel three times
    _draw_grid(canvas, path, captions,
               row_labels=class_names if class_names is not None and nrow > 1 else None,
               row_centres=[pad + r * (height + pad) + height / 2 for r in range(len(class_names or []))],
               title=title)


def _short_label(name: Optional[str], index: int) -> str:
    """A class name for a grid: ``class k`` when empty, shortened past ``LABEL_CHARS`` characters."""
    text = " ".join(str(name).split()) if name is not None else ""
    text = text or f"class {index}"
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "\u2026"


def _draw_grid(canvas: torch.Tensor, path: str, captions: list, row_labels: Optional[list],
               row_centres: list, title: Optional[str]) -> None:
    """Draw ``canvas`` (C, H, W) in [0, 1] pixel for pixel at 100 dpi with captions (x, y, text),
    row labels at the left and a title, and write the PNG through :func:`atomic_write`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    pixels = canvas[0].numpy() if canvas.shape[0] == 1 else canvas.permute(1, 2, 0).numpy()
    fig = Figure(figsize=(canvas.shape[2] / dpi, canvas.shape[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks(row_centres if row_labels else [])
    if row_labels:
        ax.set_yticklabels(row_labels, fontsize=9)
        ax.tick_params(axis="y", length=0, pad=4)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for x, y, text in captions:
        ax.text(x, y, text, fontsize=8, ha="center", va="center")
    if title:
        ax.set_title(title, fontsize=10, pad=6)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05,
                                               facecolor="white"))


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False,
                 numeric_right: bool = True) -> str:
    """The toolkit's one table formatter: ``rows`` under ``header``, as aligned plain text (columns
    two spaces apart; with ``numeric_right``, every column but the first right-aligned) or as a
    GitHub Markdown table (``markdown``, through ``tabulate``).

    Args:
        header: column titles.
        rows: one sequence of cells per row (converted with ``str``).
    """
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        from tabulate import tabulate

        return tabulate(cells, headers=list(header), tablefmt="pipe", disable_numparse=True)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *cells)]

    def line(row):
        return "  ".join(c.rjust(w) if numeric_right and i > 0 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join(line(row) for row in [[str(h) for h in header], *cells])


def round_significant(value: float, digits: int = 6) -> float:
    """``value`` rounded to ``digits`` significant digits, so that a CSV shows ``0.3`` rather
    than ``0.30000000000000004`` and a loss of ``1234.5678`` as ``1234.57`` (``digits = 6``).
    NaN, infinities and 0 come back unchanged; ``None`` stays ``None``.

    Args:
        value: any real number (converted with ``float``), or ``None``.
        digits: significant digits kept, at least 1.
    """
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or value == 0:
        return value
    return float(f"{value:.{digits}g}")


def format_acc(accs: Sequence[float]) -> str:
    """``'mean ± std'`` in percent for accuracies in [0, 1]."""
    if len(accs) == 0:
        return "n/a"
    return f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f}"
