"""Training expert trajectories for trajectory matching (MTT, DATM, PAD).

Sources (no reference code is reused):

* MTT (Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022;
  GeorgeCazenavette/mtt-distillation ``buffer.py``): each expert is a fresh network trained with
  SGD(``lr_teacher``, momentum ``mom``, weight decay ``l2``) on shuffled minibatches of the whole
  training set, with non-siamese DiffAugment (or DC augmentation ``crop_scale_rotate`` without
  ``--dsa``); its parameters are recorded at the start and after every epoch.
* DATM (Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory
  Matching", ICLR 2024; NUS-HPC-AI-Lab/DATM ``buffer/buffer_FTD.py``): "flat" experts trained with
  a GSAM (surrogate-gap guided sharpness-aware, Zhuang et al., ICLR 2022) update on every batch,
  :func:`gsam_step`.
* PAD (Li et al., "Prioritize Alignment in Dataset Distillation", 2024; NUS-HPC-AI-Lab/PAD
  ``buffer/buffer_CL.py``): experts trained on a per-epoch subset chosen by per-sample difficulty
  (easiest first, hard samples added, easy ones removed later), :class:`PadSchedule`.

Expert ``k`` is initialised from ``torch.manual_seed(seed + k)`` (inside a forked RNG) and shuffled
and augmented from ``utils.make_generator(seed + k)``, so a resumed buffer equals an uninterrupted
one on the same device.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

import augment
import distributed
import networks
import evaluation
import utils
from progress import Progress
from precision import FP32, Precision
from pretrained.buffers import (BufferWriter, Snapshot, canonical_dataset, effective_res, list_buffer_files,
                                toolkit_version)

logger = logging.getLogger(__name__)

# The DC augmentation MTT's buffer.py uses when --dsa is off.
EXPERT_DC_AUG = "crop_scale_rotate"
# Reference defaults (DATM buffer/buffer_FTD.py, PAD buffer/buffer_CL.py) of the GSAM and PAD flags.
GSAM_DEFAULTS = {"rho_max": 2.0, "alpha": 0.4, "adaptive": True}

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PadSchedule:
    """PAD's per-epoch training subset (NUS-HPC-AI-Lab/PAD ``buffer/buffer_CL.py``).

    For a class whose ``n`` training images are ordered easiest first, epoch ``e`` (0-based, the
    ``e``-th training epoch) trains on:

    1. ``e <= add_end_epoch``: the easiest ``floor(p * n)`` images with
       ``p = min(1, init_ratio + (1 - init_ratio) * e / add_end_epoch)`` (``p = 1`` when
       ``add_end_epoch == 0``);
    2. ``add_end_epoch < e <= rm_epoch_first``: all ``n`` images;
    3. ``rm_epoch_first < e <= rm_epoch_second``: all but the easiest ``floor(rm_easy_ratio_first * n)``;
    4. ``e > rm_epoch_second``: all but the easiest ``floor(rm_easy_ratio_second * n)``.

    The stages are tested in this order, so with the reference defaults (``add_end_epoch`` 100 >
    ``rm_epoch_first`` 40) stages 2 and 3 never apply. ``n`` is each class's real count (the
    reference hard-codes 5000, CIFAR-10's). ``floor`` is taken after adding 1e-9, so that
    ``0.7 * 10`` gives 7.

    Attributes:
        init_ratio: fraction of the easiest images at epoch 0, in (0, 1].
        add_end_epoch: epoch by which all images have been added.
        rm_epoch_first / rm_epoch_second: last epoch before removal stage 1 / 2.
        rm_easy_ratio_first / rm_easy_ratio_second: easiest fraction removed in stage 1 / 2, in [0, 1).
    """

    init_ratio: float = 1.0
    add_end_epoch: int = 100
    rm_epoch_first: int = 40
    rm_epoch_second: int = 60
    rm_easy_ratio_first: float = 0.1
    rm_easy_ratio_second: float = 0.1

    def validate(self) -> None:
        """Raise ``utils.UserError`` naming the flag of an out-of-range value."""
        if not 0 < self.init_ratio <= 1:
            raise utils.UserError(f"--init_ratio must be in (0, 1], got {self.init_ratio}")
        for name in ("add_end_epoch", "rm_epoch_first", "rm_epoch_second"):
            if getattr(self, name) < 0:
                raise utils.UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rm_easy_ratio_first", "rm_easy_ratio_second"):
            if not 0 <= getattr(self, name) < 1:
                raise utils.UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")

    def stage(self, epoch: int) -> int:
        """The stage (1-4, see the class docstring) of 0-based ``epoch``."""
        if epoch <= self.add_end_epoch:
            return 1
        if epoch <= self.rm_epoch_first:
            return 2
        if epoch <= self.rm_epoch_second:
            return 3
        return 4

    def window(self, count: int, epoch: int) -> tuple[int, int]:
        """``(start, stop)``: the slice of a class's easiest-first order used at ``epoch``.

        Args:
            count: the class's number of training images.
            epoch: 0-based training epoch.
        """
        stage = self.stage(epoch)
        if stage == 1:
            ratio = 1.0 if self.add_end_epoch == 0 else min(
                1.0, self.init_ratio + (1.0 - self.init_ratio) * epoch / self.add_end_epoch)
            return 0, max(1, math.floor(ratio * count + 1e-9))
        if stage == 2:
            return 0, count
        ratio = self.rm_easy_ratio_first if stage == 3 else self.rm_easy_ratio_second
        return min(math.floor(ratio * count + 1e-9), count - 1), count

    def select(self, order: Sequence[torch.Tensor], epoch: int) -> torch.Tensor:
        """The training-set indices used at ``epoch``.

        Args:
            order: one 1-D int64 tensor per class: that class's training-set indices, easiest first.
            epoch: 0-based training epoch.

        Returns:
            (M,) int64 CPU tensor, class after class, easiest first within a class.
        """
        parts = []
        for row in order:
            start, stop = self.window(int(row.numel()), epoch)
            parts.append(row[start:stop])
        return torch.cat(parts).long().cpu()


@dataclass(frozen=True)
class ExpertConfig:
    """How experts are trained (the ``buffer.py`` flags that change a trajectory).

    Field names are the reference flag names (MTT ``buffer.py``, DATM ``buffer_FTD.py``, PAD ``buffer_CL.py``).

    Attributes:
        dataset, model, zca, subset, res: what the experts are trained on / as.
        train_epochs: epochs per expert; a trajectory has ``train_epochs + 1`` snapshots.
        lr_teacher: SGD learning rate.
        batch_train: images per SGD step.
        mom, l2: SGD momentum and weight decay.
        decay: multiply the lr by 0.1 (new optimiser, momentum reset) after 0-based epoch
            ``train_epochs // 2 + 1``, as MTT's ``--decay``.
        dsa: non-siamese DiffAugment ``dsa_strategy`` on every batch; otherwise DC augmentation
            ``crop_scale_rotate`` (MTT).
        dsa_strategy: DiffAugment operations joined by ``_``.
        gsam: GSAM update (DATM flat trajectories) instead of plain SGD.
        rho_max, rho_min: GSAM radius; it follows the lr linearly from ``rho_max`` (initial lr)
            to ``rho_min`` (decayed lr) as GSAM's proportion scheduler; with a constant lr it is
            ``rho_max``.
        alpha: GSAM weight of the removed orthogonal gradient component.
        adaptive: GSAM's scale-adaptive perturbation (ASAM style).
        sort_method: PAD difficulty order (score file name or path); empty: the whole set every epoch.
        schedule: the PAD schedule, used when ``sort_method`` is set.
        seed: expert ``k`` uses seed ``seed + k``.
    """

    dataset: str
    model: str = "ConvNet"
    zca: bool = False
    subset: Optional[str] = None
    res: Optional[int] = None
    train_epochs: int = 50
    lr_teacher: float = 0.01
    batch_train: int = 256
    mom: float = 0.0
    l2: float = 0.0
    decay: bool = False
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    gsam: bool = False
    rho_max: float = 0.0
    rho_min: float = 0.0
    alpha: float = 0.0
    adaptive: bool = True
    sort_method: str = ""
    schedule: Optional[PadSchedule] = None
    seed: int = 0

    def validate(self) -> None:
        """Check every value; raise ``utils.UserError`` naming the flag.

        Raises:
            utils.UserError: a non-positive epoch count, lr or batch size, negative ``mom``/``l2``,
                an unknown model or DiffAugment operation, bad GSAM radii or PAD ratios.
        """
        utils.check_flag_ranges(self, at_least_one=("train_epochs", "batch_train"), positive=("lr_teacher",),
                                non_negative=("mom", "l2"))
        if self.model not in networks.list_networks():
            raise utils.UserError(f"--model: unknown model {self.model!r}; choose from: "
                                  f"{', '.join(networks.list_networks())}")
        try:
            augment.validate_strategy(self.dsa_strategy if self.dsa else "")
        except ValueError as error:
            raise utils.UserError(f"--dsa_strategy: {error}") from None
        if self.gsam:
            if not (self.rho_max >= 0 and self.rho_min >= 0):
                raise utils.UserError(f"--rho_max/--rho_min must be >= 0, got {self.rho_max}/{self.rho_min}")
            if self.rho_min > self.rho_max:
                raise utils.UserError(f"--rho_min {self.rho_min} exceeds --rho_max {self.rho_max}")
            if not self.alpha >= 0:
                raise utils.UserError(f"--alpha must be >= 0, got {self.alpha}")
        if self.sort_method:
            (self.schedule or PadSchedule()).validate()

    def describe(self, save_interval: int) -> dict:
        """The effective configuration, JSON-ready, as stored in the manifest's ``config``.

        GSAM values are ``None`` without ``gsam``, PAD values ``None`` without ``sort_method``,
        ``dsa_strategy`` is ``None`` without ``dsa``; the dataset name is canonical
        (:func:`canonical_dataset`) and ``res`` is the effective image side for the datasets
        that take ``--res``. Two runs may write to the same buffer only if these dicts are equal.
        """
        record = asdict(self)
        del record["schedule"]
        record["dataset"] = canonical_dataset(self.dataset)
        record["subset"] = self.subset.lower() if self.subset else None
        record["res"] = effective_res(self.dataset, self.res)
        if not self.dsa:
            record["dsa_strategy"] = None
        if not self.gsam:
            record.update(rho_max=None, rho_min=None, alpha=None, adaptive=None)
        padded = asdict(self.schedule or PadSchedule())
        record.update({key: (padded[key] if self.sort_method else None) for key in padded})
        record["sort_method"] = self.sort_method or None
        record["save_interval"] = int(save_interval)
        return record


# --------------------------------------------------------------------------------------------
# Training experts
# --------------------------------------------------------------------------------------------
def snapshot(net: nn.Module) -> Snapshot:
    """A copy of ``net``'s parameters on the CPU, in ``net.parameters()`` order (MTT's format)."""
    return [p.detach().to("cpu", copy=True) for p in net.parameters()]


def expert_augmenter(cfg: ExpertConfig) -> Optional[evaluation.Augmenter]:
    """MTT's per-batch expert augmentation: non-siamese DiffAugment ``cfg.dsa_strategy`` when
    ``cfg.dsa``, else DC augmentation ``crop_scale_rotate`` (see ``evaluation.make_augmenter``)."""
    if cfg.dsa:
        return evaluation.make_augmenter(cfg.dsa_strategy)
    return evaluation.make_augmenter("", dc_aug=augment.DCAugParam(strategy=EXPERT_DC_AUG))


@contextmanager
def _running_stats_frozen(net: nn.Module) -> Iterator[None]:
    """BatchNorm momentum 0 inside the block, as GSAM's second pass: the running statistics stay
    put (``num_batches_tracked`` is restored too, so the pass leaves no trace)."""
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module, _, _ in saved:
        module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum, tracked in saved:
            module.momentum = momentum
            if tracked is not None:
                module.num_batches_tracked.copy_(tracked)


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.float() ** 2).sum() for t in tensors))


def gsam_step(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
              rho: float, alpha: float, adaptive: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """One GSAM update (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization",
    ICLR 2022), as DATM's ``buffer/buffer_FTD.py`` applies it to every batch.

    1. ``g = grad L(w)``.
    2. ``e = rho * g / (||g|| + eps)``; with ``adaptive`` the norm is ``|| |w| * g ||`` and ``e``
       is further multiplied elementwise by ``w**2``.
    3. ``g_p = grad L(w + e)`` on the same (augmented) batch, BatchNorm running statistics frozen.
    4. ``g_final = g_p - alpha * (g - cos(g, g_p) * ||g|| * g_p / ||g_p||)``, i.e. ``alpha`` times
       the part of ``g`` orthogonal to ``g_p`` is removed (``cos = <g, g_p> / (||g|| ||g_p|| + eps)``,
       ``||g_p||`` gets ``+ eps``). Norms in 3-4 are plain global L2 norms over all parameters.
    5. Restore ``w`` exactly and let ``optimizer`` (SGD with its momentum and weight decay) step
       with ``g_final``.

    With ``rho = 0`` and ``alpha = 0`` this is exactly :func:`evaluation.sgd_step`.

    Args:
        net: the network (train mode).
        images: (B, C, H, W); labels: (B,) int64.
        optimizer: over ``net``'s parameters.
        rho: perturbation radius (>= 0).
        alpha: weight of the removed orthogonal component.
        adaptive: scale-adaptive perturbation.
        eps: GSAM's ``perturb_eps``.

    Returns:
        The batch's mean loss at ``w`` (0-d tensor).
    """
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss = evaluation.accumulate_gradient(net, images, labels)
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    with torch.no_grad():
        scaled = [g * p.abs() for g, p in zip(grads, params)] if adaptive else grads
        scale = rho / (_global_norm(scaled) + eps)
        originals = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            step = g * scale.to(g.dtype)
            p.add_(step * p * p if adaptive else step)
    optimizer.zero_grad(set_to_none=True)
    with _running_stats_frozen(net):
        evaluation.accumulate_gradient(net, images, labels)
    with torch.no_grad():
        for p, original in zip(params, originals):
            p.copy_(original)
        perturbed = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm_g, norm_p = _global_norm(grads), _global_norm(perturbed)
        inner = sum((g * gp).sum() for g, gp in zip(grads, perturbed))
        cosine = inner / (norm_g * norm_p + eps)
        for p, g, gp in zip(params, grads, perturbed):
            vertical = g - cosine * norm_g * gp / (norm_p + eps)
            p.grad = gp - alpha * vertical
    optimizer.step()
    return loss


def rho_for_lr(cfg: ExpertConfig, lr: float) -> float:
    """GSAM radius at learning rate ``lr``: linear in the lr from ``rho_max`` (at ``lr_teacher``)
    to ``rho_min`` (at the decayed ``0.1 * lr_teacher``); ``rho_max`` when the lr never changes
    (GSAM's proportion scheduler; DATM keeps lr and rho constant)."""
    lr_max = cfg.lr_teacher
    lr_min = cfg.lr_teacher * 0.1 if cfg.decay else cfg.lr_teacher
    if lr_max <= lr_min:
        return float(cfg.rho_max)
    return float(cfg.rho_min + (cfg.rho_max - cfg.rho_min) * (lr - lr_min) / (lr_max - lr_min))


@dataclass
class ExpertResult:
    """One trained expert.

    Attributes:
        trajectory: ``train_epochs + 1`` snapshots (CPU tensors, ``model.parameters()`` order).
        train_loss: mean training loss of every epoch.
        test_acc: ``[epoch (1-based), accuracy in [0, 1]]`` for every tested epoch.
        subset_sizes: training images used in every epoch.
        epoch_seconds: wall time of every epoch (training only, without the test).
    """

    trajectory: list
    train_loss: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    subset_sizes: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)

    def info(self) -> dict:
        """JSON-ready summary for the manifest."""
        return {"final_test_acc": self.test_acc[-1][1] if self.test_acc else None,
                "test_acc": self.test_acc, "train_loss": [round(v, 6) for v in self.train_loss],
                "subset_sizes": self.subset_sizes, "seconds": round(sum(self.epoch_seconds), 3)}


def train_expert(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: ExpertConfig,
                 generator: torch.Generator, *, test_images: Optional[torch.Tensor] = None,
                 test_labels: Optional[torch.Tensor] = None, order: Optional[Sequence[torch.Tensor]] = None,
                 test_every: int = 1, name: str = "expert",
                 on_epoch: Optional[Callable[[int], None]] = None, precision: Precision = FP32,
                 data_parallel: bool = False) -> ExpertResult:
    """Train one expert and record its trajectory (MTT ``buffer.py``; GSAM per DATM; PAD subset).

    Args:
        net: a freshly initialised network on the training device.
        images: (N, C, H, W) training images on that device; labels: (N,) int64.
        cfg: the expert configuration (epochs, optimiser, augmentation, GSAM).
        generator: CPU generator for shuffles and augmentation.
        test_images, test_labels: (M, C, H, W), (M,) to log the test accuracy (logging only).
        order: PAD per-class easiest-first indices; with it each epoch trains on
            ``cfg.schedule.select(order, epoch)``.
        test_every: test after every ``test_every``-th epoch and after the last (0: never).
        name: how the log names this network.
        on_epoch: called as ``on_epoch(epochs_done)`` after each epoch (progress display).
        precision: ``--amp`` (``evaluation.train_epoch``; a GSAM step runs under its autocast unscaled).
            Snapshots stay float32.
        data_parallel: under torchrun, all ranks train this expert together (``--ddp``):
            ``DistributedDataParallel`` averages the gradients; each epoch every rank passes over
            its ``DistributedSampler`` share of the (PAD-scheduled) training images in batches of
            ``cfg.batch_train // world_size``. Not the one-process trajectory (another order).

    Returns:
        An :class:`ExpertResult`; ``trajectory[0]`` equals the parameters ``net`` came with.

    Raises:
        FloatingPointError: the training loss became NaN or infinite.
    """
    augmenter = expert_augmenter(cfg)
    schedule = cfg.schedule or PadSchedule()
    lr = cfg.lr_teacher

    def make_optimizer(rate: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=rate, momentum=cfg.mom, weight_decay=cfg.l2)

    optimizer = make_optimizer(lr)
    scaler = precision.grad_scaler(images.device)
    result = ExpertResult(trajectory=[snapshot(net)])
    decay_after = cfg.train_epochs // 2 + 1
    parallel = data_parallel and distributed.world_size() > 1
    model = distributed.data_parallel(net) if parallel else net
    batch = max(1, cfg.batch_train // distributed.world_size()) if parallel else cfg.batch_train
    for epoch in range(cfg.train_epochs):
        index = schedule.select(order, epoch) if order is not None else None
        if parallel:  # this rank's DistributedSampler share of the epoch's images
            pool = torch.arange(images.shape[0]) if index is None else index.cpu()
            index = pool[distributed.distributed_indices(int(pool.numel()), epoch, int(generator.initial_seed()))]
        step = None
        if cfg.gsam:
            rho = rho_for_lr(cfg, lr)
            step = lambda n, x, y, o: gsam_step(n, x, y, o, rho, cfg.alpha, cfg.adaptive)  # noqa: E731
        start = time.perf_counter()
        loss = evaluation.train_epoch(model, images, labels, optimizer, batch, generator, augmenter, index, step,
                                 precision=precision, scaler=scaler)
        if parallel:
            loss = float(distributed.sum_scalar(torch.tensor(loss))) / distributed.world_size()
        result.epoch_seconds.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{name}: training loss became {loss} in epoch {epoch + 1}")
        result.trajectory.append(snapshot(net))
        result.train_loss.append(loss)
        result.subset_sizes.append(images.shape[0] if index is None else int(index.numel()))
        message = (f"{name} epoch {epoch + 1}/{cfg.train_epochs}: loss {loss:.4f}, "
                   f"{result.subset_sizes[-1]} images, {result.epoch_seconds[-1]:.1f} s")
        last = epoch + 1 == cfg.train_epochs
        if test_images is not None and test_every and ((epoch + 1) % test_every == 0 or last):
            acc = evaluation.test_accuracy(net, test_images, test_labels, precision=precision)
            result.test_acc.append([epoch + 1, acc])
            message += f", test acc {100 * acc:.2f}%"
        logger.info(message)
        if cfg.decay and epoch == decay_after:
            lr *= 0.1
            optimizer = make_optimizer(lr)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return result


def _fork_devices(device: torch.device) -> list:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def new_seeded_network(model: str, record, device: torch.device, seed: int) -> nn.Module:
    """``networks.get_network`` initialised from ``torch.manual_seed(seed)`` in a forked RNG (the
    caller's global RNG does not move)."""
    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(seed)
        return networks.get_network(model, record.channel, record.num_classes, record.im_size, device=device)


def parameter_layout(model: str, record) -> dict:
    """``param_names``, ``param_shapes``, ``num_params`` of ``model`` for ``record``'s images."""
    net = new_seeded_network(model, record, torch.device("cpu"), 0)
    named = list(net.named_parameters())
    return {"param_names": [n for n, _ in named], "param_shapes": [list(p.shape) for _, p in named],
            "num_params": int(sum(p.numel() for _, p in named))}


@dataclass
class BufferSummary:
    """What :func:`make_buffer` did.

    Attributes:
        directory: the buffer directory.
        num_experts: experts in the buffer now.
        trained: experts trained by this call.
        files: the chunk files.
        final_test_accs: last test accuracy of each expert trained now (in [0, 1]).
        seconds_per_epoch: mean training seconds per epoch over this call (NaN if none).
        bytes_on_disk: total size of the chunk files.
    """

    directory: str
    num_experts: int
    trained: int
    files: list
    final_test_accs: list
    seconds_per_epoch: float
    bytes_on_disk: int


def make_buffer(cfg: ExpertConfig, record, directory: str, num_experts: int, *, device: torch.device,
                save_interval: int = 10, test_every: int = 1, order: Optional[Sequence[torch.Tensor]] = None,
                run_info: Optional[dict] = None,
                on_expert: Optional[Callable[[int, ExpertResult], None]] = None,
                precision: Precision = FP32, data_parallel: bool = False) -> BufferSummary:
    """Train experts ``saved .. num_experts - 1`` into ``directory`` (resuming what is there).

    Under torchrun the experts are trained in rounds of ``world_size``: in each round rank r
    trains the round's r-th expert (expert ``i`` is seeded ``cfg.seed + i`` whoever trains it,
    so the buffer equals one process's), the trajectories are gathered on rank 0, which appends
    them in index order to the chunk files and the manifest (the one writer, so the format and
    its resume rules stay those of one process). With ``data_parallel`` (``--ddp``) all ranks
    train each expert together instead (:func:`train_expert`). ``on_expert`` runs on rank 0.

    Args:
        cfg: the expert configuration (validated here).
        record: a ``data.DatasetRecord``.
        directory: the buffer directory (usually :func:`buffer_dir`).
        num_experts: total experts wanted in the buffer.
        device: where to train.
        save_interval: experts per chunk file.
        test_every: see :func:`train_expert`.
        order: PAD per-class easiest-first indices (:func:`load_sort_order`), needed iff
            ``cfg.sort_method``.
        run_info: JSON-ready facts recorded in the manifest's ``runs`` (command line ...).
        on_expert: called as ``on_expert(index, result)`` after each expert is saved.
        precision: ``--amp`` of the experts' training (:func:`train_expert`), recorded in the
            manifest's ``runs`` (an execution choice like the device, not part of the configuration).
        data_parallel: see above.

    Returns:
        A :class:`BufferSummary`.

    Raises:
        utils.UserError: invalid configuration, or ``directory`` holds experts of another one.
        FloatingPointError: a training loss became NaN or infinite (finished experts are kept).
    """
    cfg.validate()
    if save_interval < 1 or num_experts < 1:
        raise utils.UserError(f"--save_interval and --num_experts must be at least 1, got {save_interval}, {num_experts}")
    if bool(cfg.sort_method) != (order is not None):
        raise ValueError("make_buffer: pass order exactly when cfg.sort_method is set")
    meta = {**parameter_layout(cfg.model, record), "image_shape": [record.channel, *record.im_size],
            "num_classes": record.num_classes, "num_train": int(record.labels_train.numel()),
            "normalization": getattr(record, "normalization", "own"), "torch_version": str(torch.__version__), "toolkit_version": toolkit_version(),
            "python_version": platform.python_version()}
    writer = None
    if distributed.is_main():  # the one writer of chunks and manifest
        writer = BufferWriter(directory, cfg.describe(save_interval), save_interval, meta,
                              {"device": str(device), "amp": precision.describe(), "command": " ".join(sys.argv),
                               **(run_info or {})})
    start_index = distributed.broadcast_object(writer.saved if writer is not None else None)
    if start_index >= num_experts:
        logger.info("%s already holds %d expert(s) (>= --num_experts %d): nothing to train", directory, start_index,
                    num_experts)
    elif start_index:
        logger.info("%s already holds %d expert(s); continuing from expert %d", directory, start_index, start_index)
    images, labels = record.images_train.to(device), record.labels_train.to(device)
    test_images, test_labels = record.images_test.to(device), record.labels_test.to(device)
    accs, epoch_seconds = [], []
    todo = list(range(start_index, num_experts))
    per_round = 1 if data_parallel else distributed.world_size()
    mine = todo if data_parallel else distributed.shard(todo)
    progress = Progress(len(mine) * cfg.train_epochs, f"buffer {cfg.model}", unit="epoch")
    with progress:
        for first in range(0, len(todo), per_round):
            trained = {}  # this rank's expert of the round (all ranks' with --ddp)
            for index in todo[first:first + per_round]:
                if index not in mine:
                    continue
                seed = cfg.seed + index

                def on_epoch(done: int, index: int = index) -> None:
                    progress.update(1, f"expert {index + 1}/{num_experts}, epoch {done}/{cfg.train_epochs}")

                net = new_seeded_network(cfg.model, record, device, seed)
                trained[index] = train_expert(net, images, labels, cfg, utils.make_generator(seed),
                                              test_images=test_images, test_labels=test_labels, order=order,
                                              test_every=test_every, name=f"expert {index}", on_epoch=on_epoch,
                                              precision=precision, data_parallel=data_parallel)
            if not data_parallel:
                trained = distributed.gather_units(trained, to_all=False)
            if writer is None:  # not rank 0: rank 0 writes
                continue
            for index, result in trained.items():
                path = writer.add(result.trajectory, {"seed": cfg.seed + index, "device": str(device), **result.info()})
                logger.info("expert %d/%d saved in %s (%.1f s)", index + 1, num_experts, path,
                            sum(result.epoch_seconds))
                accs.append(result.info()["final_test_acc"])
                epoch_seconds += result.epoch_seconds
                if on_expert is not None:
                    on_expert(index, result)
    saved = distributed.broadcast_object(writer.saved if writer is not None else None)
    files = list_buffer_files(directory)
    return BufferSummary(directory=directory, num_experts=saved, trained=saved - start_index,
                         files=files, final_test_accs=accs,
                         seconds_per_epoch=sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else float("nan"),
                         bytes_on_disk=sum(os.path.getsize(p) for p in files))

