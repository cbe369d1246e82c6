"""CLoM: the Classification Loss of pre-trained Original Models as a regulariser of the synthetic set.

Source: Lu et al., "Can pre-trained models assist in dataset distillation?" (arXiv 2310.03295;
yaolu-zjut/DDInterpreter, whose README is titled "Which Assessment Should be Prioritized in
Dataset Distillation?"): the CLoM flags of ``methods/DC_DSA_DM/main.py``, the loss of
``utils_clom/CLoM.py`` and the README (docs/reference-notes.md, *CLoM*). No reference code is reused.

The original models are networks trained on the whole real training set by ``train_original.py``
(``pretrained/originals.py``, layout ``{pretrained_path}/{dataset}/original/{model}/index_{i}/checkpoint.pt``).
They are loaded once per run, frozen (``requires_grad=False``) and put in eval mode (the reference
leaves them in their saved mode; eval mode makes BatchNorm use its running statistics, so the term
does not depend on which synthetic images share a batch).

At every image update (``DistillMethod.update_images``, i.e. once per outer step of DC/DSA and once
per iteration of DM and the other methods on the shared interface) :class:`CLoMRegularizer` draws
one architecture of the pool uniformly (with its weight alpha) and one of its ``model_num`` models
uniformly, and adds

* ``ce``:  ``alpha * CE(model(image_syn), label_syn)`` over all synthetic images at once, without
  augmentation (DDInterpreter ``utils_clom/CLoM.py``), or
* ``cos``: ``alpha * sum(M * D) / sum(D)`` with ``M = onehot(y_syn) onehot(y_real)^T`` and
  ``D = 1 - F_syn F_real^T`` on L2-normalised embeddings of the synthetic images and of
  ``CLoM_batch_size`` real images drawn uniformly with replacement from the whole training set.

Mapping of the reference ``--epoch`` (which ``..._original_epoch{E}.pth`` to load): this toolkit
keeps only the latest state of each model (``checkpoint.pt``), so ``--epoch E`` asks for models
whose checkpoint holds exactly ``E`` trained epochs (finished or not) and is an error otherwise;
leaving it out (the default) takes the finished models whatever their epoch count. The reference
default 150 equals ``train_original.py``'s default ``--epochs``.

A method knows no command line: ``cli/clom.py`` declares the flags and turns their values into a
:class:`CLoMSettings`, which travels in
``DistillConfig.clom`` (a plain dict, so it is written into ``config.yaml`` and the result file).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from methods.addons.base import AddOn
from pretrained import originals

logger = logging.getLogger(__name__)

DISTANCES = ("ce", "cos")
# The CLoM generator is seeded with the method generator's seed plus this (a prime).
SEED_OFFSET = 104729


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CLoMSettings:
    """The CLoM flags, parsed and checked (DDInterpreter ``methods/DC_DSA_DM/main.py``).

    Attributes:
        alphas: one weight per architecture of ``models_pool`` (a single ``--alphas`` value is
            repeated for every architecture).
        models_pool: architecture names (``networks.py``).
        model_num: original models loaded per architecture (indices ``0 .. model_num - 1``).
        distance: ``'ce'`` (classification loss) or ``'cos'`` (contrastive variant).
        source_dataset: the dataset the original models were trained on; ``None``: the target
            dataset (``--dataset``).
        epoch: required trained epochs of each model, or ``None`` for any finished model.
        batch_size: real images per ``cos`` evaluation (``--CLoM_batch_size``); unused by ``ce``.
        pretrained_path: root of the original models (``train_original.py --save_path``).
    """

    alphas: Tuple[float, ...]
    models_pool: Tuple[str, ...]
    model_num: int = 1
    distance: str = "ce"
    source_dataset: Optional[str] = None
    epoch: Optional[int] = None
    batch_size: Optional[int] = None
    pretrained_path: str = originals.DEFAULT_SAVE_PATH

    def as_dict(self) -> dict:
        """JSON/YAML-ready record (lists instead of tuples), the form ``DistillConfig.clom`` holds."""
        record = dataclasses.asdict(self)
        record["alphas"] = list(self.alphas)
        record["models_pool"] = list(self.models_pool)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "CLoMSettings":
        """Inverse of :meth:`as_dict`.

        Raises:
            ValueError: an unknown key.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"CLoM settings: unknown keys {', '.join(unknown)}")
        values = dict(record)
        values["alphas"] = tuple(float(a) for a in values["alphas"])
        values["models_pool"] = tuple(values["models_pool"])
        return cls(**values)

    def weights(self) -> Dict[str, float]:
        """``{architecture: alpha}``."""
        return dict(zip(self.models_pool, self.alphas))


# --------------------------------------------------------------------------------------------
# Loading the original models
# --------------------------------------------------------------------------------------------
def load_for_method(settings: CLoMSettings, *, dataset: str, channel: int, num_classes: int, im_size,
                    zca: bool, subset: Optional[str], device) -> Dict[str, List[nn.Module]]:
    """The pool of :func:`load_pool` for a distillation run: models trained on
    ``settings.source_dataset`` (default ``dataset``) with the run's image shape and ZCA setting,
    and, for ``ce``, its number of classes.

    Raises:
        utils.UserError: see :func:`load_pool`.
    """
    source = settings.source_dataset or dataset
    expect: Dict[str, Any] = {"channel": int(channel), "im_size": [int(s) for s in im_size], "zca": bool(zca)}
    if settings.distance == "ce":
        expect["num_classes"] = int(num_classes)
    same = originals.dataset_name(source) == originals.dataset_name(dataset)
    return originals.load_pool(settings.pretrained_path, source, settings.models_pool, settings.model_num, device,
                     epoch=settings.epoch, subset=subset if same else None, expect=expect)


# --------------------------------------------------------------------------------------------
# Loss terms (pure functions)
# --------------------------------------------------------------------------------------------
def clom_ce(logits: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * CE(logits, targets)`` (mean over the images), DDInterpreter ``utils_clom/CLoM.py`` ``ce``.

    Args:
        logits: (N, K) outputs of an original model on the synthetic images.
        targets: (N,) int64 class labels, or (N, K) probabilities (soft labels).
        alpha: the weight.

    Returns:
        A scalar tensor.
    """
    return alpha * F.cross_entropy(logits, targets)


def clom_cos(feat_syn: torch.Tensor, label_syn: torch.Tensor, feat_real: torch.Tensor, label_real: torch.Tensor,
             num_classes: int, alpha: float) -> torch.Tensor:
    """The contrastive CLoM term, DDInterpreter ``utils_clom/CLoM.py`` ``cos``:
    ``alpha * sum(M * D) / sum(D)`` with ``M = onehot(y_syn) onehot(y_real)^T`` and
    ``D = 1 - normalize(F_syn) normalize(F_real)^T``.

    The share of cosine distance that falls on same-class pairs: small when each synthetic image
    lies near the real images of its class and far from the others.

    Args:
        feat_syn: (N_syn, D) embeddings of the synthetic images.
        label_syn: (N_syn,) int64.
        feat_real: (N_real, D) embeddings of real images.
        label_real: (N_real,) int64.
        num_classes: K.
        alpha: the weight.

    Returns:
        A scalar tensor in ``[0, alpha]`` (0 when ``sum(D)`` is 0 is not guarded: all features
        identical makes it NaN, as in the reference).
    """
    same = F.one_hot(label_syn, num_classes).float() @ F.one_hot(label_real, num_classes).float().T
    distance = 1 - F.normalize(feat_syn, dim=1) @ F.normalize(feat_real, dim=1).T
    return alpha * (same * distance).sum() / distance.sum()


# --------------------------------------------------------------------------------------------
# The add-on
# --------------------------------------------------------------------------------------------
class CLoM(AddOn):
    """The CLoM add-on: ``image_loss(syn) = alpha * L_CLoM(syn)`` at every image update (module docstring).

    Draws (one architecture, then one of its models, both uniform, and the real batch of ``cos``)
    come from the add-on's own CPU generator, seeded with the method generator's seed plus
    :data:`SEED_OFFSET`: the method's own draws (real batches, augmentation) are the same as
    without CLoM, so ``alpha = 0`` reproduces the plain run exactly. Its state travels in the
    method's checkpoint (:meth:`state_dict`), so a resumed run draws the same models as an
    uninterrupted one. The values of the calls are kept for the run's log (:meth:`pop_logs`).

    Args:
        settings: ``DistillConfig.clom`` (:meth:`CLoMSettings.as_dict`) or a :class:`CLoMSettings`.
        method: the ``DistillMethod`` whose update uses the term (its ``generator``,
            ``sampler``, ``num_classes`` and ``device``).
        shared: ``{architecture: [frozen models]}`` from :meth:`load_shared` (shared by the
            experiments of a run).

    Raises:
        ValueError: the pool lacks an architecture of ``settings`` or has no models for it.
    """

    name = "CLoM"
    config_field = "clom"
    flag = "--alphas"
    log_name = "clom"

    def __init__(self, settings, method, shared: Mapping[str, Sequence[nn.Module]]):
        settings = settings if isinstance(settings, CLoMSettings) else CLoMSettings.from_dict(settings)
        super().__init__(settings, method, shared)
        for arch in settings.models_pool:
            if not shared.get(arch):
                raise ValueError(f"CLoM: no original {arch} models loaded")
        self.entries = [(arch, alpha, list(shared[arch])) for arch, alpha in zip(settings.models_pool, settings.alphas)]
        self.generator = utils.make_generator(method.generator.initial_seed() + SEED_OFFSET)
        self._values: List[torch.Tensor] = []

    @classmethod
    def load_shared(cls, settings, cfg, record, device) -> Dict[str, List[nn.Module]]:
        """The run's original models, loaded once (:func:`load_for_method`).

        Raises:
            utils.UserError: see ``originals.load_pool``.
        """
        settings = settings if isinstance(settings, CLoMSettings) else CLoMSettings.from_dict(settings)
        pool = load_for_method(settings, dataset=cfg.dataset, channel=record.channel, num_classes=record.num_classes,
                               im_size=record.im_size, zca=cfg.zca, subset=cfg.subset, device=device)
        logger.info("CLoM %s: %s", settings.distance, ", ".join(
            f"{arch} x{len(models)} (alpha {settings.weights()[arch]:g})" for arch, models in pool.items()))
        return pool

    def draw(self) -> Tuple[str, float, nn.Module]:
        """One (architecture, alpha, model), each uniform, from the add-on's generator."""
        generator = self.generator
        arch, alpha, models = self.entries[int(torch.randint(len(self.entries), (1,), generator=generator))]
        model = models[int(torch.randint(len(models), (1,), generator=generator))]
        return arch, alpha, model

    def image_loss(self, syn) -> torch.Tensor:
        """The term for one image update.

        Args:
            syn: the ``SyntheticSet`` (images (N, C, H, W) with a graph to the parameter).

        Returns:
            A scalar tensor with a graph to ``syn.images`` (not through the frozen model weights).
        """
        _, alpha, model = self.draw()
        if self.settings.distance == "ce":
            term = clom_ce(model(syn.images), syn.targets(), alpha)
        else:
            sampler = self.method.sampler
            picks = torch.randint(len(sampler), (self.settings.batch_size,), generator=self.generator)
            picks = picks.to(sampler.device)
            with torch.no_grad():
                feat_real = model.embed(sampler.images[picks])
            term = clom_cos(model.embed(syn.images), syn.labels, feat_real, sampler.labels[picks],
                            self.method.num_classes, alpha)
        self._values.append(term.detach())
        return term

    def state_dict(self) -> dict:
        """``{'generator': state}``: what a checkpoint needs to continue the same draws."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.generator.set_state(state["generator"])

    def pop_logs(self) -> Dict[str, torch.Tensor]:
        """``{'clom': mean term of the calls since the last pop}`` (a detached tensor; empty when
        there were none), for the runner's per-iteration log."""
        if not self._values:
            return {}
        value = torch.stack(self._values).mean()
        self._values = []
        return {self.log_name: value}
