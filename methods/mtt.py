"""Trajectory matching: MTT (DATM and PAD build on it in ``methods/datm.py``).

Source: Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022
(eq. 1-2, Algorithm 1); reference ``distill.py`` of GeorgeCazenavette/mtt-distillation (its
quirks: docs/reference-notes.md, *MTT*). PAD's parameter selection lives in
:func:`trajectory_matching_loss`, shared by all three.

One iteration: take the next expert trajectory, start a student at the expert's parameters of a
random start epoch t, run ``syn_steps`` SGD steps on minibatches of the synthetic set with the
learnable step size alpha (kept differentiable, ``torch.func.functional_call`` on a flat
parameter vector), and minimise ``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2``
with respect to the images and alpha (and DATM's soft labels). Experts come from ``buffer.py``.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import progress
from pretrained import buffers
import utils
from methods import tesla
from methods.addons.base import IMAGE_LOSS, TRAINING_TERM, UNROLL_LOSS
from methods.base import DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.mtt_options import MTTOptions


def flatten(snapshot: Sequence[torch.Tensor]) -> torch.Tensor:
    """One expert snapshot (parameters in ``model.parameters()`` order) as a flat vector (P,)."""
    return torch.cat([tensor.reshape(-1) for tensor in snapshot])


def trajectory_matching_loss(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor,
                             loss_ratio: float = 0.0, depth_ratio: float = 0.0) -> torch.Tensor:
    """The normalised parameter distance of MTT (eq. 2), with PAD's parameter selection.

    ``L = sum_i (student_i - target_i)^2 / sum_i (start_i - target_i)^2`` over the kept entries:
    ``depth_ratio`` drops the first (shallowest, in ``model.parameters()`` order) fraction of
    the flat vector (PAD paper, ``PAD_depth.py``); ``loss_ratio`` then drops the fraction of the
    remaining entries with the smallest student error (released ``PAD.py``). Both 0 is MTT.

    Args:
        student, start, target: (P,) flat parameter vectors (student with a graph).
        loss_ratio, depth_ratio: fractions in [0, 1).

    Returns:
        A scalar tensor; 0 when the student reaches the target.

    Raises:
        ValueError: a ratio outside [0, 1).
    """
    for name, ratio in (("loss_ratio", loss_ratio), ("depth_ratio", depth_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"--{name} must be in [0, 1), got {ratio}")
    error = (student - target) ** 2
    reference = (start - target) ** 2
    if depth_ratio > 0:
        first = int(math.floor(depth_ratio * error.numel()))
        error, reference = error[first:], reference[first:]
    if loss_ratio > 0:
        dropped = int(math.floor(loss_ratio * error.numel()))
        keep = torch.argsort(error.detach())[dropped:]
        error, reference = error[keep], reference[keep]
    return error.sum() / reference.sum()


class FlatModel:
    """Calls a network with its parameters given as one flat vector (MTT's ``ReparamModule``,
    written with ``torch.func.functional_call``). Buffers (BatchNorm statistics) stay the module's.

    Args:
        net: the network whose structure is used; its own parameter values are ignored.
    """

    def __init__(self, net: nn.Module):
        self.net = net
        named = list(net.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]

    @property
    def num_params(self) -> int:
        """P, the length of the flat vector."""
        return sum(self.numels)

    def __call__(self, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) of ``images`` (N, C, H, W) under the parameters ``flat`` (P,).

        Raises:
            ValueError: ``flat`` has the wrong length (a buffer made with another model).
        """
        if flat.numel() != self.num_params:
            raise ValueError(f"flat parameters have {flat.numel()} entries, the network {self.num_params}")
        params = {name: piece.view(shape) for name, piece, shape in zip(self.names, flat.split(self.numels), self.shapes)}
        return torch.func.functional_call(self.net, params, (images,))


class ExpertStream:
    """Serves expert trajectories as MTT's ``distill.py`` (GeorgeCazenavette/mtt-distillation) does.

    The buffer files are shuffled once and the first ``max_files`` kept (DATM's ``distill/DATM.py``
    keeps the first ``max_files`` unshuffled: ``shuffle_files=False``). Without ``load_all`` one
    file is in memory at a time, its experts shuffled and used in turn, and the kept files are
    walked in a fresh random order on every pass; with ``load_all`` every kept expert is in memory
    and each iteration draws one uniformly, with replacement.

    Args:
        directory: the buffer folder (``buffers.buffer_dir``).
        expect: manifest fields the buffer must match (dataset, model, zca, param_shapes).
        generator: CPU generator for every draw (file choice, orders, experts).
        data_facts: this run's training data (``image_shape``, ``num_classes``, ``num_train``),
            checked against the manifest once (``buffers.load_buffer``).
        load_all: keep every expert in memory and draw with replacement (``--load_all``).
        max_files: keep only so many files (0: all), after shuffling them when ``shuffle_files``.
        max_experts: use at most so many experts per file, or in total with ``load_all`` (0: all).
        shuffle_files: shuffle the files before keeping ``max_files`` (MTT) or keep the first (DATM).

    Raises:
        utils.UserError: no buffer, or one made with another dataset, model or ZCA setting
            (from :func:`buffers.load_buffer`).
    """

    def __init__(self, directory: str, expect: dict, generator: torch.Generator, *, load_all: bool = False,
                 max_files: int = 0, max_experts: int = 0, data_facts: Optional[dict] = None,
                 shuffle_files: bool = True):
        self.directory, self.expect = directory, expect
        self.generator = generator
        self.max_experts = max_experts or None
        first = buffers.load_buffer(directory, expect=expect, max_files=1, max_experts=1, data_facts=data_facts)
        self.num_snapshots = len(first[0])
        names = [os.path.basename(path) for path in buffers.list_buffer_files(directory)]
        if shuffle_files:
            names = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
        self.files: List[str] = names[:max_files or None]  # file names inside ``directory``, in use order
        self.load_all = load_all
        self._all = self._load_everything() if load_all else None
        self.file_order: List[int] = []
        self.expert_order: List[int] = []
        self._file_position, self._expert_position = 0, 0
        self._loaded_index: Optional[int] = None
        self._experts: list = []

    def _load_everything(self) -> list:
        return buffers.load_buffer(self.directory, expect=self.expect, max_experts=self.max_experts,
                                   files=[os.path.join(self.directory, name) for name in self.files])

    def _load(self, index: int) -> None:
        if self._loaded_index == index:
            return
        experts = buffers.load_chunk(os.path.join(self.directory, self.files[index]))
        self._experts = experts[:self.max_experts]
        self._loaded_index = index

    def _next_file(self) -> None:
        if self._file_position >= len(self.file_order):
            self.file_order = torch.randperm(len(self.files), generator=self.generator).tolist()
            self._file_position = 0
        self._load(self.file_order[self._file_position])
        self._file_position += 1
        self.expert_order = torch.randperm(len(self._experts), generator=self.generator).tolist()
        self._expert_position = 0

    def next(self) -> list:
        """The next trajectory: a list of snapshots, each a list of CPU tensors."""
        if self._all is not None:
            return self._all[int(torch.randint(len(self._all), (1,), generator=self.generator))]
        if self._expert_position >= len(self.expert_order):
            self._next_file()
        trajectory = self._experts[self.expert_order[self._expert_position]]
        self._expert_position += 1
        return trajectory

    def first_file_experts(self) -> list:
        """The experts in memory (loading the first file of the walk if none is), for DATM's
        label initialisation with ``--init real``/``noise`` (its ``buffer[0][-1]``)."""
        if self._all is not None:
            return self._all
        if self._loaded_index is None:
            self._next_file()
        return self._experts

    def stored_files(self) -> List[str]:
        """Paths of the files in use in stored order (``replay_buffer_0.pt`` first when kept)."""
        return [os.path.join(self.directory, name) for name in sorted(self.files, key=_chunk_number)]

    def state_dict(self) -> dict:
        """Files, positions and orders, so a resumed run continues with the same experts."""
        return {"files": list(self.files), "file_order": self.file_order, "expert_order": self.expert_order,
                "file_position": self._file_position, "expert_position": self._expert_position,
                "loaded_index": self._loaded_index}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        if "files" in state and list(state["files"]) != self.files:
            self.files = list(state["files"])
            if self._all is not None:
                self._all = self._load_everything()
        self.file_order, self.expert_order = list(state["file_order"]), list(state["expert_order"])
        self._file_position, self._expert_position = state["file_position"], state["expert_position"]
        if state["loaded_index"] is not None and self._all is None:
            self._loaded_index = None
            self._load(state["loaded_index"])


def _chunk_number(name: str) -> int:
    """``n`` of ``replay_buffer_{n}.pt``."""
    return int(os.path.basename(name).split("_")[-1].split(".")[0])


@register_method("MTT")
class MTT(DistillMethod):
    """Matching training trajectories (see the module docstring). The images (SGD lr_img,
    momentum 0.5) and the step size alpha (SGD lr_lr, momentum 0.5, initialised at lr_teacher)
    learn; evaluation trains with the learned alpha."""

    reference_model_source = "GeorgeCazenavette/mtt-distillation distill.py (--model ConvNet; ConvNetD4 for Tiny ImageNet)"
    defaults = dict(ipc=1, iterations=5000, lr_img=1000.0, lr_net=0.01, batch_real=256, batch_train=256,
                    init="real", dsa_strategy="color_crop_cutout_flip_scale_rotate", eval_mode="S")
    options_type = MTTOptions
    options: MTTOptions
    default_eval_it = 100
    writes_reference_layout = True  # images_best.pt, labels_best.pt, lr_best.pt, images_{it}.pt, ...
    run_counts = (1, 5)  # distill.py: one distillation, --num_eval 5 (DATM and PAD alike)
    pool_family = "MTT"  # utils.get_eval_pool's M pool: ConvNet, AlexNet, VGG11, ResNet18_AP, ResNet18
    cifar100_stats = "cifar10"  # utils.get_dataset normalises CIFAR100 with CIFAR10's mean/std
    can_skip = False  # whether accept() may refuse an update (then 'skipped' is logged)
    shuffle_expert_files = True  # --max_files keeps N shuffled files (MTT distill.py), else the first N
    loss_functions = ("unroll", "matching_loss")  # the student's unroll is part of the meta loss

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        try:
            self.check_config(cfg)
        except ValueError as error:
            raise utils.UserError(str(error)) from None
        self.student_net = self.new_network()
        self.student = FlatModel(self.student_net)
        self.buffer_dir = buffers.buffer_dir(self.options.buffer_path, cfg.dataset, cfg.model, cfg.zca,
                                             cfg.subset, cfg.res)
        expect = {"dataset": cfg.dataset, "model": cfg.model, "zca": cfg.zca,
                  "param_shapes": [list(shape) for shape in self.student.shapes]}
        labels = getattr(self.sampler, "labels", None)
        facts = {"image_shape": [self.channel, *self.im_size], "num_classes": self.num_classes,
                 "num_train": None if labels is None else int(labels.numel()),
                 "normalization": buffers.normalization_fact(cfg.zca, cfg.normalize_like)}
        self.experts = ExpertStream(self.buffer_dir, expect, self.generator, load_all=self.options.load_all,
                                    max_files=self.options.max_files, max_experts=self.options.max_experts,
                                    data_facts=facts, shuffle_files=self.shuffle_expert_files)
        epochs = self.experts.num_snapshots - 1
        if self.latest_start_epoch() + self.options.expert_epochs > epochs:
            raise utils.UserError(f"the experts in {self.buffer_dir} have {epochs} epochs, but start epochs up to "
                                  f"{self.latest_start_epoch()} plus --expert_epochs {self.options.expert_epochs} "
                                  f"need {self.latest_start_epoch() + self.options.expert_epochs}; lower "
                                  "--max_start_epoch or train longer experts (buffer.py --train_epochs)")
        self._chunks: List[torch.Tensor] = []  # this iteration's unused minibatches (next_batch)
        self.teacher_targets: Optional[torch.Tensor] = None  # (N, K) this iteration's --teacher_label targets
        self.optimizer_lr: Optional[torch.optim.Optimizer] = None

    eval_epochs = (1000, 1000)  # MTT and DATM evaluation
    # Image-update terms join accepted updates; an add-on's step loss replaces the unroll's CE (DATM_ours).
    addon_hooks = frozenset({IMAGE_LOSS, UNROLL_LOSS, TRAINING_TERM})
    unused_flags = ("dis_metric", "outer_loop", "inner_loop")

    # ---- set-up -------------------------------------------------------------------------
    @classmethod
    def reference_network(cls, dataset: str) -> Tuple[Optional[str], str]:
        """ConvNet, and ConvNetD4 for Tiny ImageNet (64 x 64), as the reference's scripts distil."""
        name = "ConvNetD4" if dataset.lower() in ("tiny", "tinyimagenet") else "ConvNet"
        return name, cls.reference_model_source

    @classmethod
    def check_config(cls, cfg) -> None:
        """``--tesla_grad first_order`` needs ``--tesla``; ``--teacher_label`` is MTT's only (DATM
        and PAD learn their own soft labels). Also run when the method is built.

        Raises:
            ValueError: one line naming the flags.
        """
        opts = cls.resolve_options(cfg.extra)
        if opts.tesla_grad != "exact" and not opts.tesla:
            raise ValueError(f"--tesla_grad {opts.tesla_grad} applies to the --tesla sweep; add --tesla")
        if opts.teacher_label and cls.name != "MTT":
            raise ValueError(f"--teacher_label is MTT's (TESLA); {cls.name} learns its own soft labels")

    def latest_start_epoch(self) -> int:
        """The largest start epoch this run can draw (``max_start_epoch - 1``)."""
        return self.options.max_start_epoch - 1

    def configure(self, syn: SyntheticSet) -> None:
        """Images: SGD(lr_img, momentum 0.5); the learnable step size: SGD(lr_lr, momentum 0.5)."""
        super().configure(syn)
        syn.learn_lr(self.options.lr_teacher)
        self.optimizer_lr = torch.optim.SGD([syn.syn_lr], lr=self.options.lr_lr, momentum=0.5)

    # ---- one iteration ------------------------------------------------------------------
    def start_epoch(self, iteration: int) -> int:
        """The expert epoch the student starts from: uniform in [0, max_start_epoch)."""
        return int(torch.randint(0, self.options.max_start_epoch, (1,), generator=self.generator))

    def next_batch(self, total: int) -> torch.Tensor:
        """Indices (B,) of the next student step's synthetic images, as MTT's ``distill.py``
        batches: when this iteration's chunks are used up, a fresh permutation of the ``total``
        images is split into chunks of ``batch_syn`` (the last one short when ``batch_syn`` does
        not divide ``total``; all images when ``batch_syn`` is 0), and chunks are taken from the
        end, so a short chunk is used first. :meth:`unroll` drops the chunks left by the previous
        iteration."""
        size = self.options.batch_syn or total
        if not self._chunks:
            self._chunks = list(torch.randperm(total, generator=self.generator).split(size))
        return self._chunks.pop().to(self.device)

    def unroll_targets(self, syn: SyntheticSet) -> torch.Tensor:
        """What the student's cross-entropy is taken against: the hard labels (N,), or with
        ``--teacher_label`` this iteration's (N, K) probabilities from the target expert."""
        return syn.labels if self.teacher_targets is None else self.teacher_targets

    def matching_loss(self, student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The normalised parameter distance (no parameter selection in MTT)."""
        return trajectory_matching_loss(student, start, target)

    def unroll(self, syn: SyntheticSet, start: torch.Tensor) -> torch.Tensor:
        """``syn_steps`` differentiable SGD steps of the student from ``start`` (P,) with step size
        ``syn.syn_lr``; returns the final flat parameters, with a graph to the images (and alpha).
        With ``--tesla`` the graph is one node whose backward recomputes the steps (methods/tesla.py),
        exactly or to first order (``--tesla_grad``)."""
        self._chunks = []  # a fresh permutation every iteration (MTT distill.py)
        # Terms an add-on adds to the matching loss once per unroll (AddOn.unroll_loss; DRUPI's CE of F).
        self.unroll_extra = torch.zeros((), device=self.device)
        if self.options.tesla:
            return tesla.unroll(self, syn, start)
        targets = self.unroll_targets(syn)
        augmenting = bool(self.dsa_strategy) and not self.options.no_aug
        params = start.clone().requires_grad_(True)
        for _ in range(self.options.syn_steps):
            progress.tick()  # a progress line / a stop inside a long iteration
            index = self.next_batch(syn.images.shape[0])
            images = syn.images[index]
            if augmenting:
                images = augment.diff_augment(images, self.dsa_strategy, generator=self.generator)
            loss = self.student_loss(params, syn, index, images, targets[index])
            grad = torch.autograd.grad(loss, params, create_graph=True)[0]
            params = params - syn.syn_lr * grad
        return params

    def student_loss(self, params: torch.Tensor, syn: SyntheticSet, index: torch.Tensor, images: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
        """The loss of one student step at flat parameters ``params`` (P,) on ``images`` (B, C, H, W):
        cross-entropy against ``targets`` (B,) or (B, K), or an add-on's step loss
        (``AddOn.unroll_loss``, e.g. CE + lbd * D(E(x), F_b) with feature labels), whose extra
        term joins ``self.unroll_extra``."""
        for addon in self.addons:
            handled = addon.unroll_loss(self.student, params, syn, index, images, targets)
            if handled is not None:
                loss, extra = handled
                self.unroll_extra = self.unroll_extra + extra
                return loss
        return F.cross_entropy(self.student(params, images), targets)

    def optimizers(self) -> list:
        """Every optimiser stepped by an accepted iteration (with the add-ons' ones)."""
        return [self.optimizer_img, self.optimizer_lr] + self.addon_optimizers()

    def accept(self, loss: torch.Tensor) -> bool:
        """Whether this iteration's update is applied (always, in MTT)."""
        return True

    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """One trajectory-matching iteration.

        Returns:
            ``{'loss', 'start_epoch', 'syn_lr'}`` and, where updates can be skipped, ``'skipped'``
            (detached scalar tensors).
        """
        trajectory = self.experts.next()
        epoch = self.start_epoch(iteration)
        start = flatten(trajectory[epoch]).to(self.device)
        target = flatten(trajectory[epoch + self.options.expert_epochs]).to(self.device)
        if self.options.teacher_label:  # TESLA: the target expert labels the images (methods/tesla.py)
            self.teacher_targets = tesla.teacher_soft_labels(self.student, self.student_net, target, syn.images)
        self.student_net.train()
        with self.precision.autocast(self.device):
            loss = self.matching_loss(self.unroll(syn, start), start, target)
        accepted = self.accept(loss)
        if accepted:
            self.update_images(syn, loss + self.unroll_extra, self.optimizers())
        logs = {"loss": loss.detach(), "start_epoch": torch.tensor(float(epoch)), "syn_lr": syn.syn_lr.detach().clone()}
        if self.can_skip:
            logs["skipped"] = torch.tensor(0.0 if accepted else 1.0)
        self.unroll_extra = self.unroll_extra.detach()  # release the unroll's graph
        return logs

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Image and step-size optimisers and the expert stream (minibatch orders are drawn anew
        every iteration)."""
        return {**super().state_dict(), "optimizer_lr": self.optimizer_lr.state_dict(),
                "experts": self.experts.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`init_synthetic`)."""
        super().load_state_dict(state)
        self.optimizer_lr.load_state_dict(state["optimizer_lr"])
        self.experts.load_state_dict(state["experts"])
