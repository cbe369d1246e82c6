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

A method knows no command line: ``cli.add_original_model_args`` declares the flags and
:func:`settings_from_flags` turns their values into a :class:`CLoMSettings`, which travels in
``DistillConfig.clom`` (a plain dict, so it is written into ``config.yaml`` and the result file).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrained import originals
import utils

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
                        pretrained_path: str = originals.DEFAULT_SAVE_PATH) -> Optional[CLoMSettings]:
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
    import networks

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


# --------------------------------------------------------------------------------------------
# Loading the original models
# --------------------------------------------------------------------------------------------
def load_pool(pretrained_path: str, dataset: str, models_pool: Sequence[str], model_num: Optional[int],
              device, *, epoch: Optional[int] = None, subset: Optional[str] = None,
              expect: Optional[dict] = None) -> Dict[str, List[nn.Module]]:
    """Load the original models of every architecture of a pool, frozen and in eval mode.

    Args:
        pretrained_path: ``train_original.py --save_path``.
        dataset: the dataset the models were trained on.
        models_pool: architecture names.
        model_num: models per architecture (indices ``0 .. model_num - 1``); ``None``: every
            ``index_*`` folder found.
        device: where to put them.
        epoch: ``None`` for finished models; else every checkpoint must hold exactly ``epoch``
            trained epochs (finished or not; see the module docstring).
        subset: the ImageNet subset, if any.
        expect: checkpoint values that must match (``channel``, ``im_size``, ``num_classes``,
            ``zca`` ...), passed to ``originals.load_original_models``.

    Returns:
        ``{architecture: [nn.Module, ...]}`` in pool order.

    Raises:
        utils.UserError: a model is missing (the message names the expected directory and the
            ``train_original.py`` command that makes it), does not match ``expect``, is unfinished
            (``epoch`` not given) or has another epoch count than ``epoch``.
    """
    pool: Dict[str, List[nn.Module]] = {}
    for arch in models_pool:
        if epoch is not None:
            directory = originals.original_dir(pretrained_path, dataset, arch, subset)
            indices = range(model_num) if model_num is not None else originals.list_indices(directory)
            for index in indices:
                path = originals.checkpoint_path(pretrained_path, dataset, arch, index, subset)
                if not os.path.isfile(path):
                    break  # load_original_models below reports the missing file with its command
                done = int(originals.read_checkpoint(path)["epochs_done"])
                if done != epoch:
                    raise utils.UserError(
                        f"--epoch {epoch}: {path} holds {done} trained epochs (train_original.py keeps only the "
                        f"latest epoch of a model); train models with --epochs {epoch} under another "
                        f"--save_path, or leave --epoch out")
        pool[arch] = originals.load_original_models(pretrained_path, dataset, arch, model_num, device,
                                                    allow_unfinished=epoch is not None, subset=subset,
                                                    expect=expect)
    return pool


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
    return load_pool(settings.pretrained_path, source, settings.models_pool, settings.model_num, device,
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
# The regulariser
# --------------------------------------------------------------------------------------------
class CLoMRegularizer:
    """A ``DistillMethod.regularizers`` entry: ``syn -> alpha * L_CLoM(syn)`` (module docstring).

    Draws (one architecture, then one of its models, both uniform, and the real batch of ``cos``)
    come from the regulariser's own CPU generator, seeded with the method generator's seed plus
    :data:`SEED_OFFSET`: the method's own draws (real batches, augmentation) are the same as
    without CLoM, so ``alpha = 0`` reproduces the plain run exactly. Its state travels in the
    method's checkpoint (:meth:`state_dict`), so a resumed run draws the same models as an
    uninterrupted one. The values of the calls are kept for the run's log (:meth:`pop_logs`).

    Args:
        settings: the CLoM settings.
        pool: ``{architecture: [frozen models]}`` from :func:`load_for_method` (shared by the
            experiments of a run).
        method: the ``DistillMethod`` whose update uses the term (its ``generator``,
            ``sampler``, ``num_classes`` and ``device``).

    Raises:
        ValueError: the pool lacks an architecture of ``settings`` or has no models for it.
    """

    log_name = "clom"

    def __init__(self, settings: CLoMSettings, pool: Mapping[str, Sequence[nn.Module]], method):
        for arch in settings.models_pool:
            if not pool.get(arch):
                raise ValueError(f"CLoM: no original {arch} models loaded")
        self.settings = settings
        self.entries = [(arch, alpha, list(pool[arch])) for arch, alpha in zip(settings.models_pool, settings.alphas)]
        self.method = method
        self.generator = utils.make_generator(method.generator.initial_seed() + SEED_OFFSET)
        self._values: List[torch.Tensor] = []

    def draw(self) -> Tuple[str, float, nn.Module]:
        """One (architecture, alpha, model), each uniform, from the regulariser's generator."""
        generator = self.generator
        arch, alpha, models = self.entries[int(torch.randint(len(self.entries), (1,), generator=generator))]
        model = models[int(torch.randint(len(models), (1,), generator=generator))]
        return arch, alpha, model

    def __call__(self, syn) -> torch.Tensor:
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


def attach(method, pool: Mapping[str, Sequence[nn.Module]]) -> Optional[CLoMRegularizer]:
    """Append a :class:`CLoMRegularizer` to ``method.regularizers`` when ``method.cfg.clom`` is set.

    Args:
        method: a ``DistillMethod``.
        pool: the loaded models (:func:`load_for_method`); ignored when CLoM is off.

    Returns:
        The regulariser, or ``None`` (CLoM off: the method is untouched).
    """
    record = getattr(method.cfg, "clom", None)
    if not record:
        return None
    regularizer = CLoMRegularizer(CLoMSettings.from_dict(record), pool, method)
    method.regularizers.append(regularizer)
    return regularizer


def load_for_run(cfg, record, device) -> Optional[Dict[str, List[nn.Module]]]:
    """The original-model pool of a run (``cfg.clom`` set), loaded once, or ``None`` (CLoM off).

    Args:
        cfg: the ``DistillConfig``.
        record: the ``data.DatasetRecord`` being distilled.
        device: where to put the models.

    Raises:
        utils.UserError: see :func:`load_pool`.
    """
    if not getattr(cfg, "clom", None):
        return None
    settings = CLoMSettings.from_dict(cfg.clom)
    pool = load_for_method(settings, dataset=cfg.dataset, channel=record.channel, num_classes=record.num_classes,
                           im_size=record.im_size, zca=cfg.zca, subset=cfg.subset, device=device)
    logger.info("CLoM %s: %s", settings.distance,
                ", ".join(f"{arch} x{len(models)} (alpha {settings.weights()[arch]:g})" for arch, models in pool.items()))
    return pool
