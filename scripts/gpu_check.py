#!/usr/bin/env python3
"""One short check of the CUDA path, made to fit a single short GPU allocation (docs/gpu.md).

Cases, each run once through the stage scripts themselves (``distill.main``, ``evaluate.main``,
``buffer.main``, ``train_original.main``, and ``distill.py`` under torchrun):

* ``buffer fp32``: one expert of a few epochs (the trajectory methods read it);
* every method (and KIP with each of its kernels) for a few iterations in ``fp32`` and with
  ``--amp`` (``bf16`` by default), each ending with one evaluation network;
* ``eval sequential`` / ``eval stacked``: ``evaluate.py`` of the DM set with 20 networks, trained
  one at a time and together (``--stacked_eval off|on``); the stacked row gives the speed ratio;
* ``original fp32``: one original model of one epoch;
* ``torchrun fp32``: DM under ``torchrun`` (NCCL on CUDA with one process per GPU, at most 2;
  gloo with 2 processes in the dry run).

Each case's loss and accuracy are compared with CPU reference values computed beforehand on a
CPU machine by ``--make_reference`` and stored in a small JSON file (``scripts/gpu_reference.json``;
``scripts/gpu_reference_dry.json`` for the dry run): nothing is recomputed on the GPU's time. After
**each** case the results so far are written to ``OUT/gpu_check.json`` and ``OUT/gpu_check.txt``
(``OUT``: ``--out``, default ``$OUT``), each case's console output to ``OUT/logs/<case>.log``; a
failing case is recorded and the others still run. The run ends with one line per failure
(``FAILED <case>: <why> (log: ...)``) and exit status 1 if there is any.

A case fails when its stage script fails or exceeds its time budget, when its loss is not finite,
or when its accuracy differs from the CPU reference by more than ``--acc_tol`` points. Before a case
starts, its time is estimated from the reference's seconds scaled by how fast the cases so far ran
against theirs; a case that would end after the overall deadline (``--deadline_s``) is recorded as
skipped.

Data: ``--data_path DIR`` holds Fashion-MNIST's four ``.gz`` IDX files (Debian's names,
``train-images-idx3-ubyte.gz`` ...); the check takes the first ``train_per_class`` training images
of each class and the first ``test_count`` test images (``SETTINGS``), so that the CPU reference
stays affordable. ``--dry`` runs every case on the CPU with a generated miniature (its own
reference, made the same way): ``tests/test_gpu_check.py`` runs it.

    bash scripts/gpu_check.sh --data_path shared/fmnist              # on the GPU machine ($OUT set)
    DEVICE=cpu bash scripts/gpu_check.sh --out check_out              # dry run
    python3 -m scripts.gpu_check --make_reference --out reference_logs \
        --data_path /usr/share/datasets/fashion-mnist                 # on a CPU machine, beforehand

Run it as ``python3 -m scripts.gpu_check`` from the repository root (or through gpu_check.sh, which
does), so that the toolkit is found without being installed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import logging
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import buffer
import distill
import evaluate
import storage
import tables
import train_original
from scripts.gpu_check_data import DataError, write_miniature, write_subset

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REFERENCE = os.path.join(HERE, "gpu_reference.json")
DRY_REFERENCE = os.path.join(HERE, "gpu_reference_dry.json")
# The problem sizes, recorded in the reference; a reference made with other values is not compared.
SETTINGS = {"model": "ConvNet", "train_per_class": 100, "test_count": 500, "iterations": 2, "batch_real": 32,
            "eval_epochs": 10, "num_eval": 20, "eval_case_epochs": 4, "buffer_epochs": 2, "batch_train": 256,
            "original_epochs": 1}
DRY_SETTINGS = {"model": "ConvNetW32", "train_per_class": 20, "test_count": 60, "iterations": 1, "batch_real": 16,
                "eval_epochs": 2, "num_eval": 20, "eval_case_epochs": 1, "buffer_epochs": 2, "batch_train": 64,
                "original_epochs": 1}
# --lr_lr 1e-7: on small data one iteration at MTT's 1e-5 can drive the learned step size below
# zero (measured on the miniature: -0.05), which no evaluation can train with.
TRAJECTORY = ["--init", "real", "--syn_steps", "5", "--expert_epochs", "1", "--max_start_epoch", "1", "--batch_syn", "10",
              "--lr_lr", "1e-7"]
METHODS = {
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
    # KIP's default kernel fc_ntk and fc_nngp compute in float64 (--amp changes nothing there: the
    # bf16 row must equal the fp32 one); conv_rf runs random networks under --amp.
    "KIP": ["--method", "KIP", "--ipc", "1", "--target_batch_size", "40"],
    "KIP_nngp": ["--method", "KIP", "--ipc", "1", "--target_batch_size", "40", "--kernel", "fc_nngp"],
    "KIP_rf": ["--method", "KIP", "--ipc", "1", "--target_batch_size", "40", "--kernel", "conv_rf", "--n_models", "2"],
    "FRePo": ["--method", "FRePo", "--ipc", "1", "--num_nn_state", "2", "--max_online_updates", "2"],
    "random": ["--method", "random", "--ipc", "1"],
    "herding": ["--method", "herding", "--ipc", "1"],
    "kcenter": ["--method", "kcenter", "--ipc", "1"],
    "forgetting": ["--method", "forgetting", "--ipc", "1", "--forgetting_epochs", "1"],
}
NO_ITERATIONS = ("random", "herding", "kcenter", "forgetting")  # coreset selections refuse --Iteration
CASE_NAMES = ("buffer", *METHODS, "eval", "original", "torchrun")
TORCHRUN_METHOD = "DM"


class CaseTimeout(BaseException):
    """A case ran past its time budget (raised by SIGALRM; a BaseException so that no stage
    script's error handling turns it into an exit code)."""


class CaseFailed(Exception):
    """A case's stage script failed; the message is one line."""


def call(main, argv, log) -> None:
    """Run a stage script's ``main(argv)`` with its console output sent to ``log``.

    Raises:
        CaseFailed: it exited non-zero (the message is its last line of output).
    """
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        finally:  # the stage script's logging points at this log: send it back to the console
            logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler(sys.__stderr__)], force=True)
    if code not in (0, None):
        log.flush()
        with open(log.name) as written:
            lines = [line.strip() for line in written if line.strip()]
        raise CaseFailed(f"{main.__module__}.py exited with {code}" + (f": {lines[-1]}" if lines else ""))


def last_summary(run_dir: str):
    """(final loss or None, accuracy % of the last evaluation or None) from a run's summary.csv."""
    path = os.path.join(run_dir, "summary.csv")
    rows = list(csv.DictReader(open(path))) if os.path.isfile(path) else []
    if not rows:
        return None, None
    loss = rows[-1].get("loss")
    loss = float(loss) if loss not in (None, "") else None
    if loss is not None and math.isnan(loss) and rows[-1].get("iteration") in ("0", None):
        loss = None  # a coreset selection has no loss
    return loss, 100 * float(rows[-1]["acc_mean"])


class Check:
    """The cases of one run (``--dry``, ``--make_reference`` or the CUDA check) and their records."""

    def __init__(self, args, device: torch.device, settings: dict, work: str):
        self.args, self.device, self.settings, self.work = args, device, settings, work
        self.common = ["--dataset", "FashionMNIST", "--data_path", os.path.join(work, "data"), "--device", str(device),
                       "--threads", str(args.threads), "--model", settings["model"]]

    def method_argv(self, case: str, amp: str, run_dir: str) -> list:
        s = self.settings
        argv = [*METHODS[case], *self.common, "--amp", amp, "--Iteration", str(s["iterations"]), "--num_exp", "1",
                "--num_eval", "1", "--epoch_eval_train", str(s["eval_epochs"]), "--eval_it", "0",
                "--batch_real", str(s["batch_real"]), "--batch_train", str(s["batch_real"]), "--run_dir", run_dir,
                "--no-vis", "--checkpoint_every", "0"]
        if case in NO_ITERATIONS:
            at = argv.index("--Iteration")
            del argv[at:at + 2]
        if case.startswith("KIP"):  # KIP's real batch is --target_batch_size; it refuses --batch_real
            at = argv.index("--batch_real")
            del argv[at:at + 2]
        if case in ("MTT", "DATM", "PAD"):
            argv += ["--buffer_path", os.path.join(self.work, "buffer")]
        return argv

    def run(self, case: str, variant: str, log) -> dict:
        """One case (``variant``: ``fp32`` / ``bf16`` / ``fp16``, or ``stacked`` / ``sequential``
        for ``eval``); returns its measured fields.

        Raises:
            CaseFailed: the stage script failed, or what it needs was not made.
        """
        s = self.settings
        if self.args.fail_case in (case, f"{case} {variant}"):
            print(f"injected failure (--fail_case {self.args.fail_case})", file=log, flush=True)
            raise CaseFailed(f"injected failure (--fail_case {self.args.fail_case})")
        if self.args.abort_case in (case, f"{case} {variant}"):  # a process killed mid-case (as by a time-out)
            print(f"injected abort (--abort_case {self.args.abort_case})", file=log, flush=True)
            os._exit(70)
        amp = "off" if variant in ("fp32", "stacked", "sequential") else variant
        if case == "torchrun":
            return self.run_torchrun(log)
        if case in METHODS:
            run_dir = os.path.join(self.work, "runs", f"{case}_{variant}")
            if case in ("MTT", "DATM", "PAD") and not os.path.isdir(os.path.join(self.work, "buffer")):
                raise CaseFailed("needs the buffer of case 'buffer', which did not finish")
            call(distill.main, self.method_argv(case, amp, run_dir), log)
            results = json.load(open(os.path.join(run_dir, "results.json")))
            loss, acc = last_summary(run_dir)
            per = results.get("seconds_per_iteration") if case not in NO_ITERATIONS else None
            return {"loss": loss, "acc": acc, "seconds": per, "unit": "s/iteration" if per else None}
        if case == "buffer":
            root = os.path.join(self.work, "buffer")
            call(buffer.main, [*self.common, "--amp", amp, "--num_experts", "1", "--train_epochs",
                               str(s["buffer_epochs"]), "--batch_train", str(s["batch_train"]), "--buffer_path", root,
                               "--no-gsam"], log)
            manifest = next(os.path.join(d, "manifest.json") for d, _, files in os.walk(root) if "manifest.json" in files)
            experts = json.load(open(manifest)).get("experts")
            expert = experts[0] if isinstance(experts, list) and experts else {}
            acc = expert.get("final_test_acc")
            return {"loss": (expert.get("train_loss") or [None])[-1], "acc": None if acc is None else 100 * acc}
        if case == "original":
            root = os.path.join(self.work, "original")
            call(train_original.main, [*self.common, "--amp", amp, "--num", "1", "--epochs", str(s["original_epochs"]),
                                       "--batch_size", str(s["batch_train"]), "--save_path", root], log)
            summary = next(os.path.join(d, "summary.json") for d, _, files in os.walk(root) if "summary.json" in files)
            return {"loss": None, "acc": 100 * json.load(open(summary))["models"][0]["test_acc"]}
        if case == "eval":
            syn = os.path.join(self.work, "runs", "DM_fp32")
            if not os.path.isfile(os.path.join(syn, "results.json")):
                raise CaseFailed("needs the set of case 'DM fp32', which did not finish")
            out = os.path.join(self.work, f"eval_{variant}.json")
            argv = [*self.common, "--amp", amp, "--syn_path", syn, "--num_eval", str(s["num_eval"]),
                    "--epoch_eval_train", str(s["eval_case_epochs"]), "--no-random_baseline", "--out", out,
                    "--stacked_eval", "on" if variant == "stacked" else "off"]
            at = argv.index("--model")  # evaluate.py names its networks --models
            argv[at] = "--models"
            call(evaluate.main, argv, log)
            return {"loss": None, "acc": 100 * json.load(open(out))[s["model"]]["mean"]}
        raise ValueError(case)

    def torchrun_processes(self) -> int:
        """One process per GPU, at most 2 (NCCL refuses two ranks on one GPU); 2 on the CPU."""
        return 2 if self.device.type == "cpu" else max(1, min(2, torch.cuda.device_count()))

    def run_torchrun(self, log) -> dict:
        """``distill.py`` (DM fp32) under ``torch.distributed.run --standalone`` in a child process."""
        run_dir = os.path.join(self.work, "runs", "torchrun")
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(self.torchrun_processes()), os.path.join(ROOT, "distill.py"),
                *self.method_argv(TORCHRUN_METHOD, "off", run_dir)]
        print("+ " + shlex.join(argv), file=log, flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.args.threads)}
        # its own process group, so that a time-out ends torchrun and every rank it started
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = child.wait(timeout=max(1.0, self.time_left_for_case()))
        except subprocess.TimeoutExpired:
            raise CaseTimeout() from None
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if code != 0:
            raise CaseFailed(f"torchrun distill.py exited with {code}")
        results = json.load(open(os.path.join(run_dir, "results.json")))
        loss, acc = last_summary(run_dir)
        peak = ((results.get("cost") or {}).get("peak_memory") or {})
        return {"loss": loss, "acc": acc, "seconds": results.get("seconds_per_iteration"), "unit": "s/iteration",
                "processes": self.torchrun_processes(),
                "peak_mib": peak.get("bytes", 0) / 2**20 if self.device.type == "cuda" and peak else None}

    def time_left_for_case(self) -> float:
        return min(self.args.case_budget_s, self.deadline - time.monotonic())


def variants(case: str, amp: str, make_reference: bool) -> list:
    """The variants a case runs: both eval modes; fp32 and ``amp`` for the methods (fp32 only
    when making the reference); fp32 for the rest."""
    if case == "eval":
        return ["sequential", "stacked"]
    if case in METHODS and not make_reference:
        return ["fp32", amp]
    return ["fp32"]


def compare(record: dict, reference: dict | None, acc_tol: float) -> str | None:
    """Fill ``record``'s reference fields and differences; return why it fails, or None.

    The CPU reference of a method's ``--amp`` row is its fp32 reference (the difference is what
    the device and the precision change together)."""
    if record.get("loss") is not None and not math.isfinite(record["loss"]):
        return f"loss {record['loss']} is not finite"
    if reference is None:
        return "no reference value (make the reference: scripts/gpu_check.py --make_reference)"
    record["ref_loss"], record["ref_acc"] = reference.get("loss"), reference.get("acc")
    for field in ("loss", "acc"):
        mine, theirs = record.get(field), reference.get(field)
        record[f"d{field}"] = None if mine is None or theirs is None else mine - theirs
    if record["dacc"] is not None and abs(record["dacc"]) > acc_tol:
        return (f"accuracy {record['acc']:.2f} % against {record['ref_acc']:.2f} % on the CPU "
                f"(|difference| > --acc_tol {acc_tol:g} points)")
    return None


def public_command(argv: list) -> str:
    """The check's command line with the machine's folders left out (``--out``, ``--reference``)
    or named generically (``--data_path FASHION_MNIST_DIR``), as stored in the reference."""
    shown, skip = ["python3", "-m", "scripts.gpu_check"], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--out", "--reference", "--data_path"):
            skip = "=" not in arg
            if name == "--data_path":
                shown.append("--data_path FASHION_MNIST_DIR")
            continue
        shown.append(shlex.quote(arg))
    return " ".join(shown)


def write_reference(path: str, info: dict, threads: int) -> None:
    """Store the fp32 CPU values of ``info``'s finished cases in ``path``, beside those of an
    existing reference made with the same settings (so it can be made in several calls, a few
    cases each); each case keeps the command and date that made it."""
    try:
        stored = json.load(open(path))
    except (OSError, ValueError):
        stored = {}
    if stored.get("settings") != info["settings"]:
        stored = {"settings": info["settings"], "cases": {}}
    stored.update(made_by="python3 scripts/gpu_check.py --make_reference (per case: 'command')",
                  torch=info["torch"], cpu=platform.processor() or platform.machine(), threads=threads)
    for row in info["rows"]:
        if row["status"] == "ok":
            kept = ("loss", "acc", "wall_s", "seconds", "processes")
            stored["cases"][row["case"]] = {**{k: row[k] for k in kept if k in row},
                                            "command": info["command"], "date": info["started"]}
    stored["cases"] = {key: stored["cases"][key] for key in sorted(stored["cases"], key=case_order)}
    storage.write_json(path, stored)
    print(f"wrote {path} ({len(stored['cases'])} cases)")


def case_order(key: str) -> tuple:
    """Sort key of ``"<case> <variant>"`` in the order the check runs them."""
    case, _, variant = key.partition(" ")
    return (CASE_NAMES.index(case) if case in CASE_NAMES else len(CASE_NAMES), variant)


def fmt(value, digits=4):
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


HEADER = ["case", "status", "seconds", "per step", "peak CUDA MiB", "loss", "acc %", "CPU acc %", "Δloss",
          "Δacc (pts)", "amp - fp32 loss"]


def table_rows(records: list) -> list:
    return [[r["case"], r["status"], fmt(r.get("wall_s"), 3), f"{fmt(r.get('seconds'), 3)} {r.get('unit') or ''}".strip(),
             fmt(r.get("peak_mib"), 5), fmt(r.get("loss")), fmt(r.get("acc")), fmt(r.get("ref_acc")),
             fmt(r.get("dloss"), 3), fmt(r.get("dacc"), 3), fmt(r.get("loss_vs_fp32"), 3)] for r in records]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=None,
                        help="folder holding Fashion-MNIST's four .gz IDX files (required unless --dry)")
    parser.add_argument("--out", default=None, help="results folder: gpu_check.json, gpu_check.txt, logs/ "
                        "(default $OUT)")
    parser.add_argument("--dry", action="store_true", help="CPU, generated miniature data, tiny sizes "
                        "(compared with scripts/gpu_reference_dry.json)")
    parser.add_argument("--make_reference", action="store_true",
                        help="run every case in fp32 on the CPU and write the reference file (--reference)")
    parser.add_argument("--reference", default=None, help="reference file (default scripts/gpu_reference.json; "
                        "--dry: scripts/gpu_reference_dry.json)")
    parser.add_argument("--device", default="cuda", help="the device checked (default cuda; cuda:N)")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16"), help="the mixed precision checked")
    parser.add_argument("--cases", nargs="+", default=list(CASE_NAMES), metavar="CASE",
                        help=f"cases to run, from: {' '.join(CASE_NAMES)} (default all); 'CASE VARIANT' "
                        "('eval stacked', 'DM bf16') runs that variant only")
    parser.add_argument("--deadline_s", type=float, default=None,
                        help="overall seconds after which no case starts (default 330; --dry 170; "
                        "--make_reference none)")
    parser.add_argument("--case_budget_s", type=float, default=None,
                        help="seconds one case may run before it is stopped (default 60; --dry 30; "
                        "--make_reference 600)")
    parser.add_argument("--acc_tol", type=float, default=15.0,
                        help="largest accuracy difference to the CPU reference, in points (default 15)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 4; --dry 1)")
    parser.add_argument("--fail_case", default=None, metavar="CASE",
                        help="for tests: make CASE ('DM', or one variant: 'DM bf16') fail; the others still run")
    parser.add_argument("--abort_case", default=None, metavar="CASE",
                        help="for tests: end the process abruptly (exit 70) when CASE starts, as a time-out would")
    parser.add_argument("--stopped", type=int, default=None, metavar="EXIT_CODE",
                        help="used by gpu_check.sh when the check was killed: record the case that was running "
                        "as failed and print the failures")
    return parser


def report_stopped(out: str, code: int) -> int:
    """After the check process died with ``code``: mark the case it was running as failed in
    ``out/gpu_check.json`` and print one line per failure; returns ``code``."""
    path = os.path.join(out, "gpu_check.json")
    try:
        info = json.load(open(path))
    except (OSError, ValueError):
        print(f"FAILED gpu_check.py ended with exit code {code} before writing {path}")
        return code
    running = info.get("running")
    if running:
        log_name = os.path.join("logs", running.replace(" ", "_") + ".log")
        info["rows"].append({"case": running, "status": "failed", "log": log_name,
                             "why": f"the check process ended with exit code {code} during this case"})
        info["failures"].append(f"{running}: the check process ended with exit code {code} during this case "
                                f"(log: {log_name})")
        info["running"] = None
    else:
        info["failures"].append(f"gpu_check.py ended with exit code {code} between cases")
    info["table"] = tables.format_table(HEADER, table_rows(info["rows"]))
    storage.write_json(path, info)
    storage.write_text(os.path.join(out, "gpu_check.txt"), info["table"] + "\n")
    print(info["table"])
    for failure in info["failures"]:
        print(f"FAILED {failure}")
    return code


def main(argv=None) -> int:
    started = time.monotonic()
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or os.environ.get("OUT")
    if not out:
        parser.error("--out: no results folder (give --out DIR or set OUT)")
    if args.stopped is not None:
        return report_stopped(out, args.stopped)
    if not args.dry and not args.data_path:
        parser.error("--data_path: the folder of Fashion-MNIST's four .gz files is required (or --dry)")
    settings = dict(DRY_SETTINGS if args.dry else SETTINGS)
    args.threads = args.threads or (1 if args.dry else 4)
    args.reference = args.reference or (DRY_REFERENCE if args.dry else REFERENCE)
    args.case_budget_s = args.case_budget_s or (600 if args.make_reference else 30 if args.dry else 60)
    if args.deadline_s is None:
        args.deadline_s = math.inf if args.make_reference else 170 if args.dry else 330
    if args.make_reference or args.dry:
        device = torch.device("cpu")
    else:
        device = torch.device(args.device)
        if device.type != "cuda" or not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device here; use --dry (CPU) or --make_reference")
    torch.set_num_threads(args.threads)
    reference = None
    if not args.make_reference:
        try:
            reference = json.load(open(args.reference))
        except (OSError, ValueError) as error:
            reference = {"error": f"--reference {args.reference}: {error}"}
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    unknown = [given for given in args.cases if given.split(" ")[0] not in CASE_NAMES]
    if unknown:
        parser.error(f"--cases: unknown case {unknown[0]!r}; choose from: {' '.join(CASE_NAMES)}")
    only = {given for given in args.cases if " " in given}  # single variants asked for
    cases = [case for case in CASE_NAMES if case in {given.split(" ")[0] for given in args.cases}]
    if "eval" in cases and "DM" not in cases:
        cases.insert(cases.index("eval"), "DM")
    if any(case in ("MTT", "DATM", "PAD") for case in cases) and "buffer" not in cases:
        cases.insert(0, "buffer")
    info = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": str(torch.__version__), "dry": args.dry, "make_reference": args.make_reference,
            "command": public_command(argv if argv is not None else sys.argv[1:]),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": settings, "reference": None if reference is None else os.path.relpath(args.reference, ROOT),
            "running": None, "rows": [], "failures": [], "skipped": []}
    problems = []
    if reference is not None and "error" in reference:
        problems.append(reference["error"])
        reference = None
    elif reference is not None and reference.get("settings") != settings:
        problems.append(f"--reference {args.reference} was made with other settings; make it again "
                        "(--make_reference)")
        reference = None
    info["failures"] = [f"reference: {problem}" for problem in problems]

    def save():
        info["elapsed_s"] = round(time.monotonic() - started, 1)
        info["table"] = tables.format_table(HEADER, table_rows(info["rows"]))
        storage.write_json(os.path.join(out, "gpu_check.json"), info)
        storage.write_text(os.path.join(out, "gpu_check.txt"), info["table"] + "\n")

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        check = Check(args, device, settings, work)
        check.deadline = started + args.deadline_s
        try:
            if args.dry:
                write_miniature(os.path.join(work, "data"), settings["train_per_class"], settings["test_count"])
            else:
                write_subset(args.data_path, os.path.join(work, "data"), settings["train_per_class"],
                             settings["test_count"])
        except DataError as error:
            info["failures"].append(f"data: {error}")
            save()
            print(f"FAILED data: {error}")
            return 1
        ratios = []  # measured / reference seconds of the cases so far
        for case in cases:
            for variant in variants(case, args.amp, args.make_reference):
                key = f"{case} {variant}"
                if case in {given.split(" ")[0] for given in only} and case not in args.cases and key not in only:
                    continue  # --cases named other variants of this case only
                record = {"case": key, "status": "ok"}
                known = (reference or {}).get("cases", {})
                expected = (known.get(key) or known.get(f"{case} fp32") or {}).get("wall_s")
                estimate = None if expected is None else expected * (sorted(ratios)[len(ratios) // 2] if ratios else 1.0)
                left = check.deadline - time.monotonic()
                if left < 1 or (estimate is not None and estimate > left):
                    record.update(status="skipped", why=f"{left:.0f} s left before --deadline_s, "
                                  f"estimated {fmt(estimate, 3)} s")
                    info["rows"].append(record)
                    info["skipped"].append(key)
                    save()
                    continue
                info["running"] = key
                save()
                log_name = os.path.join("logs", key.replace(" ", "_") + ".log")
                record["log"] = log_name
                tick = time.monotonic()
                with open(os.path.join(out, log_name), "w", buffering=1) as log:
                    def expire(signum, frame):
                        raise CaseTimeout()

                    previous = signal.signal(signal.SIGALRM, expire)
                    signal.setitimer(signal.ITIMER_REAL, max(1.0, check.time_left_for_case()))
                    try:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                            torch.cuda.reset_peak_memory_stats(device)
                        record.update(check.run(case, variant, log))
                        if device.type == "cuda" and case != "torchrun":
                            record["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                    except CaseTimeout:
                        record.update(status="failed", why=f"stopped after {time.monotonic() - tick:.0f} s "
                                      "(--case_budget_s or --deadline_s)")
                    except Exception as error:  # noqa: BLE001 - any failure is this case's, the others go on
                        traceback.print_exc(file=log)
                        record.update(status="failed", why=str(error).strip().splitlines()[-1] if str(error).strip()
                                      else type(error).__name__)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                        signal.signal(signal.SIGALRM, previous)
                record["wall_s"] = round(time.monotonic() - tick, 3)
                if record["status"] == "ok" and case in METHODS and variant != "fp32":
                    same = next((r for r in info["rows"] if r["case"] == f"{case} fp32" and r["status"] == "ok"), None)
                    if same and same.get("loss") is not None and record.get("loss") is not None:
                        record["loss_vs_fp32"] = record["loss"] - same["loss"]  # 0: --amp changed nothing
                    notes = [line.split(": ", 1)[-1].strip() for line in open(os.path.join(out, log_name))
                             if "WARNING methods.runner: --amp" in line]
                    record["amp_note"] = notes[0] if notes else None
                if record["status"] == "ok" and not args.make_reference:
                    ref = None if reference is None else reference.get("cases", {}).get(
                        key if variant in ("fp32", "stacked", "sequential") else f"{case} fp32")
                    why = compare(record, ref, args.acc_tol)
                    if why:
                        record.update(status="failed", why=why)
                    if expected:
                        ratios.append(record["wall_s"] / expected)
                if record["status"] == "failed":
                    info["failures"].append(f"{key}: {record['why']} (log: {log_name})")
                if case == "eval" and variant == "stacked":
                    sequential = next((r for r in info["rows"] if r["case"] == "eval sequential"), {})
                    if sequential.get("status") == "ok" and record["status"] == "ok":
                        record["speedup"] = round(sequential["wall_s"] / record["wall_s"], 3)
                info["rows"].append(record)
                info["running"] = None
                save()
                print(f"{key:<22} {record['status']:<7} {record['wall_s']:8.2f} s", flush=True)
    print(info["table"])
    if args.make_reference:
        write_reference(args.reference, info, args.threads)
    speed = next((r.get("speedup") for r in info["rows"] if r.get("speedup")), None)
    if speed:
        print(f"stacked evaluation of {settings['num_eval']} networks: {speed:.2f}x the speed of sequential")
    print(f"{len(info['rows'])} cases in {time.monotonic() - started:.0f} s; results in {out}/gpu_check.json")
    if info["skipped"]:
        print(f"skipped (deadline): {', '.join(info['skipped'])}")
    for failure in info["failures"]:
        print(f"FAILED {failure}")
    return 1 if info["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
