"""The opening every stage script shares (``distill.py``, ``evaluate.py``, ``buffer.py``,
``train_original.py``), in one order: the output is checked before anything is loaded, then
logging, threads / device / torchrun, precision, the other ranks' output, seeding.

Stops: inside ``cli.user_errors`` SIGTERM is raised as ``cli.Terminated`` (like Ctrl-C's
``KeyboardInterrupt``) where the script is, which ends ``evaluate.py``, ``buffer.py`` and
``train_original.py`` at once (finished experts and models are on disk). ``distill.py`` turns
both signals into a request instead (:func:`stop_requests`): the iteration in progress ends and
is checkpointed, or, still running ``progress.STOP_GRACE_S`` seconds later, is dropped at its
next ``progress.tick`` with the last checkpoint kept.
"""
from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

import cli
import utils
from methods.run_config import StopFlag
from precision import Precision


@dataclass(frozen=True)
class Stage:
    """What the opening resolved: this rank's ``torch.device`` and the ``--amp`` precision."""

    device: torch.device
    precision: Precision


def open_stage(args: argparse.Namespace, *, run_dir: Optional[str] = None, flag: str = "",
               given: Optional[str] = None, check: Optional[Callable[[], object]] = None, quiet: bool = False,
               seed: bool = False) -> Stage:
    """Open a stage (module docstring):

    1. ``run_dir`` (the folder the stage writes, ``log.txt`` inside it) must be creatable and
       writable (``cli.check_writable``, naming ``flag``; ``given``: the flag's value as typed when
       ``run_dir`` is derived from it), then ``check()`` runs: a stage's own early refusal of a
       folder holding other work (cheap; before the dataset is loaded);
    2. console logging (``quiet``: warnings and progress lines only) and ``run_dir/log.txt``
       (``cli.setup_logging``);
    3. ``--threads``, ``--device``, the torchrun process group (``cli.setup_runtime``);
    4. ``--amp`` for that device (``cli.setup_precision``);
    5. under torchrun, the standard output of ranks other than 0 silenced (``cli.quiet_other_ranks``);
    6. with ``seed``, the global RNGs seeded from ``--seed`` (``utils.seed_everything``; a
       distillation seeds each experiment itself).

    Raises:
        utils.UserError: an output that cannot be written, an unusable ``--device`` or ``--amp``,
            or what ``check`` raises (one line naming the flag).
    """
    if run_dir is not None:
        cli.check_writable(run_dir, flag, directory=True, given=given)
    if check is not None:
        check()
    cli.setup_logging(os.path.join(run_dir, "log.txt") if run_dir is not None else None, quiet=quiet)
    device = cli.setup_runtime(args)
    amp = cli.setup_precision(args, device)
    cli.quiet_other_ranks()  # torchrun: rank 0 prints the report
    if seed:
        utils.seed_everything(args.seed)
    return Stage(device=device, precision=amp)


@contextmanager
def stop_requests() -> Iterator[StopFlag]:
    """While the block runs, SIGINT and SIGTERM set the yielded ``methods.run_config.StopFlag``
    instead of raising (a second SIGINT still raises); the previous handlers come back after."""
    stop = StopFlag().install()
    try:
        yield stop
    finally:
        stop.restore()
