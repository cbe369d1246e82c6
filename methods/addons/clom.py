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

The add-on declares its flags (:meth:`CLoM.add_args`, the reference's names) and turns their parsed
values into a frozen :class:`CLoMSettings` (:meth:`CLoM.from_flags`), which travels in
``DistillConfig.addons['CLoM']`` and is recorded under ``clom`` (:meth:`CLoMSettings.as_dict`) in
``config.yaml``, the result file and ``results.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import networks
import utils
from flag_types import positive_int
from methods.addons import register_addon
from methods.addons.base import IMAGE_LOSS, AddOn
from pretrained import original_files

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
    pretrained_path: str = original_files.DEFAULT_SAVE_PATH

    def as_dict(self) -> dict:
        """JSON/YAML-ready record (lists instead of tuples), recorded under ``clom``."""
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
# Flags (DDInterpreter methods/DC_DSA_DM/main.py names)
# --------------------------------------------------------------------------------------------
def split_list(values: Union[None, str, float, Sequence[Any]]) -> List[str]:
    """Flag values given space-separated (the reference: ``--alphas 1000 2000``), comma-separated
    (``--alphas 1000,2000``) or both, as one flat list of non-empty strings; a single scalar
    (a YAML preset's ``alphas: 1000``) counts as one value."""
    if isinstance(values, (str, int, float)):
        values = [values]
    out: List[str] = []
    for value in values or []:
        out.extend(part.strip() for part in str(value).split(",") if part.strip())
    return out


def parse_alphas(values: Optional[Sequence[str]], models_pool: Sequence[str]) -> Tuple[float, ...]:
    """``--alphas`` for ``--models_pool``: one value for all architectures or one per architecture.

    Args:
        values: the ``--alphas`` strings (space- and/or comma-separated).
        models_pool: the architectures.

    Returns:
        One float per architecture, in pool order.

    Raises:
        utils.UserError: a value is not a number, is negative or not finite, or the count is
            neither 1 nor ``len(models_pool)``.
    """
    parts = split_list(values)
    try:
        alphas = [float(part) for part in parts]
    except ValueError:
        raise utils.UserError(f"--alphas {' '.join(parts)}: expected numbers such as 1000 or 1000,2000") from None
    if any(not (a >= 0 and a != float("inf")) for a in alphas):
        raise utils.UserError(f"--alphas {' '.join(parts)}: weights must be finite and >= 0")
    if len(alphas) == 1:
        return tuple(alphas * len(models_pool))
    if len(alphas) != len(models_pool):
        raise utils.UserError(f"--alphas has {len(alphas)} values but --models_pool has {len(models_pool)} "
                              f"architectures ({', '.join(models_pool)}); give one weight or one per architecture")
    return tuple(alphas)


def settings_from_flags(alphas: Optional[Sequence[str]], models_pool: Optional[Sequence[str]], *,
                        model: str, model_num: int = 1, distance: str = "ce",
                        source_dataset: Optional[str] = None, epoch: Optional[int] = None,
                        batch_size: Optional[int] = None,
                        pretrained_path: str = original_files.DEFAULT_SAVE_PATH) -> Optional[CLoMSettings]:
    """The CLoM settings the flags ask for, or ``None`` when ``--alphas`` is not given (CLoM off).

    Args:
        alphas: ``--alphas`` strings.
        models_pool: ``--models_pool`` strings; default: ``[model]`` (the distillation network).
        model: ``--model``.
        model_num, distance, source_dataset, epoch, batch_size, pretrained_path: the flags of
            the same names (``--CLoM_distance``, ``--CLoM_batch_size``).

    Raises:
        utils.UserError: see :func:`parse_alphas`; an unknown architecture; ``--model_num``,
            ``--epoch`` or ``--CLoM_batch_size`` below 1; an unknown ``--CLoM_distance``; ``cos``
            without ``--CLoM_batch_size``.
    """
    if not split_list(alphas):
        return None
    pool = split_list(models_pool) or [model]
    known = networks.list_networks()
    for name in pool:
        if name not in known:
            raise utils.UserError(f"--models_pool: unknown model {name!r}; choose from: {', '.join(known)}")
    if len(set(pool)) != len(pool):
        raise utils.UserError(f"--models_pool {','.join(pool)}: an architecture is listed twice")
    if model_num < 1:
        raise utils.UserError(f"--model_num must be at least 1, got {model_num}")
    if distance not in DISTANCES:
        raise utils.UserError(f"--CLoM_distance {distance!r}: expected ce or cos")
    if epoch is not None and epoch < 1:
        raise utils.UserError(f"--epoch must be at least 1, got {epoch}")
    if batch_size is not None and batch_size < 1:
        raise utils.UserError(f"--CLoM_batch_size must be at least 1, got {batch_size}")
    if distance == "cos" and batch_size is None:
        raise utils.UserError("--CLoM_distance cos needs --CLoM_batch_size N (real images per step; "
                              "the reference README uses 8196)")
    return CLoMSettings(alphas=parse_alphas(alphas, pool), models_pool=tuple(pool), model_num=int(model_num),
                        distance=distance, source_dataset=source_dataset, epoch=epoch, batch_size=batch_size,
                        pretrained_path=str(pretrained_path))


def add_original_model_args(group, clom: bool = True) -> None:
    """Flags choosing original models (``train_original.py`` outputs; the reference's names,
    DDInterpreter ``main.py``) on an ``argparse`` parser or group.

    With ``clom`` (``distill.py``): the CLoM regulariser flags ``--alphas --models_pool --model_num
    --CLoM_distance --source_dataset --epoch --CLoM_batch_size --pretrained_path`` (and the
    reference's ``--CLoM`` switch, which ``--alphas`` implies). Without (``evaluate.py --assess``):
    ``--models_pool --model_num --epoch --pretrained_path``. ``--alphas`` and ``--models_pool``
    take values space- or comma-separated (``--alphas 1000 2000`` or ``--alphas 1000,2000``).
    The root of the models is ``--pretrained_path`` (``train_original.py --save_path``), because
    ``distill.py --save_path`` names the root of run directories.
    """
    if clom:
        group.add_argument("--CLoM", action="store_true",
                           help="reference switch; CLoM is on exactly when --alphas is given")
        group.add_argument("--alphas", nargs="+", default=None,
                           help="CLoM weight: one for every architecture or one per --models_pool entry (off if absent)")
    group.add_argument("--models_pool", nargs="+", default=None,
                       help="architectures of the original models, e.g. ConvNet or ConvNet,LeNet (default: --model)")
    group.add_argument("--model_num", type=positive_int, default=1 if clom else None,
                       help="original models per architecture, indices 0..N-1 "
                            f"(default {'1' if clom else 'every index_* folder found'})")
    group.add_argument("--epoch", type=positive_int, default=None,
                       help="use models whose checkpoint holds exactly this many trained epochs "
                            "(default: the finished models)")
    group.add_argument("--pretrained_path", default="pretrained_model",
                       help="root of the original models (train_original.py --save_path)")
    if clom:
        group.add_argument("--CLoM_distance", default="ce", choices=["ce", "cos"],
                           help="ce: alpha*CE(model(image_syn), label_syn); cos: the contrastive variant")
        group.add_argument("--source_dataset", default=None,
                           help="dataset the original models were trained on (default: --dataset)")
        group.add_argument("--CLoM_batch_size", type=positive_int, default=None,
                           help="real images per step for --CLoM_distance cos (required there)")


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
    same = original_files.dataset_name(source) == original_files.dataset_name(dataset)
    return original_files.load_pool(settings.pretrained_path, source, settings.models_pool, settings.model_num, device,
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
@register_addon
class CLoM(AddOn):
    """The CLoM add-on: ``image_loss(syn) = alpha * L_CLoM(syn)`` at every image update (module docstring).

    Draws (one architecture, then one of its models, both uniform, and the real batch of ``cos``)
    come from the add-on's own CPU generator, seeded with the method generator's seed plus
    :data:`SEED_OFFSET`: the method's own draws (real batches, augmentation) are the same as
    without CLoM, so ``alpha = 0`` reproduces the plain run exactly. Its state travels in the
    method's checkpoint (:meth:`state_dict`), so a resumed run draws the same models as an
    uninterrupted one. The values of the calls are kept for the run's log (:meth:`pop_logs`).

    Args:
        settings: ``DistillConfig.addons['CLoM']``, a :class:`CLoMSettings` (or its :meth:`CLoMSettings.as_dict`).
        method: the ``DistillMethod`` whose update uses the term (its ``generator``,
            ``sampler``, ``num_classes`` and ``device``).
        shared: ``{architecture: [frozen models]}`` from :meth:`load_shared` (shared by the
            experiments of a run).

    Raises:
        ValueError: the pool lacks an architecture of ``settings`` or has no models for it.
    """

    name = "CLoM"
    title = "CLoM"
    flag = "--alphas"
    record_key = "clom"
    hooks = frozenset({IMAGE_LOSS})
    requires = (frozenset({IMAGE_LOSS}),)
    log_name = "clom"

    def __init__(self, settings, method, shared: Mapping[str, Sequence[nn.Module]]):
        settings = _settings(settings)
        super().__init__(settings, method, shared)
        for arch in settings.models_pool:
            if not shared.get(arch):
                raise ValueError(f"CLoM: no original {arch} models loaded")
        self.entries = [(arch, alpha, list(shared[arch])) for arch, alpha in zip(settings.models_pool, settings.alphas)]
        self.generator = utils.make_generator(method.generator.initial_seed() + SEED_OFFSET)
        self._values: List[torch.Tensor] = []

    # ---- settings ----------------------------------------------------------------------
    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """The CLoM flags of ``distill.py`` (:func:`add_original_model_args` with ``clom``)."""
        add_original_model_args(parser.add_argument_group("CLoM regulariser (original models' classification loss)"))

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> Optional[CLoMSettings]:
        """The :class:`CLoMSettings` of the parsed flags (:func:`settings_from_flags`; ``--models_pool``
        defaults to ``--model``), or ``None`` when ``--alphas`` is absent.

        Raises:
            utils.UserError: an invalid CLoM flag, or ``--CLoM`` without ``--alphas``.
        """
        settings = settings_from_flags(values["alphas"], values["models_pool"], model=values["model"],
                                       model_num=values["model_num"], distance=values["CLoM_distance"],
                                       source_dataset=values["source_dataset"], epoch=values["epoch"],
                                       batch_size=values["CLoM_batch_size"], pretrained_path=values["pretrained_path"])
        if settings is None and values["CLoM"]:
            raise utils.UserError("--CLoM needs --alphas (the weight of the term)")
        return settings

    @classmethod
    def config_record(cls, settings) -> dict:
        """:meth:`CLoMSettings.as_dict` (``settings`` a :class:`CLoMSettings` or that dict)."""
        return _settings(settings).as_dict()

    @classmethod
    def legacy_state(cls, state: Mapping[str, Any]) -> Optional[dict]:
        """Checkpoints written before the add-on interface kept CLoM's state as
        ``state['regularizers'][0]``."""
        return state["regularizers"][0] if state.get("regularizers") else None

    @classmethod
    def load_shared(cls, settings, cfg, record, device) -> Dict[str, List[nn.Module]]:
        """The run's original models, loaded once (:func:`load_for_method`).

        Raises:
            utils.UserError: see ``original_files.load_pool``.
        """
        settings = _settings(settings)
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


def _settings(settings: Union[CLoMSettings, Mapping[str, Any]]) -> CLoMSettings:
    """``settings`` as a :class:`CLoMSettings` (it may be its :meth:`CLoMSettings.as_dict` record)."""
    return settings if isinstance(settings, CLoMSettings) else CLoMSettings.from_dict(settings)
