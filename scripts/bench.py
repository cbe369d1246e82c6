#!/usr/bin/env python3
"""Seconds per distillation iteration (DC ipc 1, DSA ipc 1, DM ipc 10 with --batch_real 256;
DataDAM ipc 10 with its default --batch_real 64) and seconds to evaluate one ConvNet on an ipc-1 set (300 epochs + the 10,000
test images), on real Fashion-MNIST.

    python scripts/bench.py                     # all cases, 3 timed iterations each
    python scripts/bench.py --cases DC DM --iterations 5 --device cuda --json bench.json

The first iteration of each case is a warm-up and is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import augment  # noqa: E402
import methods  # noqa: E402
import utils  # noqa: E402
from data import RealSampler, load_dataset, sample_random_real  # noqa: E402

CASES = {  # name: (method, ipc)
    "DC": ("DC", 1),
    "DSA": ("DSA", 1),
    "DM": ("DM", 10),
    "DataDAM": ("DataDAM", 10),
}


def time_method(name, record, sampler, device, iterations):
    method_name, ipc = CASES[name]
    cls = methods.get_method_class(method_name)
    fields = {k: v for k, v in cls.defaults.items() if k != "eval_mode"}
    fields.update(ipc=ipc)  # batch_real: the method's reference default (256 for DC/DSA/DM, 64 for DataDAM)
    cfg = methods.DistillConfig(method=method_name, dataset=record.name, model="ConvNet", **fields)
    utils.seed_everything(0)
    method = cls(cfg, channel=record.channel, num_classes=record.num_classes, im_size=record.im_size,
                 sampler=sampler, device=device, generator=utils.make_generator(0))
    syn = method.init_synthetic()
    times = []
    for iteration in range(iterations + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        float(method.step(syn, iteration)["loss"])
        if iteration > 0:
            times.append(time.perf_counter() - start)
    return times


def time_eval(record, device, repeats):
    images, labels = sample_random_real(record, 1, utils.make_generator(0))
    cfg = utils.EvalConfig(epochs=300, dc_aug=augment.get_daparam(record.name, "ConvNet", "ConvNet", 1))
    test_x, test_y = record.images_test.to(device), record.labels_test.to(device)
    times = []
    for run in range(repeats):
        start = time.perf_counter()
        utils.evaluate_synset(images.to(device), labels.to(device), "ConvNet", record.num_classes, test_x, test_y,
                              cfg, num_eval=1, device=device, seed=run)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES) + ["eval"], help="DC DSA DM DataDAM eval")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per method")
    parser.add_argument("--eval_repeats", type=int, default=1, help="timed evaluations")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data_path", default="data")
    parser.add_argument("--json", default=None, help="write the timings here")
    args = parser.parse_args()
    device = utils.resolve_device(args.device)
    record = load_dataset("FashionMNIST", args.data_path)
    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, device)
    rows = {}
    for case in args.cases:
        if case == "eval":
            times = time_eval(record, device, args.eval_repeats)
            label = "evaluate ConvNet, ipc 1 (300 epochs + 10k test)"
        elif case in CASES:
            times = time_method(case, record, sampler, device, args.iterations)
            label = f"{case} ipc {CASES[case][1]} iteration (batch_real {methods.get_method_class(CASES[case][0]).defaults['batch_real']})"
        else:
            parser.error(f"unknown case {case!r}")
        rows[case] = {"label": label, "seconds": statistics.median(times), "all": times}
        print(f"{label:<52} {statistics.median(times):8.2f} s  (median of {len(times)})", flush=True)
    info = {"device": str(device), "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cases": rows}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(info, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
