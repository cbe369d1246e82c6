#!/usr/bin/env python3
"""Training cost of distillation methods as the synthetic set grows: seconds of one outer
iteration, seconds of the loss alone, and peak memory, over a wide range of ipc.

This is the training-cost evaluation of Yu, Liu & Wang, "Dataset Distillation: A Comprehensive
Review", IEEE TPAMI 46(1), 2024 (section "Training Cost Evaluation": run time of the whole outer
loop and of the loss function, and peak memory, on CIFAR-10 over a wide range of ipc). Every
method runs at its reference defaults on generated tensors of CIFAR-10's shape (3x32x32, 10
classes; ``--image_shape``, ``--num_classes``); no dataset is read, since the cost of an iteration
does not depend on what the images show.

    python scripts/cost_study.py --ipc 1 10 20 50 100 200 500 1000 --time_bound 120 --iterations 0 --threads 1 --memory_limit 6144 --out docs/cost
    python scripts/cost_study.py --methods all --ipc 1 10 50 100 200 500 1000 --device cuda --out result/cost_study
    python scripts/cost_study.py --replot --out docs/cost     # the table and figures again, from the JSON

For each method the ipc values run in increasing order; the series stops at the first ipc where
memory runs out (``--memory_limit`` on the CPU, the GPU's memory on CUDA) or where an iteration
takes longer than ``--time_bound`` seconds (that ipc is still reported). A name that is not
registered in this checkout (``methods.list_methods()``) is refused in one line listing the known
ones; a method the study cannot time (a selection baseline, one that needs a teacher or
``train_original.py`` models) is skipped with a note, and is refused when nothing else is left.

Columns (the first iteration of each case is a warm-up and is not timed, unless it alone already
exceeds the time bound; then it is the one timed):

* ``loss s``: seconds of one computation of the method's matching / meta loss and its gradient to
  the set, i.e. the calls of the functions the method names in ``DistillMethod.loss_functions``
  plus its ``update_images`` (backward and optimiser step), per image update. DM: the whole
  iteration (no network is trained). DC, DSA, CAFE: one matching step (one network, every class)
  out of the ``updates/it`` of an iteration. MTT, DATM, PAD (and DD, whose loss is its unroll):
  the unroll of ``syn_steps`` student steps and the backward through it, i.e. nearly the whole
  iteration.
* ``iteration s``: seconds of one outer iteration (``DistillMethod.step``): what updating the set
  costs in total, with DC's / DSA's inner network training and MTT's expert loading.
* ``updates/it``: image updates per iteration (DC: its outer loop).
* ``peak MiB``: on CUDA, ``torch.cuda.max_memory_allocated`` over the case (set-up included); on the
  CPU, the peak resident set of a child process that runs that case alone (Python, torch and the
  generated real images included: ``base MiB`` in the JSON is the resident set just before the
  first iteration).
* ``graph MiB`` (CPU): the peak bytes of the tensors autograd saves for backward during the warm-up
  iteration (``sets.resources.SavedTensorMeter``).

Trajectory-matching methods (those with a ``buffer_path`` option) read a 1-expert, 4-epoch buffer
made here first on 256 generated images, with ``--expert_epochs 2 --max_start_epoch 2`` (DATM, PAD
also ``--current_max_start_epoch 1`` and ``--threshold 1e9``, so that every update is applied); a
method whose default ``--init`` is neither noise nor real (DATM's samples_predicted_correctly)
starts from real images. None of these change what an iteration computes.

Outputs in ``--out``: ``cost_study.json`` (settings, machine, rows, skipped methods),
``cost_study.csv``, ``cost_study.md``, ``time_vs_ipc.png`` and ``memory_vs_ipc.png``; they are
rewritten after every case, so an interrupted study keeps what it measured.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

import cli
import methods
import storage
import tables
import utils
from scripts.cost_case import (FAILED, KILLED, OK, OUT_OF_MEMORY, OVER_TIME, CaseSpec, make_generated_buffer,
                               measure_case, needs_buffer)

DEFAULT_METHODS = ["DD", "DC", "DSA", "DM", "MTT", "FRePo"]
DEFAULT_IPC = [1, 10, 20, 50, 100, 200, 500, 1000]
# A child whose iteration runs this many times the time bound is stopped (its series ends anyway).
KILL_FACTOR = 2.0
COLUMNS = ["method", "ipc", "loss s", "iteration s", "updates/it", "peak MiB", "graph MiB", "status"]


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``error: ...``, exit 2), as the toolkit's."""

    def error(self, message: str):
        cli.fail(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The ``cost_study.py`` flags."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        help="registered method names, or 'all' (every registered distillation method); methods "
                             "the study cannot time are skipped with a note "
                             f"(default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--ipc", type=int, nargs="+", default=DEFAULT_IPC,
                        help=f"images per class, run in increasing order (default: {' '.join(map(str, DEFAULT_IPC))})")
    parser.add_argument("--time_bound", type=float, default=60.0,
                        help="seconds; a method's series stops after the first ipc whose iteration takes longer")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per case after the warm-up "
                        "(0: time the warm-up alone)")
    parser.add_argument("--model", default="ConvNet", help="network of every method (default ConvNet)")
    parser.add_argument("--image_shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"),
                        help="generated image shape (default CIFAR-10's 3 32 32)")
    parser.add_argument("--num_classes", type=int, default=10, help="classes K (default CIFAR-10's 10)")
    parser.add_argument("--real_per_class", type=int, default=500,
                        help="generated real images per class (raised to ipc where smaller)")
    parser.add_argument("--memory_limit", type=float, default=None,
                        help="MiB of data memory each CPU case may use (RLIMIT_DATA of its process; beyond it the "
                             "case is out of memory); default: half the machine's memory")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="run each case in its own process, whose peak resident set is that case's "
                             "(default: on for the CPU, off for CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch in every case")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data, networks and draws")
    parser.add_argument("--out", default="result/cost_study", help="folder for the table, JSON and figures")
    parser.add_argument("--replot", action="store_true",
                        help="measure nothing: rewrite the table and figures from --out/cost_study.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: SPEC.json of one case
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Validate the numbers.

    Raises:
        utils.UserError: one line naming the flag.
    """
    if any(ipc < 1 for ipc in args.ipc):
        raise utils.UserError(f"--ipc: every value must be at least 1, got {' '.join(map(str, args.ipc))}")
    if not args.time_bound > 0:
        raise utils.UserError(f"--time_bound must be > 0 seconds, got {args.time_bound}")
    if args.iterations < 0:
        raise utils.UserError(f"--iterations must be >= 0, got {args.iterations}")
    if min(args.image_shape) < 1:
        raise utils.UserError(f"--image_shape: expected three positive sizes C H W, got {args.image_shape}")
    if args.num_classes < 2:
        raise utils.UserError(f"--num_classes must be at least 2, got {args.num_classes}")
    if args.real_per_class < 1:
        raise utils.UserError(f"--real_per_class must be at least 1, got {args.real_per_class}")
    if args.threads is not None and args.threads < 1:
        raise utils.UserError(f"--threads must be at least 1, got {args.threads}")
    if args.memory_limit is not None and not args.memory_limit > 0:
        raise utils.UserError(f"--memory_limit must be > 0 MiB, got {args.memory_limit}")


# ---- running the cases -------------------------------------------------------------------------
def child_main(spec_path: str) -> int:
    """Run the case of ``spec_path`` (a child process): apply its threads and memory limit, write
    the phase file (the iteration running and since when) before every iteration and the row to
    the result file (both named in the spec)."""
    with open(spec_path) as handle:
        job = json.load(handle)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job.get("memory_limit_mb"):
        limit = int(job["memory_limit_mb"] * 2**20)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    spec = CaseSpec(**{**job["spec"], "image_shape": tuple(job["spec"]["image_shape"])})

    def phase(iteration: Optional[int]) -> None:
        storage.write_json(job["phase_file"], {"iteration": iteration,
                                             "started": None if iteration is None else time.time()})

    try:
        row = measure_case(spec, on_iteration=phase)
    except Exception as error:  # reported as this case's row; the study goes on
        row = {"method": spec.method, "ipc": spec.ipc, "status": FAILED,
               "note": f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"}
    storage.write_json(job["result_file"], row)
    return 0


def run_isolated(spec: CaseSpec, threads: Optional[int], memory_limit_mb: Optional[float]) -> dict:
    """Run ``spec`` in a child ``cost_study.py`` process and return its row; the child is stopped
    once one iteration has run ``KILL_FACTOR`` times the time bound (status ``killed``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="cost_case_") as folder:
        job = {"spec": dataclasses.asdict(spec), "threads": threads, "memory_limit_mb": memory_limit_mb,
               "phase_file": os.path.join(folder, "phase.json"), "result_file": os.path.join(folder, "row.json")}
        spec_path = os.path.join(folder, "spec.json")
        storage.write_json(spec_path, job)
        log_path = os.path.join(folder, "log.txt")
        with open(log_path, "w") as log:
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec_path],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=root)
            killed_after = None
            while child.poll() is None:
                time.sleep(0.2)
                try:
                    with open(job["phase_file"]) as handle:
                        started = json.load(handle)["started"]
                except (OSError, ValueError):
                    continue
                if started is not None and time.time() - started > KILL_FACTOR * spec.time_bound:
                    killed_after = time.time() - started
                    child.kill()
                    child.wait()
        if os.path.isfile(job["result_file"]):
            with open(job["result_file"]) as handle:
                return json.load(handle)
        row = {"method": spec.method, "ipc": spec.ipc}
        if killed_after is not None:
            return {**row, "status": KILLED, "note": f"stopped after {killed_after:.0f} s in one iteration, "
                                                     f"over {KILL_FACTOR:g} x the time bound"}
        with open(log_path) as handle:
            last = ([line.strip() for line in handle if line.strip()] or [""])[-1]
        if child.returncode in (-9, 137):  # the system's out-of-memory killer
            return {**row, "status": OUT_OF_MEMORY, "note": "killed by the system (out of memory)"}
        return {**row, "status": FAILED, "note": f"exit {child.returncode}: {last[:200]}"}


def resolve_methods(requested: Sequence[str]) -> tuple:
    """``(names to measure, skipped notes)``: ``all`` expands to every registered distillation
    method (selection baselines have no iterations; methods that need a teacher or train_original.py
    models are skipped with a note, also when named).

    Raises:
        utils.UserError: a name is not registered (one line naming ``--methods`` and the registered
            names), or no method is left to measure.
    """
    registered = methods.list_methods()
    unknown = [name for name in requested if name.lower() != "all" and name not in registered]
    if unknown:
        raise utils.UserError(f"--methods {' '.join(unknown)}: not a registered method; known: "
                              f"{', '.join(registered)} (or all)")
    names = []
    for name in requested:
        if name.lower() == "all":
            names += [known for known in registered if not methods.get_method_class(known).selection_only
                      and not methods.get_method_class(known).needs_teacher
                      and not methods.get_method_class(known).needs_pretrained]
        else:
            names.append(name)
    chosen, skipped = [], []
    for name in dict.fromkeys(names):
        if methods.get_method_class(name).selection_only:
            skipped.append({"method": name, "note": f"{name}: a selection baseline, no iterations to time; skipped"})
        elif methods.get_method_class(name).needs_teacher:
            skipped.append({"method": name, "note": f"{name}: needs a trained teacher (--teacher_model ...), which "
                                                    "this study does not train; skipped"})
        elif methods.get_method_class(name).needs_pretrained:
            skipped.append({"method": name, "note": f"{name}: matches against train_original.py models, which this "
                                                    "study does not train; skipped"})
        else:
            chosen.append(name)
    if not chosen:
        raise utils.UserError(f"--methods {' '.join(requested)}: nothing to measure ("
                              f"{'; '.join(entry['note'] for entry in skipped)})")
    return chosen, skipped


def default_memory_limit_mb() -> float:
    """Half of the machine's physical memory, in MiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 / 2


# ---- outputs -----------------------------------------------------------------------------------
def format_number(value, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits (whole numbers from 1000 on), or ``-`` for None."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"


def short_status(row: dict) -> str:
    """The status cell: the status and, shortened, its note (an allocation that failed is given by
    its size; a stopped child by the rule that stopped it)."""
    note = row.get("note") or ""
    if row["status"] == KILLED:
        return f"killed: an iteration ran over {KILL_FACTOR:g} x the time bound"
    if row["status"] == OUT_OF_MEMORY:
        found = re.search(r"[Tt]ried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", note)
        if found:
            scale = {"bytes": 2**-20, "KiB": 2**-10, "MiB": 1, "GiB": 2**10, "TiB": 2**20}[found.group(2)]
            note = f"allocating {float(found.group(1)) * scale:.0f} MiB more failed"
    if len(note) > 80:
        note = note[:77] + "..."
    return row["status"] + (f" ({note})" if note else "")


def table_rows(rows: Sequence[dict]) -> List[list]:
    """The printed table's cells (:data:`COLUMNS`)."""
    cells = []
    for row in rows:
        status = short_status(row)
        cells.append([row["method"], row["ipc"], format_number(row.get("loss_s")), format_number(row.get("iteration_s")),
                      format_number(row.get("updates")),
                      "-" if row.get("peak_mb") is None else f"{row['peak_mb']:.0f}",
                      format_number(row.get("graph_mb")), status])
    return cells


def plot_study(rows: Sequence[dict], out_dir: str, cuda: bool, subtitle: str = "") -> List[str]:
    """``time_vs_ipc.png`` (loss and whole iteration, seconds) and ``memory_vs_ipc.png`` (peak
    memory; on the CPU also the autograd graph), one line per method, log-log axes; a method's
    legend says where and why its series stopped; ``subtitle`` goes above the panels. Returns the
    paths written."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: Dict[str, List[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)

    def label(name):
        last = by_method[name][-1]
        return name if last["status"] == OK else f"{name} (stopped at ipc {last['ipc']}: {last['status']})"

    def draw(axis, key, title, ylabel):
        ran_out = False
        for name, series in by_method.items():
            points = [(row["ipc"], row[key]) for row in series if row.get(key) and row["status"] in (OK, OVER_TIME)]
            failed = [(row["ipc"], row[key]) for row in series if row.get(key) and row["status"] == OUT_OF_MEMORY]
            line, = axis.plot(*(zip(*points) if points else ([], [])), marker="o", label=label(name))
            if failed:  # the memory in use when an allocation failed
                axis.plot(*zip(*failed), marker="x", markersize=9, linestyle="none", color=line.get_color())
                ran_out = True
        if ran_out:
            title += "\n(x: in use when memory ran out)"
        axis.set(xscale="log", yscale="log", xlabel="images per class (ipc)", ylabel=ylabel, title=title)
        ipcs = sorted({row["ipc"] for row in rows})
        axis.set_xticks(ipcs, [str(ipc) for ipc in ipcs])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.grid(True, which="both", alpha=0.3)

    paths = []
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    draw(axes[0], "loss_s", "loss and its gradient (one image update)", "seconds")
    draw(axes[1], "iteration_s", "whole outer iteration", "seconds")
    axes[1].legend(fontsize=8)
    figure.suptitle(subtitle, fontsize=9)
    figure.tight_layout()
    paths.append(os.path.join(out_dir, "time_vs_ipc.png"))
    storage.atomic_write(paths[-1], lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    panels = 1 if cuda else 2
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    draw(axes[0][0], "peak_mb", "peak GPU memory (max_memory_allocated)" if cuda else "peak resident set (process)",
         "MiB")
    if not cuda:
        draw(axes[0][1], "graph_mb", "autograd saved tensors (peak)", "MiB")
    axes[0][-1].legend(fontsize=8)
    figure.suptitle(subtitle, fontsize=9)
    figure.tight_layout()
    paths.append(os.path.join(out_dir, "memory_vs_ipc.png"))
    storage.atomic_write(paths[-1], lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return paths


def write_outputs(report: dict, out_dir: str) -> List[str]:
    """``cost_study.json``, ``.csv``, ``.md`` and the two figures in ``out_dir``; returns their paths."""
    rows = report["rows"]
    paths = [os.path.join(out_dir, name) for name in ("cost_study.json", "cost_study.csv", "cost_study.md")]
    storage.write_json(paths[0], report)
    fields = ["method", "ipc", "status", "loss_s", "iteration_s", "updates", "timed", "peak_mb", "memory_measure",
              "graph_mb", "base_mb", "data_mb", "note"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: tables.round_significant(value) if isinstance(value, float) else value
                         for key, value in row.items()})
    storage.write_text(paths[1], buffer.getvalue())
    notes = "".join(f"\n- {entry['note']}" for entry in report["skipped"])
    storage.write_text(paths[2], tables.format_table(COLUMNS, table_rows(rows), markdown=True) + "\n" + notes + "\n")
    if rows:
        settings, machine = report["settings"], report["machine"]
        where = machine.get("gpu") or f"CPU, {machine['threads']} thread(s)"
        subtitle = (f"{settings['model']} on generated {'x'.join(map(str, settings['image_shape']))} images, "
                    f"{settings['num_classes']} classes; {where}")
        paths += plot_study(rows, out_dir, machine["device"].startswith("cuda"), subtitle)
    return paths


def replot(out_dir: str) -> int:
    """Rewrite the table, CSV and figures of ``out_dir/cost_study.json``; print the table.

    Raises:
        utils.UserError: no readable ``cost_study.json`` in ``out_dir``.
    """
    path = os.path.join(out_dir, "cost_study.json")
    try:
        with open(path) as handle:
            report = json.load(handle)
        rows = report["rows"]
    except (OSError, ValueError, KeyError) as error:
        raise utils.UserError(f"--replot: cannot read {path} ({type(error).__name__}); run the study first") from None
    print(tables.format_table(COLUMNS, table_rows(rows)))
    for written in write_outputs(report, out_dir):
        print(f"wrote {written}")
    return 0


def machine_info(device: torch.device, threads: Optional[int]) -> dict:
    """Device, torch version, threads, CPU count and load average (the machine may be shared)."""
    info = {"device": str(device), "torch": str(torch.__version__), "threads": threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    """Parse, measure every method's ipc series, print and write the table, JSON and figures."""
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args.child)
    with cli.user_errors():
        cli.setup_logging(quiet=True)
        if args.replot:
            return replot(args.out)
        check_args(args)
        names, skipped = resolve_methods(args.methods)  # before any work: an unknown name is one line
        device = cli.setup_runtime(args)
        for entry in skipped:
            print(entry["note"], flush=True)
        isolate = args.isolate if args.isolate is not None else device.type == "cpu"
        memory_limit = None
        if isolate and device.type == "cpu":
            memory_limit = args.memory_limit or default_memory_limit_mb()
        report = {"command": " ".join(["python", "scripts/cost_study.py", *(argv if argv is not None else sys.argv[1:])]),
                  "settings": {key: value for key, value in vars(args).items() if key != "child"},
                  "memory_limit_mb": memory_limit, "machine": machine_info(device, args.threads),
                  "skipped": skipped, "rows": []}
        buffer_root = None
        if any(needs_buffer(name) for name in names):
            buffer_root = make_generated_buffer(args.model, args.image_shape, args.num_classes, device,
                                                tempfile.mkdtemp(prefix="cost_buffer_"), args.seed)
        try:
            for name in names:
                for ipc in sorted(set(args.ipc)):
                    spec = CaseSpec(method=name, ipc=ipc, model=args.model, image_shape=tuple(args.image_shape),
                                    num_classes=args.num_classes, real_per_class=args.real_per_class,
                                    iterations=args.iterations, time_bound=args.time_bound, device=str(device),
                                    seed=args.seed, buffer_root=buffer_root)
                    if isolate:
                        row = run_isolated(spec, args.threads, memory_limit)
                    else:
                        try:
                            row = measure_case(spec)
                            if device.type == "cpu":  # one process for every case: its peak is cumulative
                                row["memory_measure"] += ", cumulative over the cases (--no-isolate)"
                        except Exception as error:  # this method's series ends; the others go on
                            row = {"method": name, "ipc": ipc, "status": FAILED,
                                   "note": f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"}
                    report["rows"].append(row)
                    peak = "-" if row.get("peak_mb") is None else f"{row['peak_mb']:.0f}"
                    print(f"{name} ipc {ipc}: loss {format_number(row.get('loss_s'))} s, iteration "
                          f"{format_number(row.get('iteration_s'))} s, peak {peak} MiB, {short_status(row)}", flush=True)
                    report["machine"]["load_average_end"] = list(os.getloadavg())
                    write_outputs(report, args.out)
                    if row["status"] != OK:
                        break
        finally:
            if buffer_root is not None:
                shutil.rmtree(buffer_root, ignore_errors=True)
        print()
        print(tables.format_table(COLUMNS, table_rows(report["rows"])))
        for path in write_outputs(report, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
