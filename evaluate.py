#!/usr/bin/env python3
"""Evaluate saved synthetic sets (ours, or a reference repository's ``res_*.pt`` / ``images_*.pt``),
or ipc random real images per class (``--baseline random``), by training fresh networks on them and
testing on the real test set. Each set is trained with the protocol saved with it (the one
``distill.py`` evaluated it with) unless flags say otherwise; ipc random real images per class are
trained the same way beside it. The network a set was distilled with and its ipc come from its
record (``sets.saved``; ``--model`` overrides the network). Prints one table (rows: sets, columns: networks); ``--out
FILE.json`` writes ``{model: {"mean", "std", "accs", "protocol"}}`` of the first row (accuracies in
[0, 1]) and the whole comparison, with the table as ``FILE.csv`` beside it.

Examples:
    python evaluate.py --dataset FashionMNIST --syn_path result/DM_FashionMNIST_ConvNet_10ipc
    python evaluate.py --dataset FashionMNIST --baseline random --ipc 10 --dsa_strategy color_crop_cutout_flip_scale_rotate

``--assess`` trains nothing: it prints the set's accuracy and loss on original models
(``train_original.py``) and its distances to real data (``sets/assess.py``), written to ``--out``
or ``{syn_path stem}_assess.json``.
"""
from __future__ import annotations

import sys

import cli
import distributed
import utils
from cli import evaluate_flags as flags
from cli.evaluate_outputs import check_out
from cli.stage import open_stage
from sets import comparison, files


def main(argv=None) -> int:
    """Parse, load the test set and the sets, evaluate them and their random baselines, print and
    write the table. Returns the exit code."""
    args = flags.build_parser(__doc__).parse_args(argv)
    with cli.user_errors():
        flags.check_args(args)
        if args.out:
            cli.check_writable(args.out, "--out")
        paths = files.expand_syn_paths(args.syn_path or [])
        check_out(args, paths)  # --out names the JSON; neither it nor its CSV is an input
        if args.assess and len(paths) != 1:
            raise utils.UserError(f"--assess takes one synthetic set (--syn_path), got {len(paths)}")
        args = flags.adopt_recorded_data_flags(args, paths)  # --zca / --norm_stats as the sets record them
        stage = open_stage(args, quiet=True)  # torchrun: rank 0 prints the table and writes --out
        device, amp = stage.device, stage.precision
        record = cli.load_record(args)
        print(f"{record.name}: {len(record.labels_train)} training / {len(record.labels_test)} test images "
              f"from {record.source or args.data_path}")
        loaded = [flags.load_set(path, args, record) for path in paths]  # (SavedSet, experiments, protocol)
        if args.assess:
            return flags.run_assess(args, record, loaded[0], device)
        plan = flags.plan_evaluation(args, record, loaded)
        rows = flags.evaluate_rows(args, record, plan, loaded, device, amp)
        print()
        print(comparison.format_table(rows, plan.models))
        scores = comparison.format_scores(rows, plan.models, flags.score_settings(args))
        if scores:
            print()
            print(scores)
        flags.write_out(args, plan, rows, amp)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
