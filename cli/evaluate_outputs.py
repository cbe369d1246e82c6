"""``evaluate.py --out``: the report it names never replaces what the run reads (the sets, the
files beside them, the run directories' own files), and its CSV is a file of its own.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
from typing import List, Sequence

import cli
import utils
from methods.run_dir import RUN_FILES
from sets import files


def input_files(args: argparse.Namespace, paths: Sequence[str]) -> List[str]:
    """The existing files ``evaluate.py`` reads or that record the sets it reads: the ``--syn_path``
    files (``paths``: expanded, :func:`sets.files.expand_syn_paths`), the labels and lr files beside
    an ``images_*.pt`` (every ``images_/labels_/lr_*.pt`` of a logged-files directory),
    ``--labels_path``, ``--lr_path``, and in every ``--syn_path`` directory and folder of a
    ``--syn_path`` file the files of a run (``methods.runner.RUN_FILES``: ``config.yaml``,
    ``results.json``, ``last.pt``, ``res_*.pt``, ...)."""
    found, folders = [], []
    for path in [*(args.syn_path or []), *paths]:
        if os.path.isdir(path):
            folders.append(path)
            found += [os.path.join(path, name) for name in os.listdir(path)
                      if fnmatch.fnmatchcase(name, "images_*.pt") or fnmatch.fnmatchcase(name, "labels_*.pt")
                      or fnmatch.fnmatchcase(name, "lr_*.pt")]
        else:
            folders.append(os.path.dirname(path) or ".")
            found += [path, files.labels_file_beside(path), files.lr_file_beside(path) or path]
    for folder in dict.fromkeys(folders):
        if os.path.isdir(folder):
            found += [os.path.join(folder, name) for name in os.listdir(folder)
                      if any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)]
    found += [path for path in (getattr(args, "labels_path", None), getattr(args, "lr_path", None)) if path]
    return [path for path in dict.fromkeys(found) if os.path.isfile(path)]


def check_out(args: argparse.Namespace, paths: Sequence[str]) -> None:
    """``--out`` names the JSON report, and neither it nor the CSV written beside it (same name with
    ``.csv``; not with ``--assess``) is an input (:func:`input_files`): the same file, also through
    a hard or symbolic link (``os.path.samefile``). ``paths``: the expanded ``--syn_path`` files.

    Raises:
        utils.UserError: one line naming ``--out`` (and the input it would replace).
    """
    if not args.out:
        return
    if os.path.splitext(args.out)[1].lower() == ".csv":
        raise utils.UserError(f"--out {args.out}: --out names the JSON report; the CSV is written beside it "
                              f"(give --out {os.path.splitext(args.out)[0]}.json)")
    outputs = [args.out] + ([] if args.assess else [os.path.splitext(args.out)[0] + ".csv"])
    cli.refuse_inputs_as_outputs("--out", args.out, outputs, input_files(args, paths))
