#!/usr/bin/env python3
"""Wall time of one DM ipc-10 iteration and of a 4-network evaluation on real Fashion-MNIST with 1
and with 2 processes (torchrun, gloo on the CPU, one thread each; ``distributed``).

For each process count the script starts ``torchrun --standalone --nproc_per_node N`` on itself
(``--worker``); every rank loads the data, then:

* DM ipc 10 (its reference defaults: batch_real 256, DSA, ConvNet): one warm-up iteration, then
  ``--iterations`` timed ones; with 2 processes each rank computes 5 of the 10 classes and the
  image gradients are summed (``DistillMethod.owned_classes``);
* ``--num_eval`` ConvNets trained on 10 random real images per class for ``--epochs`` epochs and
  tested on the 10,000 test images (``evaluation.evaluate_synset_sharded``: the networks are spread
  over the ranks).

Every timing is taken between two barriers, so it is the slowest rank's. Rank 0 checks that the
DM images and the accuracies equal those of the 1-process run (printed as ``max |diff|``).

    python scripts/bench_distributed.py --data_path /usr/share/datasets/fashion-mnist
    python scripts/bench_distributed.py --procs 1 2 --iterations 3 --epochs 100 --json bench_dist.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import distributed
import evaluation
import methods
import utils
from data import RealSampler, load_dataset, sample_random_real


def timed(work) -> float:
    """Seconds of ``work()`` between two barriers (the slowest rank's time)."""
    distributed.barrier()
    start = time.perf_counter()
    work()
    distributed.barrier()
    return time.perf_counter() - start


def worker(args) -> None:
    """One rank: time DM and the evaluation; rank 0 writes ``args.out``."""
    torch.set_num_threads(1)
    device = distributed.init(torch.device("cpu"))
    record = load_dataset("FashionMNIST", args.data_path)
    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, device)
    cls = methods.get_method_class("DM")
    fields = {k: v for k, v in cls.defaults.items() if k != "eval_mode"}
    fields.update(ipc=10)
    cfg = methods.DistillConfig(method="DM", dataset=record.name, model="ConvNet", **fields)
    utils.seed_everything(0)
    method = cls(cfg, channel=record.channel, num_classes=record.num_classes, im_size=record.im_size,
                 sampler=sampler, device=device, generator=utils.make_generator(0))
    syn = method.init_synthetic()
    dm_times = []
    for iteration in range(1, args.iterations + 2):
        seconds = timed(lambda: method.step(syn, iteration))
        if iteration > 1:  # the first is a warm-up
            dm_times.append(seconds)
    images, labels = sample_random_real(record, 10, utils.make_generator(0))
    eval_cfg = evaluation.EvalConfig(epochs=args.epochs, lr=0.01, batch_train=256)
    found = {}

    def evaluate() -> None:
        found["accs"] = evaluation.evaluate_synset_sharded(images, labels, "ConvNet", record.num_classes,
                                                      record.images_test, record.labels_test, eval_cfg,
                                                      num_eval=args.num_eval, device=device, seed=0,
                                                      progress=False).accs

    eval_seconds = timed(evaluate)
    if distributed.is_main():
        torch.save({"procs": distributed.world_size(), "dm_seconds": dm_times, "eval_seconds": eval_seconds,
                    "accs": found["accs"], "images": syn.images.detach().clone(),
                    "owned_classes": method.owned_classes()}, args.out)
    distributed.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to time")
    parser.add_argument("--iterations", type=int, default=3, help="timed DM iterations after one warm-up")
    parser.add_argument("--num_eval", type=int, default=4, help="evaluation networks")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per evaluation network")
    parser.add_argument("--data_path", default="data")
    parser.add_argument("--json", default=None, help="write the timings here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    rows, first = [], None
    with tempfile.TemporaryDirectory() as folder:
        for procs in args.procs:
            out = os.path.join(folder, f"p{procs}.pt")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                       os.path.abspath(__file__), "--worker", "--out", out, "--iterations", str(args.iterations),
                       "--num_eval", str(args.num_eval), "--epochs", str(args.epochs), "--data_path", args.data_path]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            report = torch.load(out)
            first = first or report
            diff = float((report["images"] - first["images"]).abs().max())
            rows.append({"procs": procs, "dm_iteration_s": statistics.median(report["dm_seconds"]),
                         "dm_all_s": report["dm_seconds"], "eval_s": report["eval_seconds"],
                         "accs": report["accs"], "same_accs_as_first": report["accs"] == first["accs"],
                         "max_image_diff_vs_first": diff, "dm_classes_on_rank0": report["owned_classes"]})
            print(f"{procs} process(es): DM ipc 10 iteration {rows[-1]['dm_iteration_s']:.2f} s (median of "
                  f"{len(report['dm_seconds'])}), evaluation of {args.num_eval} ConvNets x {args.epochs} epochs "
                  f"{report['eval_seconds']:.1f} s; accuracies {', '.join(f'{100 * a:.2f}' for a in report['accs'])}"
                  f" (same as first: {rows[-1]['same_accs_as_first']}), max |image diff| {diff:.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": str(torch.__version__), "cpu_count": os.cpu_count(), "threads_per_process": 1,
                       "backend": "gloo", "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
