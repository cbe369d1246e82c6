"""Add-ons a distillation method may host: learned state or loss terms beside the synthetic images
that work with several methods (``base.AddOn``). Importing the package registers every add-on.

* ``clom``: the CLoM regulariser (classification loss of pre-trained original models);
* ``feature_labels``: DRUPI's privileged feature labels F (with ``feature_loss``, the loss of
  networks trained on (x, y, F)).

:data:`ADDONS` is the one registry; everything else (``distill.py`` and ``evaluate.py`` flags,
``DistillConfig.addons``, records, checkpoints, saved entries) goes through the functions below, so
the core names no add-on. A new add-on subclasses ``AddOn`` and registers with
:func:`register_addon` (a module of this package is imported at the bottom of this file; code
elsewhere, e.g. a test, may register its own).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Type

from methods.addons.base import HOOKS, AddOn

ADDONS: Dict[str, Type[AddOn]] = {}


def register_addon(cls: Type[AddOn]) -> Type[AddOn]:
    """Class decorator adding an :class:`AddOn` subclass to :data:`ADDONS` under ``cls.name``.

    Raises:
        ValueError: the name is already registered, its record key is taken, or it declares a
            hook point not in ``base.HOOKS``.
    """
    if cls.name in ADDONS:
        raise ValueError(f"add-on {cls.name!r} is already registered by {ADDONS[cls.name].__name__}")
    taken = {other.record_key: other.name for other in ADDONS.values()}
    if not cls.name or not cls.record_key or cls.record_key in taken:
        raise ValueError(f"add-on {cls.__name__} needs a name and a record key of its own "
                         f"(record key {cls.record_key!r} of {taken.get(cls.record_key)})")
    unknown = (set(cls.hooks) | {h for needed in cls.requires for h in needed}) - set(HOOKS)
    if unknown:
        raise ValueError(f"add-on {cls.name!r}: unknown hook points {', '.join(sorted(unknown))}")
    ADDONS[cls.name] = cls
    return cls


def unregister_addon(name: str) -> None:
    """Remove the add-on ``name`` from :data:`ADDONS` (a test's own add-on, once the test is done).

    Raises:
        KeyError: no such add-on.
    """
    del ADDONS[name]


def enabled(cfg) -> List[Type[AddOn]]:
    """The add-on classes a ``DistillConfig`` turns on (``cfg.addons``), in registration order.

    Raises:
        ValueError: ``cfg.addons`` names an add-on that is not registered.
    """
    unknown = sorted(set(cfg.addons) - set(ADDONS))
    if unknown:
        raise ValueError(f"unknown add-on {', '.join(unknown)}; registered: {', '.join(ADDONS) or 'none'}")
    return [cls for name, cls in ADDONS.items() if name in cfg.addons]


# ---- the command line of distill.py -----------------------------------------------------------
def add_args(parser) -> None:
    """Every add-on's ``distill.py`` flags (:meth:`AddOn.add_args`), in registration order."""
    for cls in ADDONS.values():
        cls.add_args(parser)


def settings_from_flags(values: Mapping[str, Any]) -> Dict[str, Any]:
    """``{name: frozen settings}`` of every add-on the parsed ``distill.py`` flag values (a plain
    mapping) turn on (:meth:`AddOn.from_flags`): the value of ``DistillConfig.addons``.

    Raises:
        ValueError or utils.UserError: an add-on's flag is invalid (the message names it).
    """
    settings = {}
    for name, cls in ADDONS.items():
        value = cls.from_flags(values)
        if value is not None:
            settings[name] = value
    return settings


# ---- capabilities ------------------------------------------------------------------------------
def supported_by(method_class) -> List[str]:
    """Names of the registered add-ons ``method_class`` can host (its ``addon_hooks``)."""
    return [name for name, cls in ADDONS.items() if cls.hostable(method_class.addon_hooks)]


def check_hosted(method_class, cfg) -> None:
    """Refuse add-ons ``cfg`` turns on that ``method_class`` cannot host (before anything is loaded).

    Raises:
        ValueError: one line naming the add-on's flag, the method and the add-ons it supports.
    """
    for cls in enabled(cfg):
        if not cls.hostable(method_class.addon_hooks):
            supported = ", ".join(supported_by(method_class)) or "none"
            raise ValueError(f"{cls.flag}: --method {method_class.name} does not support the {cls.name} add-on "
                             f"(add-ons it supports: {supported})")


# ---- a run ---------------------------------------------------------------------------------------
def load_shared(cfg, record, device) -> Dict[str, Any]:
    """``{name: shared resources}`` of every add-on ``cfg`` turns on, loaded once per run
    (:meth:`AddOn.load_shared`; the CLoM models).

    Raises:
        utils.UserError: an add-on's files are missing or do not fit.
    """
    return {cls.name: cls.load_shared(cfg.addons[cls.name], cfg, record, device) for cls in enabled(cfg)}


def create(cfg, method, shared: Dict[str, Any]) -> List[AddOn]:
    """The add-ons ``cfg`` turns on, built for one experiment's ``method`` (registration order).

    Raises:
        ValueError: ``method`` cannot host one of them (:func:`check_hosted`).
    """
    check_hosted(type(method), cfg)
    return [cls(cfg.addons[cls.name], method, shared.get(cls.name)) for cls in enabled(cfg)]


def config_record(cfg) -> dict:
    """The flat record of a ``DistillConfig`` written to ``config.yaml``, ``meta['config']`` and
    checkpoints (and compared on resume): its fields but ``addons``, then every registered add-on's
    settings under its record key (:meth:`AddOn.config_record`; ``None``: off)."""
    record = dataclasses.asdict(cfg)
    record.pop("addons")
    for name, cls in ADDONS.items():
        settings = cfg.addons.get(name)
        record[cls.record_key] = cls.config_record(settings) if settings is not None else None
    return record


def results_records(cfg) -> Dict[str, Any]:
    """``{record key: record}`` of every registered add-on for ``results.json``
    (:meth:`AddOn.results_record`; ``None``: off)."""
    return {cls.record_key: (cls.results_record(cfg.addons[name]) if name in cfg.addons else None)
            for name, cls in ADDONS.items()}


def saved_entry_names(cfg) -> List[str]:
    """The add-on of each tensor that follows ``[images, labels]`` in a ``data`` entry of a result
    file written with ``cfg`` (``meta['addon_entries']``, read by ``sets.saved``): the add-ons it
    turns on that save one (:attr:`AddOn.saved_name`), in the order
    ``DistillMethod.saved_entries`` appends them."""
    return [cls.name for cls in enabled(cfg) if cls.saved_name]


# ---- evaluating a saved set ------------------------------------------------------------------------
def add_eval_args(parser) -> None:
    """Every add-on's ``evaluate.py`` flags (:meth:`AddOn.add_eval_args`)."""
    for cls in ADDONS.values():
        cls.add_eval_args(parser)


def check_eval_flags(values: Mapping[str, Any]) -> None:
    """Every add-on's check of the ``evaluate.py`` flag values (a plain mapping).

    Raises:
        ValueError: an invalid value (the message names the flag).
    """
    for cls in ADDONS.values():
        cls.check_eval_flags(values)


def saved_term(entries: Mapping[str, Any], config: Optional[Mapping[str, Any]], num_images: int, num_classes: int,
               values: Mapping[str, Any]):
    """The training term networks trained on one saved experiment use, or ``None``: each add-on's
    :meth:`AddOn.saved_term` of its entry (``sets.saved.SavedExperiment.addons``), given its settings
    as saved under its record key in ``meta['config']``.

    Args:
        entries: ``{add-on name: its saved entry}`` of one experiment.
        config: the file's ``meta['config']`` (``None`` if none).
        num_images, num_classes: N and K.
        values: the ``evaluate.py`` flag values (a plain mapping).

    Raises:
        ValueError: an add-on the file names is not registered, its entry or settings do not fit,
            or two add-ons both change how networks train; the message starts with the add-on's title.
    """
    config = config or {}
    terms = []
    for name, entry in entries.items():
        if name not in ADDONS:
            raise ValueError(f"the set was saved with the add-on {name!r}, which is not installed here")
        cls = ADDONS[name]
        try:
            term = cls.saved_term(entry, config.get(cls.record_key), num_images, num_classes, values)
        except ValueError as error:
            raise ValueError(f"{cls.title}: {error}") from None
        if term is not None:
            terms.append((cls.title, term))
    if len(terms) > 1:
        raise ValueError(f"add-ons {', '.join(title for title, _ in terms)} both change how networks train on the set")
    return terms[0][1] if terms else None


from methods.addons import clom, feature_labels  # noqa: E402,F401  (registration)

__all__ = ["ADDONS", "AddOn", "add_args", "add_eval_args", "check_eval_flags", "check_hosted", "config_record",
           "create", "enabled", "load_shared", "register_addon", "results_records", "saved_entry_names",
           "saved_term", "settings_from_flags", "supported_by", "unregister_addon"]
