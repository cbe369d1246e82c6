"""Distillation methods. Importing the package registers every method module.

``METHODS`` maps a ``--method`` name to its class; ``get_method_class(name)`` looks one up and
``create_method(cfg, **kwargs)`` builds it. To add a method: write ``methods/<name>.py`` with a
:class:`DistillMethod` subclass decorated by ``@register_method('<NAME>')`` (its own flags: a frozen
:class:`MethodOptions` dataclass, ``methods/options.py``) and import it here.
"""
from methods.base import DistillConfig, DistillMethod, SyntheticSet
from methods.registry import METHODS, get_method_class, list_methods, method_options, register_method
from methods.options import MethodOptions, Option, option
# Importing each method module registers its methods (``register_method``).
from methods import cafe, coreset, datadam, datm, dc, dd, dm, frepo, kip, mtt, ncfm, ratbptt, rded, sre2l  # noqa: F401


def create_method(cfg: DistillConfig, **kwargs) -> DistillMethod:
    """Build the method named by ``cfg.method`` (see :class:`DistillMethod` for ``kwargs``).

    Raises:
        KeyError: unknown method; the message lists the registered ones.
    """
    return get_method_class(cfg.method)(cfg, **kwargs)


__all__ = ["METHODS", "DistillConfig", "DistillMethod", "MethodOptions", "Option", "SyntheticSet", "create_method",
           "get_method_class", "list_methods", "method_options", "option", "register_method"]
