#!/usr/bin/env python3
"""One short check of the CUDA path: every method for a few iterations in float32 and with
``--amp`` (bf16 by default), the evaluation of 20 networks (with ``--stacked_eval on`` and
``off`` when ``evaluate.py`` has that flag), a small expert buffer and a small original model,
each also run once on the CPU in float32 with the same tiny problem. Prints one table
(``tables.format_table``): seconds per iteration (per evaluation, per run for buffer / original),
peak CUDA memory, the final loss and accuracy, and their difference to the CPU run; writes it as
JSON to ``$OUT/gpu_check.json`` when ``$OUT`` is set (or to ``--json``).

Every case runs the stage scripts themselves (``distill.main``, ``evaluate.main``, ``buffer.main``,
``train_original.main``) in this process, on Fashion-MNIST read from ``--data_path`` (default: the
folder of this script; the loader also searches ``/usr/share/datasets/fashion-mnist``; nothing is
downloaded). ``--dry`` runs the same cases on the CPU ("device" and reference both CPU, so the
float32 differences must be 0) with a generated 28x28 ten-class miniature written in the IDX
layout, in well under a minute: ``tests/test_gpu_check.py`` runs it so the script cannot rot.

    bash scripts/gpu_check.sh                         # CUDA, about 5 minutes on one GPU
    python3 scripts/gpu_check.py --dry --cases DC DM eval
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import struct
import sys
import tempfile
import time

import torch

import buffer
import distill
import evaluate
import train_original
import storage
import tables
import utils
from cli import evaluate_flags

HERE = os.path.dirname(os.path.abspath(__file__))
# Tiny problems: (distill.py flags beyond the common ones). ipc 1 except DM/DataDAM (ipc 10 as bench.py).
# --lr_lr 1e-7: on the generated miniature one iteration at MTT's 1e-5 drives the learned step size
# below zero (measured: -0.05), which no evaluation can train with.
TRAJECTORY = ["--init", "real", "--syn_steps", "5", "--expert_epochs", "1", "--max_start_epoch", "1", "--batch_syn", "10",
              "--lr_lr", "1e-7"]
METHOD_CASES = {
    "DC": ["--method", "DC", "--ipc", "1"],
    "DSA": ["--method", "DSA", "--ipc", "1"],
    "DM": ["--method", "DM", "--ipc", "10"],
    "DataDAM": ["--method", "DataDAM", "--ipc", "10"],
    "CAFE": ["--method", "CAFE", "--ipc", "1", "--watcher_window", "2", "--watcher_images", "8",
             "--max_outer_steps", "2", "--max_inner_steps", "2"],
    "MTT": ["--method", "MTT", "--ipc", "1", *TRAJECTORY],
    "DATM": ["--method", "DATM", "--ipc", "1", *TRAJECTORY, "--current_max_start_epoch", "1", "--threshold", "1e9"],
    "PAD": ["--method", "PAD", "--ipc", "1", *TRAJECTORY, "--current_max_start_epoch", "1", "--threshold", "1e9",
            "--loss_ratio", "0.5"],
    "DD": ["--method", "DD", "--ipc", "1"],
    "KIP": ["--method", "KIP", "--ipc", "1", "--target_batch_size", "40"],
    "FRePo": ["--method", "FRePo", "--ipc", "1", "--num_nn_state", "2", "--max_online_updates", "2"],
    "random": ["--method", "random", "--ipc", "1"],
    "herding": ["--method", "herding", "--ipc", "1"],
    "kcenter": ["--method", "kcenter", "--ipc", "1"],
    "forgetting": ["--method", "forgetting", "--ipc", "1", "--forgetting_epochs", "1"],
}
OTHER_CASES = ("buffer", "original", "eval")
ALL_CASES = ("buffer", *METHOD_CASES, "eval", "original")
NO_ITERATIONS = ("random", "herding", "kcenter", "forgetting")


def write_miniature(root: str, per_class: int = 20, test_per_class: int = 6) -> str:
    """A generated ten-class 28x28 set in the uncompressed IDX layout ``root/FashionMNIST/raw``
    (each class a different mean brightness, so networks can learn it); returns ``root``."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("t10k", test_per_class)):
        labels = torch.arange(10).repeat_interleave(count)
        images = (torch.rand(len(labels), 28, 28, generator=generator) * 100 + labels.view(-1, 1, 1) * 15)
        with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as handle:
            handle.write(struct.pack(">IIII", 2051, len(labels), 28, 28) + images.clamp(0, 255).to(torch.uint8).numpy().tobytes())
        with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as handle:
            handle.write(struct.pack(">II", 2049, len(labels)) + labels.to(torch.uint8).numpy().tobytes())
    return root


def call(main, argv, log) -> None:
    """Run a stage script's ``main(argv)`` with its console output sent to ``log``.

    Raises:
        RuntimeError: it exited non-zero (the log says why).
    """
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    if code not in (0, None):
        raise RuntimeError(f"{main.__module__} {' '.join(argv)} exited with {code}; see the log")


class Measure:
    """Wall seconds and peak CUDA memory (MiB; ``None`` off CUDA) of a block."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mib = None
        self.seconds = time.perf_counter() - self.start


def last_summary(run_dir: str):
    """(final loss or None, accuracy % of the last evaluation or None) from a run's summary.csv."""
    path = os.path.join(run_dir, "summary.csv")
    if not os.path.isfile(path):
        return None, None
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return None, None
    loss = rows[-1].get("loss")
    loss = float(loss) if loss not in (None, "") else None
    if loss is not None and not math.isfinite(loss):  # coreset selections have no loss ("nan")
        loss = None
    return loss, 100 * float(rows[-1]["acc_mean"])


def run_case(case: str, device: torch.device, amp: str, args, work: str, log) -> dict:
    """One case on one device and precision; returns its table fields."""
    tag = f"{case}_{device.type}_{amp}"
    common = ["--dataset", "FashionMNIST", "--data_path", args.data_path, "--device", str(device), "--amp", amp,
              "--threads", str(args.threads)]
    if case in METHOD_CASES:
        run_dir = os.path.join(work, "runs", tag)
        argv = [*METHOD_CASES[case], *common, "--model", "ConvNet", "--Iteration", str(args.iterations),
                "--num_exp", "1", "--num_eval", "1", "--epoch_eval_train", str(args.eval_epochs), "--eval_it", "0",
                "--batch_real", str(args.batch_real), "--batch_train", str(args.batch_real), "--run_dir", run_dir,
                "--no-vis", "--checkpoint_every", "0"]
        if case in NO_ITERATIONS:  # coreset selections have no iterations; they refuse --Iteration
            at = argv.index("--Iteration")
            del argv[at:at + 2]
        if case == "KIP":  # KIP's real batch is --target_batch_size; it refuses --batch_real
            at = argv.index("--batch_real")
            del argv[at:at + 2]
        if case in ("MTT", "DATM", "PAD"):
            argv += ["--buffer_path", os.path.join(work, "buffer_ref")]
        with Measure(device) as measure:
            call(distill.main, argv, log)
        results = json.load(open(os.path.join(run_dir, "results.json")))
        loss, acc = last_summary(run_dir)
        per = results.get("seconds_per_iteration") if case not in NO_ITERATIONS else measure.seconds
        return {"seconds": per, "unit": "s/iteration" if case not in NO_ITERATIONS else "s/selection",
                "peak_mib": measure.peak_mib, "loss": loss, "acc": acc}
    if case == "buffer":
        root = os.path.join(work, f"buffer_{device.type}_{amp}")
        argv = [*common, "--model", "ConvNet", "--num_experts", "1", "--train_epochs", str(args.buffer_epochs),
                "--batch_train", "256", "--buffer_path", root, "--no-gsam"]
        with Measure(device) as measure:
            call(buffer.main, argv, log)
        manifest = json.load(open(next(os.path.join(d, "manifest.json") for d, _, files in os.walk(root)
                                       if "manifest.json" in files)))
        expert = manifest["experts"][0] if isinstance(manifest.get("experts"), list) else {}
        acc = expert.get("final_test_acc")
        return {"seconds": measure.seconds / args.buffer_epochs, "unit": "s/epoch", "peak_mib": measure.peak_mib,
                "loss": (expert.get("train_loss") or [None])[-1], "acc": None if acc is None else 100 * acc}
    if case == "original":
        root = os.path.join(work, f"original_{device.type}_{amp}")
        argv = [*common, "--model", "ConvNet", "--num", "1", "--epochs", "1", "--batch_size", "256",
                "--save_path", root]
        with Measure(device) as measure:
            call(train_original.main, argv, log)
        summary = json.load(open(next(os.path.join(d, "summary.json") for d, _, files in os.walk(root)
                                      if "summary.json" in files)))
        return {"seconds": measure.seconds, "unit": "s/epoch", "peak_mib": measure.peak_mib, "loss": None,
                "acc": 100 * summary["models"][0]["test_acc"]}
    raise ValueError(case)


def run_eval(device: torch.device, amp: str, stacked, args, work: str, log) -> dict:
    """``evaluate.py`` of the DM set of the reference run: ``--num_eval`` networks (20)."""
    out = os.path.join(work, f"eval_{device.type}_{amp}_{stacked}.json")
    argv = ["--dataset", "FashionMNIST", "--data_path", args.data_path, "--device", str(device), "--amp", amp,
            "--threads", str(args.threads), "--syn_path", os.path.join(work, "runs", "DM_cpu_off"),
            "--models", "ConvNet", "--num_eval", str(args.num_eval), "--epoch_eval_train", str(args.eval_epochs),
            "--no-random_baseline", "--out", out]
    if stacked is not None:
        argv += ["--stacked_eval", stacked]
    with Measure(device) as measure:
        call(evaluate.main, argv, log)
    acc = 100 * json.load(open(out))["ConvNet"]["mean"]
    return {"seconds": measure.seconds, "unit": f"s/evaluation ({args.num_eval} nets)", "peak_mib": measure.peak_mib,
            "loss": None, "acc": acc}


def has_stacked_eval() -> bool:
    """Whether ``evaluate.py --help`` lists ``--stacked_eval`` (another branch adds it)."""
    return "--stacked_eval" in evaluate_flags.build_parser("").format_help()


def difference(value, reference):
    if value is None or reference is None:
        return None
    return value - reference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device checked (default cuda)")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16"), help="the mixed precision checked")
    parser.add_argument("--data_path", default=HERE, help="folder holding Fashion-MNIST (default: beside this script)")
    parser.add_argument("--dry", action="store_true", help="CPU only, generated miniature data, tiny sizes")
    parser.add_argument("--cases", nargs="*", default=list(ALL_CASES), help=f"from: {' '.join(ALL_CASES)}")
    parser.add_argument("--iterations", type=int, default=None, help="distillation iterations (default 3; dry 2)")
    parser.add_argument("--num_eval", type=int, default=20, help="networks of the evaluation case")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 4; dry 1)")
    parser.add_argument("--json", default=None, help="also write the table here (default $OUT/gpu_check.json)")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    unknown = [case for case in args.cases if case not in ALL_CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from: {' '.join(ALL_CASES)}")
    args.iterations = args.iterations or (2 if args.dry else 3)
    args.threads = args.threads or (1 if args.dry else 4)
    args.eval_epochs = 2 if args.dry else 20
    args.batch_real = 16 if args.dry else 256
    args.buffer_epochs = 2
    device = torch.device("cpu") if args.dry else utils.resolve_device(args.device)
    if device.type != "cuda" and not args.dry:
        parser.error("no CUDA device; use --dry for the CPU dry run")
    stacked_modes = ["on", "off"] if has_stacked_eval() else [None]
    cases = [case for case in ALL_CASES if case in args.cases]
    # The trajectory methods and the evaluation read what the CPU run of buffer / DM wrote.
    if any(case in ("MTT", "DATM", "PAD") for case in cases) and "buffer" not in cases:
        cases.insert(0, "buffer")
    if "eval" in cases and "DM" not in cases:
        cases.insert(cases.index("eval"), "DM")
    header = ["case", "precision", "device", "seconds", "unit", "peak CUDA MiB", "loss", "acc %", "Δloss vs CPU",
              "Δacc vs CPU (pts)"]
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = args.work or scratch
        if args.dry:
            args.data_path = write_miniature(os.path.join(work, "data"))
        log_path = os.path.join(work, "gpu_check.log")
        with open(log_path, "w") as log:
            for case in cases:
                variants = [(None,)] if case != "eval" else [(mode,) for mode in stacked_modes]
                for (stacked,) in variants:
                    def once(dev, amp):
                        if case == "eval":
                            return run_eval(dev, amp, stacked, args, work, log)
                        return run_case(case, dev, amp, args, work, log)

                    reference = once(torch.device("cpu"), "off")
                    if case == "buffer":  # the trajectory methods all read this float32 buffer
                        os.replace(os.path.join(work, "buffer_cpu_off"), os.path.join(work, "buffer_ref"))
                    for amp in ("off", args.amp):
                        # dry: the "device" is the CPU, so its float32 run is the reference itself
                        result = reference if args.dry and amp == "off" else once(device, amp)
                        name = case if stacked is None else f"{case} (stacked {stacked})"
                        record = {"case": name, "precision": "fp32" if amp == "off" else amp, "device": str(device),
                                  **result, "cpu_loss": reference["loss"], "cpu_acc": reference["acc"],
                                  "dloss": difference(result["loss"], reference["loss"]),
                                  "dacc": difference(result["acc"], reference["acc"])}
                        records.append(record)
                        rows.append([name, record["precision"], record["device"], record["seconds"], record["unit"],
                                     record["peak_mib"], record["loss"], record["acc"], record["dloss"],
                                     record["dacc"]])
                        print(f"{name:<24} {record['precision']:<5} {record['seconds']:.3f} {record['unit']}",
                              flush=True)
        table = tables.format_table(header, rows)
        print(table)
        print(f"CPU reference: float32 on the CPU, {args.threads} thread(s); log: {log_path if args.work else 'removed'}")
        if args.dry:
            print("dry run: 'device' is the CPU and the data a generated miniature")
        info = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "torch": str(torch.__version__), "dry": args.dry, "stacked_eval_flag": stacked_modes != [None],
                "iterations": args.iterations, "rows": records, "table": table}
        target = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
        if target:
            storage.write_json(target, info)
            print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
