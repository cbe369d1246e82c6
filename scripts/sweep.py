#!/usr/bin/env python3
"""Sweeps of distill.py over a grid, one after another here or as a SLURM job array, and the table
of their results.

A grid is methods x datasets x ipc x seeds (``--methods --datasets --ipcs --seeds``), or YAML
presets x seeds (``--presets configs/MTT/*.yaml``); ``--extra`` adds flags to every distill.py
command. Each grid point has its own run directory ``ROOT/{method}_{dataset}_ipc{ipc}_seed{seed}``
(``--root``), so a stopped or requeued point continues its own run (``--resume``), and a finished
one (``results.json`` there) is skipped when the sweep is started or submitted again (a submission
while an array of the same root is still queued is refused).

    python3 scripts/sweep.py --methods DC DSA DM --datasets CIFAR10 --ipcs 1 10 50 --root result/sweep \\
        --scheduler slurm --time 24:00:00 --gres gpu:1 --extra "--device cuda"
    python3 scripts/sweep.py --methods DM --datasets FashionMNIST --ipcs 1 --root result/s --dry
    python3 scripts/sweep.py gather result/sweep          # result/sweep/sweep_table.{csv,md}

``--scheduler local`` (the default) runs the points here, one after another. ``--scheduler slurm``
writes ``ROOT/_sweep/grid_{id}.tsv`` (one grid point per line: the array index is the line) and
``ROOT/_sweep/array_{id}.sbatch`` and submits it with ``sbatch``: ``--array`` over the unfinished
points with ``%--throttle``, ``--requeue``, ``--signal=B:USR1@{--grace}`` (the time-limit warning,
to the batch shell only), ``--time``, ``--open-mode=append`` and the optional ``--gres``,
``--partition``, ``--cpus_per_task``, ``--mem``, ``--nodes``. Each array task runs
``scripts/slurm/array_task.sh``, which forwards the warning to distill.py as SIGTERM and requeues
the element when the point is unfinished; SLURM's own SIGTERM (scontrol requeue, preemption by
requeue, scancel) is forwarded and SLURM requeues (or cancels) the job itself. With
``--nproc_per_node N`` every point runs under ``srun torchrun`` (N processes per node, ``--nodes``
nodes, c10d rendezvous on the first node). ``--random_baseline`` adds an ``evaluate.py
--random_baseline`` step per point (``RUN_DIR/eval.json``: the set and random real images under
the same protocol), which ``gather`` reports beside the set.

``gather ROOT`` writes one row per grid point of every grid submitted or run under ROOT (or, with
no grid file, per run directory): status, accuracy mean ± std over the evaluation networks, the
random-real row when ``eval.json`` holds one, distillation time and peak memory. Points without a
result are listed with their status (not run, stopped with last.pt, failed with the exit code).

Exit codes: 0 done (or submitted), 1 some point failed, 2 a mistake in the flags, 130 stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import glob
import hashlib
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_SCRIPT = os.path.join(REPO, "scripts", "slurm", "array_task.sh")
STATE_DIR = "_sweep"


class SweepError(Exception):
    """A mistake in the sweep's flags or files; printed on one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One distill.py run of a sweep: its name (the run directory's), the grid values and the
    distill.py flags without ``--run_dir`` / ``--resume`` (the sweep adds them)."""

    name: str
    method: str
    dataset: str
    ipc: int
    seed: int
    argv: tuple
    preset: str = ""


def _preset_values(path: str) -> dict:
    """method, dataset and ipc of a YAML preset (``configs/``), for the run directory's name."""
    import yaml

    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SweepError(f"--presets {path}: cannot be read ({error})") from None
    missing = [key for key in ("method", "dataset", "ipc") if key not in values]
    if missing:
        raise SweepError(f"--presets {path}: no {', '.join(missing)} in it (a sweep names its runs by them)")
    return values


def expand_grid(methods: Sequence[str] = (), datasets: Sequence[str] = (), ipcs: Sequence[int] = (),
                seeds: Sequence[int] = (0,), extra: str = "", presets: Sequence[str] = ()) -> List[GridPoint]:
    """The grid points, in order: presets x seeds, or methods x datasets x ipcs x seeds (the last
    varies fastest). ``extra``: flags (one shell-quoted string) added to every command.

    Raises:
        SweepError: no grid, a preset without method/dataset/ipc, or two points with one name.
    """
    extra_argv = tuple(shlex.split(extra))
    points = []
    if presets:
        for preset in presets:
            preset = os.path.abspath(preset)
            values = _preset_values(preset)
            for seed in seeds:
                name = f"{values['method']}_{values['dataset']}_ipc{values['ipc']}_seed{seed}"
                points.append(GridPoint(name, str(values["method"]), str(values["dataset"]), int(values["ipc"]), seed,
                                        ("--config", preset, "--seed", str(seed), *extra_argv), preset))
    else:
        for method in methods:
            for dataset in datasets:
                for ipc in ipcs:
                    for seed in seeds:
                        argv = ("--method", method, "--dataset", dataset, "--ipc", str(ipc), "--seed", str(seed),
                                *extra_argv)
                        points.append(GridPoint(f"{method}_{dataset}_ipc{ipc}_seed{seed}", method, dataset, ipc,
                                                seed, argv))
    if not points:
        raise SweepError("an empty grid: give --methods, --datasets and --ipcs, or --presets")
    names = [p.name for p in points]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SweepError(f"two grid points share the run directory {twice[0]} (the same preset twice?)")
    return points


def check_commands(points: Sequence[GridPoint]) -> None:
    """Parse and resolve every point's distill.py flags as distill.py does, before anything runs.

    Raises:
        SweepError: naming the grid point and what distill.py would refuse.
    """
    import utils
    from cli import distill_flags

    for point in points:
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                args = distill_flags.parse_args([*point.argv, "--run_dir", "unused"])
            distill_flags.resolve(args)
        except SystemExit:
            lines = said.getvalue().strip().splitlines() or ["unknown"]
            message = lines[-1].split("error: ", 1)[-1]
            raise SweepError(f"{point.name}: distill.py refuses its flags: {message}") from None
        except utils.UserError as error:
            raise SweepError(f"{point.name}: {error}") from None


def is_locked(run_dir: str) -> bool:
    """Whether a process holds the run directory's ``.lock`` (a distill.py running it now)."""
    path = os.path.join(run_dir, ".lock")
    if not os.path.exists(path):
        return False
    try:
        with open(path) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def point_status(root: str, name: str, evaluate: bool = False) -> str:
    """``finished``, ``running``, ``stopped (last.pt kept)``, ``failed (distill exit N)`` or
    ``not run`` for the grid point ``name`` under ``root`` (``evaluate``: finished needs eval.json)."""
    run_dir = os.path.join(root, name)
    if os.path.isfile(os.path.join(run_dir, "results.json")) and (
            not evaluate or os.path.isfile(os.path.join(run_dir, "eval.json"))):
        return "finished"
    if is_locked(run_dir):
        return "running"
    recorded = os.path.join(root, STATE_DIR, "exit", name)
    if os.path.isfile(recorded):
        with open(recorded) as handle:
            step, _, code = handle.read().strip().partition(" ")
        if code not in ("0", "130", ""):
            return f"failed ({step} exit {code})"
    if os.path.isfile(os.path.join(run_dir, "last.pt")):
        return "stopped (last.pt kept)"
    return "not run"


def evaluate_argv(point: GridPoint, num_eval: int) -> tuple:
    """evaluate.py's flags for ``--random_baseline`` (without ``--syn_path`` / ``--out``): the
    protocol recorded with the set, the same number of networks for the set and the random rows."""
    return ("--dataset", point.dataset, "--random_baseline", "--num_eval", str(num_eval), "--seed", str(point.seed))


def write_grid(root: str, points: Sequence[GridPoint], evaluate_num: int) -> str:
    """``ROOT/_sweep/grid_{id}.tsv``: line i (0-based) is array index i: name, run directory,
    distill.py flags, evaluate.py flags (empty without ``--random_baseline``), tab-separated and
    shell-quoted. ``id``: a digest of the content, so a resubmission of the same grid reuses it.
    Returns the path."""
    lines = []
    for point in points:
        evaluate = shlex.join(evaluate_argv(point, evaluate_num)) if evaluate_num else ""
        lines.append("\t".join([point.name, os.path.join(root, point.name), shlex.join(point.argv), evaluate]))
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(root, STATE_DIR), exist_ok=True)
    path = os.path.join(root, STATE_DIR, f"grid_{hashlib.sha1(text.encode()).hexdigest()[:10]}.tsv")
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path


def array_ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``'0-2,5,7-8'`` (sbatch --array's syntax)."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def array_script(args: argparse.Namespace, grid_path: str, indices: Sequence[int]) -> str:
    """The sbatch script of the job array over ``indices`` of the grid file (module docstring)."""
    logs = os.path.join(args.root, STATE_DIR, "logs")
    lines = ["#!/bin/bash", "# Written by scripts/sweep.py; one grid point per array index (line of the grid file).",
             f"#SBATCH --job-name={args.job_name}",
             f"#SBATCH --array={array_ranges(indices)}%{args.throttle}",
             "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR1@{args.grace}",
             f"#SBATCH --time={args.time}",
             "#SBATCH --open-mode=append",
             f"#SBATCH --output={logs}/%A_%a.out",
             f"#SBATCH --cpus-per-task={args.cpus_per_task}"]
    if args.nodes > 1 or args.nproc_per_node:
        lines += [f"#SBATCH --nodes={args.nodes}", "#SBATCH --ntasks-per-node=1"]
    for flag, value in (("gres", args.gres), ("partition", args.partition), ("mem", args.mem)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"export SWEEP_PYTHON={shlex.quote(args.python)}",
              f"export SWEEP_NPROC_PER_NODE={args.nproc_per_node}",
              f"export SWEEP_MAX_REQUEUES={args.max_requeues}",
              f"export SWEEP_SRUN={int(args.srun)}",
              f"exec bash {shlex.quote(TASK_SCRIPT)} {shlex.quote(grid_path)}", ""]
    return "\n".join(lines)


def queued_arrays(root: str) -> List[str]:
    """Array job ids in the queue (pending, running, requeued) whose script is one of this sweep's
    ``ROOT/_sweep/array_*.sbatch`` (none when squeue is missing or fails)."""
    try:
        listed = subprocess.run(["squeue", "-h", "-o", "%F|%o"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    prefix = os.path.join(root, STATE_DIR, "array_")
    found = [line.split("|", 1)[0] for line in listed.stdout.splitlines()
             if "|" in line and line.split("|", 1)[1].startswith(prefix)]
    return sorted(set(found))


def submit(args: argparse.Namespace, points: Sequence[GridPoint], pending: Sequence[int]) -> int:
    """Write the grid and array script and ``sbatch`` it (``--dry``: print them); returns the exit code."""
    grid_path = write_grid(args.root, points, args.num_eval_random if args.random_baseline else 0) if not args.dry \
        else os.path.join(args.root, STATE_DIR, "grid_ID.tsv")
    script = array_script(args, grid_path, pending)
    script_path = grid_path.replace("grid_", "array_").replace(".tsv", ".sbatch")
    if args.dry:
        print(f"+ sbatch {script_path}")
        print(script)
        for index in pending:
            print(f"+ {args.python} distill.py {shlex.join(points[index].argv)} "
                  f"--run_dir {shlex.quote(os.path.join(args.root, points[index].name))} --resume")
        return 0
    queued = queued_arrays(args.root)
    if queued:
        raise SweepError(f"job array {queued[0]} of this sweep (--root {args.root}) is still queued or running; "
                         f"submit again once it has ended (squeue), or scancel {queued[0]} first")
    os.makedirs(os.path.join(args.root, STATE_DIR, "logs"), exist_ok=True)
    with open(script_path, "w") as handle:
        handle.write(script)
    try:
        done = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True, cwd=REPO)
    except FileNotFoundError:
        raise SweepError("--scheduler slurm: sbatch is not on PATH (a SLURM client; for a local cluster: "
                         "bash scripts/slurm/local_cluster.sh start)") from None
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SweepError(f"sbatch {script_path} failed: {message}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job array {job_id}: {len(pending)} grid point(s) of {len(points)} ({script_path}); "
          f"logs in {os.path.join(args.root, STATE_DIR, 'logs')}; table: python3 scripts/sweep.py gather {args.root}")
    return 0


def run_local(args: argparse.Namespace, points: Sequence[GridPoint], pending: Sequence[int]) -> int:
    """Run the pending points here, one after another (``--dry``: print the commands). A stop
    (Ctrl-C, SIGTERM) is passed to the running stage, which checkpoints; the sweep then ends with
    130 and, started again, continues. A failed point is recorded and the sweep goes on."""
    stop = {"requested": False, "child": None}

    def on_signal(signum, _frame):
        stop["requested"] = True
        if stop["child"] is not None and signum == signal.SIGTERM:  # Ctrl-C reaches the child itself
            stop["child"].send_signal(signal.SIGTERM)

    failed = 0
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if not args.dry else {}
    try:
        for index in pending:
            point = points[index]
            run_dir = os.path.join(args.root, point.name)
            steps = []
            if not os.path.isfile(os.path.join(run_dir, "results.json")):
                steps.append(("distill", ["distill.py", *point.argv, "--run_dir", run_dir, "--resume"]))
            if args.random_baseline:
                steps.append(("evaluate", ["evaluate.py", *evaluate_argv(point, args.num_eval_random),
                                           "--syn_path", run_dir, "--out", os.path.join(run_dir, "eval.json")]))
            for step, argv in steps:
                print(f"+ {args.python} {shlex.join(argv)}", flush=True)
                if args.dry:
                    continue
                stop["child"] = subprocess.Popen([args.python, *argv], cwd=REPO)
                code = stop["child"].wait()
                stop["child"] = None
                os.makedirs(os.path.join(args.root, STATE_DIR, "exit"), exist_ok=True)
                with open(os.path.join(args.root, STATE_DIR, "exit", point.name), "w") as handle:
                    handle.write(f"{step} {code}\n")
                if stop["requested"] or code == 130:
                    print(f"sweep: stopped in {point.name} ({step} exit {code}); run the same command again to "
                          "continue", file=sys.stderr)
                    return 130
                if code != 0:
                    print(f"sweep: {point.name}: {step} failed (exit {code}); going on", file=sys.stderr)
                    failed += 1
                    break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------
# gather
# ------------------------------------------------------------------------------------------------

def grid_names(root: str) -> List[str]:
    """Grid point names of every grid file under ``root/_sweep`` (first seen order), else of every
    directory under ``root`` holding a results.json or last.pt."""
    names: List[str] = []
    for path in sorted(glob.glob(os.path.join(root, STATE_DIR, "grid_*.tsv")), key=os.path.getmtime):
        with open(path) as handle:
            for line in handle:
                name = line.split("\t", 1)[0].strip()
                if name and name not in names:
                    names.append(name)
    if not names:
        names = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(root, "*", "results.json"))
                       + glob.glob(os.path.join(root, "*", "last.pt")))
        names = list(dict.fromkeys(names))
    return names


def _random_row(eval_path: str, model: str) -> Optional[dict]:
    """The random-real row's ``{mean, std}`` (fractions) for ``model`` in an evaluate.py --out JSON."""
    if not os.path.isfile(eval_path):
        return None
    with open(eval_path) as handle:
        report = json.load(handle)
    for row in (report.get("comparison") or {}).get("rows") or []:
        if row.get("kind") == "random" and model in (row.get("results") or {}):
            return row["results"][model]
    return None


def gather_rows(root: str, model: Optional[str] = None) -> List[Dict[str, object]]:
    """One record per grid point under ``root``: name, method, dataset, ipc, seed, status, model,
    acc_mean / acc_std (%), n (networks), random_mean / random_std (%, NaN without eval.json),
    distill_seconds, seconds_per_iteration, peak_memory_mib. ``model``: the evaluation network
    (default: the first one of each results.json)."""
    rows = []
    for name in grid_names(root):
        run_dir = os.path.join(root, name)
        row: Dict[str, object] = {"point": name, "status": point_status(root, name), "model": "", "acc_mean": math.nan,
                                  "acc_std": math.nan, "n": 0, "random_mean": math.nan, "random_std": math.nan,
                                  "distill_seconds": math.nan, "seconds_per_iteration": math.nan,
                                  "peak_memory_mib": math.nan}
        results_path = os.path.join(run_dir, "results.json")
        if os.path.isfile(results_path):
            with open(results_path) as handle:
                results = json.load(handle)
            row["status"] = "finished"
            accuracy = results.get("accuracy") or {}
            chosen = model or next(iter(accuracy), "")
            row["model"] = chosen
            for key in ("method", "dataset", "ipc", "seed"):
                row[key] = results.get(key, "")
            if chosen in accuracy:
                found = accuracy[chosen]
                row.update(acc_mean=100 * found["mean"], acc_std=100 * found["std"], n=len(found.get("accs") or []))
            else:
                row["status"] = f"finished, no {chosen} accuracy"
            random_row = _random_row(os.path.join(run_dir, "eval.json"), chosen)
            if random_row:
                row.update(random_mean=100 * random_row["mean"], random_std=100 * random_row["std"])
            cost = results.get("cost") or {}
            row["distill_seconds"] = cost.get("distill_seconds", math.nan)
            row["seconds_per_iteration"] = results.get("seconds_per_iteration", math.nan)
            peak = (cost.get("peak_memory") or {}).get("bytes")
            row["peak_memory_mib"] = peak / 2 ** 20 if peak else math.nan
        rows.append(row)
    return rows


def _cell(mean, std) -> str:
    return "-" if isinstance(mean, float) and math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _number(value, digits: int) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"


def write_table(rows: Sequence[dict], out_dir: str) -> tuple:
    """``sweep_table.csv`` (every field, accuracies in %) and ``sweep_table.md`` in ``out_dir``;
    returns both paths and the Markdown text."""
    os.makedirs(out_dir, exist_ok=True)
    fields = ["point", "method", "dataset", "ipc", "seed", "status", "model", "acc_mean", "acc_std", "n",
              "random_mean", "random_std", "distill_seconds", "seconds_per_iteration", "peak_memory_mib"]
    csv_path = os.path.join(out_dir, "sweep_table.csv")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else
                                 ("" if isinstance(v, float) else v)) for k, v in row.items()})
    lines = ["| grid point | status | accuracy (%) | random real (%) | networks | distill time (s) | "
             "s/iteration | peak memory (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['point']} | {row['status']} | {_cell(row['acc_mean'], row['acc_std'])} | "
                     f"{_cell(row['random_mean'], row['random_std'])} | {row['n']} | "
                     f"{_number(row['distill_seconds'], 1)} | {_number(row['seconds_per_iteration'], 3)} | "
                     f"{_number(row['peak_memory_mib'], 0)} |")
    models = sorted({str(r["model"]) for r in rows if r["model"]})
    text = "\n".join(lines) + (f"\n\nTest accuracy of {', '.join(models)}, mean ± std over the networks; random real: "
                               "ipc random real images per class under the same protocol (evaluate.py "
                               "--random_baseline, with sweep.py --random_baseline).\n")
    md_path = os.path.join(out_dir, "sweep_table.md")
    with open(md_path, "w") as handle:
        handle.write(text)
    return csv_path, md_path, text


def gather_main(argv: Sequence[str]) -> int:
    """``sweep.py gather ROOT [--model M] [--out_dir D]``; returns the exit code (1: a point unfinished)."""
    parser = argparse.ArgumentParser(prog="sweep.py gather", description="The table of a sweep's grid points.")
    parser.add_argument("root", help="the sweep's --root")
    parser.add_argument("--model", default=None, help="evaluation network (default: the first of each results.json)")
    parser.add_argument("--out_dir", default=None, help="where sweep_table.csv / .md go (default: ROOT)")
    args = parser.parse_args(argv)
    rows = gather_rows(args.root, args.model)
    if not rows:
        raise SweepError(f"gather {args.root}: no grid file ({STATE_DIR}/grid_*.tsv) and no run directory with "
                         "results.json or last.pt")
    csv_path, md_path, text = write_table(rows, args.out_dir or args.root)
    print(text)
    unfinished = [r["point"] for r in rows if r["status"] != "finished"]
    print(f"wrote {csv_path}, {md_path}: {len(rows) - len(unfinished)} of {len(rows)} grid point(s) finished"
          + (f"; not finished: {', '.join(unfinished)}" if unfinished else ""))
    return 1 if unfinished else 0


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The sweep's flags (``sweep.py gather`` has its own)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_argument_group("grid")
    grid.add_argument("--methods", nargs="+", default=[], help="distill.py --method values")
    grid.add_argument("--datasets", nargs="+", default=[], help="--dataset values")
    grid.add_argument("--ipcs", nargs="+", type=int, default=[], help="--ipc values")
    grid.add_argument("--seeds", nargs="+", type=int, default=[0], help="--seed values (default: 0)")
    grid.add_argument("--presets", nargs="+", default=[], help="YAML presets (distill.py --config), instead of "
                      "--methods/--datasets/--ipcs")
    grid.add_argument("--extra", default="", help="flags added to every distill.py command, one quoted string")
    grid.add_argument("--root", default="result/sweep", help="where the run directories go (default: result/sweep)")
    grid.add_argument("--random_baseline", action="store_true", help="after each distillation, evaluate.py "
                      "--random_baseline into RUN_DIR/eval.json (the random-real row of the table)")
    grid.add_argument("--num_eval_random", type=int, default=5, help="networks per row of that evaluation (default: 5)")
    run = parser.add_argument_group("running")
    run.add_argument("--scheduler", choices=["local", "slurm"], default="local",
                     help="local: one after another here (default); slurm: one job array")
    run.add_argument("--dry", action="store_true", help="print the commands (and the sbatch script); run nothing")
    run.add_argument("--python", default="python3", help="interpreter of the stage scripts (default: python3)")
    slurm = parser.add_argument_group("slurm (--scheduler slurm)")
    slurm.add_argument("--throttle", type=int, default=8, help="array tasks running at once (--array=...%%N; default 8)")
    slurm.add_argument("--time", default="24:00:00", help="time limit of each array task (default 24:00:00)")
    slurm.add_argument("--grace", type=int, default=120, help="seconds between the warning signal and the time limit "
                       "(default 120; at least 60: a stop takes up to about 31 s plus the checkpoint)")
    slurm.add_argument("--gres", default="", help="e.g. gpu:1 (default: none)")
    slurm.add_argument("--partition", default="", help="partition (default: the cluster's default)")
    slurm.add_argument("--cpus_per_task", type=int, default=1, help="CPUs per array task (default 1)")
    slurm.add_argument("--mem", default="", help="memory per node, e.g. 32G (default: the cluster's default)")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per grid point (with --nproc_per_node; default 1)")
    slurm.add_argument("--nproc_per_node", type=int, default=0, help="run each point under srun + torchrun with this "
                       "many processes per node (default 0: one plain process)")
    slurm.add_argument("--srun", action="store_true", help="start torchrun under srun also on one node (always "
                       "with --nodes > 1)")
    slurm.add_argument("--max_requeues", type=int, default=20, help="self-requeues of one element (default 20)")
    slurm.add_argument("--job_name", default="sweep", help="SLURM job name (default: sweep)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, expand the grid, check every command, run or submit the unfinished points; or
    ``gather``. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["gather"]:
            return gather_main(argv[1:])
        args = build_parser().parse_args(argv)
        if args.throttle < 1 or args.cpus_per_task < 1 or args.nodes < 1 or args.nproc_per_node < 0:
            raise SweepError("--throttle, --cpus_per_task and --nodes must be >= 1, --nproc_per_node >= 0")
        if args.grace < 1:
            raise SweepError(f"--grace {args.grace}: must be >= 1 (seconds)")
        if args.presets and (args.methods or args.datasets or args.ipcs):
            raise SweepError("--presets replaces --methods/--datasets/--ipcs: give one or the other")
        args.root = os.path.abspath(args.root)
        points = expand_grid(args.methods, args.datasets, args.ipcs, args.seeds, args.extra, args.presets)
        check_commands(points)
        statuses = [point_status(args.root, p.name, args.random_baseline) for p in points]
        pending = [i for i, status in enumerate(statuses) if status not in ("finished", "running")]
        for point, status in zip(points, statuses):
            if status in ("finished", "running"):
                print(f"sweep: {point.name}: {status}, skipped")
        if not pending:
            print(f"sweep: all {len(points)} grid point(s) finished or running; table: "
                  f"python3 scripts/sweep.py gather {args.root}")
            return 0
        if args.scheduler == "slurm":
            return submit(args, points, pending)
        return run_local(args, points, pending)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
