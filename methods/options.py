"""Typed method options: each method declares a frozen dataclass of its own settings.

A method's options are the fields of a frozen dataclass derived from :class:`MethodOptions`;
each field is declared with :func:`option` (its reference default, the one-line help of the flag
``--{name}``, its range (minimum, maximum) or choices, and the source of the default: reference
repository and file). A numeric option's range is the flag's argparse type
(:meth:`Option.flag_range`, a ``flag_types.Range``), so a value outside it is refused while
parsing. ``distill.py`` adds one flag per field over all registered methods
(``methods.method_options``); the method receives a validated instance as ``self.options`` and
reads attributes (``self.options.syn_steps``).

Constructing an instance converts and validates every field (:meth:`MethodOptions.__post_init__`),
so an instance is always valid: ``MTTOptions(syn_steps=0)`` raises ``ValueError`` naming
``--syn_steps``.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Type

from flag_types import Range

# Where a default comes from when no reference repository has the flag.
TOOLKIT = "this toolkit (no reference flag)"


@dataclass(frozen=True)
class Option:
    """One option as a flag: what ``distill.py`` needs to declare, convert and check ``--{name}``
    (derived from a field of a :class:`MethodOptions` dataclass by :func:`option_specs`).

    Attributes:
        name: flag and field name (reference spelling, e.g. ``lambda_1``).
        default: the reference default.
        help: one line for ``--help``.
        type: ``float``, ``int``, ``str`` or ``bool`` (the field's annotation).
        minimum: smallest allowed value (numbers; every int or float option has one).
        exclusive_minimum: ``True`` when ``minimum`` itself is not allowed (``> minimum``).
        maximum: largest allowed value (numbers), or ``None``.
        exclusive_maximum: ``True`` when ``maximum`` itself is not allowed (``< maximum``).
        choices: the allowed values (a ``str`` option with a fixed set of values), or ``None``.
        source: where the default comes from (reference repository and file, or :data:`TOOLKIT`).
    """

    name: str
    default: Any
    help: str
    type: Callable = float
    minimum: Optional[float] = None
    exclusive_minimum: bool = False
    choices: Optional[Tuple[Any, ...]] = None
    source: str = ""
    maximum: Optional[float] = None
    exclusive_maximum: bool = False

    def flag_range(self) -> Optional[Range]:
        """The range of a numeric option (its flag's argparse type), ``None`` for str and bool."""
        if self.type not in (int, float):
            return None
        return Range(self.type, self.minimum, self.maximum, exclusive_minimum=self.exclusive_minimum,
                     exclusive_maximum=self.exclusive_maximum)

    def convert(self, value: Any) -> Any:
        """``value`` converted by ``type``; a ``bool`` option also takes the strings
        true/false/yes/no/1/0 (the references spell booleans ``--dsa True``).

        Raises:
            ValueError: not convertible; the message names ``--{name}``.
        """
        if self.type is bool and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(f"--{self.name} expects true or false, got {value!r}")
            return lowered in ("true", "yes", "1")
        try:
            return self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{self.name} expects a {self.type.__name__}, got {value!r}") from None

    def check(self, value: Any) -> Any:
        """Validate ``value`` (already converted by :meth:`convert`) and return it.

        Raises:
            ValueError: outside the range (:meth:`flag_range`), or not one of ``choices``; the
                message names ``--{name}``.
        """
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"--{self.name} {value!r}: expected one of {', '.join(map(str, self.choices))}")
        allowed = self.flag_range()
        if allowed is not None and not allowed.contains(value):
            raise ValueError(f"--{self.name} must be {allowed.bounds_text()}, got {value}")
        return value


def option(default: Any, help: str, *, source: str, minimum: Optional[float] = None,
           exclusive_minimum: bool = False, maximum: Optional[float] = None, exclusive_maximum: bool = False,
           choices: Optional[Tuple[Any, ...]] = None):
    """A field of a :class:`MethodOptions` dataclass: ``default`` with the flag's help, bounds and
    the source of the default (``"GeorgeCazenavette/mtt-distillation distill.py"``, or
    :data:`TOOLKIT`). The field's annotation (int, float, str, bool) is the flag's type; an int or
    float option needs a ``minimum`` (:func:`option_specs` refuses one without)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "source": source, "minimum": minimum, "exclusive_minimum": exclusive_minimum,
        "maximum": maximum, "exclusive_maximum": exclusive_maximum,
        "choices": None if choices is None else tuple(choices)})


def redefault(options_class: type, name: str, default: Any, *, source: str):
    """The field ``name`` of ``options_class`` with another default and its source (help and
    bounds unchanged): a method that shares a family's options but not their reference default
    (DATM's ``syn_steps`` 80 against MTT's 20).

    Raises:
        KeyError: ``options_class`` has no field ``name``.
    """
    metadata = dict(options_class.__dataclass_fields__[name].metadata)
    metadata["source"] = source
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options dataclass (no fields: a method without options of its own
    uses it as it is). Subclasses are ``@dataclass(frozen=True)`` and declare fields with
    :func:`option`.

    Raises:
        ValueError: (at construction) a value is not convertible to its field's type, below its
            minimum, or not one of its choices; one line naming ``--{name}``.
    """

    def __post_init__(self) -> None:
        for spec in option_specs(type(self)):
            object.__setattr__(self, spec.name, spec.check(spec.convert(getattr(self, spec.name))))


@functools.lru_cache(maxsize=None)
def option_specs(options_class: Type[MethodOptions]) -> Tuple[Option, ...]:
    """The flags of an options dataclass, in field order.

    Raises:
        TypeError: a field is not declared with :func:`option`, its annotation is none of
            int, float, str, bool, or an int or float field declares no ``minimum``.
    """
    hints = typing.get_type_hints(options_class)
    specs = []
    for field in dataclasses.fields(options_class):
        kind = hints[field.name]
        if kind not in (int, float, str, bool) or "help" not in field.metadata:
            raise TypeError(f"{options_class.__name__}.{field.name}: declare options with methods.options.option() "
                            "and an int, float, str or bool annotation")
        meta = field.metadata
        if kind in (int, float) and meta["minimum"] is None:
            raise TypeError(f"{options_class.__name__}.{field.name}: a numeric option declares its range "
                            "(option(..., minimum=...))")
        specs.append(Option(field.name, field.default, meta["help"], type=kind, minimum=meta["minimum"],
                            exclusive_minimum=meta["exclusive_minimum"], choices=meta["choices"],
                            source=meta["source"], maximum=meta.get("maximum"),
                            exclusive_maximum=meta.get("exclusive_maximum", False)))
    return tuple(specs)


def shared_flag_range(options: Sequence[Option]) -> Range:
    """The argparse type of a flag that several methods declare (``--factor``: NCFM from 1, RDED
    from 0, where 0 means automatic): the loosest of their ranges, so that the flag refuses what no
    method takes and each method still refuses the rest of its own when it is resolved
    (:meth:`MethodOptions.__post_init__`).

    Raises:
        ValueError: ``options`` is empty or holds a str or bool option.
    """
    ranges = [option.flag_range() for option in options]
    if not ranges or any(r is None for r in ranges):
        raise ValueError("shared_flag_range needs numeric options")
    lowest = min(ranges, key=lambda r: (r.minimum, r.exclusive_minimum))
    highest = None if any(r.maximum is None for r in ranges) else max(
        ranges, key=lambda r: (r.maximum, not r.exclusive_maximum))
    return Range(ranges[0].kind, lowest.minimum, None if highest is None else highest.maximum,
                 exclusive_minimum=lowest.exclusive_minimum,
                 exclusive_maximum=False if highest is None else highest.exclusive_maximum)


def resolve(options_class: Type[MethodOptions], given: Mapping[str, Any], method: str) -> MethodOptions:
    """An instance of ``options_class`` from the values given (flag name -> value; the others
    keep their defaults), converted and validated.

    Raises:
        ValueError: a name is not a field (the message names ``method`` and its options), or a
            value is invalid (the message names the flag).
    """
    known = [spec.name for spec in option_specs(options_class)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"method {method} has no option {', '.join(unknown)}; "
                         f"its options: {', '.join(known) or 'none'}")
    return options_class(**given)
