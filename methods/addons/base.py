"""The add-on interface: learned state or loss terms beside the synthetic images that several
distillation methods can carry (the CLoM regulariser, DRUPI's feature labels).

An add-on never edits a method. A method *hosts* an add-on when its class lists the add-on's name
in ``DistillMethod.hosted_addons`` and calls the hooks below at the points they describe (the base class
does so for every method that uses ``DistillMethod.update_images`` and ``DistillMethod.step``);
any other combination is refused before anything is loaded (``DistillMethod.check_addons``). The runner
builds the add-ons named by the configuration (``methods.addons.create``), hands them to the
method (``DistillMethod.attach_addons``) and knows nothing else about them.

Hooks, each a no-op here:

* :meth:`AddOn.attach`: once per experiment, after the initial synthetic set exists (create
  learned state on the set and its optimisers);
* :meth:`AddOn.image_loss`: a term added to every image update;
* :meth:`AddOn.after_image_update`: work after every image update (e.g. a step on the add-on's
  own learned state), on the method's network when it has one;
* :meth:`AddOn.training_term`: how networks trained on the set (inner loops, evaluation) train,
  an ``evaluation.TrainingTerm``;
* :meth:`AddOn.unroll_loss`: the per-step loss of an unrolled student (trajectory matching);
* :meth:`AddOn.optimizers`, :meth:`AddOn.saved_entries`, :meth:`AddOn.pop_logs`,
  :meth:`AddOn.state_dict` / :meth:`AddOn.load_state_dict`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn


class AddOn:
    """Base class of an add-on (see the module docstring).

    Class attributes:
        name: the name methods list in ``DistillMethod.hosted_addons`` and messages use.
        config_field: the ``DistillConfig`` field holding its settings (``None`` there: off).
        flag: the command-line flag that turns it on, for messages.

    Args:
        settings: the value of ``config_field`` (the add-on's resolved settings).
        method: the ``DistillMethod`` hosting it (its generator, sampler, device, cfg ...).
        shared: what :meth:`load_shared` returned for this run (loaded once, shared by experiments).
    """

    name: ClassVar[str] = ""
    config_field: ClassVar[str] = ""
    flag: ClassVar[str] = ""

    def __init__(self, settings: Any, method, shared: Any = None):
        self.settings = settings
        self.method = method
        self.shared = shared

    @classmethod
    def load_shared(cls, settings: Any, cfg, record, device: torch.device) -> Any:
        """Resources loaded once per run before the first experiment (e.g. pre-trained models);
        ``None`` by default. Raises ``utils.UserError`` for a user mistake (a missing file)."""
        return None

    def attach(self, syn) -> None:
        """Called once per experiment with the initial ``SyntheticSet`` (after the method's optimiser exists)."""

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
        """Tensors appended to each experiment's ``[image_syn, label_syn]`` entry of the result file."""
        return []

    def pop_logs(self) -> Dict[str, torch.Tensor]:
        """Per-iteration values for the log since the last call (detached tensors)."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue exactly (generator states, optimiser moments)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`)."""

