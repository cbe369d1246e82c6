"""Small generic helpers every layer may use: the user-error type, seeds and random-number
generators, device choice, progress of long stages, flag-range checks and the resume-compatibility
check. Nothing here knows about any distillation method, the evaluation protocol or argparse.

Where the rest went: the evaluation protocol and training loop are the ``evaluation`` package;
atomic writes and checkpoints ``storage.py``; image grids ``pictures.py``; tables and number
formats ``tables.py``; chunked forward/backward passes ``chunked.py``.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

import distributed

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake in what the user asked for (a flag value, a file); scripts print it on one line."""


# --------------------------------------------------------------------------------------------
# Seeds, generators, devices
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) global RNGs once.

    Args:
        seed: any integer; the scripts use ``--seed + experiment index``.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded with ``seed``.

    All sampling of real images and augmentation parameters draws from such generators (on the
    CPU, then moved), so the global RNG is never reseeded.
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a ``--device`` value into a ``torch.device``, once per script.

    Args:
        spec: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        UserError: the value is not one of those, or asks for CUDA on a machine without it.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise UserError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def rng_state() -> dict:
    """Capture the global RNG states (python, numpy, torch CPU, CUDA) for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Progress of long stages
# --------------------------------------------------------------------------------------------
# Seconds between two progress lines when no terminal shows a bar (:class:`Progress`).
PROGRESS_EVERY_S = 30.0
# Progress lines go here; scripts that log only warnings keep this logger at INFO.
progress_logger = logging.getLogger(__name__ + ".progress")
# A progress line: tqdm's meter without the bar.
PROGRESS_LINE = "{desc}: {percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _BarSafeHandler(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``, so that a log line printed while a
    bar is open does not land inside the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must not raise (as logging.StreamHandler.emit)
            self.handleError(record)


def _route_console_through_tqdm() -> List[Tuple[logging.Handler, logging.Handler]]:
    """Swap the root logger's console handlers (stdout / stderr) for :class:`_BarSafeHandler`s
    with the same level, formatter and filters; returns ``(original, replacement)`` pairs."""
    swapped = []
    for position, handler in enumerate(logging.root.handlers):
        if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, _BarSafeHandler)
                and handler.stream in (sys.stdout, sys.stderr)):
            safe = _BarSafeHandler(handler.stream)
            safe.setLevel(handler.level)
            safe.setFormatter(handler.formatter)
            for log_filter in handler.filters:
                safe.addFilter(log_filter)
            logging.root.handlers[position] = safe
            swapped.append((handler, safe))
    return swapped


class Progress:
    """Progress of a long stage (evaluation, distillation, experts, original models ...).

    On a terminal (tqdm's own test, ``file.isatty()``) a tqdm bar is drawn, and while it is open
    console log lines are written through ``tqdm.write`` so that they do not break it. Without a
    terminal (batch jobs, pipes, pytest) an INFO line goes to :data:`progress_logger` once
    ``log_every_s`` seconds have passed since the previous one, each time a further
    ``log_fraction`` of ``total`` is done (when given), and at the end; the line is tqdm's meter
    without the bar
    (:data:`PROGRESS_LINE`), e.g.
    ``evaluation ConvNet: 41% 2050/5005 [00:41<00:59, 49.64epoch/s, network 2/5, epoch 49/1001]``.

    It only counts and prints: no random number is drawn and nothing is synchronised. Under
    torchrun only rank 0 shows it (``distributed.is_main``); the other ranks count silently.

    Args:
        total: units of work in the stage (e.g. epochs of all networks).
        desc: what runs (the bar's and every line's prefix).
        unit: name of one unit (``epoch``, ``it``); the rate is given per unit.
        initial: units already done before this process (a resumed run); the rate counts only new ones.
        log_every_s: seconds between lines without a terminal (0: a line per update); ``None``:
            :data:`PROGRESS_EVERY_S`.
        log_fraction: also a line each time another such fraction of ``total`` is done (the
            distillation loop logs every 5 %); ``None``: by time only.
        leave: keep the bar on screen when closed (``False`` for bars inside another stage).
        file: the bar's stream (default ``sys.stderr``); whether it is a terminal decides.
        bar: ``True``/``False`` forces the bar / the log lines; ``None`` decides by ``file``.

    Use as a context manager (``with Progress(...) as progress:``) or call :meth:`close`.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0,
                 log_every_s: Optional[float] = None, log_fraction: Optional[float] = None, leave: bool = True,
                 file=None, bar: Optional[bool] = None):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.log_every_s = PROGRESS_EVERY_S if log_every_s is None else log_every_s
        self.log_fraction = log_fraction
        self.n = self.logged_n = initial
        self.postfix = ""
        # Under torchrun only rank 0 draws a bar or logs progress lines (``distributed.is_main``).
        self.silent = not distributed.is_main()
        self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=file,
                        dynamic_ncols=True, disable=True if self.silent else (None if bar is None else not bar))
        self.start = self.logged_at = time.monotonic()
        self._swapped = [] if self.bar.disable else _route_console_through_tqdm()
        self.closed = False

    @property
    def logs(self) -> bool:
        """Whether progress goes to log lines (no terminal) rather than to a bar."""
        return self.bar.disable

    def update(self, n: int = 1, postfix: Optional[str] = None) -> None:
        """Count ``n`` more units done; ``postfix`` (e.g. ``"network 2/5, epoch 49/1001"`` or
        ``"loss=0.1234, acc=45.10%"``) replaces the text shown after the rate."""
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if not self.logs:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        if self.silent:
            return
        now = time.monotonic()
        step = self.total * self.log_fraction if self.log_fraction and self.total else 0
        crossed = step > 0 and math.floor(self.n / step) > math.floor(self.logged_n / step)
        if now - self.logged_at >= self.log_every_s or crossed or self.n == self.total:
            self.log(now)

    def line(self, now: Optional[float] = None) -> str:
        """The progress line as logged (:data:`PROGRESS_LINE`)."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        return tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix or None, initial=self.initial, bar_format=PROGRESS_LINE)

    def log(self, now: Optional[float] = None) -> None:
        """Log the progress line now."""
        now = time.monotonic() if now is None else now
        progress_logger.info(self.line(now))
        self.logged_n, self.logged_at = self.n, now

    def close(self) -> None:
        """Close the bar (console logging goes back to its handlers), or log the last line if
        work was done since the previous one. Calling it again does nothing."""
        if self.closed:
            return
        self.closed = True
        if not self.logs:
            self.bar.close()
            for original, safe in self._swapped:
                if safe in logging.root.handlers:
                    logging.root.handlers[logging.root.handlers.index(safe)] = original
        elif self.n != self.logged_n and not self.silent:
            self.log()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def check_flag_ranges(values: object, at_least_one: Sequence[str] = (), positive: Sequence[str] = (),
                      non_negative: Sequence[str] = ()) -> None:
    """Check the named attributes of ``values`` (a config whose fields are flag names).

    Raises:
        UserError: ``--NAME must be at least 1 / positive / >= 0, got V`` for the first value out of range.
    """
    for name in at_least_one:
        if getattr(values, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(values, name)}")
    for name in positive:
        if not getattr(values, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(values, name)}")
    for name in non_negative:
        if not getattr(values, name) >= 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(values, name)}")


def config_differences(saved: dict, current: dict, flag_names: Optional[dict] = None) -> List[str]:
    """The toolkit's one resume-compatibility check: ``'--flag saved → current'`` for every key
    whose value differs between a saved and the current flat configuration (run checkpoints,
    expert buffers, original models); empty when they agree. ``flag_names`` maps a key to its
    flag's name where they differ (``iterations`` is ``--Iteration``)."""
    names = flag_names or {}
    keys = list(dict.fromkeys([*current, *saved]))
    return [f"--{names.get(key, key)} {saved.get(key)!r} → {current.get(key)!r}"
            for key in keys if saved.get(key) != current.get(key)]
