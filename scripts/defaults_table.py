#!/usr/bin/env python3
"""The table of ``scripts/defaults_sweep.sh``: one row per method, its set beside random real images
under the protocol recorded with the set, and whether the set beats them.

Reads every ``*/eval.json`` (``evaluate.py --random_baseline --out``) under the directory, with the
``results.json`` beside it (method, network, iterations). A row says "above random" when the set's
mean accuracy exceeds the random rows' by more than the larger of the two standard deviations,
"within noise" when the gap is smaller, and "below random" otherwise. A step the sweep recorded
in ``failed.txt`` (``method step status`` lines) is a row of its own unless the method has a result.

    python3 scripts/defaults_table.py result/defaults_sweep           # Markdown on stdout
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import List, Optional

import tables

HEADER = ("method", "network", "iterations", "protocol", "set %", "random real %", "IOR", "verdict")


def verdict(set_mean: float, set_std: float, random_mean: float, random_std: float) -> str:
    """``above random``, ``within noise`` or ``below random`` (accuracies in any one unit): the gap
    must exceed the larger standard deviation to count."""
    gap = set_mean - random_mean
    if abs(gap) <= max(set_std, random_std):
        return "within noise"
    return "above random" if gap > 0 else "below random"


def protocol_text(protocol: dict) -> str:
    """A short description of a recorded evaluation protocol: epochs, optimiser, augmentation, labels."""
    parts = [f"{protocol.get('epochs')} epochs", str(protocol.get("optimizer", "SGD")),
             str(protocol.get("augmentation", "none"))]
    if protocol.get("mix_type"):
        parts.append(str(protocol["mix_type"]))
    labels = protocol.get("label_regime") or protocol.get("labels")
    if labels and labels != "hard":
        parts.append(f"{labels} labels")
    if protocol.get("lr") is not None:
        parts.append(f"lr {protocol['lr']:g}" if isinstance(protocol["lr"], (int, float)) else f"lr {protocol['lr']}")
    return ", ".join(parts)


def row_of(eval_path: str) -> Optional[List[str]]:
    """The table row of one ``eval.json`` (None when it holds no synthetic row)."""
    with open(eval_path) as handle:
        report = json.load(handle)
    comparison = report.get("comparison") or {}
    rows = comparison.get("rows") or []
    model = (comparison.get("models") or [None])[0]
    synthetic = [r for r in rows if r.get("kind") == "synthetic" and r.get("augmented", True)]
    if not synthetic or model is None:
        return None
    results_path = os.path.join(os.path.dirname(eval_path), "results.json")
    run = {}
    if os.path.isfile(results_path):
        with open(results_path) as handle:
            run = json.load(handle)
    # The row of the method's own label regime (SRe2L, CDA, RDED: soft), recorded with its protocol.
    regime = next((p.get("label_regime") for p in (run.get("protocol") or {}).values() if p.get("label_regime")),
                  "hard")
    own = next((r for r in synthetic if r.get("labels") == regime), synthetic[0])
    randoms = [r for r in rows if r.get("kind") == "random" and r.get("labels") == own.get("labels")
               and r.get("augmented", True) == own.get("augmented", True)]
    result = own["results"][model]
    iterations = str((run.get("config") or {}).get("iterations", run.get("iterations", "?")))
    iterations = "–" if iterations == "0" else iterations  # a selection (RDED, coresets): no iterations
    set_cell = f"{100 * result['mean']:.2f} ± {100 * result['std']:.2f}"
    if not randoms:
        return [own.get("method", "?"), model, iterations, protocol_text(result.get("protocol") or {}),
                set_cell, "–", "–", "no random row"]
    base = randoms[0]["results"][model]
    gap = 100 * (result["mean"] - base["mean"])
    return [own.get("method", "?"), model, iterations, protocol_text(result.get("protocol") or {}), set_cell,
            f"{100 * base['mean']:.2f} ± {100 * base['std']:.2f}", f"{gap:+.2f}",
            verdict(result["mean"], result["std"], base["mean"], base["std"])]


def failed_rows(directory: str, done: set) -> List[List[str]]:
    """Rows for the steps ``failed.txt`` records, for methods without an ``eval.json`` row."""
    path = os.path.join(directory, "failed.txt")
    rows = []
    if os.path.isfile(path):
        with open(path) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 3 and parts[0] not in done:
                    rows.append([parts[0], "–", "–", "–", "–", "–", "–", f"{parts[1]} failed (exit {parts[2]})"])
                    done.add(parts[0])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="the sweep's OUT directory")
    args = parser.parse_args(argv)
    rows = [row for path in sorted(glob.glob(os.path.join(args.directory, "*", "eval.json")))
            if (row := row_of(path)) is not None]
    rows += failed_rows(args.directory, {row[0] for row in rows})
    if not rows:
        print(f"error: no */eval.json under {args.directory}", file=sys.stderr)
        return 1
    print(tables.format_table(HEADER, rows, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
