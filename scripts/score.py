#!/usr/bin/env python3
"""Per-image difficulty scores for PAD's data schedule: ``python scripts/score.py --dataset ... --method EL2N``.

Trains ``--num_models`` fresh networks for ``--epochs`` epochs (0 = score at initialisation),
scores every training image with each (EL2N, GraNd on the last layer, least-confidence
uncertainty; see ``scores.sample_scores``), averages, and writes for each method
``{buffer_path}/scores/{dataset}_{method}.pt`` holding the raw scores and each class's training
indices sorted easiest (lowest score) first. ``buffer.py --sort_method {method}`` reads it.

Example:
    python scripts/score.py --dataset CIFAR10 --zca --method EL2N GraNd --num_models 3 --epochs 10
"""
from __future__ import annotations

import argparse
import sys

import torch

import cli
from pretrained import buffers, experts, scores
import utils


def build_parser() -> argparse.ArgumentParser:
    """The ``score.py`` flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", default=["all"],
                        help=f"{', '.join(scores.SCORE_METHODS)} or all (default all)")
    parser.add_argument("--model", default="ConvNet", help="scoring network (networks.py names)")
    parser.add_argument("--num_models", type=int, default=3, help="networks the scores are averaged over")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs before scoring (0: at initialisation)")
    parser.add_argument("--lr_net", type=float, default=0.01, help="SGD learning rate")
    parser.add_argument("--mom", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--l2", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--batch_train", type=int, default=256, help="images per SGD step")
    parser.add_argument("--dsa", action=cli.TrueFalseFlag, default=True, help="DiffAugment while training (default True)")
    parser.add_argument("--dsa_strategy", default="color_crop_cutout_flip_scale_rotate", help="DiffAugment ops joined by _")
    parser.add_argument("--buffer_path", default="./buffers", help="scores go to {buffer_path}/scores/")
    cli.add_data_args(parser, cifar100_stats_default="cifar10")
    cli.add_runtime_args(parser)
    return parser


def main(argv=None) -> int:
    """Parse, load the data, train and score, write one file per method."""
    args = build_parser().parse_args(argv)
    with cli.user_errors():
        cli.setup_logging()
        names = list(scores.SCORE_METHODS) if [m.lower() for m in args.method] == ["all"] else list(
            dict.fromkeys(scores.score_method_name(m) for m in args.method))
        if args.epochs < 0:
            raise utils.UserError(f"--epochs must be >= 0, got {args.epochs}")
        cfg = experts.ExpertConfig(dataset=args.dataset, model=args.model, zca=args.zca, subset=args.subset,
                                        res=args.res, train_epochs=args.epochs, lr_teacher=args.lr_net,
                                        batch_train=args.batch_train, mom=args.mom, l2=args.l2, dsa=args.dsa,
                                        dsa_strategy=args.dsa_strategy, seed=args.seed)
        cli.check_writable(scores.score_path(args.buffer_path, args.dataset, names[0], args.subset), "--buffer_path",
                           given=args.buffer_path)
        device = cli.setup_runtime(args)
        utils.seed_everything(args.seed)
        record = cli.load_record(args, device, cifar100_stats_default="cifar10")
        computed = scores.score_dataset(record, cfg, args.num_models, device)
        meta = {"dataset": record.name, "zca": args.zca, "model": args.model, "epochs": args.epochs,
                "num_models": args.num_models, "lr_net": args.lr_net, "mom": args.mom, "l2": args.l2,
                "dsa_strategy": args.dsa_strategy if args.dsa else None, "seed": args.seed,
                "definition": "", "torch_version": str(torch.__version__),
                "toolkit_version": buffers.toolkit_version()}
        for name in names:
            path = scores.score_path(args.buffer_path, args.dataset, name, args.subset)
            meta["definition"] = scores.SCORE_METHODS[name]
            scores.save_scores(path, name, computed[name], record.labels_train, record.num_classes, meta)
            values = computed[name]
            print(f"{name:<12} mean {values.mean():.4f}, min {values.min():.4f}, max {values.max():.4f} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
