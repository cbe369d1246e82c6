"""What a distillation run is told and what it reports, apart from the method's own
configuration: the run options (:class:`RunOptions`), the outcome (:class:`RunOutcome`), the
evaluation protocol a run derives from its method (:func:`eval_protocol`, :func:`eval_config_for`),
and stopping on a signal (:class:`StopFlag`, :class:`RunInterrupted`). ``methods/runner.py`` runs
with them; ``cli/`` builds them from flags."""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import evaluation
import progress
from methods.base import DistillConfig, DistillMethod
from precision import FP32, Precision

logger = logging.getLogger("methods.runner")


class RunInterrupted(Exception):
    """The run was asked to stop (SIGINT / SIGTERM): a checkpoint was written after the current
    iteration, or, when that iteration ran past the grace period (``progress.STOP_GRACE_S``), it
    was dropped and the last checkpoint kept (the message says which)."""


class StopFlag:
    """Turns SIGINT and SIGTERM into a request to stop after the current iteration; an iteration
    still running ``progress.STOP_GRACE_S`` seconds later is abandoned where it is
    (``progress.tick`` raises ``progress.StopRequested``) and the last checkpoint is kept.

    A second SIGINT while a stop is pending raises ``KeyboardInterrupt`` at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested (signal %d): finishing this iteration, then writing a checkpoint (an iteration "
                       "still running after %.0f s is dropped and the last checkpoint kept)", signum, progress.STOP_GRACE_S)

    def install(self) -> "StopFlag":
        """Install the handlers (remembering the previous ones); returns ``self``."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous SIGINT / SIGTERM handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class RunOptions:
    """How to run and evaluate, independent of the method.

    Attributes:
        num_exp: independent experiments (``--num_exp``), seeds ``seed + exp``.
        num_eval: networks per evaluation (``--num_eval``; 0 skips evaluation).
        eval_it: evaluate every ``eval_it`` iterations (and at iteration 0 and the end); 0 only
            at the end.
        eval_models: networks to evaluate with (from ``--eval_mode``).
        epoch_eval_train: evaluation epochs; ``None`` takes the method's default.
        seed: base seed.
        run_dir: where everything is written.
        checkpoint_every: write ``last.pt`` every so many iterations (0: only when stopped).
        resume: continue from ``run_dir/last.pt`` if it exists.
        save_vis: write a picture at each evaluation.
        tta_mode: test-time augmentation of the evaluation (``--tta --tta_mode hflip``; ``""`` off).
        deterministic: deterministic evaluation (``--deterministic``; ``evaluation.EvalConfig``).
        stacked_eval: ``--stacked_eval`` auto|on|off: train each evaluation's networks together
            (``evaluation.eval_path``).
        command: the command line that started the run (recorded in ``results.json``).
        label_loss: how evaluation networks fit the labels (``--label_loss``, ``evaluation.LABEL_LOSSES``);
            ``None`` takes the method's (``DistillMethod.eval_label_loss``: mse for KIP and FRePo).
        precision: ``--amp`` (``precision.Precision``) of distillation and evaluation, recorded
            in ``config.yaml`` / ``results.json`` (``run.precision``) and each evaluation's protocol.
        save_every: for methods that write the trajectory-matching layout
            (``DistillMethod.writes_reference_layout``), write ``images_{it}.pt`` etc. every so many
            iterations (``--save_every``; 0: only the best). GeorgeCazenavette/mtt-distillation
            ``distill.py`` hard-codes 1000 (at evaluation iterations divisible by 1000).
        select_on: ``--select_on`` (``methods.run_selection.SELECT_ON``): what the best-so-far set
            of each experiment is chosen on: ``test`` accuracy (the references') or ``val``, the
            accuracy on a class-balanced validation split held out of the training set (and out
            of distillation); either way the mean over the evaluation models.
        val_per_class: ``--val_per_class``: training images per class held out under ``select_on='val'``.
    """

    num_exp: int = 1
    num_eval: int = 5
    eval_it: int = 0
    eval_models: tuple = ("ConvNet",)
    epoch_eval_train: Optional[int] = None
    seed: int = 0
    run_dir: str = "runs/default"
    checkpoint_every: int = 0
    resume: bool = False
    save_vis: bool = True
    tta_mode: str = ""
    deterministic: bool = False
    stacked_eval: str = "auto"
    command: str = ""
    save_every: int = 1000
    label_loss: Optional[str] = None
    precision: Precision = FP32
    eval_student: Dict[str, object] = field(default_factory=dict)
    select_on: str = "test"
    val_per_class: int = 100


@dataclass
class RunOutcome:
    """What a finished run produced: per-model final accuracies and the files written; ``best``:
    the best-so-far record of each experiment (``methods.run_selection.BestSoFar.best_records``:
    iteration, test ``accuracy`` in [0, 1], ``selected_on``; ``None`` when never evaluated) and
    ``best_path``, its file (``None`` when not written)."""

    accs_all_exps: Dict[str, List[float]]
    result_path: str
    run_dir: str
    seconds_per_iteration: float
    vis_paths: List[str] = field(default_factory=list)
    best: List[Optional[dict]] = field(default_factory=list)
    best_path: Optional[str] = None


def eval_protocol(method_class, cfg: DistillConfig, opts: RunOptions) -> evaluation.EvalProtocol:
    """The evaluation protocol of a run (``evaluation.EvalProtocol``): the method's reference epochs
    (``DistillMethod.eval_epochs``) unless ``--epoch_eval_train`` is given, ``--lr_net``,
    ``--batch_train``, the DiffAugment strategy the method trains with (none for plain DC: DC's
    ``get_daparam`` augmentation then applies), test-time augmentation, determinism and the label
    loss (``--label_loss``, else the method's ``eval_label_loss``), and the student settings: the
    method's ``student_defaults(cfg)`` (its ``eval_student_defaults`` class attribute, e.g. ``{'labels':
    'soft', 'optimizer': 'adamw', ...}``, or fields its options decide, e.g. NCFM's ``decode_factor``;
    none: today's protocol) with ``opts.eval_student`` (the flags given) over them."""
    augmented, plain = method_class.eval_epochs
    defaults = (method_class.student_defaults(cfg) if hasattr(method_class, "student_defaults")
                else getattr(method_class, "eval_student_defaults", None))
    student = {**dict(defaults or {}), **dict(opts.eval_student)}
    return evaluation.EvalProtocol(epochs_augmented=augmented, epochs_plain=plain, lr=cfg.lr_net,
                              batch_train=cfg.batch_train, dsa_strategy=method_class.training_dsa(cfg),
                              tta_mode=opts.tta_mode, deterministic=opts.deterministic,
                              stacked_eval=opts.stacked_eval,
                              label_loss=opts.label_loss or method_class.eval_label_loss,
                              **student).with_epochs(opts.epoch_eval_train)


def eval_config_for(method: DistillMethod, model_eval: str, opts: RunOptions, syn=None) -> evaluation.EvalConfig:
    """The :class:`evaluation.EvalConfig` of one evaluation network: :func:`eval_protocol` resolved for
    ``model_eval``, with the step size the set learned (``syn.syn_lr``, MTT's alpha) when it has one."""
    cfg = method.cfg
    learned = float(syn.syn_lr.detach()) if syn is not None and syn.syn_lr is not None else None
    return eval_protocol(type(method), cfg, opts).resolve(cfg.dataset, cfg.model, model_eval, cfg.ipc, learned,
                                                          precision=opts.precision)
