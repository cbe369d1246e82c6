#!/usr/bin/env python3
"""Seconds per distillation iteration and peak memory on real Fashion-MNIST, and seconds to
evaluate one ConvNet on an ipc-1 set (300 epochs + the 10,000 test images).

Cases (each method's reference defaults unless listed): DC ipc 1, DSA ipc 1, DM ipc 10 (batch_real
256), DataDAM ipc 10 (batch_real 64), CAFE ipc 1 with the CPU-sized watchers of
scripts/fmnist_cpu_table.sh (CAFE_cpu), and CAFE ipc 1 at the reference settings (CAFE_ref, not
in the default list: about 4 minutes per iteration on 2 CPU cores). A CAFE iteration runs until
its accuracy watchers settle, so its time varies; the image updates and network epochs per
iteration are printed beside it. MTT, DATM and PAD run at ipc 1 with their default syn_steps and
batch_syn on a 1-expert, 4-epoch buffer the script makes first (start epochs below 2, 2 expert
epochs; an iteration's cost does not depend on the experts' quality).

``--cases eval_stacked`` times the evaluation of ``--eval_networks`` (20) ConvNets on an ipc-10 set
(random real images, DSA augmentation, ``--eval_epochs`` epochs + the 10,000 test images) trained
one after another (``--stacked_eval off``) and together (``--stacked_eval on``, ``evaluation.stacked``), and
prints both, their ratio and what ``--stacked_eval auto`` picks on the device.
``--cases dd`` times DD (ipc 1; ipc 10 with its 30-step unroll, full and with ``--rat_bptt
--truncation`` 10 and 5), batch_real 64.

``--cases tesla`` compares the unrolled meta-gradient with ``--tesla`` (methods/tesla.py): MTT
and DATM at ipc 10, ``--batch_syn 20``, ``--syn_steps`` 20, 40 and 80, each with and without
``--tesla`` (cases ``MTT10_s20``, ``MTT10_s20_tesla``, ...).

    python scripts/bench.py                     # default cases, 3 timed iterations each
    python scripts/bench.py --cases DC DM --iterations 5 --device cuda --json bench.json
    python scripts/bench.py --cases eval_stacked --eval_epochs 300 --device cuda
    python scripts/bench.py --cases DC DSA DM eval --amp bf16   # each case in fp32, then in bf16

With ``--amp bf16|fp16`` every case runs first in float32 and then under that autocast
(``precision.Precision``), in the same process one after the other, and the line of the mixed
precision run gives its time as a ratio of the float32 one (the JSON has both, the mixed precision
case under ``CASE@bf16``; the CPU peak memory is then that of both runs together).

The first iteration of each case is a warm-up and is not timed (with ``--iterations 0`` it is the one timed). Peak memory: on CUDA the peak
allocated by torch during the case; on CPU the peak resident set of the process, which runs that
case alone (each case is its own process on CPU, so this includes the loaded dataset, ~0.3 GiB).
Graph memory: the peak bytes of the tensors autograd saves for backward during the warm-up
iteration (``sets.resources.SavedTensorMeter``; on CPU only, where it sees every graph).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch

import augment
import methods
import evaluation
import utils
from precision import AMP_CHOICES, FP32, resolve_precision
from data import RealSampler, load_dataset, sample_random_real
from sets.resources import SavedTensorMeter

CAFE_CPU = dict(batch_real=64, init="real",
                extra=dict(watcher_window=5, watcher_images=32, max_outer_steps=10, watcher="clean"))
CASES = {  # name: (method, ipc, overrides of the method's defaults)
    "DC": ("DC", 1, {}),
    "DSA": ("DSA", 1, {}),
    "DM": ("DM", 10, {}),
    "DataDAM": ("DataDAM", 10, {}),
    "CAFE_cpu": ("CAFE", 1, CAFE_CPU),
    "CAFE_ref": ("CAFE", 1, {}),
    # Trajectory matching at each method's default syn_steps / batch_syn, ipc 1, on a short
    # buffer made here (the time of an iteration does not depend on how good the experts are).
    "MTT": ("MTT", 1, dict(init="real", extra=dict(expert_epochs=2, max_start_epoch=2))),
    "DATM": ("DATM", 1, dict(init="real", extra=dict(expert_epochs=2, max_start_epoch=2, current_max_start_epoch=1,
                                                      threshold=1e9))),
    "PAD": ("PAD", 1, dict(init="real", extra=dict(expert_epochs=2, max_start_epoch=2, current_max_start_epoch=1,
                                                    threshold=1e9, loss_ratio=0.5))),
}
TESLA_CASES = []  # the unrolled meta-gradient against --tesla, ipc 10
for _name in ("MTT", "DATM"):
    for _steps in (20, 40, 80):
        for _tesla in (False, True):
            _extra = dict(CASES[_name][2]["extra"], syn_steps=_steps, batch_syn=20, tesla=_tesla)
            TESLA_CASES.append(f"{_name}10_s{_steps}" + ("_tesla" if _tesla else ""))
            CASES[TESLA_CASES[-1]] = (_name, 10, dict(init="real", extra=_extra))
# DD (Wang et al. 2018) at the CPU runs' real batch of 64: the full unroll of distill_steps x
# distill_epochs steps against RaT-BPTT (``--rat_bptt --truncation W``, window of W steps).
DD_CASES = ["DD1", "DD10", "DD10_rat10", "DD10_rat5"]
CASES["DD1"] = ("DD", 1, dict(batch_real=64))
CASES["DD10"] = ("DD", 10, dict(batch_real=64))
CASES["DD10_rat10"] = ("DD", 10, dict(batch_real=64, extra=dict(rat_bptt=True, truncation=10)))
CASES["DD10_rat5"] = ("DD", 10, dict(batch_real=64, extra=dict(rat_bptt=True, truncation=5)))
TRAJECTORY_METHODS = ("MTT", "DATM", "PAD")
DEFAULT_CASES = ["DC", "DSA", "DM", "DataDAM", "CAFE_cpu", "MTT", "DATM", "PAD", "eval"]


def bench_buffer(record, device, root: str) -> str:
    """A 1-expert, 4-epoch ConvNet buffer trained on 512 Fashion-MNIST images in batches of 32
    (16 SGD steps an epoch, so consecutive snapshots differ enough for a finite normalised
    matching loss; with the reference batch of 256 the expert barely moves and the learned step
    size can diverge), under ``root``."""
    import dataclasses

    from pretrained import buffers, experts
    generator = utils.make_generator(0)
    index = torch.randperm(len(record.labels_train), generator=generator)[:512]
    small = dataclasses.replace(record, images_train=record.images_train[index], labels_train=record.labels_train[index])
    cfg = experts.ExpertConfig(dataset=record.name, model="ConvNet", train_epochs=4, batch_train=32)
    directory = buffers.buffer_dir(root, record.name, "ConvNet", False)
    experts.make_buffer(cfg, small, directory, 1, device=device, test_every=0)
    return root


def peak_memory_mb(device) -> float:
    """Peak memory in MiB: torch's CUDA peak since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_method(name, record, sampler, device, iterations, buffer_root=None, precision=FP32):
    """Seconds of each timed iteration of case ``name`` (under ``precision``) and the logs of the last one."""
    method_name, ipc, overrides = CASES[name]
    cls = methods.get_method_class(method_name)
    fields = {k: v for k, v in cls.defaults.items() if k != "eval_mode"}
    fields.update(ipc=ipc, **overrides)
    if method_name in TRAJECTORY_METHODS:
        fields["extra"] = dict(fields["extra"], buffer_path=buffer_root)
    cfg = methods.DistillConfig(method=method_name, dataset=record.name, model="ConvNet", **fields)
    utils.seed_everything(0)
    method = cls(cfg, channel=record.channel, num_classes=record.num_classes, im_size=record.im_size,
                 sampler=sampler, device=device, generator=utils.make_generator(0), precision=precision)
    syn = method.init_synthetic()
    times, logs = [], {}
    for iteration in range(1, iterations + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if iteration == 1:  # the warm-up measures the graph memory
            with SavedTensorMeter() as meter:
                logs = {key: float(value) for key, value in method.step(syn, iteration).items()}
            logs["graph_peak_mb"] = meter.peak_bytes / 2**20
            if iterations == 0:  # the warm-up is the only, timed, iteration
                times.append(time.perf_counter() - start)
        else:
            logs = {key: float(value) for key, value in method.step(syn, iteration).items()}
            times.append(time.perf_counter() - start)
    return times, logs


def time_eval(record, device, repeats, precision=FP32):
    """Seconds of each of ``repeats`` evaluations of one ConvNet on 1 random real image per class."""
    images, labels = sample_random_real(record, 1, utils.make_generator(0))
    cfg = evaluation.EvalConfig(epochs=300, dc_aug=augment.get_daparam(record.name, "ConvNet", "ConvNet", 1),
                           precision=precision)
    test_x, test_y = record.images_test.to(device), record.labels_test.to(device)
    times = []
    for run in range(repeats):
        start = time.perf_counter()
        evaluation.evaluate_synset(images.to(device), labels.to(device), "ConvNet", record.num_classes, test_x, test_y,
                              cfg, num_eval=1, device=device, seed=run)
        times.append(time.perf_counter() - start)
    return times


def time_eval_stacked(record, device, repeats, epochs, count, test_images=None):
    """Seconds to evaluate ``count`` ConvNets on an ipc-10 set one after another and together,
    (median of ``repeats`` each), the accuracies of both paths and the path ``auto`` picks; with
    ``test_images``, only that many of the test set."""
    import dataclasses

    images, labels = sample_random_real(record, 10, utils.make_generator(0))
    base = evaluation.EvalConfig(epochs=epochs, dsa_strategy="color_crop_cutout_flip_scale_rotate")
    test_x, test_y = record.images_test[:test_images].to(device), record.labels_test[:test_images].to(device)
    seconds, accs = {}, {}
    for mode in ("off", "on"):
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = evaluation.evaluate_synset(images.to(device), labels.to(device), "ConvNet", record.num_classes, test_x,
                                           test_y, dataclasses.replace(base, stacked_eval=mode), num_eval=count,
                                           device=device, seed=0, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds[mode], accs[mode] = statistics.median(times), result.accs
    auto = evaluation.eval_path("auto", "ConvNet", device, count)
    return seconds, accs, auto


def run_isolated(args) -> int:
    """Run every case in a child ``bench.py --no-isolate`` and merge their JSON reports."""
    import subprocess

    merged: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases:
            out = os.path.join(folder, f"{case}.json")
            command = [sys.executable, os.path.abspath(__file__), "--no-isolate", "--cases", case, "--iterations",
                       str(args.iterations), "--eval_repeats", str(args.eval_repeats), "--eval_epochs",
                       str(args.eval_epochs), "--eval_networks", str(args.eval_networks), "--device", args.device,
                       *(["--eval_test_images", str(args.eval_test_images)] if args.eval_test_images else []),
                       "--data_path", args.data_path, "--json", out, "--amp", args.amp]
            subprocess.run(command, check=True)
            report = json.load(open(out))
            merged.setdefault("info", {k: v for k, v in report.items() if k != "cases"})
            merged.setdefault("cases", {}).update(report["cases"])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({**merged["info"], "cases": merged["cases"]}, handle, indent=2)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help=f"from: {' '.join(CASES)} eval eval_stacked, or tesla (all the --tesla comparison cases), or dd "
                        "(DD's full unroll against RaT-BPTT)")
    parser.add_argument("--iterations", type=int, default=3,
                        help="timed iterations per method after the warm-up (0: time the warm-up alone)")
    parser.add_argument("--eval_repeats", type=int, default=1, help="timed evaluations")
    parser.add_argument("--eval_epochs", type=int, default=300, help="eval_stacked: training epochs of each network")
    parser.add_argument("--eval_networks", type=int, default=20, help="eval_stacked: networks evaluated")
    parser.add_argument("--eval_test_images", type=int, default=None,
                        help="eval_stacked: test on the first N test images only (default all 10,000)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data_path", default="data")
    parser.add_argument("--json", default=None, help="write the timings here")
    parser.add_argument("--amp", default="off", choices=AMP_CHOICES,
                        help="also time every case under this autocast, after its float32 run, and print the ratio")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="run each case in its own process so the CPU peak memory is that case's "
                             "(default: on for CPU, off for CUDA)")
    args = parser.parse_args()
    groups = {"tesla": TESLA_CASES, "dd": DD_CASES}
    args.cases = [name for case in args.cases for name in groups.get(case, [case])]
    for case in args.cases:
        if case not in CASES and case not in ("eval", "eval_stacked"):
            parser.error(f"unknown case {case!r}; choose from: {' '.join(CASES)} eval eval_stacked")
    device = utils.resolve_device(args.device)
    amp = resolve_precision(args.amp, device)
    if args.isolate if args.isolate is not None else (device.type != "cuda" and len(args.cases) > 1):
        return run_isolated(args)
    record = load_dataset("FashionMNIST", args.data_path)
    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, device)
    rows = {}
    buffer_root = None
    if any(CASES.get(case, ("",))[0] in TRAJECTORY_METHODS for case in args.cases):
        buffer_root = bench_buffer(record, device, tempfile.mkdtemp(prefix="bench_buffer_"))
    for case in args.cases:
        for precision in (FP32, amp) if amp.enabled and case != "eval_stacked" else (FP32,):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            logs = {}
            if case == "eval":
                times = time_eval(record, device, args.eval_repeats, precision)
                label = "evaluate ConvNet, ipc 1 (300 epochs + 10k test)"
            elif case == "eval_stacked":
                seconds, accs, auto = time_eval_stacked(record, device, args.eval_repeats, args.eval_epochs,
                                                        args.eval_networks, args.eval_test_images)
                times = [seconds["on"]]
                logs = {"sequential_s": seconds["off"], "stacked_s": seconds["on"],
                        "throughput_ratio": seconds["off"] / seconds["on"],
                        "max_acc_difference": max(abs(a - b) for a, b in zip(accs["on"], accs["off"])),
                        "auto_stacked": float(auto[0])}
                tested = f"{args.eval_test_images} test images" if args.eval_test_images else "10k test"
                label = f"evaluate {args.eval_networks} ConvNets together, ipc 10 ({args.eval_epochs} epochs + {tested})"
                print(f"sequential {seconds['off']:.2f} s, stacked {seconds['on']:.2f} s: stacked throughput "
                      f"x{seconds['off'] / seconds['on']:.2f}; auto picks {'stacked' if auto[0] else 'sequential'}"
                      f"{' (' + auto[1] + ')' if auto[1] else ''}", flush=True)
            else:
                times, logs = time_method(case, record, sampler, device, args.iterations, buffer_root, precision)
                method_name, ipc, overrides = CASES[case]
                batch_real = overrides.get("batch_real", methods.get_method_class(method_name).defaults["batch_real"])
                label = f"{case} ipc {ipc} iteration (batch_real {batch_real})"
            memory = peak_memory_mb(device)
            extras = {key: value for key, value in logs.items() if key != "loss"}
            key, seconds = case if not precision.enabled else f"{case}@{precision.amp}", statistics.median(times)
            rows[key] = {"label": label, "seconds": seconds, "all": times, "peak_memory_mb": memory,
                         "last_iteration": extras, "amp": precision.describe()}
            ratio = ""
            if precision.enabled:
                rows[key]["ratio_to_fp32"] = seconds / rows[case]["seconds"]
                ratio = f", {rows[key]['ratio_to_fp32']:.2f}x fp32"
            detail = "".join(f", {key} {value:g}" for key, value in extras.items())
            print(f"{label + ' ' + ('[' + precision.amp + ']' if precision.enabled else '[fp32]'):<60} {seconds:8.2f} s  "
                  f"(median of {len(times)}{detail}{ratio}), peak memory {memory:.0f} MiB", flush=True)
    if buffer_root is not None:
        shutil.rmtree(buffer_root, ignore_errors=True)
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
