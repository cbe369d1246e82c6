#!/usr/bin/env python3
"""How well does each assessment predict the measured accuracy of a synthetic set?

Walks a directory tree for the assessment files of ``evaluate.py --assess`` (``*_assess.json``)
that sit in a run directory of ``distill.py`` (beside its ``results.json``), pairs each
assessment with the run's measured evaluation accuracy, and prints the Spearman and Kendall rank
correlations (``scipy.stats.spearmanr`` / ``kendalltau``, with their two-sided p-values) as a
Markdown table; one scatter plot per assessment goes to ``--plot_dir``. The README of
yaolu-zjut/DDInterpreter ("Which Assessment Should be Prioritized in Dataset Distillation?")
reports that the OM accuracy correlates strongly with the accuracy of networks trained on a set.

Example:
    python evaluate.py --dataset FashionMNIST --assess --syn_path result/DC_FashionMNIST_ConvNet_1ipc/res_DC_FashionMNIST_ConvNet_1ipc.pt
    python scripts/assess_correlation.py result --plot_dir result/assess_plots
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import cli  # noqa: E402
import storage  # noqa: E402
import utils  # noqa: E402
from sets import assess  # noqa: E402

MIN_SETS = 3


def find_pairs(root: str, model: Optional[str] = None) -> List[dict]:
    """Every ``*_assess.json`` under ``root`` with the accuracy of the ``results.json`` beside it.

    Args:
        root: directory searched recursively.
        model: which evaluation network's accuracy to take from ``results.json``; default: its
            first entry (the distillation network in distill.py's order).

    Returns:
        One ``{'path', 'run_dir', 'accuracy', 'ipc', 'metrics'}`` per assessment with a measured
        accuracy (in [0, 1]), sorted by path.

    Raises:
        utils.UserError: ``root`` is no directory, or ``results.json`` lacks ``--model``.
    """
    if not os.path.isdir(root):
        raise utils.UserError(f"{root}: not a directory")
    pairs = []
    for directory, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith("_assess.json")):
            results_path = os.path.join(directory, "results.json")
            if not os.path.isfile(results_path):
                print(f"warning: {os.path.join(directory, name)} has no results.json beside it; skipped", file=sys.stderr)
                continue
            with open(results_path) as handle:
                results = json.load(handle)
            accuracy = results.get("accuracy") or {}
            chosen = model or next(iter(accuracy), None)
            if chosen not in accuracy:
                raise utils.UserError(f"{results_path} has no accuracy of --model {chosen} "
                                      f"(it has: {', '.join(accuracy) or 'none'})")
            mean = accuracy[chosen].get("mean")
            if mean is None or (isinstance(mean, float) and math.isnan(mean)):
                print(f"warning: {results_path} has no measured accuracy (num_eval 0?); skipped", file=sys.stderr)
                continue
            with open(os.path.join(directory, name)) as handle:
                metrics = json.load(handle)["metrics"]
            pairs.append({"path": os.path.join(directory, name), "run_dir": directory, "accuracy": float(mean),
                          "ipc": results.get("ipc"), "metrics": metrics})
    return pairs


def input_files(root: str) -> List[str]:
    """The files :func:`find_pairs` reads under ``root``: every ``*_assess.json`` and the
    ``results.json`` beside it (what ``--out`` must never replace)."""
    found = []
    for directory, _, files in sorted(os.walk(root)) if os.path.isdir(root) else []:
        assessments = [os.path.join(directory, f) for f in sorted(files) if f.endswith("_assess.json")]
        found += assessments + ([os.path.join(directory, "results.json")] if assessments else [])
    return found


def correlations(pairs: List[dict]) -> List[dict]:
    """Spearman and Kendall correlation of every assessment with the accuracy.

    Args:
        pairs: :func:`find_pairs` output (at least 3).

    Returns:
        One ``{'metric', 'description', 'spearman', 'spearman_p', 'kendall', 'kendall_p', 'n'}``
        per metric of ``assess.METRICS`` present in every pair (NaN where a column is constant).

    Raises:
        utils.UserError: fewer than 3 pairs.
    """
    from scipy import stats

    if len(pairs) < MIN_SETS:
        raise utils.UserError(f"found {len(pairs)} assessed set(s) with a measured accuracy; correlations need at "
                              f"least {MIN_SETS} (run evaluate.py --assess --syn_path RUN_DIR/res_*.pt for more runs)")
    accuracy = [p["accuracy"] for p in pairs]
    rows = []
    for key, description, _ in assess.METRICS:
        if not all(key in p["metrics"] for p in pairs):
            continue
        values = [p["metrics"][key] for p in pairs]
        constant = len(set(values)) < 2 or len(set(accuracy)) < 2
        if constant:  # scipy warns and returns NaN; say so without the warning
            rho = rho_p = tau = tau_p = float("nan")
        else:
            rho, rho_p = stats.spearmanr(values, accuracy)
            tau, tau_p = stats.kendalltau(values, accuracy)
        rows.append({"metric": key, "description": description, "spearman": float(rho), "spearman_p": float(rho_p),
                     "kendall": float(tau), "kendall_p": float(tau_p), "n": len(values)})
    return rows


def by_ipc(pairs: List[dict]) -> dict:
    """The pairs grouped by images per class, for ipc values with at least 3 sets.

    Sets of different ipc differ in accuracy for reasons no assessment of the images measures
    (an ipc-1 set is easy for the original models and trains worse networks), so a correlation over
    mixed ipc can hide or invert the one within each ipc.

    Returns:
        ``{ipc: [pair, ...]}`` in ascending ipc; pairs without a recorded ipc are left out.
    """
    groups: dict = {}
    for pair in pairs:
        if pair.get("ipc") is not None:
            groups.setdefault(int(pair["ipc"]), []).append(pair)
    return {ipc: groups[ipc] for ipc in sorted(groups) if len(groups[ipc]) >= MIN_SETS}


def markdown_table(rows: List[dict]) -> str:
    """The correlations as a Markdown table."""
    lines = ["| assessment | Spearman rho | p | Kendall tau | p | n |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['metric']}: {r['description']} | {r['spearman']:.3f} | {r['spearman_p']:.3g} | "
                     f"{r['kendall']:.3f} | {r['kendall_p']:.3g} | {r['n']} |")
    return "\n".join(lines)


def scatter_plots(pairs: List[dict], rows: List[dict], plot_dir: str) -> List[str]:
    """One PNG per assessment: the assessment (x) against the accuracy in % (y).

    Returns:
        The written paths (``{plot_dir}/scatter_{metric}.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    accuracy = [100 * p["accuracy"] for p in pairs]
    paths = []
    for r in rows:
        figure, axis = plt.subplots(figsize=(4, 3.2))
        for ipc in sorted({p.get("ipc") for p in pairs}, key=lambda v: (v is None, v)):
            chosen = [i for i, p in enumerate(pairs) if p.get("ipc") == ipc]
            axis.scatter([pairs[i]["metrics"][r["metric"]] for i in chosen], [accuracy[i] for i in chosen], s=18,
                         label=f"ipc {ipc}" if ipc is not None else "ipc ?")
        axis.legend(fontsize=7)
        axis.set_xlabel(r["description"], fontsize=8)
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"Spearman {r['spearman']:.2f}, Kendall {r['kendall']:.2f} (n={r['n']})", fontsize=9)
        figure.tight_layout()
        path = os.path.join(plot_dir, f"scatter_{r['metric']}.png")
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    """Parse, pair, correlate, print, plot. Returns the exit code (2 on a user mistake)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="directory searched recursively for *_assess.json beside results.json")
    parser.add_argument("--model", default=None, help="evaluation network whose accuracy to use (default: the first)")
    parser.add_argument("--plot_dir", default=None, help="where the scatter PNGs go (default: ROOT/assess_correlation)")
    parser.add_argument("--out", default=None, help="also write the correlations as JSON here (never one of the "
                                                    "files read)")
    args = parser.parse_args(argv)
    try:
        if args.out:  # before any work: writable, and never one of the files read
            cli.check_writable(args.out, "--out")
            cli.refuse_inputs_as_outputs("--out", args.out, [args.out], input_files(args.root))
        pairs = find_pairs(args.root, args.model)
        rows = correlations(pairs)
    except utils.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(pairs)} assessed synthetic sets under {args.root}\n")
    print(markdown_table(rows))
    per_ipc = by_ipc(pairs) if len({p.get("ipc") for p in pairs}) > 1 else {}
    per_ipc_rows = {}
    for ipc, group in per_ipc.items():
        per_ipc_rows[ipc] = correlations(group)
        print(f"\nipc {ipc} only ({len(group)} sets)\n")
        print(markdown_table(per_ipc_rows[ipc]))
    paths = scatter_plots(pairs, rows, args.plot_dir or os.path.join(args.root, "assess_correlation"))
    print(f"\nscatter plots: {os.path.dirname(paths[0]) if paths else '-'} ({len(paths)} files)")
    if args.out:  # the toolkit's atomic writer: a failed write leaves the previous file as it was
        try:
            storage.write_json(args.out, {"sets": pairs, "correlations": rows,
                                          "correlations_by_ipc": {str(k): v for k, v in per_ipc_rows.items()}})
        except OSError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
