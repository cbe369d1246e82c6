"""Progress of long stages, and the heartbeat that keeps long loops observable and stoppable.

:class:`Progress` counts the units of a stage (evaluation epochs, distillation iterations,
expert epochs): a tqdm bar on a terminal, log lines on :data:`progress_logger` without one.

:func:`tick` is what a long inner loop calls once per cheap step (a batch of a training epoch,
an image update of DC's or CAFE's outer loop, a step of an unrolled trajectory). Until a deadline
passes it costs one clock read and one comparison: no device sync, no random draw. Past it:

- without a terminal, the innermost open :class:`Progress` logs its line, marked with the unit in
  progress and how long it has run, once :data:`HEARTBEAT_EVERY_S` seconds have passed without a
  line, so that a batch job sees a line at least that often even when one iteration takes
  17 minutes (CAFE's watcher loops on Fashion-MNIST);
- inside :func:`stoppable` (the distillation loop installs it), the stop check is asked every
  :data:`POLL_S` seconds; once a stop has been pending for the grace period
  (:data:`STOP_GRACE_S`) it raises :class:`StopRequested` where the loop is, and the caller drops
  the unfinished unit. A stop is thus honoured within grace + poll + the time between two ticks;
- under torchrun, this rank's heartbeat for the ranks waiting in a collective
  (``distributed.beat``, every ``distributed.beat_every_s()`` seconds), so that a rank that works
  is not taken for a stuck one (``--dist_timeout``).

The loops know nothing of who watches them: the state here is module-level and one process runs
one stage at a time.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple

from tqdm import tqdm

import distributed

# Seconds between two progress lines when no terminal shows a bar (:class:`Progress` updates).
PROGRESS_EVERY_S = 30.0
# The longest silence without a terminal while a unit of work runs (:func:`tick`); at most 60 s.
HEARTBEAT_EVERY_S = 30.0
# A requested stop lets the running unit go on this long before :func:`tick` abandons it (so a
# short iteration still ends and is checkpointed); with POLL_S the bound of a stop is ~31 s.
STOP_GRACE_S = 30.0
# How often :func:`tick` asks the stop check of :func:`stoppable`.
POLL_S = 1.0
# The clock of everything here (seconds); tests replace it by a stub.
clock: Callable[[], float] = time.monotonic
# Progress lines go here; scripts that log only warnings keep this logger at INFO.
progress_logger = logging.getLogger("progress")
# A progress line: tqdm's meter without the bar.
PROGRESS_LINE = "{desc}: {percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class StopRequested(Exception):
    """A stop was requested and the unit of work in progress did not end within the grace period
    (:func:`stoppable`); raised by :func:`tick` inside the loop. What the unit changed is to be
    dropped: the last checkpoint stays the state to continue from.

    Attributes:
        waited_s: seconds between the first tick that saw the request and this raise.
    """

    def __init__(self, waited_s: float):
        super().__init__(f"a stop was pending for {waited_s:.0f} s")
        self.waited_s = waited_s


# ---- the heartbeat state ----------------------------------------------------------------------
_open: List["Progress"] = []  # open Progress objects of this process, innermost last
_stop: Optional[Callable[[], bool]] = None  # the stop check of the innermost stoppable()
_grace_s = STOP_GRACE_S
_stop_seen_at: Optional[float] = None
_deadline = -math.inf  # clock value from which tick() does its work; -inf: at the next tick


def tick() -> None:
    """Called by long loops once per step: a progress line when one is due, and
    :class:`StopRequested` when a stop has been pending longer than the grace period (see the
    module docstring). Costs a clock read and a comparison until a deadline passes.

    Raises:
        StopRequested: inside :func:`stoppable`, its check said so for the grace period.
    """
    now = clock()
    if now >= _deadline:
        _due(now)


def _due(now: float) -> None:
    global _deadline, _stop_seen_at
    if _stop is not None and _stop():
        if _stop_seen_at is None:
            _stop_seen_at = now
        if now - _stop_seen_at >= _grace_s:
            raise StopRequested(now - _stop_seen_at)
    if _open:
        _open[-1].heartbeat(now)
    due = [_open[-1].next_heartbeat(now)] if _open else []
    if distributed.world_size() > 1:  # torchrun: tell the ranks waiting in a collective this one works
        distributed.beat()
        due.append(now + distributed.beat_every_s())
    if _stop is not None:
        due.append(now + POLL_S if _stop_seen_at is None else min(now + POLL_S, _stop_seen_at + _grace_s))
    _deadline = min(due, default=math.inf)


@contextmanager
def stoppable(requested: Callable[[], bool], grace_s: Optional[float] = None) -> Iterator[None]:
    """While the block runs, :func:`tick` asks ``requested()`` every :data:`POLL_S` seconds and
    raises :class:`StopRequested` once it has answered ``True`` for ``grace_s`` seconds (default
    :data:`STOP_GRACE_S`; 0 at the first tick that sees it). The previous check is restored after.

    Args:
        requested: a cheap check (e.g. ``lambda: stop_flag.requested``); called at most every
            :data:`POLL_S` seconds.
        grace_s: seconds a requested stop lets the running unit go on.
    """
    global _stop, _grace_s, _stop_seen_at, _deadline
    previous = (_stop, _grace_s, _stop_seen_at)
    _stop, _grace_s, _stop_seen_at = requested, STOP_GRACE_S if grace_s is None else grace_s, None
    _deadline = -math.inf
    try:
        yield
    finally:
        _stop, _grace_s, _stop_seen_at = previous
        _deadline = -math.inf


# ---- the progress display ---------------------------------------------------------------------
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
    While it is open it is the heartbeat's display (:func:`tick`): inside a long unit the same line
    is logged every :data:`HEARTBEAT_EVERY_S` seconds with ``(it 3 running for 05:00)`` after it
    (on a terminal the bar's clock is redrawn).

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
        global _deadline
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.log_every_s = PROGRESS_EVERY_S if log_every_s is None else log_every_s
        self.log_fraction = log_fraction
        self.n = self.logged_n = initial
        self.postfix = ""
        # Under torchrun only rank 0 draws a bar or logs progress lines (``distributed.is_main``).
        self.silent = not distributed.is_main()
        self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=file,
                        dynamic_ncols=True, disable=True if self.silent else (None if bar is None else not bar))
        self.start = self.logged_at = self.updated_at = clock()
        self._swapped = [] if self.bar.disable else _route_console_through_tqdm()
        self.closed = False
        _open.append(self)
        _deadline = -math.inf

    @property
    def logs(self) -> bool:
        """Whether progress goes to log lines (no terminal) rather than to a bar."""
        return self.bar.disable

    def update(self, n: int = 1, postfix: Optional[str] = None) -> None:
        """Count ``n`` more units done; ``postfix`` (e.g. ``"network 2/5, epoch 49/1001"`` or
        ``"loss=0.1234, acc=45.10%"``) replaces the text shown after the rate."""
        self.n += n
        now = self.updated_at = clock()
        distributed.beat()  # torchrun: this rank is working (distributed.beat)
        if postfix is not None:
            self.postfix = postfix
        if not self.logs:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        if self.silent:
            return
        step = self.total * self.log_fraction if self.log_fraction and self.total else 0
        crossed = step > 0 and math.floor(self.n / step) > math.floor(self.logged_n / step)
        if now - self.logged_at >= self.log_every_s or crossed or self.n == self.total:
            self.log(now)

    def line(self, now: Optional[float] = None) -> str:
        """The progress line as logged (:data:`PROGRESS_LINE`)."""
        elapsed = (clock() if now is None else now) - self.start
        return tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix or None, initial=self.initial, bar_format=PROGRESS_LINE)

    def log(self, now: Optional[float] = None) -> None:
        """Log the progress line now."""
        now = clock() if now is None else now
        progress_logger.info(self.line(now))
        self.logged_n, self.logged_at = self.n, now

    def heartbeat(self, now: float) -> None:
        """The heartbeat's work (:func:`tick`): without a terminal, log the line marked with the
        unit in progress once :data:`HEARTBEAT_EVERY_S` seconds have passed without a line; on a
        terminal, redraw the bar (its clock)."""
        if self.closed or self.silent:
            return
        if not self.logs:
            self.bar.refresh()
        elif now - self.logged_at >= HEARTBEAT_EVERY_S:
            running = tqdm.format_interval(now - self.updated_at)
            progress_logger.info("%s (%s %d running for %s)", self.line(now), self.unit, self.n + 1, running)
            self.logged_at = now

    def next_heartbeat(self, now: float) -> float:
        """The clock value of this display's next heartbeat (infinite when it shows nothing)."""
        if self.closed or self.silent:
            return math.inf
        return now + 1.0 if not self.logs else max(self.logged_at + HEARTBEAT_EVERY_S, now)

    def close(self) -> None:
        """Close the bar (console logging goes back to its handlers), or log the last line if
        work was done since the previous one. Calling it again does nothing."""
        global _deadline
        if self.closed:
            return
        self.closed = True
        if self in _open:
            _open.remove(self)
        _deadline = -math.inf
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
