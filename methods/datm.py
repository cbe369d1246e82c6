"""Difficulty-aligned trajectory matching: DATM and PAD, MTT (``methods/mtt.py``) with a widening
start-epoch window, learnable soft labels, expert-filtered real initialisation and, for PAD,
parameter selection in the matching loss.

Sources:
- DATM: Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory
  Matching", ICLR 2024; reference ``distill/DATM.py`` of NUS-HPC-AI-Lab/DATM (docs/reference-notes.md,
  *DATM*).
- PAD: Li et al., "Prioritize Alignment in Dataset Distillation", arXiv 2408.03360, 2024; reference
  ``distill/PAD.py`` (and the historical ``PAD_depth.py``) of NUS-HPC-AI-Lab/PAD
  (docs/reference-notes.md, *PAD*).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

import utils
from methods.base import SyntheticSet
from methods.mtt import MTT, flatten, trajectory_matching_loss
from methods.mtt_options import DATMOptions, PADOptions
from methods.registry import register_method
from pretrained import buffers


@register_method("DATM")
class DATM(MTT):
    """Difficulty-aligned trajectory matching: MTT plus a start-epoch window that widens over the
    run (``--Sequential_Generation``), learnable soft labels initialised from the experts' logits
    (SGD lr_y, momentum Momentum_y, soft cross-entropy in the student steps and in evaluation),
    images initialised with real images the expert classifies correctly
    (``--init samples_predicted_correctly``), and skipped updates when the loss exceeds
    ``--threshold``."""

    defaults = dict(MTT.defaults, init="samples_predicted_correctly")
    options_type = DATMOptions
    options: DATMOptions
    init_choices = ("samples_predicted_correctly", "real", "noise")
    can_skip = True
    shuffle_expert_files = False  # DATM.py keeps the first --max_files files

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.optimizer_y: Optional[torch.optim.Optimizer] = None
        if self.options.min_start_epoch >= self.options.max_start_epoch:
            raise utils.UserError(f"--min_start_epoch {self.options.min_start_epoch} must be below "
                                  f"--max_start_epoch {self.options.max_start_epoch}")

    def upper_start_epoch(self, iteration: int) -> int:
        """The exclusive upper bound of the start epoch at ``iteration`` (DATM's ``Sequential_Generation``
        schedule in NUS-HPC-AI-Lab/DATM ``distill/DATM.py``; docs/reference-notes.md, *DATM*)."""
        opts = self.options
        if not opts.Sequential_Generation:
            return opts.max_start_epoch
        grown = opts.current_max_start_epoch + int((opts.max_start_epoch - opts.current_max_start_epoch)
                                                    * iteration / opts.expansion_end_epoch)
        return max(opts.min_start_epoch + 1, min(grown, opts.max_start_epoch))

    def start_epoch(self, iteration: int) -> int:
        """Uniform in [min_start_epoch, upper_start_epoch(iteration))."""
        low, high = self.options.min_start_epoch, self.upper_start_epoch(iteration)
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def expert_logits(self, snapshot: Sequence[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """(N, K) logits of an expert snapshot on ``images`` (no gradient, in chunks)."""
        flat = flatten(snapshot).to(self.device)
        with torch.no_grad():
            return torch.cat([self.student(flat, chunk) for chunk in images.split(256)])

    def init_synthetic(self) -> SyntheticSet:
        """Images and soft-label logits, as NUS-HPC-AI-Lab/DATM ``distill/DATM.py`` initialises them.

        ``samples_predicted_correctly``: per class, real images in random order that the final
        snapshot of expert 0 in the first stored file (``replay_buffer_0.pt``) classifies
        correctly (:meth:`correctly_classified`); the logits (N, K) are, per image, the mean
        final-snapshot logits of the experts of every buffer file in use that classify it
        correctly (:meth:`label_logits_from_experts`). ``real``/``noise``: the base images and
        the logits of the first expert in memory.

        Raises:
            utils.UserError: a class has fewer than ipc real images that any expert classifies
                correctly.
        """
        if self.cfg.init != "samples_predicted_correctly":
            syn = super().init_synthetic()
            logits = self.expert_logits(self.experts.first_file_experts()[0][-1], syn.images.detach())
        else:
            judges = self.final_snapshots()
            chosen = [self.correctly_classified(c, judges) for c in range(self.num_classes)]
            labels = SyntheticSet.class_major_labels(self.num_classes, self.cfg.ipc, device=self.device)
            syn = SyntheticSet(torch.cat(chosen), labels, self.num_classes, self.cfg.ipc)
            self.configure(syn)
            logits = self.label_logits_from_experts(judges, syn.images.detach(), labels)
        syn.learn_soft_labels(logits)
        self.optimizer_y = torch.optim.SGD([syn.label_logits], lr=self.options.lr_y,
                                           momentum=self.options.Momentum_y)
        return syn

    def final_snapshots(self) -> List[List[torch.Tensor]]:
        """The final snapshot of every expert of every buffer file in use, file by file in stored
        order (``replay_buffer_0.pt`` first), experts in file order; each a list of CPU tensors."""
        return [trajectory[-1] for path in self.experts.stored_files() for trajectory in buffers.load_chunk(path)]

    def correctly_classified(self, c: int, judges: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``ipc`` real images (ipc, C, H, W) of class ``c`` that an expert classifies as ``c``.

        The class's images are taken in one random order and scanned in chunks of 256 with the
        first judge; when the class is used up before ``ipc`` are found, the scan starts again
        with the next judge, keeping the images found so far (DATM ``distill/DATM.py``).

        Args:
            c: the class.
            judges: final expert snapshots in the order to try (:meth:`final_snapshots`).

        Raises:
            utils.UserError: fewer than ipc of the class's images are classified correctly by
                any judge.
        """
        ipc = self.cfg.ipc
        pool = self.sampler.get_images(c, self.sampler.class_counts[c], self.generator)
        found = torch.zeros(pool.shape[0], dtype=torch.bool)
        for judge in judges:
            for start in range(0, pool.shape[0], 256):
                chunk = pool[start:start + 256]
                correct = (self.expert_logits(judge, chunk).argmax(dim=1) == c).cpu()
                found[start:start + chunk.shape[0]] |= correct
                if int(found.sum()) >= ipc:
                    return pool[found.nonzero().flatten()[:ipc].to(pool.device)]
        raise utils.UserError(f"--init samples_predicted_correctly: the experts classify only {int(found.sum())} "
                              f"real images of class {c} correctly, fewer than --ipc {ipc}; use --init real")

    def label_logits_from_experts(self, snapshots: Sequence[Sequence[torch.Tensor]], images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image, the mean logits over the expert snapshots that classify it correctly (the
        first snapshot's logits where none does).

        Args:
            snapshots: final expert snapshots (:meth:`final_snapshots`).
            images: (N, C, H, W) synthetic images.
            labels: (N,) their classes.

        Returns:
            (N, K) logits.
        """
        total = torch.zeros(images.shape[0], self.num_classes, device=self.device)
        count = torch.zeros(images.shape[0], device=self.device)
        fallback = None
        for snapshot in snapshots:
            logits = self.expert_logits(snapshot, images)
            fallback = logits if fallback is None else fallback
            correct = (logits.argmax(dim=1) == labels).float()
            total += logits * correct[:, None]
            count += correct
        return torch.where(count[:, None] > 0, total / count.clamp_min(1)[:, None], fallback)

    def unroll_targets(self, syn: SyntheticSet) -> torch.Tensor:
        """``softmax(label_logits)`` (N, K), with a graph to the logits (soft cross-entropy)."""
        return torch.softmax(syn.label_logits, dim=1)

    def optimizers(self) -> list:
        """Images, step size, soft labels (and the add-ons' optimisers)."""
        return super().optimizers() + [self.optimizer_y]

    def accept(self, loss: torch.Tensor) -> bool:
        """Apply the update only when the matching loss is at most ``--threshold`` (one sync)."""
        return float(loss.detach()) <= self.options.threshold

    def state_dict(self) -> dict:
        """MTT's state plus the soft-label optimiser."""
        return {**super().state_dict(), "optimizer_y": self.optimizer_y.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self.optimizer_y.load_state_dict(state["optimizer_y"])


@register_method("PAD")
class PAD(DATM):
    """DATM plus parameter selection in the matching loss. ``--param_selection loss`` (default,
    the released ``distill/PAD.py`` of NUS-HPC-AI-Lab/PAD) drops the ``--loss_ratio`` fraction of
    parameter entries with the smallest matching error; ``depth`` (the paper's deep-layers-only
    matching, the older ``PAD_depth.py``) drops the ``--depth_ratio`` fraction of the flat
    vector's shallowest entries; ``both`` applies the two, depth first.

    Raises:
        utils.UserError: ``--param_selection`` is none of loss, depth, both.
    """

    selections = ("loss", "depth", "both")
    options_type = PADOptions
    options: PADOptions

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        if self.options.param_selection not in self.selections:
            raise utils.UserError(f"--param_selection {self.options.param_selection!r}: PAD takes "
                                  f"{', '.join(self.selections)}")

    def selection_ratios(self) -> tuple:
        """``(loss_ratio, depth_ratio)`` in effect under ``--param_selection`` (0 for the rule not used)."""
        selection = self.options.param_selection
        loss = self.options.loss_ratio if selection in ("loss", "both") else 0.0
        depth = self.options.depth_ratio if selection in ("depth", "both") else 0.0
        return loss, depth

    def matching_loss(self, student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The normalised distance over the selected parameter entries."""
        loss_ratio, depth_ratio = self.selection_ratios()
        return trajectory_matching_loss(student, start, target, loss_ratio, depth_ratio)
