"""The registry of distillation methods: ``distill.py --method NAME`` looks a
:class:`methods.base.DistillMethod` subclass up here, and each method module registers its class
with :func:`register_method` when it is imported (``methods/__init__.py`` imports them all).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Tuple, Type

from methods.options import Option

if TYPE_CHECKING:
    from methods.base import DistillMethod

METHODS: Dict[str, Type["DistillMethod"]] = {}


def register_method(name: str):
    """Class decorator adding a :class:`DistillMethod` subclass to ``METHODS`` under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def decorator(cls: Type["DistillMethod"]) -> Type["DistillMethod"]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__name__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def list_methods() -> list:
    """Names accepted by ``distill.py --method``."""
    return sorted(METHODS)


def get_method_class(name: str) -> Type["DistillMethod"]:
    """Look a method up by name.

    Raises:
        KeyError: unknown name; the message lists the registered ones.
    """
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose from: {', '.join(list_methods())}")
    return METHODS[name]


def method_options() -> Dict[str, Tuple[Option, Tuple[str, ...]]]:
    """Every option of every registered method: ``name -> (option, names of the methods using it)``.

    Raises:
        TypeError: two methods declare the same option name with different types.
    """
    found: Dict[str, Tuple[Option, Tuple[str, ...]]] = {}
    for method_name in sorted(METHODS):
        for option in METHODS[method_name].option_specs():
            if option.name in found:
                first, users = found[option.name]
                if first.type is not option.type:
                    raise TypeError(f"option {option.name!r} has type {first.type.__name__} in {users[0]} "
                                    f"but {option.type.__name__} in {method_name}")
                found[option.name] = (first, users + (method_name,))
            else:
                found[option.name] = (option, (method_name,))
    return found
