"""Command-line flags of privileged feature labels (DRUPI, ``--feature_labels``) and of the
evaluation options of its ``DCmain3.0.py`` (``--tta --tta_mode``; and ``--deterministic``), shared by
``distill.py`` and ``evaluate.py``.

Flag names and defaults are those of turturturturtur/DRUPI ``DC/main.py``; the reference spells several
with dashes (``--feat-opt``), which are accepted as aliases.
"""
from __future__ import annotations

import argparse
from typing import Optional

import evaluation
import utils

# Methods whose reference DRUPI code defaults --feat_lbd to 0.02 (DATM_FD/distill/DATM_ours.py).
FEAT_LBD_002 = ("MTT", "DATM", "PAD")


def _optional_int(value: str) -> Optional[int]:
    """``None`` for none/None, else an int (``--layer_idx``)."""
    return None if value.strip().lower() == "none" else int(value)


def _optional_str(value: str) -> Optional[str]:
    """``None`` for none/None, else the lower-cased string (``--pooling``)."""
    return None if value.strip().lower() == "none" else value.strip().lower()


def add_feature_label_args(parser: argparse.ArgumentParser) -> None:
    """``--feature_labels`` and its settings (distill.py)."""
    group = parser.add_argument_group("privileged feature labels (DRUPI)")
    group.add_argument("--feature_labels", action=argparse.BooleanOptionalAction, default=False,
                       help="learn a feature label F per image (or class) beside the images; networks trained on the "
                            "set minimise CE + lbd * D(E(x), F)")
    group.add_argument("--lbd", type=float, default=0.01, help="lambda of D(E(x), F) in network training (0.01)")
    group.add_argument("--lr_feat", "--lr-feat", dest="lr_feat", type=float, default=0.1,
                       help="learning rate of F (0.1)")
    group.add_argument("--feat_opt", "--feat-opt", dest="feat_opt", default="SGD",
                       help="optimiser of F: SGD (momentum 0.5) or anything else for Adam (SGD)")
    group.add_argument("--layer_idx", "--layer-idx", dest="layer_idx", type=_optional_int, default=None,
                       help="feature tap: omitted/none = last feature map, k = after ConvNet block k's pool")
    group.add_argument("--pooling", type=_optional_str, default=None,
                       help="avg, max or sum: pool E(x) and F to 1x1 (default none)")
    group.add_argument("--feat_lbd", "--feat-lbd", dest="feat_lbd", type=float, default=None,
                       help="weight of CE(h(F), y) in the feature step (0; MTT/DATM/PAD 0.02)")
    group.add_argument("--n_feat", "--n-feat", dest="n_feat", type=int, default=1,
                       help="number of sets of feature labels (1)")
    group.add_argument("--use_feature", "--use-feature", dest="use_feature", default="mean",
                       help="with --n_feat > 1: mean (average the sets) or random (one set per batch)")
    group.add_argument("--feat_metric", "--feat-metric", dest="feat_metric", type=str.lower, default="mse",
                       help="D: mse, cos (1 - cosine) or mmd (Gaussian kernel)")
    group.add_argument("--feat_norm", "--feat-norm", dest="feat_norm", action=argparse.BooleanOptionalAction,
                       default=False, help="L2-normalise E(x) and F along the channel axis")
    group.add_argument("--feat_per", default="image", help="image (one F per synthetic image) or class (one per class)")
    group.add_argument("--feat_init", default="pretrained",
                       help="pretrained (E(S) under a network trained one epoch on the real set, as the reference), "
                            "random (a fresh network) or noise (N(0, 1))")


def feature_label_config(args: argparse.Namespace):
    """The ``FeatureLabelConfig`` of the flags, or ``None`` without ``--feature_labels``.

    Raises:
        utils.UserError: a value out of range (the message names the flag).
    """
    if not args.feature_labels:
        return None
    from methods.addons.feature_labels import FeatureLabelConfig

    feat_lbd = args.feat_lbd if args.feat_lbd is not None else (0.02 if args.method in FEAT_LBD_002 else 0.0)
    try:
        return FeatureLabelConfig(lbd=args.lbd, lr_feat=args.lr_feat, feat_opt=args.feat_opt, layer_idx=args.layer_idx,
                                  pooling=args.pooling, feat_lbd=feat_lbd, n_feat=args.n_feat,
                                  use_feature=args.use_feature, feat_metric=args.feat_metric, feat_norm=args.feat_norm,
                                  feat_per=args.feat_per, feat_init=args.feat_init)
    except ValueError as error:
        raise utils.UserError(str(error)) from None


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
