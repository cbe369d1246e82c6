"""The evaluation options shared by ``distill.py`` and ``evaluate.py``: ``--tta --tta_mode`` (DRUPI
``DCmain3.0.py``), ``--deterministic``, ``--stacked_eval`` and ``--label_loss``, turned into the
fields of ``evaluation.EvalProtocol`` / ``methods.run_config.RunOptions``."""
from __future__ import annotations

import argparse

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
                            "(square loss on one-hot - 1/K, or on a set's learned real-valued labels); default: "
                            + ("the protocol saved with the set" if saved_default else
                               "the method's (KIP mse, every other cross_entropy)"))


def eval_option_values(args: argparse.Namespace, given_only: bool = False) -> dict:
    """``{'tta_mode', 'deterministic', 'stacked_eval', 'label_loss'}`` for ``evaluation.EvalProtocol`` /
    ``RunOptions``; with ``given_only``, only the flags given (``None`` defaults are left out;
    ``stacked_eval`` is always there; ``label_loss`` is left out whenever it is not given, so the
    method's or the saved protocol's applies).

    Raises:
        utils.UserError: unknown ``--tta_mode`` or ``--label_loss``.
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
    return values
