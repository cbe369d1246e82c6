"""Several networks of one architecture trained and tested together, as one vectorised network.

Evaluating a distilled set trains ``num_eval`` fresh networks on 10-500 images; on a GPU each of
their steps is a few dozen tiny kernel launches, so one network at a time leaves the device idle.
Here N networks are held as *stacked* parameters (every tensor gets a leading network axis of
size N, ``torch.func.stack_module_state``) and run with ``torch.func.vmap`` over
``torch.func.functional_call`` of one parameter-less copy of the architecture: every layer becomes
one batched kernel over the N networks (a convolution with stacked weights is one grouped
convolution, a norm layer one call over N x C channels), so a step costs about the launches of one
network. The PyTorch documentation's model-ensembling recipe (``torch.func`` tutorial "Model
ensembling") is this construction; BatchNorm in training mode works because its running statistics
are stacked buffers updated in place per network.

The stacked parameters are ordinary leaf tensors: the gradient of the sum of the N networks' losses
with respect to slice k is network k's own gradient, and an elementwise optimiser (SGD with
momentum and weight decay) over the stacked tensors is N independent optimisers. A training step
is therefore the usual zero_grad / forward / loss / backward / step (:func:`sgd_step`), which an
autocast context and a ``GradScaler`` can wrap like any other step.

Randomness stays per network: each network draws its data order and its augmentation from its own
``torch.Generator``, in the order a network trained alone draws them (``evaluation.training.train_epoch``): the
permutation at the start of an epoch, then each batch's augmentation. Only the application of the
drawn augmentations is joined (:func:`augment_stacked`).

This module knows no method; :func:`train_and_test_stacked` runs the protocol's schedule
(:func:`evaluation.training.sgd_schedule`) over the stacked networks.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

import augment
import progress
from chunked import CPU_CHUNK, chunk_size
from evaluation.protocol import TTA_MODES, EvalConfig
from evaluation.training import DETERMINISTIC_TEST_PASS, sgd_schedule

__all__ = [
    "StackingUnsupported",
    "StackedNetworks",
    "check_stackable",
    "augment_stacked",
    "accumulate_gradient",
    "sgd_step",
    "train_epoch",
    "test_accuracies",
    "train_and_test_stacked",
]


class StackingUnsupported(Exception):
    """The architecture cannot run under ``torch.func.vmap`` (the message says why)."""


class StackedNetworks:
    """N networks of one architecture as stacked parameters, run as one (``torch.func``).

    Args:
        nets: N >= 1 networks of the same class and shapes, on one device, each with its own
            initialisation (they are copied; the originals are not touched afterwards).

    Attributes:
        count: N.
        params: name -> stacked parameter (N, *shape), a leaf tensor with ``requires_grad``.
        buffers: name -> stacked buffer (N, *shape) (BatchNorm running statistics, updated in place
            by a training-mode forward, per network).

    Raises:
        ValueError: ``nets`` is empty or the networks differ in their parameter names or shapes.

    Source: ``torch.func.stack_module_state`` / ``vmap`` / ``functional_call`` (PyTorch
    documentation, "Model ensembling").
    """

    def __init__(self, nets: Sequence[nn.Module]):
        nets = list(nets)
        if not nets:
            raise ValueError("StackedNetworks needs at least one network")
        shapes = [[(name, tuple(p.shape)) for name, p in net.named_parameters()] for net in nets]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("StackedNetworks: the networks differ in their parameters (one architecture only)")
        self.count = len(nets)
        params, buffers = stack_module_state(nets)
        self.params: Dict[str, Tensor] = params
        self.buffers: Dict[str, Tensor] = buffers
        self.template = copy.deepcopy(nets[0]).to("meta")  # the architecture, without storage
        self.training = True

        def run(p: Dict[str, Tensor], b: Dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.template, (p, b), (x,))

        self._run = run

    def parameters(self) -> List[Tensor]:
        """The stacked parameters (for an optimiser; elementwise optimisers act per network)."""
        return list(self.params.values())

    def train(self, mode: bool = True) -> "StackedNetworks":
        """Training (batch statistics, running-statistics updates) or evaluation mode, as ``nn.Module.train``."""
        self.template.train(mode)
        self.training = mode
        return self

    def eval(self) -> "StackedNetworks":
        """Evaluation mode (``train(False)``)."""
        return self.train(False)

    def batch_dependent(self) -> bool:
        """Whether a network's output for one image depends on the rest of its batch (a BatchNorm
        layer in training mode); the batch then cannot be split into chunks."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.template.modules())

    def __call__(self, x: Tensor) -> Tensor:
        """Logits of every network on its own images or on shared ones.

        Args:
            x: (N, B, C, H, W), network k sees ``x[k]``; or (B, C, H, W), every network sees it.

        Returns:
            (N, B, K) logits.
        """
        shared = x.dim() == 4
        return vmap(self._run, in_dims=(0, 0, None if shared else 0))(self.params, self.buffers, x)

    def network(self, k: int) -> nn.Module:
        """A plain copy of network ``k`` with its current parameters and buffers (for inspection)."""
        device = next(iter(self.params.values())).device
        net = copy.deepcopy(self.template).to_empty(device=device)
        state = {name: value[k].detach().clone() for name, value in {**self.params, **self.buffers}.items()}
        net.load_state_dict(state, strict=False)
        return net.train(self.training)


def check_stackable(net: nn.Module, images: Tensor, labels: Tensor) -> None:
    """Run a two-network copy of ``net`` forward and backward on two images under ``vmap``.

    Args:
        net: one network of the architecture (not modified).
        images: (B, C, H, W) training images, at least one; labels: (B,) or (B, K).

    Raises:
        StackingUnsupported: the architecture uses an operation ``vmap`` cannot batch (one line
            with the reason).
    """
    probe = [copy.deepcopy(net) for _ in range(2)]
    try:
        stack = StackedNetworks(probe).train()
        x = images[:2].unsqueeze(0).expand(2, *images[:2].shape)
        y = labels[:2].unsqueeze(0).expand(2, *labels[:2].shape)
        logits = stack(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1)).backward()
        with torch.no_grad():
            stack.eval()(images[:1])
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
        raise StackingUnsupported(" ".join(str(error).split())[:200]) from None


# --------------------------------------------------------------------------------------------
# Augmentation: draws per network, one application
# --------------------------------------------------------------------------------------------
def augment_stacked(x: Tensor, generators: Sequence[torch.Generator], dsa_strategy: str = "",
                    dc_aug: Optional[augment.DCAugParam] = None,
                    dsa_param: Optional[augment.ParamDiffAug] = None) -> Tensor:
    """The evaluation training augmentation of N networks' batches, each drawn from its generator.

    Network k's draws are exactly those ``augment.diff_augment(x[k], dsa_strategy, generators[k])``
    (DSA, non-Siamese: one operation per batch, per-image parameters) or
    ``augment.dc_augment(x[k], dc_aug, generators[k])`` (DC augmentation, when ``dsa_strategy`` is
    empty) would make; the drawn transforms are then applied in one call per operation over all
    networks' images, which gives the same images as N separate calls (every operation acts per
    image; DC's padding value stays the per-network batch mean).

    Args:
        x: (N, B, C, H, W) the N networks' batches.
        generators: N CPU generators.
        dsa_strategy: DiffAugment strategy; when empty, ``dc_aug`` (or none).
        dc_aug: DC augmentation parameters.
        dsa_param: DiffAugment magnitudes (default ``augment.ParamDiffAug()``).

    Returns:
        (N, B, C, H, W) augmented batches (``x`` itself when there is no augmentation).

    Raises:
        ValueError: ``len(generators) != N`` or an invalid strategy.
    """
    n, b = x.shape[:2]
    if len(generators) != n:
        raise ValueError(f"augment_stacked: {len(generators)} generators for {n} networks")
    flat = x.reshape(n * b, *x.shape[2:])
    if dsa_strategy and augment.validate_strategy(dsa_strategy):
        param = dsa_param or augment.ParamDiffAug()
        drawn = [augment.sample_diffaug_params(dsa_strategy, b, tuple(x.shape[3:]), g, False, param)
                 for g in generators]
        out = flat
        for op in dict.fromkeys(p.op for p in drawn):
            nets = [k for k, p in enumerate(drawn) if p.op == op]
            if op is None:
                continue
            index = (torch.tensor(nets).unsqueeze(1) * b + torch.arange(b)).flatten().to(x.device)
            values = {key: torch.cat([drawn[k].values[key] for k in nets]) for key in drawn[nets[0]].values}
            joined = augment.DiffAugParams(op, values, tuple(x.shape[3:]), False, len(nets) * b)
            result = augment.apply_diffaug(flat.index_select(0, index), joined)
            out = result if len(nets) == n else out.index_copy(0, index, result)
        return out.view_as(x)
    if dc_aug is not None and augment.validate_dc_strategy(dc_aug.strategy):
        draws = augment.concat_dc_draws([augment.sample_dc_augment(dc_aug, (b, *x.shape[2:]), g) for g in generators])
        with torch.no_grad():
            fill = x.mean(dim=(1, 3, 4)).repeat_interleave(b, dim=0)  # (N*B, C): each batch's channel means
        return augment.apply_dc_augment(flat, dc_aug, draws, fill).view_as(x)
    return x


# --------------------------------------------------------------------------------------------
# Training and testing
# --------------------------------------------------------------------------------------------
def accumulate_gradient(stack: StackedNetworks, images: Tensor, labels: Tensor,
                        chunk: Optional[int] = None) -> Tensor:
    """Add to every stacked ``p.grad`` each network's gradient of its batch-mean cross-entropy.

    Args:
        stack: the networks.
        images: (N, B, C, H, W); labels: (N, B) int64 or (N, B, K) probabilities.
        chunk: images per network per forward pass (``None``: the whole batch); ignored when the
            networks are batch-dependent (BatchNorm in training mode). The result does not depend
            on it up to float summation order.

    Returns:
        (N,) the networks' mean losses on the batch (detached; no sync).
    """
    n, b = images.shape[:2]
    size = b if chunk is None or stack.batch_dependent() else max(1, int(chunk))
    total = torch.zeros(n, device=images.device)
    for x, y in zip(images.split(size, dim=1), labels.split(size, dim=1)):
        logits = stack(x)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1), reduction="none").view(n, -1).sum(1) / b
        losses.sum().backward()
        total += losses.detach()
    return total


def sgd_step(stack: StackedNetworks, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer,
             chunk: Optional[int] = None) -> Tensor:
    """One optimiser step of every network on its batch (:func:`accumulate_gradient`).

    The stacked counterpart of ``evaluation.training.sgd_step``: zero_grad, forward, loss, backward, step.

    Returns:
        (N,) the mean losses before the step (detached).
    """
    optimizer.zero_grad(set_to_none=True)
    losses = accumulate_gradient(stack, images, labels, chunk)
    optimizer.step()
    return losses


def train_epoch(stack: StackedNetworks, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer,
                batch_size: int, generators: Sequence[torch.Generator], dsa_strategy: str = "",
                dc_aug: Optional[augment.DCAugParam] = None, chunk: Optional[int] = None) -> Tensor:
    """One shuffled pass of every network over the same in-memory set, each in its own order.

    Network k draws from ``generators[k]`` what ``evaluation.training.train_epoch`` draws for a
    network trained alone: ``randperm`` of the set at the start, then each batch's augmentation
    (:func:`augment_stacked` with ``dsa_strategy`` / ``dc_aug``).

    Args:
        stack: the networks (put in train mode).
        images: (M, C, H, W) the set, on the networks' device; labels: (M,) int64 or (M, K).
        optimizer: over ``stack.parameters()``.
        batch_size: images per step and network; the last batch may be smaller.
        generators: N CPU generators.
        dsa_strategy, dc_aug: the protocol's training augmentation (none when both are empty).
        chunk: images per network per forward pass (:func:`sgd_step`).

    Returns:
        (N,) mean training loss of each network over the epoch (on the device; no sync).
    """
    stack.train()
    count = images.shape[0]
    orders = torch.stack([torch.randperm(count, generator=g) for g in generators]).to(images.device)  # (N, M)
    total = torch.zeros(stack.count, device=images.device)
    for start in range(0, count, batch_size):
        progress.tick()  # a progress line / a stop inside long epochs
        batch = orders[:, start:start + batch_size]  # (N, B)
        x, y = images[batch], labels[batch]
        with torch.no_grad():
            x = augment_stacked(x, generators, dsa_strategy, dc_aug)
        total += sgd_step(stack, x, y, optimizer, chunk) * x.shape[1]
    return total / max(count, 1)


@torch.no_grad()
def test_accuracies(stack: StackedNetworks, images: Tensor, labels: Tensor, batch_size: int,
                    tta_mode: str = "") -> List[float]:
    """Top-1 accuracy in [0, 1] of every network (put in eval mode) on one labelled set.

    Args:
        images: (M, C, H, W), moved pass by pass to the networks' device; labels: (M,) int64.
        batch_size: test images per pass (all N networks see them in that pass).
        tta_mode: ``""`` or ``hflip`` (mean of the softmax of the image and its mirror), as
            ``evaluation.training.test_accuracy``.

    Returns:
        N accuracies.
    """
    stack.eval()
    device = next(iter(stack.params.values())).device
    correct = torch.zeros(stack.count, dtype=torch.long, device=device)
    for start in range(0, images.shape[0], max(1, batch_size)):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        if tta_mode == "hflip":
            scores = torch.softmax(stack(x), dim=2) + torch.softmax(stack(x.flip(-1)), dim=2)
        else:
            scores = stack(x)
        correct += (scores.argmax(dim=2) == y).sum(dim=1)
    return [int(c) / max(images.shape[0], 1) for c in correct.tolist()]


def train_and_test_stacked(nets: Sequence[nn.Module], images: Tensor, labels: Tensor,
                           test_images: Tensor, test_labels: Tensor, cfg: EvalConfig,
                           generators: Sequence[torch.Generator], on_epoch: Optional[Callable[[int], None]] = None,
                           should_stop: Optional[Callable[[], bool]] = None,
                           also_test: Optional[Tuple[Tensor, Tensor, List[float]]] = None) -> List[float]:
    """``evaluation.student.train_and_test`` (DC protocol) for N networks of one architecture at once.

    Network k trains from its own initialisation and draws its data order and augmentation from
    ``generators[k]`` exactly as ``train_and_test`` would with that generator, so the
    accuracies equal N separate calls up to float rounding (batched kernels sum in another order).

    Args:
        nets: N freshly initialised networks of one architecture on the target device.
        images: (M, C, H, W) training images on that device; labels: (M,) int64 or (M, K).
        test_images, test_labels: (T, C, H, W) and (T,), on any device.
        cfg: the protocol.
        generators: N CPU generators.
        on_epoch: called as ``on_epoch(epochs_done)`` after each epoch (of all N networks).
        should_stop: asked before every epoch; ``True`` abandons the training.
        also_test: ``(images (V, C, H, W), labels (V,), out)``: a second labelled set (a validation
            split); the N networks' accuracies on it are appended to the list ``out``.

    Returns:
        N test accuracies in [0, 1].

    Raises:
        FloatingPointError: a network's training loss became NaN or infinite.
        EvaluationStopped: ``should_stop`` said so.
    """
    stack = StackedNetworks(nets)
    count = stack.count
    cpu = images.device.type == "cpu"
    chunk = max(1, CPU_CHUNK // count) if cpu else None  # per network; CPU: a cache-sized pass in all

    def run_epoch(optimizer: torch.optim.Optimizer) -> Tensor:
        with cfg.precision.autocast(images.device):  # bfloat16 only: eval_path keeps float16 sequential
            return train_epoch(stack, images, labels, optimizer, cfg.batch_train, generators, cfg.dsa_strategy,
                               cfg.dc_aug, chunk)

    losses = sgd_schedule(stack.parameters(), cfg, run_epoch, on_epoch, should_stop)
    losses = torch.as_tensor(losses).cpu()
    if not bool(torch.isfinite(losses).all()):
        bad = next(float(v) for v in losses if not math.isfinite(float(v)))
        raise FloatingPointError(f"evaluation training loss became {bad}")
    size = chunk_size(images.device, DETERMINISTIC_TEST_PASS if cfg.deterministic else cfg.batch_test)
    per_pass = size if cpu else max(1, size // count)  # CUDA: about one network's pass of activations
    if cfg.tta_mode and cfg.tta_mode not in TTA_MODES:
        raise ValueError(f"--tta_mode {cfg.tta_mode!r}: expected one of {', '.join(TTA_MODES)}")
    with cfg.precision.autocast(images.device):
        accs = test_accuracies(stack, test_images, test_labels, per_pass, cfg.tta_mode)
        if also_test is not None:
            also_test[2].extend(test_accuracies(stack, also_test[0], also_test[1], per_pass, cfg.tta_mode))
    return accs
