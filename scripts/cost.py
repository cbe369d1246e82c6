#!/usr/bin/env python3
"""Print the cost of networks and synthetic sets: parameters and FLOPs per image of any network at
any dataset's image size (``torch.utils.flop_counter``), the storage of saved synthetic sets, and
the distillation cost recorded in a run's ``results.json``.

Examples:
    python scripts/cost.py --model ConvNet --dataset FashionMNIST
    python scripts/cost.py --eval_mode M --dataset CIFAR10
    python scripts/cost.py --dataset FashionMNIST --run_dir result/DM_FashionMNIST_ConvNet_10ipc
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import cli
import data
import storage as storage_module  # "storage" names a run's storage record below
from sets import resources
import utils


def build_parser() -> argparse.ArgumentParser:
    """The ``cost.py`` flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="CIFAR10", help=f"one of {', '.join(data.DATASET_SHAPES)} "
                        "or an ImageNet subset (image size and classes; no data is loaded)")
    parser.add_argument("--res", type=int, default=None, help="image side for ImageNet subsets / MHIST")
    parser.add_argument("--model", default="ConvNet", help="network name")
    parser.add_argument("--models", nargs="+", default=None, help="several networks (overrides --model)")
    parser.add_argument("--eval_mode", default=None, help="a get_eval_pool mode (M, B, W, D, A, P, N) instead of --model")
    parser.add_argument("--run_dir", nargs="*", default=[], help="distill.py run directories: print their cost record")
    parser.add_argument("--out", default=None, help="write everything as JSON here (never a file of a --run_dir)")
    return parser


def format_bytes(count: float) -> str:
    """``count`` bytes in B / KiB / MiB / GiB (binary prefixes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def run_costs(run_dirs) -> list:
    """The ``cost`` records of ``results.json`` in each run directory.

    Raises:
        utils.UserError: a directory has no ``results.json`` or it has no ``cost`` record.
    """
    rows = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "results.json")
        if not os.path.isfile(path):
            raise utils.UserError(f"--run_dir {run_dir}: no results.json (a finished distill.py run writes it)")
        with open(path) as handle:
            results = json.load(handle)
        if "cost" not in results:
            raise utils.UserError(f"--run_dir {run_dir}: results.json has no cost record (written by an older version)")
        rows.append({"run_dir": run_dir, "method": results["method"], "ipc": results["ipc"], **results["cost"]})
    return rows


def main(argv=None) -> int:
    """Parse, count, print; returns the exit code."""
    args = build_parser().parse_args(argv)
    with cli.user_errors():
        if args.out:
            inputs = [os.path.join(run_dir, name) for run_dir in args.run_dir if os.path.isdir(run_dir)
                      for name in os.listdir(run_dir)]
            cli.refuse_inputs_as_outputs("--out", args.out, [args.out], inputs)
        try:
            channel, im_size, classes = data.dataset_shape(args.dataset, args.res)
        except ValueError as error:
            raise utils.UserError(str(error)) from None
        models = args.models or (cli.resolve_eval_models(args.eval_mode, args.model) if args.eval_mode else [args.model])
        cli.check_models(models, "--models" if args.models else "--model")
        networks_cost = []
        print(f"{args.dataset}: {channel} x {im_size[0]} x {im_size[1]} images, {classes} classes")
        print(f"{'model':<16} {'params':>12} {'MFLOPs/img':>11} {'MMACs/img':>10}")
        for model in models:
            try:
                row = resources.network_cost(model, channel, im_size, classes)
            except ValueError as error:
                raise utils.UserError(f"{model} at {im_size}: {error}") from None
            networks_cost.append(row)
            print(f"{model:<16} {row['params']:>12,} {row['flops_per_image'] / 1e6:>11.2f} {row['macs_per_image'] / 1e6:>10.2f}")
        runs = run_costs(args.run_dir)
        for run in runs:
            storage = run["storage_bytes"] or {}
            print(f"\n{run['run_dir']}: {run['method']} ipc {run['ipc']}: {run['distill_seconds']:.1f} s distillation "
                  f"over {run['experiments']} experiment(s), {run['seconds_per_iteration']:.3f} s/iteration, peak "
                  f"memory {format_bytes(run['peak_memory']['bytes'])} ({run['peak_memory']['measure']}), storage "
                  f"{format_bytes(storage.get('total', 0))} per set "
                  f"({', '.join(f'{k} {format_bytes(v)}' for k, v in storage.items() if k != 'total')})")
        if args.out:
            storage_module.write_json(args.out, {"dataset": args.dataset, "channel": channel, "im_size": list(im_size),
                                                 "num_classes": classes, "networks": networks_cost, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
