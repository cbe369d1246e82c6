"""Learned step schedules (DD's own evaluation): fresh networks trained by plain gradient steps whose
sizes and batches were learned with the set (Wang et al., "Dataset Distillation", 2018,
Algorithm 1; SsnL/dataset-distillation ``basics.py``). Knows no method."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import networks
from evaluation.protocol import EvalResult
from evaluation.training import deterministic_algorithms, test_accuracy
from tables import round_significant


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
                      batch_test: int = 1000, tta_mode: str = "", deterministic: bool = False,
                      val: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> EvalResult:
    """Train ``num_eval`` fresh ``model`` networks by a learned step schedule (:func:`train_on_schedule`)
    and report their test accuracy: DD's own evaluation (SsnL/dataset-distillation ``basics.py``
    ``evaluate_steps`` with ``--test_nets_type unknown_init --test_distilled_lrs loaded``).

    Network ``k`` is initialised from seed ``seed + k`` inside a forked RNG, as in :func:`evaluate_synset`.

    Args:
        image_syn: (N, C, H, W) images; label_syn: (N,) int64 or (N, K) probabilities.
        model, num_classes, test_images, test_labels, num_eval, device, seed: as :func:`evaluate_synset`.
        schedule: the steps (:class:`StepSchedule`).
        batch_test, tta_mode, deterministic: as :class:`EvalConfig`.
        val: a validation split ``(images, labels)``, as :func:`evaluate_synset` (``EvalResult.val_accs``).

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
            if val is not None:
                result.val_accs.append(test_accuracy(net, val[0], val[1], batch_test, tta_mode, deterministic))
    result.train_time_s = time.perf_counter() - start
    return result
