"""Expert replay buffers of trajectory matching (MTT, DATM, PAD): where they live on disk, their
manifest, the chunked writer ``buffer.py`` uses, and loading them back for distillation.

On-disk layout (:func:`buffer_dir`)::

    {buffer_path}/{dataset}[_NO_ZCA]/{model}/replay_buffer_{n}.pt   n = 0, 1, ...
    {buffer_path}/{dataset}[_NO_ZCA]/{model}/manifest.json
    {buffer_path}/{dataset}[_NO_ZCA]/{model}/log.txt                 (written by buffer.py)
    {buffer_path}/scores/{dataset}_{method}.pt                       (written by scripts/score.py)

Every ``replay_buffer_{n}.pt`` is what MTT's ``buffer.py`` writes (GeorgeCazenavette/mtt-distillation):
``torch.save`` of a Python list of trajectories; a trajectory is a list of ``train_epochs + 1``
snapshots; a snapshot is a list of CPU tensors in ``model.parameters()`` order. Chunk ``n`` holds
experts ``n * save_interval ... (n + 1) * save_interval - 1``. Unlike MTT, a chunk is rewritten
(atomically) after every expert, so an interrupted run loses at most the expert in progress.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from typing import Optional, Sequence

import torch


import storage
import utils
from data import DEFAULT_RES, PlainDataError, load_plain, normalization_name, one_line

logger = logging.getLogger(__name__)

# Version of the manifest / score-file layout written here.
BUFFER_FORMAT = "dd-toolkit expert buffer"
BUFFER_FORMAT_VERSION = 1
SCORE_FORMAT = "dd-toolkit difficulty scores"
SCORE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHUNK_RE = re.compile(r"^replay_buffer_(\d+)\.pt$")

# MTT names the TinyImageNet folder "Tiny"; both registered names map to it.
_FOLDER_ALIASES = {"TinyImageNet": "Tiny"}

Snapshot = list  # list[torch.Tensor], one per parameter, CPU, model.parameters() order
Trajectory = list  # list[Snapshot], train_epochs + 1 of them



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


def imagenet_subset(dataset: str, subset: Optional[str]) -> Optional[str]:
    """The ImageNet subset named by ``dataset`` (or by ``subset`` for dataset ImageNet), else None."""
    from data import IMAGENET_SUBSETS

    name = canonical_dataset(dataset)
    if name in IMAGENET_SUBSETS:
        return name
    if name == "ImageNet":
        return (subset or "").lower() or "none"
    return None


def effective_res(dataset: str, res: Optional[int]) -> Optional[int]:
    if imagenet_subset(dataset, None) is not None:
        return int(res or DEFAULT_RES["ImageNet"])
    if canonical_dataset(dataset) == "MHIST":
        return int(res or DEFAULT_RES["MHIST"])
    return None if res is None else int(res)


def dataset_folder(dataset: str, zca: bool, subset: Optional[str] = None, res: Optional[int] = None) -> str:
    """The dataset part of a buffer path: MTT's layout, with ``_NO_ZCA`` for every dataset.

    ``FashionMNIST_NO_ZCA``, ``CIFAR10`` (with ZCA), ``ImageNet/imagenette/128_NO_ZCA``. MTT
    appends ``_NO_ZCA`` only for CIFAR-10/100 and nests ImageNet subsets as
    ``ImageNet/{subset}/{res}``; here the suffix marks every buffer made without ZCA, so whitened
    and unwhitened experts of a dataset never share a folder.
    """
    subset_name = imagenet_subset(dataset, subset)
    if subset_name is not None:
        base = os.path.join("ImageNet", subset_name, str(effective_res(dataset, res)))
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
    return [path for _, path in storage.numbered_entries(directory, CHUNK_RE)]


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
        raise utils.UserError(f"cannot read {path}: {one_line(error)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise utils.UserError(f"{path} is not a buffer manifest of this toolkit (no 'config')")
    if int(manifest.get("format_version", 0)) > BUFFER_FORMAT_VERSION:
        raise utils.UserError(f"{path} has layout version {manifest['format_version']}; this toolkit reads "
                              f"up to {BUFFER_FORMAT_VERSION}")
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (temporary file + ``os.replace``)."""
    storage.write_json(os.path.join(directory, MANIFEST_NAME), manifest)


def load_chunk(path: str) -> list:
    """One ``replay_buffer_{n}.pt``: a list of trajectories (``data.load_plain``: tensors only).

    Raises:
        utils.UserError: unreadable, holding more than plain data (a pickle that would run code),
            not a list of trajectories (lists of lists of tensors), an empty list, or a
            parameter holding NaN or infinite values (the message names the expert's place in
            the file, the parameter's index in ``model.parameters()`` order and the epoch).
    """
    try:
        chunk = load_plain(path, "expert buffer file")
    except PlainDataError as error:  # truncated or foreign file, or a pickle that would run code
        raise utils.UserError(str(error)) from None
    if not isinstance(chunk, list) or not all(
            isinstance(traj, (list, tuple)) and traj and all(
                isinstance(snap, (list, tuple)) and snap and all(torch.is_tensor(t) for t in snap) for snap in traj)
            for traj in chunk):
        raise utils.UserError(f"{path} is not an expert buffer file (a list of trajectories, each a list of "
                              "snapshots, each a list of parameter tensors)")
    if not chunk:
        raise utils.UserError(f"expert buffer file {path} holds no experts (an empty list); remove it, or make the "
                              "buffer again with buffer.py")
    for number, trajectory in enumerate(chunk):
        for epoch, snapshot in enumerate(trajectory):
            for index, tensor in enumerate(snapshot):
                if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                    when = "its initialisation (epoch 0)" if epoch == 0 else f"epoch {epoch}"
                    raise utils.UserError(f"expert buffer file {path}: expert {number} (counting from 0 in this "
                                          f"file) holds NaN or infinite values in parameter {index} at {when}; "
                                          "the expert diverged or the file is damaged: remove it, or make the "
                                          "buffer again with buffer.py")
    return chunk


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
    differences = utils.config_differences(manifest["config"], config)
    if differences and files:
        raise utils.UserError(f"{directory} holds {manifest.get('num_experts', '?')} expert(s) made with "
                              f"{'; '.join(differences)}; refusing to mix experts: use the same flags, another "
                              "--buffer_path, or delete that folder")
    return 0 if differences else int(manifest.get("num_experts", 0))


class BufferWriter:
    """Append-only writer of one buffer directory, resumable after an interruption.

    Opening counts the experts already saved (chunk files and manifest; a chunk written just before
    a crash, whose manifest update was lost, still counts) and reloads a partially filled last
    chunk. :meth:`add` appends a trajectory, rewrites its chunk with ``storage.atomic_save`` and then
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
            if utils.config_differences(existing["config"], config):
                logger.info("%s holds no experts yet; replacing its manifest (another configuration)", directory)
            existing = None
        self.saved, self._chunk = self._count(files, existing)
        if existing is not None:
            for key in ("param_names", "param_shapes"):
                if existing.get(key) != meta.get(key):
                    raise utils.UserError(f"{directory}: the saved experts have other {key} than a {config['model']} "
                                          f"network for these images; use another --buffer_path")
            if None not in (existing.get("normalization"), meta.get("normalization")) and \
                    existing["normalization"] != meta["normalization"]:
                raise utils.UserError(f"{directory}: the saved experts were trained on images normalised "
                                      f"{existing['normalization']!r}, this run's are {meta['normalization']!r} "
                                      "(--cifar100_stats / --zca); use the same setting or another --buffer_path")
            if None not in (existing.get("num_train"), meta.get("num_train")) and existing["num_train"] != meta["num_train"]:
                logger.warning("%s: the saved experts were trained on num_train %s images, this run's training set has "
                               "%s: the buffer will mix experts of both (its manifest keeps %s)", directory,
                               existing["num_train"], meta["num_train"], existing["num_train"])
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
        storage.atomic_save(self._chunk, path)
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


# Facts about the training data the manifest records beside ``config`` (make_buffer's ``meta``):
# experts on images of another shape or class count cannot serve this data and are refused; a
# training set of another size (a subset, another split) is allowed with a warning.
_REFUSED_FACTS = ("image_shape", "num_classes", "normalization")


def normalization_fact(zca: bool, normalize_like: Optional[str]) -> str:
    """The ``normalization`` data fact of a run (``data.DatasetRecord.normalization``): ``'zca'``,
    ``'own'`` (the dataset's mean/std) or ``'CIFAR10'`` (CIFAR100 normalised with CIFAR10's)."""
    return normalization_name(zca, normalize_like)
_WARNED_FACTS = ("num_train",)


def _check_data_facts(directory: str, manifest: dict, facts: dict, command: str) -> None:
    """Compare the manifest's data facts with this run's; a fact the manifest lacks is unknown."""
    unknown = sorted(set(facts) - set(_REFUSED_FACTS) - set(_WARNED_FACTS))
    if unknown:
        raise ValueError(f"load_buffer: unknown data fact(s) {', '.join(unknown)}; known: "
                         f"{', '.join(_REFUSED_FACTS + _WARNED_FACTS)}")
    for key, wanted in facts.items():
        have = manifest.get(key)
        if have is None or wanted is None:  # older manifests do not record it
            continue
        if key == "image_shape":
            have, wanted = [int(s) for s in have], [int(s) for s in wanted]
        if have == wanted:
            continue
        if key in _REFUSED_FACTS:
            raise utils.UserError(f"the expert buffer {directory} was made with {key}={have!r} but this run's data has "
                                  f"{key}={wanted!r}; make a matching one with: {command}")
        logger.warning("the expert buffer %s was trained on another training set: %s %s -> %s (this run); fine for a "
                       "deliberate subset, else make a matching one with: %s", directory, key, have, wanted, command)


def load_buffer(source, expect: Optional[dict] = None, max_files: Optional[int] = None,
                max_experts: Optional[int] = None, data_facts: Optional[dict] = None,
                files: Optional[Sequence[str]] = None) -> list:
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
        data_facts: this run's training data, compared with what the manifest records:
            ``image_shape`` [C, H, W], ``num_classes`` and ``normalization`` (:func:`normalization_fact`:
            experts trained on differently normalised images see other inputs) must match; ``num_train`` (the number of
            training images) may differ, with a logged warning naming both values. Facts an
            older manifest does not record are not checked.
        files: read these chunk files of the directory, in this order, instead of all of them
            (e.g. MTT's ``--max_files`` choice of shuffled files); ``max_files`` then applies to
            this list.

    Returns:
        A list of trajectories; ``buffer[i][t][j]`` is parameter ``j`` of expert ``i`` after epoch
        ``t`` (``t = 0``: initialisation), a CPU tensor.

    Raises:
        utils.UserError: no ``replay_buffer_*.pt`` where expected (the message names the path and
            the ``buffer.py`` command that makes it); the manifest records another dataset, model,
            ZCA setting, image shape, class count or other expected value (the message names the
            field), or normalisation; parameter shapes differ from ``expect['param_shapes']``; an unreadable file,
            or one holding more than plain data.
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
    files = list_buffer_files(directory) if files is None else list(files)
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
        _check_data_facts(directory, manifest, dict(data_facts or {}), command)
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

