#!/usr/bin/env python3
"""Evaluate saved synthetic sets (ours, or a reference repository's ``res_*.pt`` / ``images_*.pt``),
or ipc random real images per class (``--baseline random``), by training fresh networks on them and
testing on the real test set. Each set is trained with the protocol saved with it (the one
``distill.py`` evaluated it with) unless flags say otherwise; ipc random real images per class are
trained the same way beside it. Prints one table (rows: sets, columns: networks); ``--out
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

import os
import sys

import cli
import distributed
import tables
import utils
from cli import evaluate_flags as flags
from sets import comparison, files


def main(argv=None) -> int:
    """Parse, load the test set and the sets, evaluate them and their random baselines, print and
    write the table. Returns the exit code."""
    args = flags.build_parser(__doc__).parse_args(argv)
    with cli.user_errors():
        cli.setup_logging(quiet=True)
        flags.check_args(args)
        if args.out:
            cli.check_writable(args.out, "--out")
        models = flags.resolve_models(args)
        paths = files.expand_syn_paths(args.syn_path or [])
        if args.assess and len(paths) != 1:
            raise utils.UserError(f"--assess takes one synthetic set (--syn_path), got {len(paths)}")
        device = cli.setup_runtime(args)
        amp = cli.setup_precision(args, device)
        cli.quiet_other_ranks()  # torchrun: rank 0 prints the table and writes --out
        record = cli.load_record(args)
        print(f"{record.name}: {len(record.labels_train)} training / {len(record.labels_test)} test images "
              f"from {record.source or args.data_path}")
        if args.assess:
            if not distributed.is_main():  # trains nothing: rank 0 alone assesses and writes
                return 0
            args.syn_path = paths[0]
            return flags.run_assess(args, record, flags.load_set(paths[0], args, record)[1], device)
        loaded = [(path, *flags.load_set(path, args, record)) for path in paths]
        protocols = {protocol for _, _, _, protocol in loaded} or {flags.baseline_protocol(args)}
        if len(protocols) > 1:
            raise utils.UserError("--syn_path: the sets were evaluated with different protocols "
                                  f"({'; '.join(sorted(str(p) for p in protocols))}); pass --epoch_eval_train, "
                                  "--batch_train and --dsa_strategy to evaluate every row under one protocol")
        protocol = next(iter(protocols))
        ipcs = sorted({max(1, e[0].images.shape[0] // record.num_classes) for _, _, e, _ in loaded}
                      | ({args.ipc} if args.baseline else set()))
        for ipc in ipcs:
            if ipc > int(record.labels_train.bincount().min()) and (args.baseline or args.random_baseline):
                raise utils.UserError(f"--ipc {ipc} exceeds the smallest class of {args.dataset}")
        test_images, test_labels = record.images_test.to(device), record.labels_test.to(device)

        def report(model_eval, accs, cfg, what, seconds):
            print(f"{model_eval:<16} {tables.format_acc(accs)} %  ({len(accs)} networks, {cfg.epochs} epochs, "
                  f"{cfg.describe()['augmentation']}; {what}; {seconds:.1f} s)")

        rows = []
        for path, blob, experiments, set_protocol in loaded:
            method, ipc = files.set_method(blob, path), max(1, experiments[0].images.shape[0] // record.num_classes)
            row = comparison.Row(name=f"{method} ipc {ipc} ({os.path.basename(path)})", kind="synthetic", ipc=ipc,
                                 method=method, dataset=args.dataset, path=path)
            lbd = next((e.term.cfg.lbd for e in experiments if e.term is not None), None)
            what = os.path.basename(path) + (f"; feature labels, lbd {lbd:g}" if lbd is not None else "")
            protocols = flags.set_protocols(blob, experiments, args, path)
            if "shared" in protocols:
                try:
                    rows.append(comparison.evaluate_set_row(
                        row, experiments, models, set_protocol, args.model, test_images, test_labels, record.num_classes,
                        num_eval=args.num_eval, device=device, seed=args.seed, precision=amp,
                        report=lambda model_eval, accs, cfg, _, seconds: report(model_eval, accs, cfg, what, seconds)))
                except ValueError as error:
                    raise utils.UserError(f"{path}: {error} (--lbd 0 evaluates without feature labels)") from None
            if "schedule" in protocols:  # DD's own protocol: fresh networks trained by the learned steps
                scheduled = comparison.Row(name=f"{method} ipc {ipc}, learned schedule ({os.path.basename(path)})",
                                           kind="schedule", ipc=ipc, method=method, dataset=args.dataset, path=path)
                rows.append(comparison.evaluate_schedule_row(
                    scheduled, experiments, models, test_images, test_labels, record.num_classes,
                    num_eval=args.num_eval, device=device, seed=args.seed,
                    report=lambda model_eval, accs, described, _, seconds: print(
                        f"{model_eval:<16} {tables.format_acc(accs)} %  ({len(accs)} networks, {described['steps']} "
                        f"learned steps; {os.path.basename(path)}; {seconds:.1f} s)")))
            if lbd is not None:
                for result in row.results.values():
                    result["protocol"]["feature_labels_lbd"] = lbd
        if args.baseline or args.random_baseline:
            rows += [comparison.random_real_row(record, ipc, models, protocol, args.model, test_images, test_labels,
                                                num_eval=args.num_eval, device=device, seed=args.seed, report=report,
                                                precision=amp)
                     for ipc in ipcs]
        whole = comparison.whole_dataset_row(args.original_path, args.dataset, models, args.subset)
        rows += [whole] if whole is not None else []
        print()
        print(comparison.format_table(rows, models))
        if args.out and distributed.is_main():
            # Per-model keys of the first row, as before (scripts read them), plus the whole table.
            report_first = {model: result for model, result in rows[0].results.items()}
            record_protocol = {"num_eval": args.num_eval, "seed": args.seed, "dataset": args.dataset,
                               "amp": amp.describe(),
                               "evaluation": {m: rows[0].results[m]["protocol"] for m in rows[0].results},
                               "protocol": protocol.as_dict()}
            json_path, csv_path = cli.write_or_rescue(
                lambda path: comparison.write_table(path, rows, models, record_protocol, extra=report_first),
                args.out, "--out")
            print(f"wrote {json_path} and {csv_path}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
