"""Argparse ``type=`` values for numeric flags that carry their allowed range.

Every numeric flag of the stage scripts declares its range where it is defined, as its ``type``:
``type=positive_int`` (an integer >= 1), ``type=at_least(0)``, ``type=greater_than(0.0)``,
``type=in_range(0, 1)``. A value outside the range, or not a number of the flag's kind, is one
argparse error line naming the flag and the range (``argument --num: must be >= 1, got 0``;
``argument --seed: must be an integer in [0, 9223372036854775807], got 1e23``), exit code 2. The same object converts a value of a YAML preset and says the range
in the flag reference (``scripts/flag_reference.py``).

Nothing here knows about a method, a stage or a flag's meaning; ``methods.options`` builds the
ranges of the method options from their declarations.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Optional


class RangeError(argparse.ArgumentTypeError, ValueError):
    """A value outside a flag's range or not of its kind. argparse shows the message as it is
    (``ArgumentTypeError``); code that converts values outside argparse catches a ``ValueError``."""


class Range:
    """A numeric flag's type: converts a value to ``kind`` and checks it against the bounds.

    Attributes:
        kind: ``int`` or ``float``.
        minimum, maximum: the bounds (``None``: unbounded on that side).
        exclusive_minimum, exclusive_maximum: the bound itself is outside the range.
        none_word: a word (``"none"``) that stands for ``None`` (the flag's "not set"), or ``None``.

    A float range takes only finite values (``nan``, ``inf`` are refused); an integer range takes
    integers, and from a YAML preset also integral floats (``2.0``), never ``1e23`` typed as text.
    """

    def __init__(self, kind: type, minimum: Optional[float] = None, maximum: Optional[float] = None, *,
                 exclusive_minimum: bool = False, exclusive_maximum: bool = False,
                 none_word: Optional[str] = None) -> None:
        if kind not in (int, float):
            raise TypeError(f"a flag range is of int or float, not {kind!r}")
        if minimum is not None and maximum is not None and maximum < minimum:
            raise ValueError(f"empty range: maximum {maximum} < minimum {minimum}")
        self.kind, self.minimum, self.maximum = kind, minimum, maximum
        self.exclusive_minimum, self.exclusive_maximum = exclusive_minimum, exclusive_maximum
        self.none_word = none_word
        self.__name__ = kind.__name__  # what argparse names the type in its own messages

    def __repr__(self) -> str:
        return f"Range({self.describe()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Range) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return (self.kind, self.minimum, self.maximum, self.exclusive_minimum, self.exclusive_maximum, self.none_word)

    def bounds_text(self) -> str:
        """The bounds alone: ``>= 1``, ``> 0``, ``in [0, 1)``, ``<= 5`` (``any`` when unbounded)."""
        if self.minimum is not None and self.maximum is not None:
            left, right = "(" if self.exclusive_minimum else "[", ")" if self.exclusive_maximum else "]"
            return f"in {left}{_number(self.minimum)}, {_number(self.maximum)}{right}"
        if self.minimum is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {_number(self.minimum)}"
        if self.maximum is not None:
            return f"{'<' if self.exclusive_maximum else '<='} {_number(self.maximum)}"
        return "any"

    def describe(self) -> str:
        """``an integer >= 1``, ``a number in [0, 1]`` (with ``, or none`` when ``none_word`` is set)."""
        text = f"{'an integer' if self.kind is int else 'a number'} {self.bounds_text()}"
        return text + (f", or {self.none_word}" if self.none_word else "")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` (a number, already converted) lies in the range (``nan`` never does)."""
        if self.minimum is not None:
            if not (value > self.minimum if self.exclusive_minimum else value >= self.minimum):
                return False
        if self.maximum is not None:
            if not (value < self.maximum if self.exclusive_maximum else value <= self.maximum):
                return False
        return not (isinstance(value, float) and not math.isfinite(value))

    def convert(self, value: Any) -> Any:
        """``value`` (text from the command line, or a number from a YAML preset) as ``kind``,
        without the range check; ``None`` for ``none_word``.

        Raises:
            RangeError: not a number of this kind (``'1e23'`` or ``'0.5'`` for an integer, ``True``).
        """
        if self.none_word is not None and isinstance(value, str) and value.strip().lower() == self.none_word:
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            if self.kind is int:
                if isinstance(value, float):
                    if not value.is_integer():
                        raise ValueError
                    return int(value)
                return int(value)
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise RangeError(f"must be {self.describe()}, got {_shown(value)}") from None

    def __call__(self, value: Any) -> Any:
        """Convert ``value`` (:meth:`convert`) and check it; argparse calls this for every value.

        Raises:
            RangeError: not a number of this kind, not finite, or outside the range (the message
                says the range and the value; argparse puts the flag before it).
        """
        converted = self.convert(value)
        if converted is not None and not self.contains(converted):
            finite = "a finite number " if isinstance(converted, float) and not math.isfinite(converted) else ""
            also = f", or {self.none_word}" if self.none_word else ""
            raise RangeError(f"must be {finite}{self.bounds_text()}{also}, got {_shown(value)}")
        return converted

    def below(self) -> Optional[Any]:
        """The value just below the range (the minimum itself when it is excluded, else the next
        integer or float down), or ``None`` without a minimum; for tests and examples."""
        if self.minimum is None:
            return None
        if self.exclusive_minimum:
            return self.kind(self.minimum)
        return self.minimum - 1 if self.kind is int else math.nextafter(float(self.minimum), -math.inf)

    def above(self) -> Optional[Any]:
        """The value just above the range, or ``None`` without a maximum (see :meth:`below`)."""
        if self.maximum is None:
            return None
        if self.exclusive_maximum:
            return self.kind(self.maximum)
        return self.maximum + 1 if self.kind is int else math.nextafter(float(self.maximum), math.inf)


def _shown(value: Any) -> str:
    """A value as the user typed it: text as it is (a flag), else its ``repr`` (a YAML value)."""
    return value if isinstance(value, str) else repr(value)


def _number(value: float) -> str:
    """``1`` for 1.0, ``0.5`` for 0.5: a bound as a reader writes it."""
    if isinstance(value, int):
        return str(value)
    return str(int(value)) if float(value).is_integer() else repr(value)


def at_least(minimum: float, kind: Optional[type] = None) -> Range:
    """Values >= ``minimum``, of ``kind`` (default: the type of ``minimum``, so ``at_least(0)``
    is an integer count where 0 is allowed and ``at_least(0.0)`` a non-negative number)."""
    return Range(kind or type(minimum), minimum)


def greater_than(minimum: float, kind: Optional[type] = None) -> Range:
    """Values > ``minimum``, of ``kind`` (default: the type of ``minimum``; ``greater_than(0.0)``:
    a learning rate)."""
    return Range(kind or type(minimum), minimum, exclusive_minimum=True)


def in_range(minimum: float, maximum: float, kind: type = float, *, exclusive_minimum: bool = False,
             exclusive_maximum: bool = False) -> Range:
    """``kind`` values in [``minimum``, ``maximum``] (a fraction, a probability), either end
    optionally excluded."""
    return Range(kind, minimum, maximum, exclusive_minimum=exclusive_minimum, exclusive_maximum=exclusive_maximum)


# The ranges most flags share.
SEED_MAX = 2**63 - 1  # torch.manual_seed takes at most 2**64 - 1; seed + experiment index stays below
seed_int = in_range(0, SEED_MAX, int)  # --seed: 0 .. 2**63 - 1
positive_int = at_least(1)             # counts, sizes, epochs: >= 1
non_negative_int = at_least(0)         # counts where 0 is allowed (0 says what it means in the help), seeds
positive_float = greater_than(0.0)     # learning rates, temperatures: > 0
non_negative_float = at_least(0.0)  # weights, momenta, decays: >= 0
fraction = in_range(0.0, 1.0)          # probabilities and fractions: [0, 1]
