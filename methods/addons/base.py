"""The add-on interface: learned state or loss terms beside the synthetic images that several
distillation methods can carry (the CLoM regulariser, DRUPI's feature labels), each carrying its
own settings end to end.

An add-on never edits a method, and the core names no add-on. An add-on class declares:

* its flags (:meth:`AddOn.add_args` for ``distill.py``, :meth:`AddOn.add_eval_args` for
  ``evaluate.py``) and its frozen settings, built from the parsed values as a plain mapping
  (:meth:`AddOn.from_flags`); ``DistillConfig.addons`` maps the add-on's :attr:`AddOn.name`
  to them;
* its record keys: the key under which ``config.yaml``, the result file's ``meta['config']``
  and ``results.json`` hold its settings (:attr:`AddOn.record_key`, :meth:`AddOn.config_record`,
  :meth:`AddOn.results_record`), the learned tensor it appends to each saved set
  (:attr:`AddOn.saved_name`; the result file's ``meta['addon_entries']`` names the add-on of each
  entry after the labels, ``sets.saved`` reads them) and the checkpoint key of its state
  (:attr:`AddOn.name`);
* how a saved set's entry is loaded for evaluation (:meth:`AddOn.saved_term`), with a reader for
  checkpoints written before the add-on recorded itself (:meth:`AddOn.legacy_state`);
* its capabilities: the hook points it acts through (:attr:`AddOn.hooks`) and which hook points a
  method must honour to host it (:attr:`AddOn.requires`). A method lists the hook points it
  honours in ``DistillMethod.addon_hooks``; any other combination is refused before anything is
  loaded (``methods.addons.check_hosted``).

Hook points (capabilities), each a no-op method here:

* :data:`IMAGE_LOSS` (:meth:`AddOn.image_loss`): a term added to every image update
  (``DistillMethod.update_images``);
* :data:`AFTER_IMAGE_UPDATE` (:meth:`AddOn.after_image_update`): work after every image update
  (e.g. a step on the add-on's own learned state), on the method's network when it has one;
* :data:`TRAINING_TERM` (:meth:`AddOn.training_term`): how networks trained on the set (inner
  loops, evaluation) train, an ``evaluation.TrainingTerm``;
* :data:`UNROLL_LOSS` (:meth:`AddOn.unroll_loss`): the per-step loss of an unrolled student
  (trajectory matching); an add-on declaring it changes the student's step loss.

Once per experiment :meth:`AddOn.attach` runs after the initial set exists; :meth:`AddOn.optimizers`,
:meth:`AddOn.saved_entries`, :meth:`AddOn.pop_logs`, :meth:`AddOn.state_dict` /
:meth:`AddOn.load_state_dict` complete the interface.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

IMAGE_LOSS = "image_loss"
AFTER_IMAGE_UPDATE = "after_image_update"
TRAINING_TERM = "training_term"
UNROLL_LOSS = "unroll_loss"
# Every hook point a method may honour (``DistillMethod.addon_hooks``).
HOOKS: Tuple[str, ...] = (IMAGE_LOSS, AFTER_IMAGE_UPDATE, TRAINING_TERM, UNROLL_LOSS)


class AddOn:
    """Base class of an add-on (see the module docstring); register a subclass with
    ``methods.addons.register_addon``.

    Class attributes:
        name: registry key, the key of ``DistillConfig.addons``, of its checkpoint state and of
            its entry in a result file's ``meta['addon_entries']``.
        title: what messages call it (e.g. ``feature labels``).
        flag: the command-line flag that turns it on, for messages.
        record_key: the key of its settings in ``config.yaml``, ``meta['config']`` and ``results.json``.
        hooks: the hook points it acts through (a subset of :data:`HOOKS`).
        requires: a method hosts it when the method honours every hook point of at least one of
            these sets (``()``: any method that honours at least one hook point).
        saved_name: the learned tensor of the set (``syn.learn_extra``) saved with each experiment
            as the add-on's entry (:meth:`saved_entries`), or ``None``: nothing saved.

    Args:
        settings: its value in ``DistillConfig.addons`` (what :meth:`from_flags` built).
        method: the ``DistillMethod`` hosting it (its generator, sampler, device, cfg ...).
        shared: what :meth:`load_shared` returned for this run (loaded once, shared by experiments).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    flag: ClassVar[str] = ""
    record_key: ClassVar[str] = ""
    hooks: ClassVar[FrozenSet[str]] = frozenset()
    requires: ClassVar[Tuple[FrozenSet[str], ...]] = ()
    saved_name: ClassVar[Optional[str]] = None

    def __init__(self, settings: Any, method, shared: Any = None):
        self.settings = settings
        self.method = method
        self.shared = shared

    # ---- settings: flags -> frozen config -> records ----------------------------------------
    @classmethod
    def add_args(cls, parser) -> None:
        """Add the add-on's ``distill.py`` flags to ``parser`` (an ``argparse`` parser); none here."""

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> Optional[Any]:
        """The add-on's frozen settings from the parsed flag values (a plain mapping of every
        ``distill.py`` flag, ``dest`` names), or ``None`` when the flags leave it off (here).

        Raises:
            ValueError or utils.UserError: an invalid value (the message names the flag).
        """
        return None

    @classmethod
    def config_record(cls, settings: Any) -> Any:
        """The JSON/YAML-ready record of ``settings`` under :attr:`record_key` in ``config.yaml`` and
        ``meta['config']`` (and the resume check): ``dataclasses.asdict`` of a dataclass."""
        return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings

    @classmethod
    def results_record(cls, settings: Any) -> Any:
        """What ``results.json`` records under :attr:`record_key`: :meth:`config_record` here."""
        return cls.config_record(settings)

    # ---- capabilities -------------------------------------------------------------------------
    @classmethod
    def hostable(cls, offered) -> bool:
        """Whether a method honouring the hook points ``offered`` can host this add-on (:attr:`requires`)."""
        offered = frozenset(offered)
        if not cls.requires:
            return bool(offered)
        return any(needed <= offered for needed in cls.requires)

    # ---- evaluating a saved set ---------------------------------------------------------------
    @classmethod
    def add_eval_args(cls, parser) -> None:
        """Add the add-on's ``evaluate.py`` flags to ``parser``; none here."""

    @classmethod
    def check_eval_flags(cls, values: Mapping[str, Any]) -> None:
        """Check the add-on's ``evaluate.py`` flag values (a plain mapping) before anything is loaded.

        Raises:
            ValueError: an invalid value (the message names the flag).
        """

    @classmethod
    def legacy_state(cls, state: Mapping[str, Any]) -> Optional[dict]:
        """The add-on's state in a method checkpoint written before ``state['addons']`` existed,
        or ``None`` (here)."""
        return None

    @classmethod
    def saved_term(cls, entry: torch.Tensor, record: Optional[Mapping[str, Any]], num_images: int, num_classes: int,
                   values: Mapping[str, Any]):
        """The training term (``evaluation.TrainingTerm``) networks trained on a saved set use, or ``None``
        (plain training). A term also offers ``note()`` (a few words for the printed table) and
        ``describe()`` (fields added to the evaluation's protocol record).

        Args:
            entry: the add-on's saved entry of one experiment (:attr:`saved_name`; ``sets.saved``).
            record: its settings as saved (:meth:`config_record`; ``None`` when the file has none).
            num_images, num_classes: N and K of the set.
            values: the ``evaluate.py`` flag values (a plain mapping; :meth:`add_eval_args`).

        Raises:
            ValueError: the saved tensors or settings do not fit the set or the flags.
        """
        return None

    # ---- a run -----------------------------------------------------------------------------
    @classmethod
    def load_shared(cls, settings: Any, cfg, record, device: torch.device) -> Any:
        """Resources loaded once per run before the first experiment (e.g. pre-trained models);
        ``None`` by default. Raises ``utils.UserError`` for a user mistake (a missing file)."""
        return None

    def attach(self, syn) -> None:
        """Called once per experiment with the initial ``SyntheticSet`` (after the method's optimiser
        exists); an add-on with learned tensors adds them with ``syn.learn_extra``."""

    def image_loss(self, syn) -> Optional[torch.Tensor]:
        """A scalar added to the method's loss at every image update (graph to ``syn``), or ``None``."""
        return None

    def after_image_update(self, syn, net: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
        """Work after every image update; ``net`` is the method's network of that update (``None``:
        the method has none). Returns a detached scalar for the log, or ``None``."""
        return None

    def training_term(self, syn):
        """The ``evaluation.TrainingTerm`` of networks trained on ``syn`` (inner loops and evaluation),
        or ``None`` (plain cross-entropy)."""
        return None

    def unroll_loss(self, student, params: torch.Tensor, syn, index: torch.Tensor, images: torch.Tensor,
                    targets: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The loss of one unrolled student step of trajectory matching, replacing plain
        cross-entropy, and an extra scalar the method adds to its matching loss once per unroll;
        ``None``: not handled (the method uses cross-entropy).

        Args:
            student: the method's flat-parameter model; params: (P,) its parameters at this step.
            syn: the set; index: (B,) positions of the batch; images: (B, C, H, W); targets: (B,)
                int64 or (B, K) probabilities.
        """
        return None

    def optimizers(self) -> List[torch.optim.Optimizer]:
        """Optimisers of the add-on's learned state that step together with the images."""
        return []

    def saved_entries(self, syn) -> List[torch.Tensor]:
        """Tensors appended to each experiment's ``[image_syn, label_syn]`` entry of the result file:
        the set's learned extra :attr:`saved_name` (``syn.learn_extra``) detached on the CPU, or none."""
        return [syn.extra(self.saved_name).detach().cpu().clone()] if self.saved_name else []

    def pop_logs(self) -> Dict[str, torch.Tensor]:
        """Per-iteration values for the log since the last call (detached tensors)."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue exactly (generator states, optimiser moments)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`)."""
