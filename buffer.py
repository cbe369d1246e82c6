#!/usr/bin/env python3
"""Train expert trajectories for MTT / DATM / PAD: ``python buffer.py --dataset ... --model ...``.

Flags and defaults are those of GeorgeCazenavette/mtt-distillation ``buffer.py``; the GSAM flags
of NUS-HPC-AI-Lab/DATM ``buffer/buffer_FTD.py`` switch on flat-trajectory experts, ``--sort_method``
with the schedule flags of NUS-HPC-AI-Lab/PAD ``buffer/buffer_CL.py`` trains every epoch on a
difficulty-scheduled subset (scores from ``scripts/score.py``).
Experts go to ``{buffer_path}/{dataset}[_NO_ZCA]/{model}/replay_buffer_{n}.pt`` (MTT's format)
with a ``manifest.json``; the same command run again continues after the last saved expert.

Examples:
    python buffer.py --dataset CIFAR10 --model ConvNet --train_epochs 50 --num_experts 100 --zca
    python buffer.py --dataset CIFAR10 --train_epochs 100 --zca --rho_max 0.01 --rho_min 0.01 --alpha 0.3
    python scripts/score.py --dataset CIFAR10 --zca --method GraNd
    python buffer.py --dataset CIFAR10 --zca --train_epochs 100 --sort_method GraNd --init_ratio 0.75 \\
        --add_end_epoch 20 --rm_epoch_first 40 --rm_epoch_second 60 --rm_easy_ratio_second 0.2
"""
from __future__ import annotations

import logging
import sys

import cli
import distributed
import tables
from cli.buffer_flags import build_parser, resolve
from cli.stage import open_stage
from pretrained import buffers, experts, scores

logger = logging.getLogger("buffer")


def main(argv=None) -> int:
    """Parse, refuse a mismatching buffer early, load the data, train the missing experts, report."""
    args = build_parser(__doc__).parse_args(argv)
    with cli.user_errors():
        job = resolve(args)
        stage = open_stage(args, run_dir=job.directory, flag="--buffer_path", given=job.buffer_path, seed=True,
                           check=lambda: buffers.check_buffer_dir(job.directory, job.describe()))
        record = cli.load_record(args, stage.device, cifar100_stats_default="cifar10")
        order, sort_file = None, None
        if job.expert.sort_method:
            sort_file = scores.resolve_sort_file(job.expert.sort_method, job.buffer_path, args.dataset, args.subset)
            order = scores.load_sort_order(sort_file, record.labels_train, record.num_classes)
            logger.info("PAD schedule from %s: %s", sort_file, job.expert.schedule)
        try:
            summary = experts.make_buffer(job.expert, record, job.directory, job.num_experts, device=stage.device,
                                          save_interval=job.save_interval, test_every=job.test_every, order=order,
                                          run_info={"sort_file": sort_file, "ddp": job.ddp,
                                                    "world_size": distributed.world_size()},
                                          precision=stage.precision, data_parallel=job.ddp)
        except KeyboardInterrupt as stop:
            done = buffers.check_buffer_dir(job.directory, job.describe())
            cli.fail(f"{cli.stop_word(stop)}; {done} expert(s) are saved in {job.directory}; run the same command "
                     "again to continue from the next expert", cli.EXIT_STOPPED)
        except FloatingPointError as error:
            cli.fail(f"{error}; the finished experts in {job.directory} are kept", cli.EXIT_NUMERIC)
    print(f"{summary.num_experts} expert(s) in {summary.directory} ({summary.trained} trained now; "
          f"{len(summary.files)} file(s), {summary.bytes_on_disk / 2**20:.1f} MiB)")
    if summary.trained:
        accs = [a for a in summary.final_test_accs if a is not None]
        if accs:
            print(f"  final test accuracy of the new experts: {tables.format_acc(accs)} %")
        print(f"  {summary.seconds_per_epoch:.1f} s per training epoch on {stage.device}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
