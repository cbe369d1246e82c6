#!/usr/bin/env python3
"""Class-incremental continual learning with synthetic sets as memory (the DM paper's protocol,
``sets/continual.py``; VICO-UoE/DatasetCondensation ``CL_DM.py``).

Example (CPU-sized):
    python scripts/continual.py --dataset FashionMNIST --steps 5 --syn_path result/DM_FashionMNIST_ConvNet_10ipc \\
        --baselines random herding --num_eval 1 --epoch_eval_train 100 --out result/cl/fmnist_cl.json
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import numpy as np

import augment
import cli
import evaluation
import storage
import tables
import utils
from sets import files
from sets.saved import read_saved_set
from sets.continual import NUM_ORDERS, REFERENCE_STRATEGY, MemoryFn, herding_memory, plot_steps, run_continual, step_table


def build_parser() -> argparse.ArgumentParser:
    """The ``continual.py`` flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--syn_path", nargs="*", default=[], help="result files or distill.py run directories")
    parser.add_argument("--exp", type=int, default=0, help="which experiment of each result file")
    parser.add_argument("--baselines", nargs="*", default=["random", "herding"], choices=["random", "herding"],
                        help="selection baselines to add (default: random herding)")
    parser.add_argument("--ipc", type=int, default=None, help="images per class of the baselines (default: the sets')")
    parser.add_argument("--steps", type=int, default=5, help="number of class-incremental steps (5 or 10)")
    parser.add_argument("--model", default="ConvNet", help="network trained at every step (and herding's embedding)")
    parser.add_argument("--num_eval", type=int, default=3, help="networks per order and step (reference 3)")
    parser.add_argument("--epoch_eval_train", type=int, default=1000, help="training epochs (reference 1000)")
    parser.add_argument("--lr_net", type=float, default=0.01, help="SGD learning rate (reference 0.01)")
    parser.add_argument("--batch_train", type=int, default=256, help="training batch size (reference 256)")
    parser.add_argument("--dsa_strategy", default=REFERENCE_STRATEGY,
                        help=f"DiffAugment for every source (reference {REFERENCE_STRATEGY}; 'none' to disable)")
    parser.add_argument("--orders", type=int, default=NUM_ORDERS, help="class orders, seeds 0..N-1 (reference 5)")
    parser.add_argument("--out", default="result/continual/continual.json", help="JSON results; the plot goes beside it (.png); "
                        "neither may be an input (a --syn_path file or a file of its run directory)")
    cli.add_data_args(parser)
    cli.add_runtime_args(parser)
    return parser


def main(argv=None) -> int:
    """Parse, build the memories, run the protocol, print the table, save JSON and the plot."""
    args = build_parser().parse_args(argv)
    with cli.user_errors():
        cli.setup_logging(quiet=True)
        device = cli.setup_runtime(args)
        for flag in ("num_eval", "epoch_eval_train", "orders", "batch_train"):
            if getattr(args, flag) < 1:
                raise utils.UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
        cli.check_models([args.model], "--model")
        from cli.evaluate_outputs import input_files

        cli.refuse_inputs_as_outputs("--out", args.out, [args.out, os.path.splitext(args.out)[0] + ".png"],
                                     input_files(args, files.expand_syn_paths(args.syn_path)))
        try:
            strategy = "_".join(augment.validate_strategy(args.dsa_strategy))
        except ValueError as error:
            raise utils.UserError(str(error)) from None
        from data import sample_random_real

        record = cli.load_record(args)
        if not 1 <= args.steps <= record.num_classes:
            raise utils.UserError(f"--steps {args.steps}: expected 1..{record.num_classes} for {args.dataset}")
        memories: Dict[str, MemoryFn] = {}
        ipcs = []
        for path in files.expand_syn_paths(args.syn_path):
            saved = read_saved_set(path, record, exp=[args.exp], dataset=args.dataset)
            images, labels = saved.experiments[0].images, saved.experiments[0].labels
            if labels.dim() != 1:
                raise utils.UserError(f"--syn_path {path}: soft labels are not supported by the continual protocol")
            name = f"{saved.method} ({os.path.basename(path)})"
            memories[name] = lambda index, images=images, labels=labels: (images, labels)
            ipcs.append(saved.ipc)
        ipc = args.ipc or (ipcs[0] if ipcs else None)
        if args.baselines and ipc is None:
            raise utils.UserError("--baselines need --ipc N when no --syn_path is given")
        if "random" in args.baselines:
            memories[f"random ipc {ipc}"] = lambda index: sample_random_real(record, ipc, utils.make_generator(index))
        if "herding" in args.baselines:
            herding = herding_memory(record, args.model, ipc, args.seed, device)
            memories[f"herding ipc {ipc}"] = lambda index: herding
        if not memories:
            raise utils.UserError("nothing to evaluate: give --syn_path and/or --baselines")
        cfg = evaluation.EvalConfig(epochs=args.epoch_eval_train, lr=args.lr_net, batch_train=args.batch_train,
                               dsa_strategy=strategy)
        outcome = run_continual(memories, record, args.steps, args.model, cfg, num_eval=args.num_eval, device=device,
                                seed=args.seed, num_orders=args.orders)
        table = step_table(outcome["accs"])
        print(f"\n{args.steps}-step class-incremental {args.dataset}, {args.model}, accuracy (%) on seen classes, "
              f"mean ± std over {args.orders} orders x {args.num_eval} networks ({args.epoch_eval_train} epochs, "
              f"{cfg.describe()['augmentation']}):")
        print(tables.format_table([""] + list(table.columns), [[i, *r] for i, r in zip(table.index, table.values.tolist())],
                                 markdown=True))
        plot_path = os.path.splitext(args.out)[0] + ".png"
        plot_steps(outcome["accs"], record.num_classes // args.steps, plot_path,
                   f"{args.dataset}, {args.steps} steps, {args.model}")
        storage.write_json(args.out, {"dataset": args.dataset, "steps": args.steps, "model": args.model, "orders": outcome["orders"],
                       "protocol": {**cfg.describe(), "labels": "hard", "num_eval": args.num_eval,
                                    "reference": "CL_DM.py (VICO-UoE/DatasetCondensation)"},
                       "accs": outcome["accs"],
                       "summary": {name: [{"mean": float(np.mean(a)), "std": float(np.std(a))} for a in per_step]
                                   for name, per_step in outcome["accs"].items()}})
        print(f"wrote {args.out} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
