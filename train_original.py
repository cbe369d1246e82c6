#!/usr/bin/env python3
"""Train original models (networks on the whole real training set) for CLoM and for assessments:
``python train_original.py --dataset ... --model ... --num N``.

Flags and defaults are those of yaolu-zjut/DDInterpreter ``train_original_models.py``:
SGD lr 0.01, momentum 0.9, weight decay 0.005, batch 256, 150 epochs, lr x0.1 at epochs 50 and 100
(``MultiStepLR``), no augmentation. Model ``i`` goes to
``{save_path}/{dataset}/original/{model}/index_{i}/`` (``checkpoint.pt`` every ``--save_every``
epochs and at the end, plus ``{dataset}_{model}_original_epoch{E}.pth``, and with ``--save_epochs``
the weights after those epochs in ``epoch_{E}.pt``, for an early-stopped teacher); ``summary.json`` and
``log.txt`` sit beside the index folders. The same command run again skips finished models and
continues an unfinished one. At the end a table gives each model's test accuracy, parameter count
and FLOPs per image (2 x multiply-adds of conv/linear layers, ``torch.utils.flop_counter``).

Examples:
    python train_original.py --dataset CIFAR10 --model ConvNet --num 10
    python train_original.py --dataset FashionMNIST --model ConvNet --num 2 --epochs 1 --threads 1
    python train_original.py --dataset FashionMNIST --model ConvNetBN --epochs 50 --save_epochs 5,10,20
"""
from __future__ import annotations

import sys

import cli
import distributed
from cli.original_flags import build_parser, resolve
from cli.stage import open_stage
from pretrained import original_files
from pretrained import originals


def main(argv=None) -> int:
    """Parse, refuse a mismatching folder early, load the data, train what is missing, report."""
    args = build_parser(__doc__).parse_args(argv)
    with cli.user_errors():
        job = resolve(args)
        stage = open_stage(args, run_dir=job.directory, flag="--save_path", given=job.save_path, seed=True,
                           check=lambda: originals.check_existing(job.save_path, job.original, job.num))
        record = cli.load_record(args, stage.device)
        try:
            done = originals.train_originals(job.original, record, job.save_path, job.num, device=stage.device,
                                             save_every=job.save_every, precision=stage.precision,
                                             data_parallel=job.ddp, save_epochs=job.save_epochs)
        except KeyboardInterrupt as stop:
            cli.fail(f"{cli.stop_word(stop)}; finished models and the last checkpoint are kept in {job.directory}; "
                     "run the same command again to continue", cli.EXIT_STOPPED)
        except FloatingPointError as error:
            cli.fail(f"{error}; finished models in {job.directory} are kept", cli.EXIT_NUMERIC)
    status = {result.index: result.status for result in done.results}
    print(f"{len(done.results)} original {job.original.model} model(s) of {record.name} in {job.directory} on "
          f"{stage.device} (image {record.channel}x{record.im_size[0]}x{record.im_size[1]}, "
          f"{record.num_classes} classes):")
    print(original_files.format_table(done.summary, status))
    print(f"summary: {done.summary_path}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
