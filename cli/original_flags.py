"""The ``train_original.py`` command line: its flags (yaolu-zjut/DDInterpreter
``train_original_models.py`` names and defaults), resolved once into a frozen :class:`OriginalJob`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import cli
from pretrained import original_files
from pretrained import originals


@dataclass(frozen=True)
class OriginalJob:
    """A resolved ``train_original.py`` command.

    Attributes:
        original: how each model trains (``pretrained.originals.OriginalConfig``).
        save_path: ``--save_path``, the root of the saved models.
        directory: ``{save_path}/{dataset}/original/{model}``, where the models go.
        num: models wanted, indices ``0 .. num - 1`` (``--num``).
        save_every: the resumable checkpoint every so many epochs (``--save_every``; 0: at the end).
        save_epochs: epochs whose weights are kept in ``index_{i}/epoch_{E}.pt`` (``--save_epochs``;
            ``None``, ``'all'`` or a tuple, ``pretrained.originals.parse_save_epochs``).
        ddp: all ranks train each model together (``--ddp``).
    """

    original: originals.OriginalConfig
    save_path: str
    directory: str
    num: int
    save_every: int
    ddp: bool
    save_epochs: originals.SaveEpochs = None


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The ``train_original.py`` flags (reference names and defaults, DDInterpreter)."""
    parser = cli.OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ConvNet", help="network to train (networks.py names)")
    parser.add_argument("--num", type=cli.positive_int, default=1, help="number of models (indices 0 .. num-1)")
    parser.add_argument("--epochs", type=cli.positive_int, default=150, help="training epochs per model")
    parser.add_argument("--batch_size", type=cli.positive_int, default=256, help="images per SGD step")
    parser.add_argument("--lr", type=cli.positive_float, default=0.01, help="SGD learning rate")
    parser.add_argument("--momentum", type=cli.non_negative_float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight_decay", type=cli.non_negative_float, default=0.005, help="SGD weight decay")
    parser.add_argument("--lr_decay_step", default="50,100",
                        help="MultiStepLR milestones: lr x0.1 once that many epochs are done (none: constant lr)")
    parser.add_argument("--save_every", type=cli.non_negative_int, default=1,
                        help="write the resumable checkpoint every N epochs (and after the last; 0: only then)")
    parser.add_argument("--save_epochs", default=None,
                        help="also keep the weights after these epochs in index_{i}/epoch_{E}.pt, e.g. 5,10 or "
                             "all (default: none), so an early-stopped model can be a teacher (--teacher_epoch)")
    parser.add_argument("--save_path", default=original_files.DEFAULT_SAVE_PATH, help="root of the saved models")
    parser.add_argument("--random_seed", type=cli.seed_int, dest="seed", default=argparse.SUPPRESS,
                        help="the reference's name for --seed")
    parser.add_argument("--ddp", action="store_true",
                        help="torchrun: all ranks train each model together (DistributedDataParallel); "
                             "default: the --num models are spread over the ranks")
    parser.add_argument("--normalize_data", action="store_true",
                        help="accepted for reference commands; images are always normalised (as in the reference)")
    cli.add_data_args(parser)
    cli.add_runtime_args(parser)
    cli.add_amp_arg(parser)
    return parser


def resolve(args: argparse.Namespace) -> OriginalJob:
    """The validated configuration of the parsed flags, and where the models go.

    Raises:
        utils.UserError: a value is invalid (the message names the flag).
    """
    cfg = originals.OriginalConfig(
        dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, lr_decay_step=originals.parse_milestones(
            args.lr_decay_step), zca=args.zca, subset=args.subset, res=args.res, seed=args.seed)
    cfg.validate()
    save_epochs = originals.parse_save_epochs(args.save_epochs)
    return OriginalJob(original=cfg, save_path=args.save_path, num=args.num, save_every=args.save_every, ddp=args.ddp,
                       save_epochs=save_epochs,
                       directory=original_files.original_dir(args.save_path, cfg.dataset, cfg.model, cfg.subset))
