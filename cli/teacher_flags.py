"""The teacher flags shared by the stages that need a teacher (``distill.py`` for SRe2L, CDA and
RDED; ``evaluate.py`` for the ``soft`` and ``teacher`` label regimes), resolved once into a frozen
``pretrained.teachers.TeacherSpec``.

Every default is ``None`` (no teacher, or in ``evaluate.py`` the recorded one); the help texts give
the values used when a teacher is asked for."""
from __future__ import annotations

import argparse
from typing import Optional

import cli
import utils
from pretrained import original_files
from pretrained.teachers import TeacherSpec


def add_teacher_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--teacher_model``, ``--teacher_dir``, ``--teacher_index``, ``--teacher_epoch``,
    ``--teacher_arch`` and ``--teacher_path`` (one argument group, all defaults ``None``)."""
    group = parser.add_argument_group(
        "teacher", "a trained network whose logits label images; several are averaged. Files are read with "
                   "weights_only (a file that would run code is refused); nothing is downloaded")
    group.add_argument("--teacher_model", default=None,
                       help="train_original.py model(s), comma-separated, e.g. ConvNetBN or ConvNetBN,ResNet18BN")
    group.add_argument("--teacher_dir", default=None,
                       help=f"train_original.py --save_path of those models (default {original_files.DEFAULT_SAVE_PATH})")
    group.add_argument("--teacher_index", default=None,
                       help="index(es) of each --teacher_model, comma-separated (default 0)")
    group.add_argument("--teacher_epoch", type=cli.positive_int, default=None,
                       help="use the weights after this epoch (index_{i}/epoch_{E}.pt, made by train_original.py "
                            "--save_epochs) instead of the finished model")
    group.add_argument("--teacher_arch", default=None,
                       help="architecture of --teacher_path: a torchvision name (resnet18), timm:NAME "
                            "(timm:resnet18) or a networks.py name; one for all files or one per file")
    group.add_argument("--teacher_path", default=None,
                       help="local weight file(s), comma-separated (a state_dict, or a train_original.py "
                            "checkpoint.pt / epoch_{E}.pt, which needs no --teacher_arch)")


def _split(text: Optional[str]) -> tuple:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def teacher_spec(args: argparse.Namespace) -> Optional[TeacherSpec]:
    """The teacher the flags ask for, or ``None`` when neither ``--teacher_model`` nor
    ``--teacher_arch``/``--teacher_path`` is given.

    Raises:
        utils.UserError: ``--teacher_dir``/``--teacher_index``/``--teacher_epoch`` without
            ``--teacher_model``, an index that is not an integer, or an invalid combination
            (:meth:`TeacherSpec.validate`); the message names the flag.
    """
    models = _split(getattr(args, "teacher_model", None))
    archs = _split(getattr(args, "teacher_arch", None))
    paths = _split(getattr(args, "teacher_path", None))
    directory = getattr(args, "teacher_dir", None)
    index_text = getattr(args, "teacher_index", None)
    epoch = getattr(args, "teacher_epoch", None)
    if not (models or archs or paths):
        stray = [flag for flag, value in (("--teacher_dir", directory), ("--teacher_index", index_text),
                                          ("--teacher_epoch", epoch)) if value is not None]
        if stray:
            raise utils.UserError(f"{stray[0]} applies to --teacher_model, which is not given")
        return None
    if not models:
        stray = [flag for flag, value in (("--teacher_dir", directory), ("--teacher_index", index_text),
                                          ("--teacher_epoch", epoch)) if value is not None]
        if stray:
            raise utils.UserError(f"{stray[0]} applies to --teacher_model, not to --teacher_path files "
                                  "(pass the epoch_{E}.pt file itself)")
    try:
        indices = tuple(int(part) for part in _split(index_text)) or (0,)
    except ValueError:
        raise utils.UserError(f"--teacher_index {index_text!r}: expected comma-separated integers such as 0,1") from None
    spec = TeacherSpec(models=models, directory=directory or original_files.DEFAULT_SAVE_PATH, indices=indices,
                       epoch=epoch, archs=archs, paths=paths)
    spec.validate()
    return spec
