#!/usr/bin/env python3
"""Train original models (networks on the whole real training set) for CLoM and for assessments:
``python train_original.py --dataset ... --model ... --num N``.

Flags and defaults are those of yaolu-zjut/DDInterpreter ``train_original_models.py``:
SGD lr 0.01, momentum 0.9, weight decay 0.005, batch 256, 150 epochs, lr x0.1 at epochs 50 and 100
(``MultiStepLR``), no augmentation. Model ``i`` goes to
``{save_path}/{dataset}/original/{model}/index_{i}/`` (``checkpoint.pt`` every ``--save_every``
epochs and at the end, plus ``{dataset}_{model}_original_epoch{E}.pth``); ``summary.json`` and
``log.txt`` sit beside the index folders. The same command run again skips finished models and
continues an unfinished one. At the end a table gives each model's test accuracy, parameter count
and FLOPs per image (2 x multiply-adds of conv/linear layers, ``torch.utils.flop_counter``).

Examples:
    python train_original.py --dataset CIFAR10 --model ConvNet --num 10
    python train_original.py --dataset FashionMNIST --model ConvNet --num 2 --epochs 1 --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys

import cli
import distributed
from pretrained import originals
import utils


def build_parser() -> argparse.ArgumentParser:
    """The ``train_original.py`` flags (reference names and defaults, DDInterpreter)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ConvNet", help="network to train (networks.py names)")
    parser.add_argument("--num", type=int, default=1, help="number of models (indices 0 .. num-1)")
    parser.add_argument("--epochs", type=int, default=150, help="training epochs per model")
    parser.add_argument("--batch_size", type=int, default=256, help="images per SGD step")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight_decay", type=float, default=0.005, help="SGD weight decay")
    parser.add_argument("--lr_decay_step", default="50,100",
                        help="MultiStepLR milestones: lr x0.1 once that many epochs are done (none: constant lr)")
    parser.add_argument("--save_every", type=int, default=1,
                        help="write the resumable checkpoint every N epochs (and after the last; 0: only then)")
    parser.add_argument("--save_path", default=originals.DEFAULT_SAVE_PATH, help="root of the saved models")
    parser.add_argument("--random_seed", type=int, dest="seed", default=argparse.SUPPRESS,
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


def resolve(args: argparse.Namespace) -> originals.OriginalConfig:
    """The validated configuration of the parsed flags.

    Raises:
        utils.UserError: a value is invalid (the message names the flag).
    """
    if args.num < 1:
        raise utils.UserError(f"--num must be at least 1, got {args.num}")
    if args.save_every < 0:
        raise utils.UserError(f"--save_every must be >= 0, got {args.save_every}")
    cfg = originals.OriginalConfig(
        dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, lr_decay_step=originals.parse_milestones(
            args.lr_decay_step), zca=args.zca, subset=args.subset, res=args.res, seed=args.seed)
    cfg.validate()
    return cfg


def main(argv=None) -> int:
    """Parse, refuse a mismatching folder early, load the data, train what is missing, report."""
    args = build_parser().parse_args(argv)
    with cli.user_errors():
        cfg = resolve(args)
        directory = originals.original_dir(args.save_path, cfg.dataset, cfg.model, cfg.subset)
        cli.check_writable(directory, "--save_path", directory=True, given=args.save_path)
        originals.check_existing(args.save_path, cfg, args.num)
        cli.setup_logging(os.path.join(directory, "log.txt"))
        device = cli.setup_runtime(args)
        amp = cli.setup_precision(args, device)
        cli.quiet_other_ranks()  # torchrun: rank 0 prints the table
        utils.seed_everything(args.seed)
        record = cli.load_record(args, device)
        try:
            done = originals.train_originals(cfg, record, args.save_path, args.num, device=device,
                                             save_every=args.save_every, precision=amp, data_parallel=args.ddp)
        except KeyboardInterrupt as stop:
            cli.fail(f"{cli.stop_word(stop)}; finished models and the last checkpoint are kept in {directory}; run "
                     "the same command again to continue", cli.EXIT_STOPPED)
        except FloatingPointError as error:
            cli.fail(f"{error}; finished models in {directory} are kept", cli.EXIT_NUMERIC)
    status = {result.index: result.status for result in done.results}
    print(f"{len(done.results)} original {cfg.model} model(s) of {record.name} in {directory} on {device} "
          f"(image {record.channel}x{record.im_size[0]}x{record.im_size[1]}, {record.num_classes} classes):")
    print(originals.format_table(done.summary, status))
    print(f"summary: {done.summary_path}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
