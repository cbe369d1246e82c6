"""Add-ons a distillation method may host: learned state or loss terms beside the synthetic images
that work with several methods (``base.AddOn``). Importing the package registers every add-on.

* ``clom``: the CLoM regulariser (classification loss of pre-trained original models);
* ``feature_labels``: DRUPI's privileged feature labels F (with ``feature_loss``, the loss of
  networks trained on (x, y, F)).

The runner calls :func:`load_shared` once per run and :func:`create` once per experiment; a
method lists the add-ons it hosts in ``DistillMethod.hosted_addons``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Type

from methods.addons.base import AddOn

ADDONS: Dict[str, Type[AddOn]] = {}


def register_addon(cls: Type[AddOn]) -> Type[AddOn]:
    """Class decorator adding an :class:`AddOn` subclass to :data:`ADDONS` under ``cls.name``.

    Raises:
        ValueError: the name is already registered.
    """
    if cls.name in ADDONS:
        raise ValueError(f"add-on {cls.name!r} is already registered by {ADDONS[cls.name].__name__}")
    ADDONS[cls.name] = cls
    return cls


def requested(cfg) -> List[Tuple[str, str]]:
    """``(name, flag)`` of every add-on a ``DistillConfig`` turns on (its ``config_field`` is set)."""
    return [(cls.name, cls.flag) for cls in ADDONS.values() if getattr(cfg, cls.config_field, None)]


def load_shared(cfg, record, device) -> Dict[str, Any]:
    """``{name: shared resources}`` of every add-on ``cfg`` turns on, loaded once per run
    (:meth:`AddOn.load_shared`; the CLoM models).

    Raises:
        utils.UserError: an add-on's files are missing or do not fit.
    """
    return {cls.name: cls.load_shared(getattr(cfg, cls.config_field), cfg, record, device)
            for cls in ADDONS.values() if getattr(cfg, cls.config_field, None)}


def create(cfg, method, shared: Dict[str, Any]) -> List[AddOn]:
    """The add-ons ``cfg`` turns on, built for one experiment's ``method`` (registration order)."""
    return [cls(getattr(cfg, cls.config_field), method, shared.get(cls.name))
            for cls in ADDONS.values() if getattr(cfg, cls.config_field, None)]


from methods.addons import clom, feature_labels  # noqa: E402  (registration)

register_addon(clom.CLoM)
register_addon(feature_labels.FeatureLabels)

__all__ = ["ADDONS", "AddOn", "create", "load_shared", "register_addon", "requested"]
