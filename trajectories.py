"""Expert training trajectories for trajectory matching (MTT, DATM, PAD): training the experts,
the on-disk replay buffer and its manifest, loading it back, per-sample difficulty scores and
PAD's difficulty-scheduled training subset.

Sources (facts from ``/work/shared/reference/methods.md``; no reference code is reused):

* MTT (Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022;
  GeorgeCazenavette/mtt-distillation ``buffer.py``, methods.md §4.1): each expert is a fresh
  network trained with SGD(``lr_teacher``, momentum ``mom``, weight decay ``l2``) on shuffled
  minibatches of the whole training set, with non-siamese DiffAugment (or DC augmentation
  ``crop_scale_rotate`` without ``--dsa``); its parameters are recorded at the start and after
  every epoch.
* DATM (Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory
  Matching", ICLR 2024; NUS-HPC-AI-Lab/DATM ``buffer_FTD.py``, methods.md §5.1): "flat" experts
  trained with a GSAM (surrogate-gap guided sharpness-aware) update on every batch,
  :func:`gsam_step`.
* PAD (NUS-HPC-AI-Lab/PAD ``buffer_CL.py``, methods.md §6.1): experts trained on a per-epoch
  subset chosen by per-sample difficulty (easiest first, hard samples added, easy ones removed
  later), :class:`PadSchedule`; the difficulty scores come from :func:`score_dataset` (EL2N, GraNd,
  uncertainty; Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021, for EL2N and GraNd).

On-disk layout (:func:`buffer_dir`)::

    {buffer_path}/{dataset}[_NO_ZCA]/{model}/replay_buffer_{n}.pt   n = 0, 1, ...
    {buffer_path}/{dataset}[_NO_ZCA]/{model}/manifest.json
    {buffer_path}/{dataset}[_NO_ZCA]/{model}/log.txt                 (written by buffer.py)
    {buffer_path}/scores/{dataset}_{method}.pt                       (written by score.py)

Every ``replay_buffer_{n}.pt`` is what MTT writes: ``torch.save`` of a Python list of
trajectories; a trajectory is a list of ``train_epochs + 1`` snapshots; a snapshot is a list of
CPU tensors in ``model.parameters()`` order. Chunk ``n`` holds experts
``n * save_interval ... (n + 1) * save_interval - 1``. Unlike MTT, a chunk is rewritten
(atomically) after every expert, so an interrupted run loses at most the expert in progress.

Expert ``k`` is initialised from ``torch.manual_seed(seed + k)`` (inside a forked RNG) and shuffled
and augmented from ``utils.make_generator(seed + k)``, so a resumed buffer equals an uninterrupted
one on the same device.

Public API:

* reading: :func:`load_buffer` (directory or ``(buffer_path, dataset, model, zca)``, checked
  against the manifest), :func:`buffer_dir`, :func:`list_buffer_files`, :func:`load_chunk`,
  :func:`read_manifest`;
* writing: :class:`ExpertConfig`, :class:`PadSchedule`, :func:`make_buffer`, :class:`BufferWriter`,
  :func:`check_buffer_dir`, :func:`train_expert`,
  :func:`gsam_step`, :func:`snapshot`;
* difficulty: :func:`score_dataset`, :func:`sample_scores`, :func:`class_order`,
  :func:`save_scores`, :func:`resolve_sort_file`, :func:`load_sort_order`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import networks
import utils

logger = logging.getLogger(__name__)

# Version of the manifest / score-file layout written here.
BUFFER_FORMAT = "dd-toolkit expert buffer"
BUFFER_FORMAT_VERSION = 1
SCORE_FORMAT = "dd-toolkit difficulty scores"
SCORE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHUNK_RE = re.compile(r"^replay_buffer_(\d+)\.pt$")

# The DC augmentation MTT's buffer.py uses when --dsa is off.
EXPERT_DC_AUG = "crop_scale_rotate"
# Reference defaults (methods.md §5.1, §6.1) of the GSAM and PAD flags.
GSAM_DEFAULTS = {"rho_max": 2.0, "alpha": 0.4, "adaptive": True}
# MTT names the TinyImageNet folder "Tiny"; both registered names map to it.
_FOLDER_ALIASES = {"TinyImageNet": "Tiny"}
# Default image sides of the datasets whose resolution is a flag (data/folder_sets.py).
_DEFAULT_RES = {"ImageNet": 128, "MHIST": 224}

Snapshot = list  # list[torch.Tensor], one per parameter, CPU, model.parameters() order
Trajectory = list  # list[Snapshot], train_epochs + 1 of them


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PadSchedule:
    """PAD's per-epoch training subset (``buffer_CL.py``, methods.md §6.1).

    For a class whose ``n`` training images are ordered easiest first, epoch ``e`` (0-based, the
    ``e``-th training epoch) trains on:

    1. ``e <= add_end_epoch``: the easiest ``floor(p * n)`` images with
       ``p = min(1, init_ratio + (1 - init_ratio) * e / add_end_epoch)`` (``p = 1`` when
       ``add_end_epoch == 0``);
    2. ``add_end_epoch < e <= rm_epoch_first``: all ``n`` images;
    3. ``rm_epoch_first < e <= rm_epoch_second``: all but the easiest ``floor(rm_easy_ratio_first * n)``;
    4. ``e > rm_epoch_second``: all but the easiest ``floor(rm_easy_ratio_second * n)``.

    The stages are tested in this order, so with the reference defaults (``add_end_epoch`` 100 >
    ``rm_epoch_first`` 40) stages 2 and 3 never apply. ``n`` is each class's real count (the
    reference hard-codes 5000, CIFAR-10's). ``floor`` is taken after adding 1e-9, so that
    ``0.7 * 10`` gives 7.

    Attributes:
        init_ratio: fraction of the easiest images at epoch 0, in (0, 1].
        add_end_epoch: epoch by which all images have been added.
        rm_epoch_first / rm_epoch_second: last epoch before removal stage 1 / 2.
        rm_easy_ratio_first / rm_easy_ratio_second: easiest fraction removed in stage 1 / 2, in [0, 1).
    """

    init_ratio: float = 1.0
    add_end_epoch: int = 100
    rm_epoch_first: int = 40
    rm_epoch_second: int = 60
    rm_easy_ratio_first: float = 0.1
    rm_easy_ratio_second: float = 0.1

    def validate(self) -> None:
        """Raise ``utils.UserError`` naming the flag of an out-of-range value."""
        if not 0 < self.init_ratio <= 1:
            raise utils.UserError(f"--init_ratio must be in (0, 1], got {self.init_ratio}")
        for name in ("add_end_epoch", "rm_epoch_first", "rm_epoch_second"):
            if getattr(self, name) < 0:
                raise utils.UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rm_easy_ratio_first", "rm_easy_ratio_second"):
            if not 0 <= getattr(self, name) < 1:
                raise utils.UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")

    def stage(self, epoch: int) -> int:
        """The stage (1-4, see the class docstring) of 0-based ``epoch``."""
        if epoch <= self.add_end_epoch:
            return 1
        if epoch <= self.rm_epoch_first:
            return 2
        if epoch <= self.rm_epoch_second:
            return 3
        return 4

    def window(self, count: int, epoch: int) -> tuple[int, int]:
        """``(start, stop)``: the slice of a class's easiest-first order used at ``epoch``.

        Args:
            count: the class's number of training images.
            epoch: 0-based training epoch.
        """
        stage = self.stage(epoch)
        if stage == 1:
            ratio = 1.0 if self.add_end_epoch == 0 else min(
                1.0, self.init_ratio + (1.0 - self.init_ratio) * epoch / self.add_end_epoch)
            return 0, max(1, math.floor(ratio * count + 1e-9))
        if stage == 2:
            return 0, count
        ratio = self.rm_easy_ratio_first if stage == 3 else self.rm_easy_ratio_second
        return min(math.floor(ratio * count + 1e-9), count - 1), count

    def select(self, order: Sequence[torch.Tensor], epoch: int) -> torch.Tensor:
        """The training-set indices used at ``epoch``.

        Args:
            order: one 1-D int64 tensor per class: that class's training-set indices, easiest first.
            epoch: 0-based training epoch.

        Returns:
            (M,) int64 CPU tensor, class after class, easiest first within a class.
        """
        parts = []
        for row in order:
            start, stop = self.window(int(row.numel()), epoch)
            parts.append(row[start:stop])
        return torch.cat(parts).long().cpu()


@dataclass(frozen=True)
class ExpertConfig:
    """How experts are trained (the ``buffer.py`` flags that change a trajectory).

    Field names are the reference flag names (methods.md §4.1, §5.1, §6.1).

    Attributes:
        dataset, model, zca, subset, res: what the experts are trained on / as.
        train_epochs: epochs per expert; a trajectory has ``train_epochs + 1`` snapshots.
        lr_teacher: SGD learning rate.
        batch_train: images per SGD step.
        mom, l2: SGD momentum and weight decay.
        decay: multiply the lr by 0.1 (new optimiser, momentum reset) after 0-based epoch
            ``train_epochs // 2 + 1``, as MTT's ``--decay``.
        dsa: non-siamese DiffAugment ``dsa_strategy`` on every batch; otherwise DC augmentation
            ``crop_scale_rotate`` (MTT).
        dsa_strategy: DiffAugment operations joined by ``_``.
        gsam: GSAM update (DATM flat trajectories) instead of plain SGD.
        rho_max, rho_min: GSAM radius; it follows the lr linearly from ``rho_max`` (initial lr)
            to ``rho_min`` (decayed lr) as GSAM's proportion scheduler; with a constant lr it is
            ``rho_max``.
        alpha: GSAM weight of the removed orthogonal gradient component.
        adaptive: GSAM's scale-adaptive perturbation (ASAM style).
        sort_method: PAD difficulty order (score file name or path); empty: the whole set every epoch.
        schedule: the PAD schedule, used when ``sort_method`` is set.
        seed: expert ``k`` uses seed ``seed + k``.
    """

    dataset: str
    model: str = "ConvNet"
    zca: bool = False
    subset: Optional[str] = None
    res: Optional[int] = None
    train_epochs: int = 50
    lr_teacher: float = 0.01
    batch_train: int = 256
    mom: float = 0.0
    l2: float = 0.0
    decay: bool = False
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    gsam: bool = False
    rho_max: float = 0.0
    rho_min: float = 0.0
    alpha: float = 0.0
    adaptive: bool = True
    sort_method: str = ""
    schedule: Optional[PadSchedule] = None
    seed: int = 0

    def validate(self) -> None:
        """Check every value; raise ``utils.UserError`` naming the flag.

        Raises:
            utils.UserError: a non-positive epoch count, lr or batch size, negative ``mom``/``l2``,
                an unknown model or DiffAugment operation, bad GSAM radii or PAD ratios.
        """
        for name in ("train_epochs", "batch_train"):
            if getattr(self, name) < 1:
                raise utils.UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr_teacher > 0:
            raise utils.UserError(f"--lr_teacher must be positive, got {self.lr_teacher}")
        for name in ("mom", "l2"):
            if not getattr(self, name) >= 0:
                raise utils.UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.model not in networks.list_networks():
            raise utils.UserError(f"--model: unknown model {self.model!r}; choose from: "
                                  f"{', '.join(networks.list_networks())}")
        try:
            augment.validate_strategy(self.dsa_strategy if self.dsa else "")
        except ValueError as error:
            raise utils.UserError(f"--dsa_strategy: {error}") from None
        if self.gsam:
            if not (self.rho_max >= 0 and self.rho_min >= 0):
                raise utils.UserError(f"--rho_max/--rho_min must be >= 0, got {self.rho_max}/{self.rho_min}")
            if self.rho_min > self.rho_max:
                raise utils.UserError(f"--rho_min {self.rho_min} exceeds --rho_max {self.rho_max}")
            if not self.alpha >= 0:
                raise utils.UserError(f"--alpha must be >= 0, got {self.alpha}")
        if self.sort_method:
            (self.schedule or PadSchedule()).validate()

    def describe(self, save_interval: int) -> dict:
        """The effective configuration, JSON-ready, as stored in the manifest's ``config``.

        GSAM values are ``None`` without ``gsam``, PAD values ``None`` without ``sort_method``,
        ``dsa_strategy`` is ``None`` without ``dsa``; the dataset name is canonical
        (:func:`canonical_dataset`) and ``res`` is the effective image side for the datasets
        that take ``--res``. Two runs may write to the same buffer only if these dicts are equal.
        """
        record = asdict(self)
        del record["schedule"]
        record["dataset"] = canonical_dataset(self.dataset)
        record["subset"] = self.subset.lower() if self.subset else None
        record["res"] = _effective_res(self.dataset, self.res)
        if not self.dsa:
            record["dsa_strategy"] = None
        if not self.gsam:
            record.update(rho_max=None, rho_min=None, alpha=None, adaptive=None)
        padded = asdict(self.schedule or PadSchedule())
        record.update({key: (padded[key] if self.sort_method else None) for key in padded})
        record["sort_method"] = self.sort_method or None
        record["save_interval"] = int(save_interval)
        return record


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------
def canonical_dataset(name: str) -> str:
    """The registered spelling of a dataset name (case-insensitive), with ``TinyImageNet`` folded
    to MTT's ``Tiny``; an unregistered name is returned unchanged."""
    from data import DATASETS

    canonical = name
    if name not in DATASETS:
        matches = [key for key in DATASETS if key.lower() == str(name).lower()]
        if len(matches) == 1:
            canonical = matches[0]
    return _FOLDER_ALIASES.get(canonical, canonical)


def _imagenet_subset(dataset: str, subset: Optional[str]) -> Optional[str]:
    """The ImageNet subset named by ``dataset`` (or by ``subset`` for dataset ImageNet), else None."""
    from data import IMAGENET_SUBSETS

    name = canonical_dataset(dataset)
    if name in IMAGENET_SUBSETS:
        return name
    if name == "ImageNet":
        return (subset or "").lower() or "none"
    return None


def _effective_res(dataset: str, res: Optional[int]) -> Optional[int]:
    if _imagenet_subset(dataset, None) is not None:
        return int(res or _DEFAULT_RES["ImageNet"])
    if canonical_dataset(dataset) == "MHIST":
        return int(res or _DEFAULT_RES["MHIST"])
    return None if res is None else int(res)


def dataset_folder(dataset: str, zca: bool, subset: Optional[str] = None, res: Optional[int] = None) -> str:
    """The dataset part of a buffer path: MTT's layout, with ``_NO_ZCA`` for every dataset.

    ``FashionMNIST_NO_ZCA``, ``CIFAR10`` (with ZCA), ``ImageNet/imagenette/128_NO_ZCA``. MTT
    appends ``_NO_ZCA`` only for CIFAR-10/100 and nests ImageNet subsets as
    ``ImageNet/{subset}/{res}``; here the suffix marks every buffer made without ZCA, so whitened
    and unwhitened experts of a dataset never share a folder.
    """
    subset_name = _imagenet_subset(dataset, subset)
    if subset_name is not None:
        base = os.path.join("ImageNet", subset_name, str(_effective_res(dataset, res)))
    else:
        base = canonical_dataset(dataset)
    return base if zca else f"{base}_NO_ZCA"


def buffer_dir(buffer_path: str, dataset: str, model: str, zca: bool, subset: Optional[str] = None,
               res: Optional[int] = None) -> str:
    """``{buffer_path}/{dataset_folder}/{model}``: where ``buffer.py`` writes these experts."""
    return os.path.join(os.fspath(buffer_path), dataset_folder(dataset, zca, subset, res), model)


def chunk_path(directory: str, index: int) -> str:
    """``{directory}/replay_buffer_{index}.pt``."""
    return os.path.join(directory, f"replay_buffer_{index}.pt")


def list_buffer_files(directory: str) -> list:
    """The ``replay_buffer_{n}.pt`` files of a buffer directory, sorted by ``n`` (empty if none)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = CHUNK_RE.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return [path for _, path in sorted(found)]


def buffer_command(dataset: str = "DATASET", model: str = "MODEL", zca: bool = False,
                   buffer_path: Optional[str] = None, subset: Optional[str] = None) -> str:
    """The ``buffer.py`` command line that makes a buffer (for error messages)."""
    parts = ["python buffer.py", f"--dataset {dataset}", f"--model {model}"]
    if subset:
        parts.append(f"--subset {subset}")
    if zca:
        parts.append("--zca")
    if buffer_path:
        parts.append(f"--buffer_path {buffer_path}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Manifest and chunk files
# --------------------------------------------------------------------------------------------
def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def toolkit_version() -> str:
    """``git describe --always --dirty`` of this checkout, or ``'unknown'`` outside git."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest of a buffer directory, or ``None`` when it has none (a reference buffer).

    Raises:
        utils.UserError: the manifest is unreadable or of a newer layout.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise utils.UserError(f"cannot read {path}: {_one_line(error)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise utils.UserError(f"{path} is not a buffer manifest of this toolkit (no 'config')")
    if int(manifest.get("format_version", 0)) > BUFFER_FORMAT_VERSION:
        raise utils.UserError(f"{path} has layout version {manifest['format_version']}; this toolkit reads "
                              f"up to {BUFFER_FORMAT_VERSION}")
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (temporary file + ``os.replace``)."""
    path = os.path.join(directory, MANIFEST_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def load_chunk(path: str) -> list:
    """One ``replay_buffer_{n}.pt``: a list of trajectories (``torch.load``, ``weights_only``).

    Raises:
        utils.UserError: unreadable, or not a list of trajectories (lists of lists of tensors).
    """
    try:
        chunk = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign file
        raise utils.UserError(f"cannot read expert buffer file {path}: {_one_line(error)}") from None
    if not isinstance(chunk, list) or not all(
            isinstance(traj, (list, tuple)) and traj and all(
                isinstance(snap, (list, tuple)) and snap and all(torch.is_tensor(t) for t in snap) for snap in traj)
            for traj in chunk):
        raise utils.UserError(f"{path} is not an expert buffer file (a list of trajectories, each a list of "
                              "snapshots, each a list of parameter tensors)")
    return chunk


def config_differences(saved: dict, current: dict) -> list:
    """``['--key saved (this run: current)', ...]`` for every key whose value differs."""
    keys = list(dict.fromkeys([*current, *saved]))
    return [f"--{key} {saved.get(key)!r} (this run: {current.get(key)!r})"
            for key in keys if saved.get(key) != current.get(key)]


def check_buffer_dir(directory: str, config: dict) -> int:
    """Refuse early to add experts with another configuration; returns the experts already saved.

    Cheap (reads only the manifest), so ``buffer.py`` calls it before loading the dataset.

    Args:
        directory: the buffer directory (:func:`buffer_dir`).
        config: :meth:`ExpertConfig.describe` of this run.

    Returns:
        The number of experts the manifest records (0 for a new or empty directory).

    Raises:
        utils.UserError: the directory holds experts made with another configuration (the
            message names every differing flag), or chunk files without a manifest.
    """
    manifest = read_manifest(directory)
    files = list_buffer_files(directory)
    if manifest is None:
        if files:
            raise utils.UserError(f"{directory} holds {len(files)} replay_buffer_*.pt file(s) but no {MANIFEST_NAME} "
                                  "(a reference-format buffer?); refusing to add experts to it: use another "
                                  "--buffer_path")
        return 0
    differences = config_differences(manifest["config"], config)
    if differences and files:
        raise utils.UserError(f"{directory} holds {manifest.get('num_experts', '?')} expert(s) made with "
                              f"{'; '.join(differences)}; refusing to mix experts: use the same flags, another "
                              "--buffer_path, or delete that folder")
    return 0 if differences else int(manifest.get("num_experts", 0))


class BufferWriter:
    """Append-only writer of one buffer directory, resumable after an interruption.

    Opening counts the experts already saved (chunk files and manifest; a chunk written just before
    a crash, whose manifest update was lost, still counts) and reloads a partially filled last
    chunk. :meth:`add` appends a trajectory, rewrites its chunk with ``utils.atomic_save`` and then
    the manifest.

    Attributes:
        directory: the buffer directory.
        saved: experts saved so far.
        manifest: the manifest dict as last written.

    Raises:
        utils.UserError: (on construction) the directory holds experts of another configuration or
            parameter layout, chunk files without a manifest, or chunk files that are not numbered
            0, 1, ... or not full where they should be.
    """

    def __init__(self, directory: str, config: dict, save_interval: int, meta: dict,
                 run_info: Optional[dict] = None) -> None:
        self.directory = directory
        self.save_interval = int(save_interval)
        check_buffer_dir(directory, config)
        os.makedirs(directory, exist_ok=True)
        existing = read_manifest(directory)
        files = list_buffer_files(directory)
        if existing is not None and not files:  # no experts saved yet: nothing to keep
            if config_differences(existing["config"], config):
                logger.info("%s holds no experts yet; replacing its manifest (another configuration)", directory)
            existing = None
        self.saved, self._chunk = self._count(files, existing)
        if existing is not None:
            for key in ("param_names", "param_shapes"):
                if existing.get(key) != meta.get(key):
                    raise utils.UserError(f"{directory}: the saved experts have other {key} than a {config['model']} "
                                          f"network for these images; use another --buffer_path")
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        self.manifest = existing or {"format": BUFFER_FORMAT, "format_version": BUFFER_FORMAT_VERSION,
                                     "created": now, "config": config, **meta, "files": {}, "experts": [],
                                     "runs": []}
        self.manifest["num_experts"] = self.saved
        self.manifest["runs"].append({"started": now, **(run_info or {})})
        self._recover_entries(files)
        write_manifest(directory, self.manifest)

    def _count(self, files: list, manifest: Optional[dict]) -> tuple[int, list]:
        indices = [int(CHUNK_RE.match(os.path.basename(p)).group(1)) for p in files]
        if indices != list(range(len(indices))):
            raise utils.UserError(f"{self.directory}: chunk files are numbered {indices}, expected 0..{len(indices) - 1}; "
                                  "was a file removed?")
        recorded = (manifest or {}).get("files", {})
        saved, partial = 0, []
        for position, path in enumerate(files):
            name = os.path.basename(path)
            last = position == len(files) - 1
            count = recorded.get(name)
            if count != self.save_interval:
                chunk = load_chunk(path)
                count = len(chunk)
                if last and count < self.save_interval:
                    partial = chunk
            if count > self.save_interval or (not last and count != self.save_interval):
                raise utils.UserError(f"{path} holds {count} experts but --save_interval is {self.save_interval}")
            saved += count
        return saved, partial

    def _recover_entries(self, files: list) -> None:
        """Make the manifest's file counts and expert list agree with the files on disk."""
        self.manifest["files"] = {}
        for index, path in enumerate(files):
            full = min(self.save_interval, self.saved - index * self.save_interval)
            self.manifest["files"][os.path.basename(path)] = full
        experts = [e for e in self.manifest["experts"] if e.get("index", 0) < self.saved]
        known = {e["index"] for e in experts}
        for index in range(self.saved):
            if index not in known:  # trained, saved, but the manifest update was lost
                experts.append({"index": index, "file": os.path.basename(chunk_path("", index // self.save_interval)),
                                "recovered": True})
        self.manifest["experts"] = sorted(experts, key=lambda e: e["index"])

    def add(self, trajectory: Trajectory, info: Optional[dict] = None) -> str:
        """Append one expert's trajectory and save its chunk and the manifest.

        Args:
            trajectory: ``train_epochs + 1`` snapshots, each a list of CPU tensors.
            info: JSON-ready facts about the expert (test accuracies, seconds ...).

        Returns:
            The chunk file written.
        """
        index = self.saved
        path = chunk_path(self.directory, index // self.save_interval)
        self._chunk.append(trajectory)
        utils.atomic_save(self._chunk, path)
        self.saved += 1
        name = os.path.basename(path)
        self.manifest["files"][name] = len(self._chunk)
        self.manifest["experts"].append({"index": index, "file": name, **(info or {})})
        self.manifest["num_experts"] = self.saved
        self.manifest["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_manifest(self.directory, self.manifest)
        if len(self._chunk) == self.save_interval:
            self._chunk = []
        return path


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _resolve_source(source, expect: Optional[dict]) -> tuple[str, dict, dict]:
    """(directory, expectations, fields for the make-command hint) of a ``load_buffer`` source."""
    expect = dict(expect or {})
    if isinstance(source, (str, os.PathLike)):
        directory = os.fspath(source)
        hint = {"dataset": expect.get("dataset", "DATASET"), "model": expect.get("model", "MODEL"),
                "zca": bool(expect.get("zca", False)), "subset": expect.get("subset")}
        return directory, expect, hint
    if isinstance(source, (tuple, list)) and 4 <= len(source) <= 6:
        buffer_path, dataset, model, zca, *rest = source
        subset = rest[0] if rest else None
        res = rest[1] if len(rest) > 1 else None
        directory = buffer_dir(buffer_path, dataset, model, zca, subset, res)
        expect = {"dataset": dataset, "model": model, "zca": bool(zca), **expect}
        hint = {"dataset": dataset, "model": model, "zca": bool(zca), "subset": subset, "buffer_path": buffer_path}
        return directory, expect, hint
    raise TypeError("load_buffer source must be a buffer directory or (buffer_path, dataset, model, zca"
                    "[, subset[, res]]), got " + repr(source))


def _check_expectations(directory: str, saved: dict, expect: dict, command: str) -> None:
    for key, wanted in expect.items():
        if key == "param_shapes":
            continue
        if key not in saved:
            raise ValueError(f"load_buffer: unknown expectation {key!r}; manifest fields: {', '.join(saved)}")
        have = saved[key]
        if key == "dataset":
            same = canonical_dataset(str(wanted)).lower() == canonical_dataset(str(have)).lower()
        elif key == "zca":
            same = bool(wanted) == bool(have)
        elif key == "subset":
            same = (wanted or "").lower() == (have or "").lower()
        else:
            same = wanted == have
        if not same:
            raise utils.UserError(f"the expert buffer {directory} was made with {key}={have!r} but this run needs "
                                  f"{key}={wanted!r}; make a matching one with: {command}")


def load_buffer(source, expect: Optional[dict] = None, max_files: Optional[int] = None,
                max_experts: Optional[int] = None) -> list:
    """Load expert trajectories written by ``buffer.py`` or by the MTT/DATM/PAD reference scripts.

    Args:
        source: a buffer directory, or ``(buffer_path, dataset, model, zca[, subset[, res]])``,
            which names the directory of :func:`buffer_dir` and implies
            ``expect={'dataset', 'model', 'zca'}``.
        expect: manifest ``config`` values the buffer must have (any keys of
            :meth:`ExpertConfig.describe`, e.g. ``dataset``, ``model``, ``zca``, ``train_epochs``),
            plus optionally ``param_shapes`` (a list of shapes in ``model.parameters()`` order),
            which is also checked for buffers without a manifest.
        max_files: read only the first ``max_files`` chunk files (MTT ``--max_files``).
        max_experts: return at most this many trajectories in total (MTT ``--max_experts`` with
            ``--load_all``; files past the limit are not read).

    Returns:
        A list of trajectories; ``buffer[i][t][j]`` is parameter ``j`` of expert ``i`` after epoch
        ``t`` (``t = 0``: initialisation), a CPU tensor.

    Raises:
        utils.UserError: no ``replay_buffer_*.pt`` where expected (the message names the path and
            the ``buffer.py`` command that makes it); the manifest records another dataset, model,
            ZCA setting or other expected value (the message names the field); parameter shapes
            differ from ``expect['param_shapes']``; an unreadable file.
        ValueError: ``expect`` names a field the manifest does not have, or a non-positive limit.
        TypeError: ``source`` is neither a path nor such a tuple.

    A buffer without ``manifest.json`` (reference format) is accepted with a logged warning,
    since its dataset, model and ZCA setting cannot be checked.
    """
    directory, expect, hint = _resolve_source(source, expect)
    command = buffer_command(hint["dataset"], hint["model"], hint["zca"], hint.get("buffer_path"), hint.get("subset"))
    for name, limit in (("max_files", max_files), ("max_experts", max_experts)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be at least 1, got {limit}")
    files = list_buffer_files(directory)
    manifest = read_manifest(directory)
    if not files:
        state = "holds no experts yet" if manifest is not None else "has no replay_buffer_0.pt"
        raise utils.UserError(f"no expert buffer: {directory} {state}; make it with: {command}")
    if manifest is not None:  # complete the make-command hint from what the buffer holds
        saved = manifest["config"]
        command = buffer_command(expect.get("dataset", saved.get("dataset")), expect.get("model", saved.get("model")),
                                 bool(expect.get("zca", saved.get("zca"))), hint.get("buffer_path"),
                                 expect.get("subset", saved.get("subset")))
    if manifest is None:
        logger.warning("%s has no %s (a reference-format buffer): its dataset, model and ZCA setting cannot be "
                       "checked", directory, MANIFEST_NAME)
    else:
        _check_expectations(directory, manifest["config"], expect, command)
    if max_files is not None:
        files = files[:max_files]
    buffer: list = []
    for path in files:
        buffer.extend(load_chunk(path))
        if max_experts is not None and len(buffer) >= max_experts:
            break
    if max_experts is not None:
        buffer = buffer[:max_experts]
    shapes = [list(t.shape) for t in buffer[0][0]]
    wanted = expect.get("param_shapes")
    if wanted is None and manifest is not None:
        wanted = manifest.get("param_shapes")
    if wanted is not None and [list(s) for s in wanted] != shapes:
        raise utils.UserError(f"the expert buffer {directory} holds parameters of shapes {shapes}, expected "
                              f"{[list(s) for s in wanted]} (another model or image size?); make a matching one "
                              f"with: {command}")
    for number, trajectory in enumerate(buffer):
        if len(trajectory) != len(buffer[0]) or any([list(t.shape) for t in snap] != shapes for snap in trajectory):
            raise utils.UserError(f"{directory}: expert {number} differs in length or parameter shapes from expert 0")
    return buffer


# --------------------------------------------------------------------------------------------
# Training experts
# --------------------------------------------------------------------------------------------
def snapshot(net: nn.Module) -> Snapshot:
    """A copy of ``net``'s parameters on the CPU, in ``net.parameters()`` order (MTT's format)."""
    return [p.detach().to("cpu", copy=True) for p in net.parameters()]


def expert_augmenter(cfg: ExpertConfig) -> Optional[utils.Augmenter]:
    """MTT's per-batch expert augmentation: non-siamese DiffAugment ``cfg.dsa_strategy`` when
    ``cfg.dsa``, else DC augmentation ``crop_scale_rotate`` (see ``utils.make_augmenter``)."""
    if cfg.dsa:
        return utils.make_augmenter(cfg.dsa_strategy)
    return utils.make_augmenter("", dc_aug=augment.DCAugParam(strategy=EXPERT_DC_AUG))


@contextmanager
def _running_stats_frozen(net: nn.Module) -> Iterator[None]:
    """BatchNorm momentum 0 inside the block, as GSAM's second pass: the running statistics stay
    put (``num_batches_tracked`` is restored too, so the pass leaves no trace)."""
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module, _, _ in saved:
        module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum, tracked in saved:
            module.momentum = momentum
            if tracked is not None:
                module.num_batches_tracked.copy_(tracked)


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.float() ** 2).sum() for t in tensors))


def gsam_step(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
              rho: float, alpha: float, adaptive: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """One GSAM update (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization",
    ICLR 2022), as DATM's ``buffer_FTD.py`` applies it to every batch (methods.md §5.1).

    1. ``g = grad L(w)``.
    2. ``e = rho * g / (||g|| + eps)``; with ``adaptive`` the norm is ``|| |w| * g ||`` and ``e``
       is further multiplied elementwise by ``w**2``.
    3. ``g_p = grad L(w + e)`` on the same (augmented) batch, BatchNorm running statistics frozen.
    4. ``g_final = g_p - alpha * (g - cos(g, g_p) * ||g|| * g_p / ||g_p||)``, i.e. ``alpha`` times
       the part of ``g`` orthogonal to ``g_p`` is removed (``cos = <g, g_p> / (||g|| ||g_p|| + eps)``,
       ``||g_p||`` gets ``+ eps``). Norms in 3-4 are plain global L2 norms over all parameters.
    5. Restore ``w`` exactly and let ``optimizer`` (SGD with its momentum and weight decay) step
       with ``g_final``.

    With ``rho = 0`` and ``alpha = 0`` this is exactly :func:`utils.sgd_step`.

    Args:
        net: the network (train mode).
        images: (B, C, H, W); labels: (B,) int64.
        optimizer: over ``net``'s parameters.
        rho: perturbation radius (>= 0).
        alpha: weight of the removed orthogonal component.
        adaptive: scale-adaptive perturbation.
        eps: GSAM's ``perturb_eps``.

    Returns:
        The batch's mean loss at ``w`` (0-d tensor).
    """
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss = utils.accumulate_gradient(net, images, labels)
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    with torch.no_grad():
        scaled = [g * p.abs() for g, p in zip(grads, params)] if adaptive else grads
        scale = rho / (_global_norm(scaled) + eps)
        originals = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            step = g * scale.to(g.dtype)
            p.add_(step * p * p if adaptive else step)
    optimizer.zero_grad(set_to_none=True)
    with _running_stats_frozen(net):
        utils.accumulate_gradient(net, images, labels)
    with torch.no_grad():
        for p, original in zip(params, originals):
            p.copy_(original)
        perturbed = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm_g, norm_p = _global_norm(grads), _global_norm(perturbed)
        inner = sum((g * gp).sum() for g, gp in zip(grads, perturbed))
        cosine = inner / (norm_g * norm_p + eps)
        for p, g, gp in zip(params, grads, perturbed):
            vertical = g - cosine * norm_g * gp / (norm_p + eps)
            p.grad = gp - alpha * vertical
    optimizer.step()
    return loss


def rho_for_lr(cfg: ExpertConfig, lr: float) -> float:
    """GSAM radius at learning rate ``lr``: linear in the lr from ``rho_max`` (at ``lr_teacher``)
    to ``rho_min`` (at the decayed ``0.1 * lr_teacher``); ``rho_max`` when the lr never changes
    (GSAM's proportion scheduler; DATM keeps lr and rho constant)."""
    lr_max = cfg.lr_teacher
    lr_min = cfg.lr_teacher * 0.1 if cfg.decay else cfg.lr_teacher
    if lr_max <= lr_min:
        return float(cfg.rho_max)
    return float(cfg.rho_min + (cfg.rho_max - cfg.rho_min) * (lr - lr_min) / (lr_max - lr_min))


@dataclass
class ExpertResult:
    """One trained expert.

    Attributes:
        trajectory: ``train_epochs + 1`` snapshots (CPU tensors, ``model.parameters()`` order).
        train_loss: mean training loss of every epoch.
        test_acc: ``[epoch (1-based), accuracy in [0, 1]]`` for every tested epoch.
        subset_sizes: training images used in every epoch.
        epoch_seconds: wall time of every epoch (training only, without the test).
    """

    trajectory: list
    train_loss: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    subset_sizes: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)

    def info(self) -> dict:
        """JSON-ready summary for the manifest."""
        return {"final_test_acc": self.test_acc[-1][1] if self.test_acc else None,
                "test_acc": self.test_acc, "train_loss": [round(v, 6) for v in self.train_loss],
                "subset_sizes": self.subset_sizes, "seconds": round(sum(self.epoch_seconds), 3)}


def train_expert(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: ExpertConfig,
                 generator: torch.Generator, *, test_images: Optional[torch.Tensor] = None,
                 test_labels: Optional[torch.Tensor] = None, order: Optional[Sequence[torch.Tensor]] = None,
                 test_every: int = 1, name: str = "expert") -> ExpertResult:
    """Train one expert and record its trajectory (MTT ``buffer.py``; GSAM per DATM; PAD subset).

    Args:
        net: a freshly initialised network on the training device.
        images: (N, C, H, W) training images on that device; labels: (N,) int64.
        cfg: the expert configuration (epochs, optimiser, augmentation, GSAM).
        generator: CPU generator for shuffles and augmentation.
        test_images, test_labels: (M, C, H, W), (M,) to log the test accuracy (logging only).
        order: PAD per-class easiest-first indices; with it each epoch trains on
            ``cfg.schedule.select(order, epoch)``.
        test_every: test after every ``test_every``-th epoch and after the last (0: never).
        name: how the log names this network.

    Returns:
        An :class:`ExpertResult`; ``trajectory[0]`` equals the parameters ``net`` came with.

    Raises:
        FloatingPointError: the training loss became NaN or infinite.
    """
    augmenter = expert_augmenter(cfg)
    schedule = cfg.schedule or PadSchedule()
    lr = cfg.lr_teacher

    def make_optimizer(rate: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=rate, momentum=cfg.mom, weight_decay=cfg.l2)

    optimizer = make_optimizer(lr)
    result = ExpertResult(trajectory=[snapshot(net)])
    decay_after = cfg.train_epochs // 2 + 1
    for epoch in range(cfg.train_epochs):
        index = schedule.select(order, epoch) if order is not None else None
        step = None
        if cfg.gsam:
            rho = rho_for_lr(cfg, lr)
            step = lambda n, x, y, o: gsam_step(n, x, y, o, rho, cfg.alpha, cfg.adaptive)  # noqa: E731
        start = time.perf_counter()
        loss = utils.train_epoch(net, images, labels, optimizer, cfg.batch_train, generator, augmenter, index, step)
        result.epoch_seconds.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{name}: training loss became {loss} in epoch {epoch + 1}")
        result.trajectory.append(snapshot(net))
        result.train_loss.append(loss)
        result.subset_sizes.append(images.shape[0] if index is None else int(index.numel()))
        message = (f"{name} epoch {epoch + 1}/{cfg.train_epochs}: loss {loss:.4f}, "
                   f"{result.subset_sizes[-1]} images, {result.epoch_seconds[-1]:.1f} s")
        last = epoch + 1 == cfg.train_epochs
        if test_images is not None and test_every and ((epoch + 1) % test_every == 0 or last):
            acc = utils.test_accuracy(net, test_images, test_labels)
            result.test_acc.append([epoch + 1, acc])
            message += f", test acc {100 * acc:.2f}%"
        logger.info(message)
        if cfg.decay and epoch == decay_after:
            lr *= 0.1
            optimizer = make_optimizer(lr)
    return result


def _fork_devices(device: torch.device) -> list:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def new_seeded_network(model: str, record, device: torch.device, seed: int) -> nn.Module:
    """``networks.get_network`` initialised from ``torch.manual_seed(seed)`` in a forked RNG (the
    caller's global RNG does not move)."""
    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(seed)
        return networks.get_network(model, record.channel, record.num_classes, record.im_size, device=device)


def parameter_layout(model: str, record) -> dict:
    """``param_names``, ``param_shapes``, ``num_params`` of ``model`` for ``record``'s images."""
    net = new_seeded_network(model, record, torch.device("cpu"), 0)
    named = list(net.named_parameters())
    return {"param_names": [n for n, _ in named], "param_shapes": [list(p.shape) for _, p in named],
            "num_params": int(sum(p.numel() for _, p in named))}


@dataclass
class BufferSummary:
    """What :func:`make_buffer` did.

    Attributes:
        directory: the buffer directory.
        num_experts: experts in the buffer now.
        trained: experts trained by this call.
        files: the chunk files.
        final_test_accs: last test accuracy of each expert trained now (in [0, 1]).
        seconds_per_epoch: mean training seconds per epoch over this call (NaN if none).
        bytes_on_disk: total size of the chunk files.
    """

    directory: str
    num_experts: int
    trained: int
    files: list
    final_test_accs: list
    seconds_per_epoch: float
    bytes_on_disk: int


def make_buffer(cfg: ExpertConfig, record, directory: str, num_experts: int, *, device: torch.device,
                save_interval: int = 10, test_every: int = 1, order: Optional[Sequence[torch.Tensor]] = None,
                run_info: Optional[dict] = None,
                on_expert: Optional[Callable[[int, ExpertResult], None]] = None) -> BufferSummary:
    """Train experts ``saved .. num_experts - 1`` into ``directory`` (resuming what is there).

    Args:
        cfg: the expert configuration (validated here).
        record: a ``data.DatasetRecord``.
        directory: the buffer directory (usually :func:`buffer_dir`).
        num_experts: total experts wanted in the buffer.
        device: where to train.
        save_interval: experts per chunk file.
        test_every: see :func:`train_expert`.
        order: PAD per-class easiest-first indices (:func:`load_sort_order`), needed iff
            ``cfg.sort_method``.
        run_info: JSON-ready facts recorded in the manifest's ``runs`` (command line ...).
        on_expert: called as ``on_expert(index, result)`` after each expert is saved.

    Returns:
        A :class:`BufferSummary`.

    Raises:
        utils.UserError: invalid configuration, or ``directory`` holds experts of another one.
        FloatingPointError: a training loss became NaN or infinite (finished experts are kept).
    """
    cfg.validate()
    if save_interval < 1 or num_experts < 1:
        raise utils.UserError(f"--save_interval and --num_experts must be at least 1, got {save_interval}, {num_experts}")
    if bool(cfg.sort_method) != (order is not None):
        raise ValueError("make_buffer: pass order exactly when cfg.sort_method is set")
    meta = {**parameter_layout(cfg.model, record), "image_shape": [record.channel, *record.im_size],
            "num_classes": record.num_classes, "num_train": int(record.labels_train.numel()),
            "torch_version": str(torch.__version__), "toolkit_version": toolkit_version(),
            "python_version": platform.python_version()}
    writer = BufferWriter(directory, cfg.describe(save_interval), save_interval, meta,
                          {"device": str(device), "command": " ".join(sys.argv), **(run_info or {})})
    start_index = writer.saved
    if start_index >= num_experts:
        logger.info("%s already holds %d expert(s) (>= --num_experts %d): nothing to train", directory, start_index,
                    num_experts)
    elif start_index:
        logger.info("%s already holds %d expert(s); continuing from expert %d", directory, start_index, start_index)
    images, labels = record.images_train.to(device), record.labels_train.to(device)
    test_images, test_labels = record.images_test.to(device), record.labels_test.to(device)
    accs, epoch_seconds = [], []
    for index in range(start_index, num_experts):
        seed = cfg.seed + index
        net = new_seeded_network(cfg.model, record, device, seed)
        result = train_expert(net, images, labels, cfg, utils.make_generator(seed), test_images=test_images,
                              test_labels=test_labels, order=order, test_every=test_every,
                              name=f"expert {index}")
        path = writer.add(result.trajectory, {"seed": seed, "device": str(device), **result.info()})
        logger.info("expert %d/%d saved in %s (%.1f s)", index + 1, num_experts, path, sum(result.epoch_seconds))
        accs.append(result.info()["final_test_acc"])
        epoch_seconds += result.epoch_seconds
        if on_expert is not None:
            on_expert(index, result)
    files = list_buffer_files(directory)
    return BufferSummary(directory=directory, num_experts=writer.saved, trained=writer.saved - start_index,
                         files=files, final_test_accs=accs,
                         seconds_per_epoch=sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else float("nan"),
                         bytes_on_disk=sum(os.path.getsize(p) for p in files))


# --------------------------------------------------------------------------------------------
# Difficulty scores (PAD's data order)
# --------------------------------------------------------------------------------------------
SCORE_METHODS = {
    "EL2N": "||softmax(f(x)) - onehot(y)||_2 (Paul et al. 2021)",
    "GraNd": "||d CE(f(x), y) / d(last linear layer W, b)||_2 = ||p - onehot(y)|| * sqrt(||embed(x)||^2 + 1)",
    "Uncertainty": "1 - max_k softmax(f(x))_k (least confidence)",
}


def score_method_name(name: str) -> str:
    """The canonical spelling of a score method (case-insensitive).

    Raises:
        utils.UserError: unknown name; the message lists the methods.
    """
    for key in SCORE_METHODS:
        if key.lower() == str(name).lower():
            return key
    raise utils.UserError(f"unknown score method {name!r}; choose from: {', '.join(SCORE_METHODS)}")


@torch.no_grad()
def sample_scores(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per-sample difficulty scores of one trained network (eval mode, no augmentation).

    * ``EL2N``: ``||softmax(f(x)) - onehot(y)||_2``.
    * ``GraNd``: the L2 norm of the gradient of the sample's cross-entropy with respect to the last
      linear layer (weight and bias) only, in closed form: for logits ``z = W h + b``,
      ``dL/dz = p - onehot(y)``, so the norm is ``||p - onehot(y)|| * sqrt(||h||^2 + 1)`` with
      ``h = net.embed(x)``. The paper's GraNd uses all parameters at initialisation; the last layer
      is the usual cheap proxy.
    * ``Uncertainty``: ``1 - max_k p_k`` (least confidence).

    Low = easy for all three.

    Args:
        net: a network of the zoo (``classifier(embed(x)) == net(x)``, ``classifier`` an ``nn.Linear``).
        images: (N, C, H, W) on the network's device; labels: (N,) int64.

    Returns:
        ``{'EL2N', 'GraNd', 'Uncertainty'}`` -> (N,) float32 CPU tensors.

    Raises:
        ValueError: the network has no ``embed``/linear ``classifier``.
    """
    if not hasattr(net, "embed") or not isinstance(getattr(net, "classifier", None), nn.Linear):
        raise ValueError(f"{type(net).__name__} has no embed() + nn.Linear classifier; GraNd needs them")
    net.eval()
    size = utils.chunk_size(images.device, 1000)
    out = {key: [] for key in SCORE_METHODS}
    for x, y in zip(images.split(size), labels.split(size)):
        features = net.embed(x)
        probs = F.softmax(net.classifier(features), dim=1)
        error = (probs - F.one_hot(y, probs.shape[1]).to(probs.dtype)).norm(dim=1)
        out["EL2N"].append(error)
        out["GraNd"].append(error * torch.sqrt(features.pow(2).sum(dim=1) + 1.0))
        out["Uncertainty"].append(1.0 - probs.max(dim=1).values)
    return {key: torch.cat(parts).float().cpu() for key, parts in out.items()}


def score_dataset(record, cfg: ExpertConfig, num_models: int, device: torch.device) -> dict:
    """Difficulty scores of every training image, averaged over ``num_models`` networks.

    Network ``m`` is a fresh ``cfg.model`` (seed ``cfg.seed + m``) trained for ``cfg.train_epochs``
    epochs exactly as an expert (optimiser, augmentation; no GSAM, no schedule); ``0`` epochs
    scores the networks at initialisation (GraNd's original setting). Scores are then taken on the
    unaugmented training images (:func:`sample_scores`).

    Args:
        record: a ``data.DatasetRecord``.
        cfg: the training configuration (``train_epochs`` may be 0).
        num_models: networks to average over (>= 1).
        device: where to train.

    Returns:
        ``{method: (N,) float32 CPU tensor}`` for every method of :data:`SCORE_METHODS`.

    Raises:
        utils.UserError: invalid configuration.
    """
    if num_models < 1:
        raise utils.UserError(f"--num_models must be at least 1, got {num_models}")
    replace(cfg, train_epochs=max(cfg.train_epochs, 1)).validate()
    images, labels = record.images_train.to(device), record.labels_train.to(device)
    totals: dict = {}
    for model_index in range(num_models):
        seed = cfg.seed + model_index
        net = new_seeded_network(cfg.model, record, device, seed)
        if cfg.train_epochs > 0:
            plain = replace(cfg, schedule=None, gsam=False, sort_method="")
            train_expert(net, images, labels, plain, utils.make_generator(seed), name=f"scoring network {model_index}")
        for key, value in sample_scores(net, images, labels).items():
            totals[key] = value if key not in totals else totals[key] + value
    return {key: value / num_models for key, value in totals.items()}


def class_order(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list:
    """Per-class training-set indices sorted by ascending score (easiest first; ties by index).

    Args:
        scores: (N,) float; labels: (N,) int64 in [0, K).

    Returns:
        K int64 CPU tensors; row ``c`` holds every index of class ``c``.
    """
    scores, labels = scores.detach().cpu(), labels.detach().cpu()
    rows = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        ranking = torch.sort(scores[members], stable=True).indices
        rows.append(members[ranking])
    return rows


def score_path(buffer_path: str, dataset: str, method: str, subset: Optional[str] = None) -> str:
    """``{buffer_path}/scores/{dataset}_{method}.pt`` (an ImageNet subset is named by itself)."""
    name = _imagenet_subset(dataset, subset) or canonical_dataset(dataset)
    return os.path.join(os.fspath(buffer_path), "scores", f"{name}_{score_method_name(method)}.pt")


def save_scores(path: str, method: str, scores: torch.Tensor, labels: torch.Tensor, num_classes: int,
                meta: Optional[dict] = None) -> list:
    """Write a score file: ``{'format', 'format_version', 'method', 'scores' (N,), 'labels' (N,),
    'order' (K easiest-first index tensors), **meta}``, atomically. Returns the order."""
    order = class_order(scores, labels, num_classes)
    utils.atomic_save({"format": SCORE_FORMAT, "format_version": SCORE_FORMAT_VERSION,
                       "method": score_method_name(method), "scores": scores.detach().cpu().float(),
                       "labels": labels.detach().cpu().long(), "order": order, **(meta or {})}, path)
    return order


def resolve_sort_file(sort_method: str, buffer_path: str, dataset: str, subset: Optional[str] = None) -> str:
    """Find the index file of ``--sort_method``: an existing path, else
    ``{buffer_path}/scores/{sort_method}[.pt]`` (the reference's ``CIFAR10_GraNd`` style), else
    ``{buffer_path}/scores/{dataset}_{sort_method}.pt`` (a bare method name such as ``EL2N``).

    Raises:
        utils.UserError: none exists; the message lists the paths tried and the ``score.py``
            command that makes the file.
    """
    scores = os.path.join(os.fspath(buffer_path), "scores")
    tried = [sort_method, os.path.join(scores, sort_method if sort_method.endswith(".pt") else f"{sort_method}.pt")]
    if sort_method.lower() in (key.lower() for key in SCORE_METHODS):
        tried.append(score_path(buffer_path, dataset, sort_method, subset))
    for path in tried:
        if os.path.isfile(path):
            return path
    method = next((key for key in SCORE_METHODS if key.lower() in sort_method.lower()), "EL2N")
    raise utils.UserError(f"--sort_method {sort_method}: no score file at {' or '.join(dict.fromkeys(tried))}; make "
                          f"one with: python score.py --dataset {dataset} --method {method} --buffer_path {buffer_path}")


def load_sort_order(path: str, labels: torch.Tensor, num_classes: int) -> list:
    """Per-class easiest-first training-set indices from a score file.

    Accepts this toolkit's files (:func:`save_scores`; their ``labels`` must equal the training
    labels) and PAD's ``data_indices/*.pt`` (a (K, n) int64 tensor, rows easy first; accepted with
    a logged warning since nothing ties it to a dataset).

    Args:
        path: the file.
        labels: (N,) int64 training labels of the dataset in use.
        num_classes: K.

    Returns:
        K int64 CPU tensors; row ``c`` is a permutation of the indices of class ``c``.

    Raises:
        utils.UserError: unreadable, wrong layout, or not a permutation of each class's indices
            (a file made for another dataset).
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise utils.UserError(f"--sort_method: cannot read {path}: {_one_line(error)}") from None
    labels = labels.detach().cpu().long()
    if torch.is_tensor(blob) and blob.dim() == 2:
        logger.warning("--sort_method %s: a bare index tensor (reference format); checking it against the "
                       "training labels only", path)
        rows = list(blob.long())
    elif isinstance(blob, dict) and isinstance(blob.get("order"), (list, tuple)):
        saved_labels = blob.get("labels")
        if not torch.is_tensor(saved_labels) or not torch.equal(saved_labels.long(), labels):
            raise utils.UserError(f"--sort_method {path} was made for another training set ("
                                  f"{blob.get('dataset', '?')}, {0 if saved_labels is None else len(saved_labels)} labels "
                                  f"against {len(labels)} here)")
        rows = [torch.as_tensor(row).long() for row in blob["order"]]
    else:
        raise utils.UserError(f"--sort_method {path}: expected a score file of score.py or a (K, n) index tensor")
    if len(rows) != num_classes:
        raise utils.UserError(f"--sort_method {path} orders {len(rows)} classes, the dataset has {num_classes}")
    for c, row in enumerate(rows):
        members = torch.nonzero(labels == c).flatten()
        if row.dim() != 1 or row.numel() != members.numel() or not torch.equal(torch.sort(row).values, members):
            raise utils.UserError(f"--sort_method {path}: row {c} is not a permutation of the {members.numel()} "
                                  f"training indices of class {c} (a file for another dataset?)")
    return rows
