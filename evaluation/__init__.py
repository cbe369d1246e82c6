"""Evaluating a synthetic set: the protocol and its one resolver (:mod:`evaluation.protocol`), the
training step, epoch and test pass of DC's protocol (:mod:`evaluation.training`), networks trained
together (:mod:`evaluation.stacked`), the runner that picks how to train them, on one process or torchrun's
ranks (:mod:`evaluation.runner`), learned step schedules (:mod:`evaluation.schedule`), and the decoupled
family's student side: soft-label losses and AdamW + cosine (:mod:`evaluation.soft_labels`), crop and
mix views drawn once and applied anywhere (:mod:`evaluation.views`), multi-formation decoding
(:mod:`evaluation.formation`), one network's training, by DC's protocol or under hard, soft or
teacher labels (:mod:`evaluation.student`), and relabel stores (:mod:`evaluation.relabel`).

It knows no method and no command line: ``methods/``, ``sets/`` and ``cli/`` call it. The public
names are importable from the package itself (``evaluation.evaluate_synset``).
"""
from evaluation.protocol import (ADAMW_SCHEDULES, LABEL_LOSSES, LABEL_REGIMES, MIX_TYPES, SOFT_LOSSES, SQUARE_LOSSES, STACKED_EVAL_CHOICES,
                                 STUDENT_AUGS, STUDENT_OPTIMIZERS, TTA_MODES, EvalConfig, EvalProtocol, EvalResult,
                                 StudentProtocol)
from evaluation.training import (DETERMINISTIC_TEST_PASS, Augmenter, EvaluationStopped, Step, TrainingTerm,
                                 accumulate_gradient, centred_one_hot, deterministic_algorithms, has_batchnorm,
                                 label_loss_sum, make_augmenter, regression_targets, sgd_schedule, sgd_step,
                                 test_accuracy, train_epoch)
from evaluation.stacked import StackingUnsupported, train_and_test_stacked
from evaluation.runner import SEQUENTIAL_ON_AUTO, eval_path, evaluate_synset, evaluate_synset_sharded
from evaluation.schedule import StepSchedule, evaluate_schedule, train_on_schedule
from evaluation.soft_labels import adamw_groups, cosine_factor, make_adamw, mixed, soft_loss
from evaluation.views import Views, apply_views, draw_crops, draw_views
from evaluation.student import (epoch_views, multistep_factor, student_epochs, train_and_test, train_and_test_student,
                                train_student)
from evaluation.formation import decode_zoom, mix_grid
from evaluation.relabel import SoftLabelStore, relabel

__all__ = [
    "LABEL_LOSSES", "SQUARE_LOSSES", "STACKED_EVAL_CHOICES", "TTA_MODES", "EvalConfig", "EvalProtocol", "EvalResult",
    "DETERMINISTIC_TEST_PASS", "Augmenter", "EvaluationStopped", "Step", "TrainingTerm", "accumulate_gradient",
    "centred_one_hot", "deterministic_algorithms", "has_batchnorm", "label_loss_sum", "make_augmenter",
    "regression_targets", "sgd_schedule", "sgd_step", "test_accuracy", "train_and_test", "train_epoch",
    "StackingUnsupported", "train_and_test_stacked", "SEQUENTIAL_ON_AUTO", "eval_path", "evaluate_synset",
    "evaluate_synset_sharded", "StepSchedule", "evaluate_schedule", "train_on_schedule",
    "LABEL_REGIMES", "SOFT_LOSSES", "STUDENT_OPTIMIZERS", "STUDENT_AUGS", "MIX_TYPES", "StudentProtocol",
    "adamw_groups", "cosine_factor", "make_adamw", "mixed", "soft_loss", "Views", "apply_views", "draw_crops",
    "draw_views", "epoch_views", "student_epochs", "train_and_test_student", "train_student", "SoftLabelStore",
    "relabel", "ADAMW_SCHEDULES", "multistep_factor", "decode_zoom", "mix_grid",
]
