#!/usr/bin/env python3
"""Write ``docs/flags.md``, the flag reference of the four stage scripts, from their argparse
parsers, so the reference cannot drift from the code: every flag with its aliases, default, choices
and help text, grouped as ``--help`` groups them, plus one table of the defaults each ``--method``
resolves to (``distill.py``'s method-dependent flags are ``None`` in the parser until resolved).

The parsers are the stage scripts' own builders (``build_parser`` of ``cli.<stage>_flags`` or of
the stage module), called without parsing ``sys.argv``; the method table comes from resolving
``distill.py --method M`` with no other flag, as a run would.

    python3 scripts/flag_reference.py            # rewrite docs/flags.md
    python3 scripts/flag_reference.py --check    # exit 1 (and say so) when docs/flags.md is stale
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, List

from flag_types import Range

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "docs", "flags.md")
REGENERATE = "python3 scripts/flag_reference.py"

# (script, what it does); its parser builder is found by :func:`parser_builder`.
STAGES = (
    ("distill.py", "learn a synthetic set with --method, evaluate it, write the run directory"),
    ("evaluate.py", "train fresh networks on saved sets or random real images; --assess"),
    ("buffer.py", "expert trajectories for MTT, DATM and PAD"),
    ("train_original.py", "networks trained on the whole training set (CLoM, --assess, whole-dataset rows)"),
)


def parser_builder(script: str) -> Callable[[], argparse.ArgumentParser]:
    """The function that builds ``script``'s parser: ``build_parser`` of ``cli.<stage>_flags`` (for
    ``train_original.py`` also ``cli.original_flags``) when that module exists, else of the stage
    module itself.

    Raises:
        LookupError: neither module defines ``build_parser``.
    """
    stage = os.path.splitext(script)[0]
    for name in (f"cli.{stage}_flags", f"cli.{stage.replace('train_', '')}_flags", stage):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name:
                continue
            raise
        if callable(getattr(module, "build_parser", None)):
            return module.build_parser
    raise LookupError(f"no build_parser for {script} in cli.{stage}_flags or {stage}")


def cell(text) -> str:
    """``text`` on one line, safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def default_text(action: argparse.Action) -> str:
    """The default of ``action`` as the reference shows it (– when there is none)."""
    default = action.default
    if default is None or default == argparse.SUPPRESS:
        return "–"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return cell(" ".join(map(str, default))) or "–"
    if default == "":
        return '""'
    return f"`{cell(default)}`"


def help_text(action: argparse.Action, prog: str) -> str:
    """The help of ``action`` with ``%(default)s``-style fields filled in, its choices, and the
    range a numeric flag declares (``flag_types.Range``)."""
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "prog": prog}
    if action.choices and not isinstance(action.choices, dict):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    if isinstance(action.type, Range):
        text += f" (range: {action.type.describe()})"
    return cell(text)


def flag_text(action: argparse.Action) -> str:
    """The option strings of ``action``, long names first, with the metavar of list flags."""
    names = " / ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs in ("+", "*"):
        names += f" {action.metavar or action.dest.upper()} ..."
    return names


def stage_section(script: str, summary: str) -> List[str]:
    """The Markdown of one stage: a table of flags per argument group."""
    parser = parser_builder(script)()
    parser.prog = script
    lines = [f"## `{script}`", "", f"{summary[0].upper()}{summary[1:]}. `python3 {script} --help` prints the same.", ""]
    for group in parser._action_groups:  # argparse keeps groups in the order --help prints them
        actions = [a for a in group._group_actions if a.option_strings and a.help != argparse.SUPPRESS
                   and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments"):
            lines += [f"### {group.title}", ""]
        lines += ["| flag | default | meaning |", "|---|---|---|"]
        lines += [f"| {flag_text(a)} | {default_text(a)} | {help_text(a, script)} |" for a in actions]
        lines.append("")
    return lines


def method_defaults() -> List[str]:
    """One row per ``--method``: what ``distill.py --method M`` resolves its method-dependent flags
    to when nothing else is given."""
    import methods
    from cli import distill_flags
    from methods import runner

    flags = ("ipc", "Iteration", "lr_img", "lr_net", "batch_real", "batch_train", "init", "dsa_strategy")
    columns = ("method", "`--model`", "`--ipc`", "`--Iteration`", "`--lr_img`", "`--lr_net`", "`--batch_real`", "`--batch_train`",
               "`--init`", "`--dsa_strategy`", "`--num_exp`", "`--num_eval`", "`--eval_it`", "evaluation pool",
               "evaluation epochs (augmented / plain)", "label loss")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name in methods.list_methods():
        cfg, opts = distill_flags.resolve(distill_flags.parse_args(["--method", name]))
        method_class = methods.get_method_class(name)
        protocol = runner.eval_protocol(method_class, cfg, opts)
        refused = set(getattr(method_class, "unused_flags", ()))
        resolved = (cfg.ipc, cfg.iterations, cfg.lr_img, cfg.lr_net, cfg.batch_real, cfg.batch_train, cfg.init,
                    cfg.dsa_strategy or "none")
        values = (name, cfg.model, *("refused" if flag in refused else value for flag, value in zip(flags, resolved)),
                  opts.num_exp, opts.num_eval, opts.eval_it, " ".join(opts.eval_models),
                  f"{protocol.epochs_augmented} / {protocol.epochs_plain}", protocol.label_loss)
        lines.append("| " + " | ".join(cell(value) for value in values) + " |")
    return lines


def render() -> str:
    """The whole text of ``docs/flags.md``."""
    lines = ["# Flag reference", "",
             f"Generated from the argparse parsers by `{REGENERATE}`; do not edit by hand (a test fails when this",
             "file and the parsers disagree). What the flags mean in context: the family pages linked from the",
             "[README](../README.md).", ""]
    lines += [f"- [`{script}`](#{script.replace('.', '')}): {summary}" for script, summary in STAGES]
    lines += ["- [defaults per method](#defaults-per-method)", ""]
    for script, summary in STAGES:
        lines += stage_section(script, summary)
    lines += ["## Defaults per method", "",
              "What `distill.py --method M` resolves the method-dependent flags to when they are left out (the",
              "reference scripts' defaults, the network included; `--dataset` CIFAR10). A flag given on the command",
              "line, or in a `--config` file, replaces the value; \"refused\": the method does not use the flag and",
              "refuses it.", ""]
    lines += method_defaults()
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Write (or with ``--check`` compare) ``docs/flags.md``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when docs/flags.md is stale")
    parser.add_argument("--out", default=TARGET, help="file to write (default docs/flags.md)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            with open(args.out) as handle:
                current = handle.read()
        except OSError:
            current = None
        if current != text:
            print(f"error: {os.path.relpath(args.out)} is stale; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        print(f"{os.path.relpath(args.out)} is up to date")
        return 0
    with open(args.out, "w") as handle:
        handle.write(text)
    print(f"wrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
