"""The evaluation options shared by ``distill.py`` and ``evaluate.py``: ``--tta --tta_mode`` (DRUPI
``DCmain3.0.py``), ``--deterministic``, ``--stacked_eval`` and ``--label_loss``, and the student
settings of the decoupled family (``--labels --soft_loss --temperature --soft_t2 --mse_gt_weight
--optimizer --adamw_lr --adamw_weight_decay --student_aug --min_scale_crops --max_scale_crops
--mix_type --cutmix --mixup``; VILA-Lab/SRe2L ``relabel/generate_soft_label.py`` and
``validate/train_FKD.py``, with underscores; ``--mix_p --adamw_schedule --decode_factor`` of
gszfwsb/NCFM), turned into the fields of ``evaluation.EvalProtocol`` /
``methods.run_config.RunOptions``."""
from __future__ import annotations

import argparse

import cli
import evaluation
import utils


def add_eval_option_args(parser: argparse.ArgumentParser, saved_default: bool = False) -> None:
    """``--tta --tta_mode --deterministic`` (DRUPI ``DCmain3.0.py``), ``--label_loss`` and
    ``--stacked_eval`` (train the networks of one evaluation together, ``evaluation.eval_path``);
    distill.py and evaluate.py.

    With ``saved_default`` (``evaluate.py``), ``--tta`` and ``--deterministic`` default to ``None``:
    the protocol saved with the set decides unless the flag is given. ``--stacked_eval`` changes
    how, not what, is trained, so it always defaults to ``auto``.
    """
    group = parser.add_argument_group("evaluation options")
    off = None if saved_default else False
    group.add_argument("--tta", action=argparse.BooleanOptionalAction, default=off,
                       help="test-time augmentation: average the softmax of each test image and its transform")
    group.add_argument("--tta_mode", default="hflip", help=f"with --tta: {', '.join(evaluation.TTA_MODES)} (hflip)")
    group.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=off,
                       help="deterministic kernels and a test pass size independent of the batch size")
    group.add_argument("--stacked_eval", default="auto", choices=evaluation.STACKED_EVAL_CHOICES,
                       help="train the evaluation networks of one model together (torch.func.vmap): on, off "
                            "(one after another) or auto (together on CUDA except VGG/ResNet; one after another "
                            "on CPU, where it was measured faster). Same accuracies up to float rounding")
    group.add_argument("--label_loss", default=None,
                       help=f"how networks trained on a set fit its labels: {' or '.join(evaluation.LABEL_LOSSES)} "
                            "(mse: square loss averaged over the classes, mse_sum: summed over them; on one-hot - 1/K, "
                            "or on a set's learned real-valued labels); default: "
                            + ("the protocol saved with the set" if saved_default else
                               "the method's (KIP mse, FRePo mse_sum, every other cross_entropy)"))
    add_student_args(parser, saved_default)


# A RandomResizedCrop area fraction (--min_scale_crops <= --max_scale_crops is checked on resolve).
CROP_SCALE = cli.in_range(0.0, 1.0, exclusive_minimum=True)

# The student flags: (name, type, choices, today's default, help); a numeric type is its range. Their defaults are None (not
# given): the method's protocol (distill.py) or the saved one (evaluate.py) applies.
STUDENT_FLAGS = (
    ("labels", str, evaluation.LABEL_REGIMES, "hard",
     "what the student fits: hard (the set's own labels: today's protocol), soft (teacher logits stored with the "
     "set, per image or per crop and epoch by a relabel store) or teacher (a teacher queried on every augmented batch)"),
    ("soft_loss", str, evaluation.SOFT_LOSSES, "kl",
     "loss under soft/teacher labels: kl (SRe2L, batchmean, no T^2), sce (DD-Ranking, x T^2 with --soft_t2) or "
     "mse_gt (MSE to the teacher's logits + --mse_gt_weight x CE, G-VBSM/EDC)"),
    ("temperature", cli.positive_float, None, 20.0, "temperature T of kl and sce (SRe2L 20)"),
    ("mse_gt_weight", cli.non_negative_float, None, 0.1, "weight of the cross-entropy term of mse_gt (G-VBSM 0.1, EDC 0.025)"),
    ("optimizer", str, evaluation.STUDENT_OPTIMIZERS, "sgd",
     "student optimiser: sgd (DC's schedule: --lr_net, x0.1 at half-time) or adamw (SRe2L: --adamw_lr, "
     "--adamw_weight_decay, cosine per epoch)"),
    ("adamw_lr", cli.positive_float, None, 1e-3, "AdamW learning rate (SRe2L 0.001)"),
    ("adamw_weight_decay", cli.non_negative_float, None, 0.01, "AdamW weight decay (SRe2L 0.01)"),
    ("student_aug", str, evaluation.STUDENT_AUGS, "dc",
     "student augmentation: dc (DSA strategy or DC's get_daparam: today), rrc (RandomResizedCrop "
     "--min_scale_crops..--max_scale_crops + flip per image, SRe2L/RDED) or none"),
    ("min_scale_crops", CROP_SCALE, None, 0.08, "smallest RandomResizedCrop area fraction of rrc views (SRe2L 0.08)"),
    ("max_scale_crops", CROP_SCALE, None, 1.0, "largest RandomResizedCrop area fraction of rrc views (SRe2L 1)"),
    ("mix_type", str, evaluation.MIX_TYPES, "none", "batch mixing of the student's views: none, cutmix or mixup"),
    ("cutmix", cli.positive_float, None, 1.0, "Beta(alpha, alpha) of CutMix (SRe2L 1.0)"),
    ("mixup", cli.positive_float, None, 0.8, "Beta(alpha, alpha) of Mixup (SRe2L 0.8)"),
    ("mix_p", cli.fraction, None, 1.0, "probability that a batch is mixed under --mix_type (NCFM 0.5)"),
    ("adamw_schedule", str, evaluation.ADAMW_SCHEDULES, "cosine",
     "AdamW student's lr schedule: cosine per epoch (SRe2L) or multistep, x0.5 at each fifth of the epochs (NCFM)"),
    ("decode_factor", cli.positive_int, None, 1,
     "multi-formation: decode every stored image into decode_factor^2 upsampled grid cells before training "
     "(IDC/NCFM factor)"),
)


def add_student_args(parser: argparse.ArgumentParser, saved_default: bool = False) -> None:
    """The student flags (:data:`STUDENT_FLAGS` and ``--soft_t2``), all defaulting to ``None`` (not
    given); their defaults as resolved are today's protocol (``evaluation.StudentProtocol``)."""
    group = parser.add_argument_group("student protocol (soft labels and teachers)")
    origin = "the protocol saved with the set" if saved_default else "the method's"
    for name, kind, choices, default, text in STUDENT_FLAGS:
        group.add_argument(f"--{name}", type=kind, default=None, choices=choices,
                           help=f"{text}; default: {origin} ({default} unless the method says otherwise)")
    group.add_argument("--soft_t2", action=argparse.BooleanOptionalAction, default=None,
                       help=f"multiply the sce loss by T^2 (DD-Ranking); default: {origin} (off)")


def student_option_values(args: argparse.Namespace) -> dict:
    """The student settings given on the command line (``None``: not given, left out), checked.

    Raises:
        utils.UserError: a value outside its range (one line naming the flag).
    """
    names = [flag[0] for flag in STUDENT_FLAGS] + ["soft_t2"]
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    try:
        evaluation.StudentProtocol(**values).check_student()
    except ValueError as error:
        raise utils.UserError(str(error)) from None
    return values


def eval_option_values(args: argparse.Namespace, given_only: bool = False) -> dict:
    """``{'tta_mode', 'deterministic', 'stacked_eval', 'label_loss'}`` for ``evaluation.EvalProtocol`` /
    ``RunOptions``; with ``given_only``, only the flags given (``None`` defaults are left out;
    ``stacked_eval`` is always there; ``label_loss`` is left out whenever it is not given, so the
    method's or the saved protocol's applies).

    The student flags given (:func:`student_option_values`) come as protocol fields with
    ``given_only`` (``evaluate.py``: ``dataclasses.replace(protocol, **values)``), and otherwise as one
    entry ``eval_student`` (``distill.py``: ``RunOptions.eval_student``, laid over the method's defaults).

    Raises:
        utils.UserError: unknown ``--tta_mode`` or ``--label_loss``; a student flag out of range.
    """
    if args.tta and args.tta_mode not in evaluation.TTA_MODES:
        raise utils.UserError(f"--tta_mode {args.tta_mode!r}: expected one of {', '.join(evaluation.TTA_MODES)}")
    label_loss = getattr(args, "label_loss", None)
    if label_loss is not None and label_loss not in evaluation.LABEL_LOSSES:
        raise utils.UserError(f"--label_loss {label_loss!r}: expected one of {', '.join(evaluation.LABEL_LOSSES)}")
    values = {} if label_loss is None else {"label_loss": label_loss}
    if not given_only or args.tta is not None:
        values["tta_mode"] = args.tta_mode if args.tta else ""
    if not given_only or args.deterministic is not None:
        values["deterministic"] = bool(args.deterministic)
    values["stacked_eval"] = getattr(args, "stacked_eval", "auto")
    student = student_option_values(args)
    if given_only:
        values.update(student)
    else:
        values["eval_student"] = student
    return values
