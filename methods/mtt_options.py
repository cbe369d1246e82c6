"""The options of trajectory matching (MTT, DATM, PAD): one frozen dataclass per method, each
extending its parent's (``methods/options.py``).

Sources of the defaults: ``distill.py`` of GeorgeCazenavette/mtt-distillation (MTT), the yacs
defaults ``utils/cfg.py`` of NUS-HPC-AI-Lab/DATM (DATM) and of NUS-HPC-AI-Lab/PAD (PAD),
``distill.py`` of justincui03/tesla (``teacher_label``); the
flags no reference has are this toolkit's (``methods.options.TOOLKIT``).
"""
from __future__ import annotations

from dataclasses import dataclass

from methods.options import TOOLKIT, MethodOptions, option, redefault

MTT_REFERENCE = "GeorgeCazenavette/mtt-distillation distill.py"
DATM_REFERENCE = "NUS-HPC-AI-Lab/DATM utils/cfg.py"
PAD_REFERENCE = "NUS-HPC-AI-Lab/PAD utils/cfg.py"
TESLA_REFERENCE = "justincui03/tesla distill.py"


@dataclass(frozen=True)
class MTTOptions(MethodOptions):
    """MTT's own flags (defaults: its reference ``distill.py``; 0 stands for its ``None``: all).
    ``syn_steps`` and ``expert_epochs`` come last: DATM and PAD change their defaults."""

    max_start_epoch: int = option(25, "trajectory matching: start epochs are drawn below this (T+)", minimum=1,
                                  source=MTT_REFERENCE)
    lr_lr: float = option(1e-05, "trajectory matching: learning rate of the learnable step size", minimum=0.0,
                          source=MTT_REFERENCE)
    lr_teacher: float = option(0.01, "trajectory matching: initial step size (the experts' lr)", minimum=0.0,
                               exclusive_minimum=True, source=MTT_REFERENCE)
    batch_syn: int = option(0, "trajectory matching: synthetic images per student step (0: all)", minimum=0,
                            source=MTT_REFERENCE)
    buffer_path: str = option("./buffers", "trajectory matching: root of buffer.py's expert buffers",
                              source=MTT_REFERENCE)
    load_all: bool = option(False, "trajectory matching: keep every expert in memory, draw experts with replacement",
                            source=MTT_REFERENCE)
    max_files: int = option(0, "trajectory matching: use only N buffer files (MTT: N shuffled ones, DATM/PAD: the "
                            "first N; 0: all)", minimum=0, source=MTT_REFERENCE)
    max_experts: int = option(0, "trajectory matching: use at most N experts per file, in total with --load_all "
                              "(0: all)", minimum=0, source=MTT_REFERENCE)
    no_aug: bool = option(False, "trajectory matching: no DiffAugment in the student steps", source=MTT_REFERENCE)
    tesla: bool = option(False, "trajectory matching: TESLA's constant-memory meta-gradient (see --tesla_grad)",
                         source=TOOLKIT)
    tesla_grad: str = option("exact", "trajectory matching, --tesla: exact (the full unroll's gradient) or "
                             "first_order (TESLA's released form, Hessian terms dropped)",
                             choices=("exact", "first_order"), source=TOOLKIT)
    teacher_label: bool = option(False, "MTT: the student steps use soft labels from the expert at the target epoch "
                                 "(TESLA)", source=TESLA_REFERENCE)
    syn_steps: int = option(20, "trajectory matching: student steps on the synthetic set (N)", minimum=1,
                            source=MTT_REFERENCE)
    expert_epochs: int = option(3, "trajectory matching: expert epochs the student must cover (M)", minimum=1,
                                source=MTT_REFERENCE)


@dataclass(frozen=True)
class DATMOptions(MTTOptions):
    """DATM's flags: MTT's with DATM's ``syn_steps`` and ``expert_epochs``, plus the start-epoch
    window, the soft-label optimiser and the skip threshold (defaults: DATM ``utils/cfg.py``)."""

    syn_steps: int = redefault(MTTOptions, "syn_steps", 80, source=DATM_REFERENCE)
    expert_epochs: int = redefault(MTTOptions, "expert_epochs", 2, source=DATM_REFERENCE)
    min_start_epoch: int = option(0, "DATM: smallest start epoch", minimum=0, source=DATM_REFERENCE)
    current_max_start_epoch: int = option(20, "DATM: initial upper bound of the start epoch", minimum=1,
                                          source=DATM_REFERENCE)
    expansion_end_epoch: int = option(3000, "DATM: iteration at which the upper bound reaches --max_start_epoch",
                                      minimum=1, source=DATM_REFERENCE)
    Sequential_Generation: bool = option(True, "DATM: widen the start-epoch window over the run",
                                         source=DATM_REFERENCE)
    lr_y: float = option(2.0, "DATM: learning rate of the soft-label logits", minimum=0.0, source=DATM_REFERENCE)
    Momentum_y: float = option(0.9, "DATM: momentum of the soft-label optimiser", minimum=0.0, source=DATM_REFERENCE)
    threshold: float = option(1.0, "DATM: skip an update whose matching loss exceeds this", minimum=0.0,
                              exclusive_minimum=True, source=DATM_REFERENCE)


@dataclass(frozen=True)
class PADOptions(DATMOptions):
    """PAD's flags: DATM's with PAD's ``batch_syn``, plus the parameter selection (defaults: PAD
    ``utils/cfg.py``; ``param_selection`` is this toolkit's switch between ``distill/PAD.py`` and
    ``PAD_depth.py``)."""

    batch_syn: int = redefault(MTTOptions, "batch_syn", 256, source=PAD_REFERENCE)
    param_selection: str = option("loss", "PAD: which parameter selection applies: loss (released PAD.py), depth "
                                  "(PAD_depth.py) or both", source=TOOLKIT)
    loss_ratio: float = option(0.0, "PAD: fraction of parameter entries with the smallest error left out", minimum=0.0,
                               maximum=1.0, exclusive_maximum=True, source=PAD_REFERENCE)
    depth_ratio: float = option(0.0, "PAD: fraction of shallowest parameter entries left out", minimum=0.0,
                                maximum=1.0, exclusive_maximum=True, source=PAD_REFERENCE)
