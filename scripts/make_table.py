#!/usr/bin/env python3
"""Gather a directory of result files into one papers-style table and one figure per dataset.

Reads, recursively under each given directory:

* ``results.json`` of ``distill.py`` runs (method, dataset, ipc, accuracy and protocol per model);
* ``evaluate.py --out`` JSON files with a ``comparison`` record (every row: synthetic sets, random
  real images, whole dataset);
* older ``evaluate.py --baseline random --out random.json`` files without it, whose dataset and
  ipc are taken from the ``results.json`` in the same directory (``scripts/fmnist_cpu_table.sh``).

Writes ``table.md`` (rows: dataset x ipc; columns: methods, then random real images and the
whole-dataset accuracy; cells ``mean ± std`` in %, with ``(+x)`` the improvement over random real
images of the same ipc under the same protocol, DD-Ranking's IOR), ``table.csv`` (one record per
dataset, ipc, method, model and protocol; mean and std in %, ior in points, 4 decimals) and
``{dataset}_acc_vs_ipc.png`` (accuracy vs ipc per method, error bars = std).

Example:
    python scripts/make_table.py result/fmnist_cpu --model ConvNet --out_dir result/tables
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

import numpy as np
import pandas as pd

import storage
import utils
from cli.distill_flags import CONFIG_MAX_BYTES, PresetLoader
from sets import comparison

COLUMNS = ["dataset", "ipc", "method", "model", "epochs", "augmentation", "labels", "accs", "source"]


def shown(text):
    """``text`` as it can be printed and written as UTF-8: a path or name read from a directory
    whose name is not valid UTF-8 (Python keeps such bytes as lone surrogates) or from a JSON
    string with lone surrogates gets U+FFFD in their place; other values come back unchanged."""
    if not isinstance(text, str):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (a JSON "\ud800"): "?" for each
        return text.encode("utf-8", "replace").decode("utf-8")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry(dataset, ipc, method, model, result, source, field) -> dict:
    """One accuracy entry (keys of :data:`COLUMNS`) of the record ``result`` of ``model``, found at
    ``field`` (e.g. ``accuracy.ConvNet``) of the file ``source``.

    Raises:
        utils.UserError: one line naming the file and the field: ``result`` is not a mapping, its
            ``accs`` is not a list of finite numbers in [0, 1] (accuracies are fractions), its
            ``mean`` / ``std`` is not a number, the ipc is not an integer, or the dataset or method
            is not a string.
    """
    where = f"{shown(source)}: {shown(field)}"
    if not isinstance(result, dict):
        raise utils.UserError(f"{where} is {json.dumps(result)[:80]}, not a record with 'accs' (accuracies in [0, 1])")
    accs = result.get("accs") or []
    if not isinstance(accs, list) or not all(_is_number(a) and math.isfinite(a) and 0 <= a <= 1 for a in accs):
        raise utils.UserError(f"{where}.accs is {json.dumps(accs)[:80]}, not a list of accuracies (numbers in [0, 1])")
    for key in ("mean", "std"):
        if result.get(key) is not None and not _is_number(result[key]):
            raise utils.UserError(f"{where}.{key} is {json.dumps(result[key])[:80]}, not a number")
    if not isinstance(ipc, int) or isinstance(ipc, bool) or ipc < 1:
        raise utils.UserError(f"{shown(source)}: ipc is {json.dumps(ipc)[:80]}, not a positive integer")
    for name, value in (("dataset", dataset), ("method", method), ("model", model)):
        if not isinstance(value, str):
            raise utils.UserError(f"{shown(source)}: {name} is {json.dumps(value)[:80]}, not a string")
    protocol = result.get("protocol")
    protocol = protocol if isinstance(protocol, dict) else {}
    return {"dataset": shown(dataset), "ipc": ipc, "method": shown(method), "model": shown(model),
            "epochs": protocol.get("epochs"), "augmentation": shown(protocol.get("augmentation")),
            "labels": shown(protocol.get("labels") or "hard"), "accs": [float(a) for a in accs],
            "source": shown(source)}


def _read_json(path: str):
    """The JSON value in ``path``.

    Raises:
        utils.UserError: unreadable, or not JSON (one line naming the file).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bytes that are not UTF-8
        raise utils.UserError(f"{shown(path)}: not a readable JSON result file ({shown(' '.join(str(error).split()))})") \
            from None


def variant_suffix(results: dict, run_dir: str) -> str:
    """``+CLoM`` / ``+F`` for a distill.py run that used the CLoM regulariser or feature labels, so
    that such runs get a column of their own instead of being pooled with the plain method.

    Reads ``results.json``'s ``clom`` and ``feature_labels`` records; runs written before
    ``feature_labels`` was recorded there are recognised by the ``config.yaml`` beside it.
    """
    suffix = "+CLoM" if results.get("clom") else ""
    feature_labels = results.get("feature_labels")
    if feature_labels is None and "feature_labels" not in results:
        config_path = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(config_path) and os.path.getsize(config_path) <= CONFIG_MAX_BYTES:
            import yaml

            try:  # an alias, bad text or bad YAML: no record to read, as for a run without the file
                with open(config_path, encoding="utf-8") as handle:
                    config = yaml.load(handle, Loader=PresetLoader) or {}  # noqa: S506 (safe, no aliases)
            except (yaml.YAMLError, UnicodeDecodeError):
                config = {}
            distill = config.get("distill") if isinstance(config, dict) else None
            feature_labels = distill.get("feature_labels") if isinstance(distill, dict) else None
    return suffix + ("+F" if feature_labels else "")


def read_file(path: str) -> list:
    """The accuracy entries of one result file (``[]`` for a JSON file of another kind).

    Returns:
        dicts with the keys of :data:`COLUMNS` (``accs`` in [0, 1]).

    Raises:
        utils.UserError: the file (or the ``results.json`` a ``random*.json`` takes its dataset and
            ipc from) is not valid JSON, or an accuracy record in it is malformed (:func:`_entry`:
            one line naming the file and the field, e.g. ``accuracy.ConvNet.accs``).
    """
    blob = _read_json(path)
    if not isinstance(blob, dict):
        return []
    if "comparison" in blob:
        try:
            rows = comparison.rows_from_json(blob)
        except (TypeError, AttributeError):  # rows that are not records of comparison.Row's fields
            raise utils.UserError(f"{shown(path)}: comparison.rows is not a list of table rows") from None
        return [_entry(row.dataset, row.ipc, row.method, model, result, path, f"comparison row {row.name!r} {model}")
                for row in rows if row.kind != "whole"
                for model, result in (row.results.items() if isinstance(row.results, dict) else [("results", None)])]
    if {"method", "dataset", "ipc", "accuracy"} <= set(blob):
        accuracy, protocols = blob["accuracy"], blob.get("protocol")
        if not isinstance(accuracy, dict):
            raise utils.UserError(f"{shown(path)}: accuracy is {json.dumps(accuracy)[:80]}, not a record per "
                                  "evaluation model")
        if not isinstance(blob["method"], str):
            raise utils.UserError(f"{shown(path)}: method is {json.dumps(blob['method'])[:80]}, not a string")
        method = blob["method"] + variant_suffix(blob, os.path.dirname(path))
        protocols = protocols if isinstance(protocols, dict) else {}
        return [_entry(blob["dataset"], blob["ipc"], method, model,
                       {**result, "protocol": protocols.get(model)} if isinstance(result, dict) else result, path,
                       f"accuracy.{model}")
                for model, result in accuracy.items()]
    sibling = os.path.join(os.path.dirname(path), "results.json")
    per_model = {k: v for k, v in blob.items() if isinstance(v, dict) and "accs" in v}
    if per_model and os.path.basename(path).startswith("random") and os.path.isfile(sibling):
        run = _read_json(sibling)
        if not isinstance(run, dict) or not {"dataset", "ipc"} <= set(run):
            raise utils.UserError(f"{shown(sibling)}: no dataset and ipc for {shown(os.path.basename(path))} beside it")
        return [_entry(run["dataset"], run["ipc"], "random", model, result, path, model)
                for model, result in per_model.items()]
    return []


def gather(directories) -> pd.DataFrame:
    """Every entry of every ``*.json`` under ``directories`` (see the module docstring).

    Raises:
        utils.UserError: a directory does not exist.
    """
    entries = []
    for directory in directories:
        if not os.path.isdir(directory):
            raise utils.UserError(f"{shown(directory)}: no such directory")
        for root, _, files in sorted(os.walk(directory)):
            for name in sorted(files):
                if name.endswith(".json"):
                    entries += read_file(os.path.join(root, name))
    return pd.DataFrame.from_records(entries, columns=COLUMNS)


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """Pool the accuracies of entries with the same dataset, ipc, method, model and protocol
    (epochs, augmentation, labels), and add IOR against the random row of the same key. An entry
    whose key and accuracies equal an earlier one's (the sweep copies one shared random.json into
    every run directory that uses it) is counted once.

    Returns:
        One record per key: ``mean``, ``std`` (% over all pooled networks), ``n``, ``ior``
        (points, NaN when no random row matches), ``sources``.
    """
    keys = ["dataset", "ipc", "method", "model", "epochs", "augmentation", "labels"]
    if frame.empty:
        return pd.DataFrame(columns=[*keys, "mean", "std", "n", "ior", "sources"])
    pooled = defaultdict(lambda: ([], []))
    seen = set()
    for record in frame.to_dict("records"):
        key = tuple(record[k] for k in keys)
        if (key, tuple(record["accs"])) in seen:  # one baseline file copied beside several runs counts once
            continue
        seen.add((key, tuple(record["accs"])))
        pooled[key][0].extend(record["accs"])
        pooled[key][1].append(record["source"])
    rows = []
    for key, (accs, sources) in pooled.items():
        row = dict(zip(keys, key))
        row.update(mean=100 * float(np.mean(accs)) if accs else float("nan"),
                   std=100 * float(np.std(accs)) if accs else float("nan"), n=len(accs),
                   sources=";".join(sorted(set(sources))), accs=accs)
        rows.append(row)
    by_key = {tuple(r[k] for k in keys): r for r in rows}
    for row in rows:
        random_key = tuple("random" if k == "method" else row[k] for k in keys)
        reference = by_key.get(random_key)
        row["ior"] = (comparison.improvement_over_random(row["accs"], reference["accs"])
                      if reference is not None and row["method"] != "random" else float("nan"))
    out = pd.DataFrame(rows).drop(columns=["accs"])
    return out.sort_values(["dataset", "ipc", "method"]).reset_index(drop=True)


def short_augmentation(augmentation) -> str:
    """``DSA color_crop_cutout_flip_scale_rotate`` (the reference strategy) -> ``DSA``, ``DC none`` /
    ``none`` -> ``no aug``, other strings (other DSA strategies included) as they are, so that two
    protocols never share a column name."""
    text = str(augmentation)
    if text == "DSA color_crop_cutout_flip_scale_rotate":
        return "DSA"
    if text in ("DC none", "none", "None"):
        return "no aug"
    return text


def method_label(row, protocols_per_method) -> str:
    """A column name: the method, plus the protocol when a method appears under several."""
    if protocols_per_method[(row["dataset"], row["method"])] > 1:
        return f"{row['method']} ({row['epochs']} ep, {short_augmentation(row['augmentation'])}, {row['labels']})"
    return row["method"]


def paper_table(table: pd.DataFrame, model: str, original_path: str) -> pd.DataFrame:
    """Rows (dataset, ipc) x columns (methods, ``random``, ``whole dataset``) of ``mean ± std (+IOR)``
    cells for one evaluation ``model``; the whole-dataset column comes from ``train_original.py``
    summaries under ``original_path`` (``-`` when none)."""
    chosen = table[table["model"] == model]
    if chosen.empty:
        return pd.DataFrame()
    counts = chosen.groupby(["dataset", "method"])[["epochs", "augmentation", "labels"]].apply(
        lambda g: len(g.drop_duplicates())).to_dict()
    cells = {}
    for row in chosen.to_dict("records"):  # a record without networks (num_eval 0) has no accuracy to show
        cells[((row["dataset"], row["ipc"]), method_label(row, counts))] = (
            comparison.cell(row["mean"], row["std"], row["ior"]) if row["n"] else "n/a (no networks)")
    columns = sorted({c for _, c in cells}, key=lambda c: (c.startswith("random"), c.lower()))
    index = sorted({i for i, _ in cells})
    wide = pd.DataFrame("-", index=pd.MultiIndex.from_tuples(index, names=["dataset", "ipc"]), columns=columns)
    for (i, c), text in cells.items():
        wide.loc[i, c] = text
    whole = []
    for dataset, _ in index:
        found = comparison.whole_dataset_accuracy(original_path, dataset, model)
        whole.append(comparison.cell(100 * found["mean"], 100 * found["std"]) if found else "-")
    wide["whole dataset"] = whole
    return wide


def plot(table: pd.DataFrame, model: str, out_dir: str) -> list:
    """One PNG per dataset: mean accuracy (%) vs ipc per method, error bars = std, log ipc axis.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    chosen = table[table["model"] == model]
    for dataset, group in chosen.groupby("dataset"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (method, epochs, aug, labels), line in group.groupby(["method", "epochs", "augmentation", "labels"],
                                                                 dropna=False):
            line = line.sort_values("ipc")
            ax.errorbar(line["ipc"], line["mean"], yerr=line["std"], marker="o", capsize=3,
                        label=f"{method} ({epochs} ep, {short_augmentation(aug)})")
        ax.set_xscale("log")
        ax.set_xlabel("images per class")
        ax.set_ylabel(f"test accuracy (%), {model}")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(dataset)).lstrip(".") or "dataset"  # a name from a file: no path
        path = os.path.join(out_dir, f"{safe}_acc_vs_ipc.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    """Parse, gather, write the table and the figures; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="directories searched recursively for result JSON files")
    parser.add_argument("--model", default="ConvNet", help="evaluation network whose accuracies fill the table")
    parser.add_argument("--out_dir", default=None, help="where table.md, table.csv and figures go (default: first dir)")
    parser.add_argument("--original_path", default="pretrained_model", help="train_original.py --save_path")
    args = parser.parse_args(argv)
    try:
        table = aggregate(gather(args.dirs))
        if table.empty:
            raise utils.UserError(f"no result files (results.json, evaluate.py --out JSON) under {', '.join(args.dirs)}")
        out_dir = args.out_dir or args.dirs[0]
        os.makedirs(out_dir, exist_ok=True)
        wide = paper_table(table, args.model, args.original_path)
        if wide.empty:
            raise utils.UserError(f"--model {args.model}: no results for it; found {', '.join(sorted(table['model'].unique()))}")
    except utils.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    markdown = (wide.reset_index().to_markdown(index=False) + f"\n\nTest accuracy (%) of {args.model}, mean ± std over networks; (+x): improvement "
                "over random real images of the same ipc and protocol (DD-Ranking IOR, points).\n")
    try:  # the toolkit's atomic writer: a failed write leaves the previous file as it was
        storage.write_text(os.path.join(out_dir, "table.md"), markdown)
        storage.atomic_write(os.path.join(out_dir, "table.csv"),
                             lambda tmp: comparison.rounded_for_csv(table).to_csv(tmp, index=False, encoding="utf-8"))
    except OSError as error:
        print(f"error: {shown(str(error))}", file=sys.stderr)
        return 2
    figures = plot(table, args.model, out_dir)
    print(markdown)
    print(f"wrote {shown(os.path.join(out_dir, 'table.md'))}, {shown(os.path.join(out_dir, 'table.csv'))}"
          + "".join(f", {shown(path)}" for path in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
