"""The CLoM flags of ``distill.py`` (the reference's names, yaolu-zjut/DDInterpreter
``methods/DC_DSA_DM/main.py``) and of ``evaluate.py --assess``, turned into
``methods.addons.clom.CLoMSettings``. Only the command-line layer parses flags; the add-on
receives the resolved settings."""
from __future__ import annotations

import argparse
from typing import Any, List, Optional, Sequence, Tuple, Union

import networks
import utils
from methods.addons.clom import DISTANCES, CLoMSettings
from pretrained import originals


def split_list(values: Union[None, str, float, Sequence[Any]]) -> List[str]:
    """Flag values given space-separated (the reference: ``--alphas 1000 2000``), comma-separated
    (``--alphas 1000,2000``) or both, as one flat list of non-empty strings; a single scalar
    (a YAML preset's ``alphas: 1000``) counts as one value."""
    if isinstance(values, (str, int, float)):
        values = [values]
    out: List[str] = []
    for value in values or []:
        out.extend(part.strip() for part in str(value).split(",") if part.strip())
    return out


def parse_alphas(values: Optional[Sequence[str]], models_pool: Sequence[str]) -> Tuple[float, ...]:
    """``--alphas`` for ``--models_pool``: one value for all architectures or one per architecture.

    Args:
        values: the ``--alphas`` strings (space- and/or comma-separated).
        models_pool: the architectures.

    Returns:
        One float per architecture, in pool order.

    Raises:
        utils.UserError: a value is not a number, is negative or not finite, or the count is
            neither 1 nor ``len(models_pool)``.
    """
    parts = split_list(values)
    try:
        alphas = [float(part) for part in parts]
    except ValueError:
        raise utils.UserError(f"--alphas {' '.join(parts)}: expected numbers such as 1000 or 1000,2000") from None
    if any(not (a >= 0 and a != float("inf")) for a in alphas):
        raise utils.UserError(f"--alphas {' '.join(parts)}: weights must be finite and >= 0")
    if len(alphas) == 1:
        return tuple(alphas * len(models_pool))
    if len(alphas) != len(models_pool):
        raise utils.UserError(f"--alphas has {len(alphas)} values but --models_pool has {len(models_pool)} "
                              f"architectures ({', '.join(models_pool)}); give one weight or one per architecture")
    return tuple(alphas)


def settings_from_flags(alphas: Optional[Sequence[str]], models_pool: Optional[Sequence[str]], *,
                        model: str, model_num: int = 1, distance: str = "ce",
                        source_dataset: Optional[str] = None, epoch: Optional[int] = None,
                        batch_size: Optional[int] = None,
                        pretrained_path: str = originals.DEFAULT_SAVE_PATH) -> Optional[CLoMSettings]:
    """The CLoM settings the flags ask for, or ``None`` when ``--alphas`` is not given (CLoM off).

    Args:
        alphas: ``--alphas`` strings.
        models_pool: ``--models_pool`` strings; default: ``[model]`` (the distillation network).
        model: ``--model``.
        model_num, distance, source_dataset, epoch, batch_size, pretrained_path: the flags of
            the same names (``--CLoM_distance``, ``--CLoM_batch_size``).

    Raises:
        utils.UserError: see :func:`parse_alphas`; an unknown architecture; ``--model_num``,
            ``--epoch`` or ``--CLoM_batch_size`` below 1; an unknown ``--CLoM_distance``; ``cos``
            without ``--CLoM_batch_size``.
    """
    if not split_list(alphas):
        return None
    pool = split_list(models_pool) or [model]
    known = networks.list_networks()
    for name in pool:
        if name not in known:
            raise utils.UserError(f"--models_pool: unknown model {name!r}; choose from: {', '.join(known)}")
    if len(set(pool)) != len(pool):
        raise utils.UserError(f"--models_pool {','.join(pool)}: an architecture is listed twice")
    if model_num < 1:
        raise utils.UserError(f"--model_num must be at least 1, got {model_num}")
    if distance not in DISTANCES:
        raise utils.UserError(f"--CLoM_distance {distance!r}: expected ce or cos")
    if epoch is not None and epoch < 1:
        raise utils.UserError(f"--epoch must be at least 1, got {epoch}")
    if batch_size is not None and batch_size < 1:
        raise utils.UserError(f"--CLoM_batch_size must be at least 1, got {batch_size}")
    if distance == "cos" and batch_size is None:
        raise utils.UserError("--CLoM_distance cos needs --CLoM_batch_size N (real images per step; "
                              "the reference README uses 8196)")
    return CLoMSettings(alphas=parse_alphas(alphas, pool), models_pool=tuple(pool), model_num=int(model_num),
                        distance=distance, source_dataset=source_dataset, epoch=epoch, batch_size=batch_size,
                        pretrained_path=str(pretrained_path))


def add_original_model_args(parser: argparse.ArgumentParser, clom: bool = True) -> None:
    """Flags choosing original models (``train_original.py`` outputs; the reference's names, DDInterpreter ``main.py``).

    With ``clom`` (``distill.py``): the CLoM regulariser flags ``--alphas --models_pool --model_num
    --CLoM_distance --source_dataset --epoch --CLoM_batch_size --pretrained_path`` (and the
    reference's ``--CLoM`` switch, which ``--alphas`` implies). Without (``evaluate.py --assess``):
    ``--models_pool --model_num --epoch --pretrained_path``. ``--alphas`` and ``--models_pool``
    take values space- or comma-separated (``--alphas 1000 2000`` or ``--alphas 1000,2000``).
    The root of the models is ``--pretrained_path`` (``train_original.py --save_path``), because
    ``distill.py --save_path`` names the root of run directories.
    """
    title = "CLoM regulariser (original models' classification loss)" if clom else "original models for --assess"
    group = parser.add_argument_group(title)
    if clom:
        group.add_argument("--CLoM", action="store_true",
                           help="reference switch; CLoM is on exactly when --alphas is given")
        group.add_argument("--alphas", nargs="+", default=None,
                           help="CLoM weight: one for every architecture or one per --models_pool entry (off if absent)")
    group.add_argument("--models_pool", nargs="+", default=None,
                       help="architectures of the original models, e.g. ConvNet or ConvNet,LeNet (default: --model)")
    group.add_argument("--model_num", type=int, default=1 if clom else None,
                       help="original models per architecture, indices 0..N-1 "
                            f"(default {'1' if clom else 'every index_* folder found'})")
    group.add_argument("--epoch", type=int, default=None,
                       help="use models whose checkpoint holds exactly this many trained epochs "
                            "(default: the finished models)")
    group.add_argument("--pretrained_path", default="pretrained_model",
                       help="root of the original models (train_original.py --save_path)")
    if clom:
        group.add_argument("--CLoM_distance", default="ce", choices=["ce", "cos"],
                           help="ce: alpha*CE(model(image_syn), label_syn); cos: the contrastive variant")
        group.add_argument("--source_dataset", default=None,
                           help="dataset the original models were trained on (default: --dataset)")
        group.add_argument("--CLoM_batch_size", type=int, default=None,
                           help="real images per step for --CLoM_distance cos (required there)")


def clom_settings(args: argparse.Namespace) -> Optional[dict]:
    """The CLoM flags as ``DistillConfig.clom`` (a dict), or ``None`` when ``--alphas`` is absent.

    Raises:
        utils.UserError: an invalid CLoM flag, or ``--CLoM`` without ``--alphas``.
    """
    settings = settings_from_flags(args.alphas, args.models_pool, model=args.model, model_num=args.model_num,
                                   distance=args.CLoM_distance, source_dataset=args.source_dataset,
                                   epoch=args.epoch, batch_size=args.CLoM_batch_size,
                                   pretrained_path=args.pretrained_path)
    if settings is None and args.CLoM:
        raise utils.UserError("--CLoM needs --alphas (the weight of the term)")
    return settings.as_dict() if settings is not None else None
