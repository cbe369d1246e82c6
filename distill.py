#!/usr/bin/env python3
"""Learn a synthetic training set: ``python distill.py --method DC|DSA|DM|... --dataset ... --ipc ...``.

Flags and defaults follow the reference scripts (``main.py`` for DC/DSA and ``main_DM.py`` for DM
of VICO-UoE/DatasetCondensation, and each later method's ``distill.py``): a flag left out takes
the default of the chosen method's script. ``--config FILE.yaml`` supplies flag values first
(``configs/``); flags on the command line override it. Every flag: docs/flags.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

import cli
import distributed
import methods
import tables
import utils
from cli import distill_flags
from cli.stage import open_stage, stop_requests
from methods.runner import RunInterrupted, claim_run_dir, eval_protocol, run_distillation


def main(argv=None) -> int:
    """Parse, load the dataset, run the distillation, print the accuracy table. Returns the exit code.

    The run directory is this process's from before its ``log.txt`` is opened to the end
    (``methods.runner.claim_run_dir``: a directory of other files, or one another process is using,
    is refused in one line)."""
    with cli.user_errors(), contextlib.ExitStack() as owned:
        args = distill_flags.parse_args(argv, description=__doc__)
        cfg, opts = distill_flags.resolve(args)
        method_class = methods.get_method_class(cfg.method)  # SRe2L, CDA, RDED, --labels soft|teacher: a teacher
        method_class.check_teacher(cfg, eval_protocol(method_class, cfg, opts).labels)  # before any data is loaded
        method_class.check_files(cfg)  # NCFM: its pool of train_original.py models
        opts = dataclasses.replace(opts, command=cli.command_line(argv))
        flag, given = ("--run_dir", args.run_dir) if args.run_dir else ("--save_path", args.save_path)

        def claim() -> None:  # rank 0 owns the run directory (torchrun's other ranks share it)
            if distributed.is_main():
                owned.enter_context(claim_run_dir(opts.run_dir, flag, given))

        stage = open_stage(args, run_dir=opts.run_dir, flag=flag, given=given, check=claim)
        device, opts = stage.device, dataclasses.replace(opts, precision=stage.precision)
        data_args = argparse.Namespace(**{**vars(args), "zca": cfg.zca})  # --zca as resolved (per-dataset defaults)
        record = cli.load_record(data_args, cifar100_stats_default=method_class.cifar100_stats,
                                 norm_stats_default=method_class.norm_stats)
        if cfg.ipc > int(record.labels_train.bincount().min()):
            raise utils.UserError(f"--ipc {cfg.ipc} exceeds the smallest class of {args.dataset}")
        with stop_requests() as stop:
            try:
                outcome = run_distillation(cfg, opts, record, device, stop=stop)
            except RunInterrupted as error:
                cli.fail(f"{error}; re-run the same command with --resume to continue", cli.EXIT_STOPPED)
            except FloatingPointError as error:
                cli.fail(str(error), cli.EXIT_NUMERIC)  # names where the values are and what is kept on disk
    print(f"\n{cfg.method} {cfg.dataset} ipc {cfg.ipc} ({cfg.iterations} iterations, "
          f"{outcome.seconds_per_iteration:.3f} s/iteration on {device}, {opts.precision.describe()})")
    for model, accs in outcome.accs_all_exps.items():
        if accs:
            print(f"  {model:<16} {tables.format_acc(accs)} %  over {len(accs)} networks")
    print(f"  result file: {outcome.result_path}")
    best = [entry for entry in outcome.best if entry is not None]
    if outcome.best_path and best:  # the best-so-far sets, and what they were chosen on
        accuracies = ", ".join(f"{100 * entry['accuracy']:.2f}" for entry in best)
        iterations = ", ".join(str(entry["iteration"]) for entry in best)
        print(f"  best-so-far: {outcome.best_path} (chosen on {best[0]['selected_on']}, mean over "
              f"{len(best[0]['models'])} evaluation model(s); test accuracy {accuracies} % at iteration(s) {iterations})")
    if outcome.vis_paths:
        print(f"  picture:     {outcome.vis_paths[-1]}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
