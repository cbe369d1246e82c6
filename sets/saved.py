"""A saved synthetic set as one typed record: :func:`read_saved_set` reads any layout the toolkit
knows (``sets.files``: ours and DC's ``res_*.pt``, MTT/DATM/PAD ``logged_files`` directories,
bare ``images_*.pt`` with labels and lr beside them) into a frozen :class:`SavedSet`.

What the record holds and where it comes from:

* ``method``, ``dataset``, ``model``, ``ipc``: our ``meta``; for the DC references' files the name
  ``res_{method}_{dataset}_{model}_{ipc}ipc.pt`` (DC ``main.py``); otherwise the file's stem,
  nothing, nothing, and ``max(1, N // K)`` (N images, K classes);
* the evaluation protocol (``evaluation.EvalProtocol``) ``distill.py`` evaluated the set with (``None``
  when the file records none: the caller picks the fallback, for MTT/DATM/PAD's logged files
  (:attr:`SavedSet.is_reference_log`) the protocol those references evaluate them with) and which
  protocols (``shared``, ``schedule``) it used;
* per experiment the images, the labels as saved (hard (N,) class indices, or (N, K) soft-label
  logits / real-valued targets), the learned step size, the learned step schedule (DD) and the
  raw entries of add-ons (the tensors that follow the labels in a ``data`` item, keyed by add-on
  name: ``meta['addon_entries']`` when recorded, else DRUPI's layout, where the one extra entry
  is its feature labels), with each add-on's saved settings (``meta['config'][name]``).

Nothing here knows a method or an add-on: turning an add-on's raw entry into a training term is
the add-on's own loader (``methods.addons``), called by ``cli``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Tuple

import torch

import evaluation
import networks
import utils
from sets import checks, files

# DRUPI's result files (and ours before add-on entries were named) hold one extra tensor per
# ``data`` item: the feature labels F of the add-on of that name.
DEFAULT_ADDON_ENTRIES = ("feature_labels",)

logger = logging.getLogger(__name__)

# Datasets the references distil both with and without ZCA whitening (DC/DSA/DM: mean/std;
# MTT/DATM/PAD/FRePo/KIP: ``--zca`` by default), so a file that records neither is ambiguous.
AMBIGUOUS_PREPROCESSING = ("CIFAR10", "CIFAR100")

_REFERENCE_NAME = re.compile(r"^res_(?P<method>[^_]+)_(?P<dataset>[^_]+)_(?P<model>.+)_(?P<ipc>\d+)ipc\.pt$")


@dataclass(frozen=True)
class SavedExperiment:
    """One experiment of a saved set.

    Attributes:
        images: (N, C, H, W) float32 in the dataset's normalised (or ZCA) space.
        labels: as saved: (N,) int64 class indices, or (N, K) float32 soft-label logits (DATM, ours)
            or real-valued targets (KIP, FRePo); :meth:`training_labels` gives what networks fit.
        learned_lr: the step size learned with the set (MTT/DATM/PAD ``lr_*.pt``, ours
            ``meta['syn_lr']``), or ``None``.
        schedule: the learned step schedule (DD, ``evaluation.StepSchedule``, checked against N), or ``None``.
        addons: ``{add-on name: its raw saved entry}`` (e.g. feature labels, (n_feat, N or K, ...)).
    """

    images: torch.Tensor
    labels: torch.Tensor
    learned_lr: Optional[float] = None
    schedule: Optional[evaluation.StepSchedule] = None
    addons: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def training_labels(self, label_loss: str = "cross_entropy") -> torch.Tensor:
        """The labels networks are trained on: hard labels as they are; (N, K) labels become
        probabilities (softmax of the logits), except under a square label loss (``mse``, ``mse_sum``;
        ``evaluation.SQUARE_LOSSES``), where they are real-valued regression targets kept as saved."""
        if self.labels.dim() == 1 or label_loss in evaluation.SQUARE_LOSSES:
            return self.labels
        return torch.softmax(self.labels, dim=1)


@dataclass(frozen=True)
class SavedSet:
    """A saved synthetic set and its record (module docstring).

    Attributes:
        path: the file or directory it was read from.
        layout: ``result`` (a ``res_*.pt`` / ``best_*.pt`` dict), ``logged`` (an MTT/DATM/PAD
            directory) or ``tensor`` (a bare ``images_*.pt``).
        method: the method that made it (``meta['method']``, the reference name, else the file's stem).
        dataset: the dataset it was distilled on, or ``None`` when unrecorded.
        model: the network it was distilled with, or ``None`` when unrecorded.
        ipc: images per class.
        num_classes: K, the classes of the dataset it was read for.
        experiments: the chosen experiments, in order.
        indices: their indices in the file (``--exp``).
        protocol: the evaluation protocol saved with it (``evaluation.EvalProtocol``), or ``None``.
        eval_protocols: the protocols ``distill.py`` evaluated it with (``shared``, ``schedule``);
            ``("shared",)`` when unrecorded.
        addon_settings: ``{add-on name: its saved settings}`` for every add-on with entries.
        meta: the raw ``meta`` record (``{}`` for the references' files).
        accs_all_exps: ``{model: [accuracy in [0, 1], ...]}`` saved with it (``{}`` if none).
    """

    path: str
    layout: str
    method: str
    dataset: Optional[str]
    model: Optional[str]
    ipc: int
    num_classes: int
    experiments: Tuple[SavedExperiment, ...]
    indices: Tuple[int, ...]
    protocol: Optional[evaluation.EvalProtocol] = None
    eval_protocols: Tuple[str, ...] = ("shared",)
    addon_settings: Mapping[str, dict] = field(default_factory=dict)
    meta: Mapping = field(default_factory=dict)
    accs_all_exps: Mapping[str, list] = field(default_factory=dict)

    @property
    def label_kind(self) -> str:
        """``hard`` ((N,) class indices) or ``soft`` ((N, K) logits or real-valued targets, as saved)."""
        return "hard" if self.experiments[0].labels.dim() == 1 else "soft"

    @property
    def teacher(self) -> Optional[dict]:
        """The teacher the set was made with (``meta['teacher']``: a ``pretrained.teachers.Teacher.record``,
        ``{'spec': TeacherSpec.as_dict(), 'networks': [...]}``, or ``{'spec': ...}`` alone), or ``None``."""
        found = self.meta.get("teacher") if isinstance(self.meta, Mapping) else None
        return dict(found) if isinstance(found, Mapping) and (found.get("spec") or found.get("networks")) else None

    @property
    def is_reference_log(self) -> bool:
        """Whether the set is one of MTT/DATM/PAD's logged files (an ``images_best.pt`` directory or a
        bare ``images_*.pt``): files that record no protocol, which those references evaluate with
        DSA for 1000 epochs at the learned step size (mtt-distillation, DATM and PAD ``distill.py``)."""
        return self.layout in ("logged", "tensor")

    @property
    def has_schedule(self) -> bool:
        """Whether every experiment learned a step schedule (DD)."""
        return all(experiment.schedule is not None for experiment in self.experiments)


def reference_name(path: str) -> dict:
    """``{method, dataset, model, ipc}`` from a DC-style name ``res_{method}_{dataset}_{model}_{ipc}ipc.pt``
    (VICO-UoE/DatasetCondensation ``main.py``), without ``model`` when it names no network of
    ``networks``; ``{}`` for any other name."""
    found = _REFERENCE_NAME.match(os.path.basename(path))
    if found is None:
        return {}
    named = {**found.groupdict(), "ipc": int(found["ipc"])}
    if named["model"] not in networks.list_networks():  # a name that only looks like the pattern
        named.pop("model")
    return named


def layout_of(path: str) -> str:
    """``logged``, ``tensor`` or ``result``: which reader of ``sets.files`` a ``--syn_path`` needs."""
    if files.is_logged_run(path):
        return "logged"
    return "tensor" if files.is_tensor_file(path) else "result"


def read_saved_set(path: str, record, exp: Optional[Sequence[int]] = None, labels_path: Optional[str] = None,
                   lr_path: Optional[str] = None, dataset: Optional[str] = None) -> SavedSet:
    """Read a saved set in any layout (``sets.files``) and check it fits the dataset.

    Args:
        path: a result file, an ``images_*.pt`` (with ``labels_path`` / ``lr_path``) or a directory
            of trajectory-matching logs.
        record: the ``data.DatasetRecord`` the set must fit (``channel``, ``im_size``, ``num_classes``, ``name``).
        exp: experiment indices (default all).
        labels_path, lr_path: ``--labels_path`` / ``--lr_path`` for bare tensors.
        dataset: ``--dataset`` as given (default ``record.name``), which the file's must equal.

    Returns:
        The :class:`SavedSet`.

    Raises:
        utils.UserError: one line naming the flag: the file is missing or unreadable, lacks a known
            layout, records another dataset, its images do not fit the dataset or hold NaN/inf, its
            labels are out of range or misshapen, a step schedule does not fit, or ``exp`` is out of range.
    """
    layout = layout_of(path)
    blob = files.read_set_file(path, record.num_classes, labels_path, lr_path)
    meta = checks.check_record(blob, path)
    named = reference_name(path) if layout == "result" else {}
    dataset = dataset or record.name
    if meta.get("dataset") and meta["dataset"] not in (dataset, record.name):
        raise utils.UserError(f"--syn_path holds a {meta['dataset']} set but --dataset is {dataset}")
    entries = blob["data"]
    chosen = tuple(exp) if exp else tuple(range(len(entries)))
    learned = meta.get("syn_lr") or []
    schedules = meta.get("step_schedule") or []
    entry_names = tuple(meta.get("addon_entries") or DEFAULT_ADDON_ENTRIES)
    experiments = []
    for index in chosen:
        if not 0 <= index < len(entries):
            raise utils.UserError(f"--exp {index}: the file holds experiments 0..{len(entries) - 1}")
        images = entries[index][0]
        if tuple(images.shape[1:]) != (record.channel, *record.im_size):
            raise utils.UserError(f"--syn_path images are {tuple(images.shape[1:])} but {dataset} images are "
                                  f"{(record.channel, *record.im_size)}")
        images = checks.check_images(images, index, path)
        labels = checks.check_labels(entries[index][1], images.shape[0], record.num_classes, index, path, dataset)
        extras = [value for value in entries[index][2:] if torch.is_tensor(value)]
        schedule = None
        if index < len(schedules) and schedules[index] is not None:
            try:
                if not isinstance(schedules[index], dict):
                    raise ValueError(f"a {type(schedules[index]).__name__}, not a dict")
                schedule = evaluation.StepSchedule.from_dict(schedules[index])
                schedule.check(images.shape[0])
            except ValueError as error:
                raise utils.UserError(f"--syn_path {path}: data[{index}] step schedule: {error}") from None
        experiments.append(SavedExperiment(
            images, labels, float(learned[index]) if index < len(learned) and learned[index] is not None else None, schedule,
            dict(zip(entry_names, extras))))
    config = meta.get("config") or {}
    addon_names = dict.fromkeys(name for experiment in experiments for name in experiment.addons)
    saved_protocols = tuple(p for p in (meta.get("eval_protocols") or ()) if p in ("shared", "schedule"))
    count = experiments[0].images.shape[0]
    try:
        protocol = evaluation.EvalProtocol.from_dict(meta["protocol"]) if meta.get("protocol") else None
    except ValueError as error:
        raise utils.UserError(f"--syn_path {path}: {error}") from None
    checks.check_preprocessing(path, meta, record)
    if "zca" not in meta:  # a legacy or reference file: say what is assumed, loudly where it is ambiguous
        logger.log(logging.WARNING if record.name in AMBIGUOUS_PREPROCESSING else logging.INFO,
                   "--syn_path %s records no preprocessing: assuming its images were %s as the test set here; if it "
                   "was distilled otherwise (MTT/DATM/PAD/KIP/FRePo whiten CIFAR with --zca) pass the same flags",
                   path, "ZCA-whitened" if record.zca is not None else f"normalised with {dataset}'s mean/std")
    return SavedSet(
        path=path, layout=layout,
        method=meta.get("method") or named.get("method") or os.path.splitext(os.path.basename(path))[0],
        dataset=meta.get("dataset") or named.get("dataset"), model=meta.get("model") or named.get("model"),
        ipc=int(meta.get("ipc") or max(1, count // record.num_classes)), num_classes=record.num_classes, experiments=tuple(experiments),
        indices=chosen, protocol=protocol,
        eval_protocols=saved_protocols or ("shared",),
        addon_settings={name: dict(config.get(name) or {}) for name in addon_names},
        meta=meta, accs_all_exps=blob.get("accs_all_exps") or {})
