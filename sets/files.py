"""Synthetic-set files: every layout ``distill.py`` writes and ``evaluate.py`` reads (as a typed
record: ``sets.saved``).

Layouts:

* ours and the DC family's (VICO-UoE/DatasetCondensation ``main.py``): ``res_{method}_{dataset}_
  {model}_{ipc}ipc.pt`` holding ``{'data': [[image_syn, label_syn, *extras], ...],
  'accs_all_exps': {model: [accuracy in [0, 1], ...]}}``, one ``data`` entry per experiment
  (images N x C x H x W float32 in the dataset's normalised space; class-major labels, int64, or
  (N, K) soft-label logits; DRUPI's feature labels as a third entry). Ours adds a ``meta`` dict
  (dataset, normalisation, ZCA, DSA strategy, the configuration, the learned step size ``syn_lr``
  and the evaluation protocol ``protocol``, ``evaluation.EvalProtocol``);
* the trajectory-matching logs (GeorgeCazenavette/mtt-distillation, NUS-HPC-AI-Lab/DATM and PAD
  ``distill.py``): bare tensors ``images_*.pt``, ``labels_*.pt`` (class indices or soft-label
  logits) and ``lr_*.pt`` (the learned step size). A directory holding ``images_best.pt`` (their
  run directory, or ``logged_files/exp{e}`` of ours) reads as ``images_best.pt`` with the
  ``labels_best.pt`` and ``lr_best.pt`` beside it.

Every file is read with ``data.load_plain`` (``torch.load(weights_only=True)``): loading never runs
code from the file; one that holds more than tensors and plain values is refused in one line.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import List, Optional, Sequence

import torch

import storage
import utils
from data import PlainDataError, load_plain

logger = logging.getLogger(__name__)


def result_filename(method: str, dataset: str, model: str, ipc: int) -> str:
    """The reference file name ``res_{method}_{dataset}_{model}_{ipc}ipc.pt`` (DC ``main.py``)."""
    return f"res_{method}_{dataset}_{model}_{ipc}ipc.pt"


def save_results(path: str, data: Sequence[Sequence[torch.Tensor]], accs_all_exps: dict, **extra) -> None:
    """Save synthetic sets in the reference layout (module docstring), atomically.

    Args:
        path: the ``.pt`` file.
        data: one ``[image_syn (N, C, H, W) float32, label_syn (N,) int64 or (N, K), *extras]`` per experiment.
        accs_all_exps: ``{model: [accuracy in [0, 1], ...]}``.
        extra: further top-level keys (``meta``); readers of the reference layout ignore them.
    """
    data_cpu = [[t.detach().cpu() if torch.is_tensor(t) else t for t in entry] for entry in data]
    storage.atomic_save({"data": data_cpu, "accs_all_exps": accs_all_exps, **extra}, path)


def write_logged(folder: str, name: str, images: torch.Tensor, labels: torch.Tensor,
                 lr: Optional[torch.Tensor] = None, pixels: Optional[torch.Tensor] = None) -> None:
    """One set as the trajectory-matching references log it, in ``folder`` (atomically):
    ``images_{name}.pt`` (N, C, H, W) float32 in the dataset's normalised (or ZCA-whitened) space,
    ``labels_{name}.pt`` ((N,) int64 class indices, or DATM's (N, K) soft-label logits),
    ``lr_{name}.pt`` (the learned step size, a 0-dim float32 tensor) when ``lr`` is given, and
    ``images_zca_{name}.pt`` (the whitening undone, pixel space) when ``pixels`` is given. Sources:
    GeorgeCazenavette/mtt-distillation and NUS-HPC-AI-Lab/DATM ``distill.py`` (MTT itself never
    saves the step size; DATM does). :func:`read_set_file` reads them back.

    Raises:
        OSError: the folder cannot be created or a file written.
    """
    os.makedirs(folder, exist_ok=True)
    storage.atomic_save(images, os.path.join(folder, f"images_{name}.pt"))
    storage.atomic_save(labels, os.path.join(folder, f"labels_{name}.pt"))
    if lr is not None:
        storage.atomic_save(lr, os.path.join(folder, f"lr_{name}.pt"))
    if pixels is not None:
        storage.atomic_save(pixels, os.path.join(folder, f"images_zca_{name}.pt"))


def _load(path: str, flag: str):
    """``torch.load(path, weights_only=True)`` on the CPU, a user mistake as one line.

    Raises:
        utils.UserError: missing or unreadable file, or one that needs code to load.
    """
    if not os.path.isfile(path):
        raise utils.UserError(f"{flag}: no file at {path}")
    try:
        return load_plain(path)
    except PlainDataError as error:  # a truncated file, or a pickle that would run code
        raise utils.UserError(f"{flag}: {error}") from None


def load_results(path: str, flag: str = "--syn_path") -> dict:
    """Load a result file of this toolkit or of the DC-family references.

    Returns:
        The dict with at least ``data`` (a list of ``[image_syn, label_syn, ...]``) and ``accs_all_exps``.

    Raises:
        utils.UserError: the file is missing, unreadable or does not have the reference layout.
    """
    blob = _load(path, flag)
    if not isinstance(blob, dict) or not isinstance(blob.get("data"), (list, tuple)) or not blob["data"]:
        raise utils.UserError(f"{flag}: {path} lacks the reference layout "
                              "{'data': [[image_syn, label_syn], ...], 'accs_all_exps': {...}}")
    for index, entry in enumerate(blob["data"]):
        if (not isinstance(entry, (list, tuple)) or len(entry) < 2 or not torch.is_tensor(entry[0])
                or not torch.is_tensor(entry[1]) or entry[0].dim() != 4 or entry[1].shape[0] != entry[0].shape[0]):
            raise utils.UserError(f"{flag}: {path}: data[{index}] is not [image_syn (N,C,H,W), label_syn (N,...)]")
    blob.setdefault("accs_all_exps", {})
    return blob


def is_tensor_file(path: str) -> bool:
    """Whether ``path`` holds a bare tensor (MTT/DATM/PAD ``images_*.pt``) rather than a result dict."""
    if not os.path.isfile(path):
        return False
    try:
        return torch.is_tensor(load_plain(path))
    except PlainDataError:  # the reader of the dict layout reports it
        return False


def load_tensor(path: str, flag: str) -> torch.Tensor:
    """A bare tensor file (``images_*.pt``, ``labels_*.pt``, ``lr_*.pt``).

    Raises:
        utils.UserError: missing, unreadable, or not a tensor.
    """
    value = _load(path, flag)
    if not torch.is_tensor(value):
        raise utils.UserError(f"{flag}: {path} does not hold a tensor")
    return value


def labels_file_beside(images_path: str) -> str:
    """Where MTT / DATM / PAD save the labels of ``images_{tag}.pt``: ``labels_{tag}.pt`` beside it
    (``labels_best.pt`` for any other name)."""
    folder, name = os.path.split(images_path)
    return os.path.join(folder, "labels_" + name[len("images_"):] if name.startswith("images_") else "labels_best.pt")


def lr_file_beside(images_path: str) -> Optional[str]:
    """Where DATM / PAD (and our ``logged_files``) save the learned step size of ``images_{tag}.pt``:
    ``lr_{tag}.pt`` beside it; ``None`` for a file not named ``images_*.pt``."""
    folder, name = os.path.split(images_path)
    return os.path.join(folder, "lr_" + name[len("images_"):]) if name.startswith("images_") else None


def tensor_files_as_results(images_path: str, num_classes: int, labels_path: Optional[str] = None,
                            lr_path: Optional[str] = None) -> dict:
    """The logged files of MTT / DATM / PAD as one result entry; ``meta['syn_lr']`` holds the
    learned step size of ``lr_path``, else of the ``lr_{tag}.pt`` beside ``images_{tag}.pt``
    (:func:`lr_file_beside`, said in one INFO line) when it exists; without either there is none
    (MTT saves none: ``cli.evaluate_flags`` says which lr it trains with).

    Without ``labels_path`` the labels are assumed: class-major hard labels, ``N / K`` per class
    (what MTT's ``images_*.pt`` hold), with a logged warning naming the labels file to pass.

    Raises:
        utils.UserError: the images are not (N, C, H, W); the labels are not N class indices or
            (N, K') logits; or, with labels assumed, N is not a multiple of ``num_classes`` K.
    """
    images = load_tensor(images_path, "--syn_path")
    if images.dim() != 4 or images.shape[0] == 0:
        raise utils.UserError(f"--syn_path: {images_path} holds {tuple(images.shape)}; expected images (N, C, H, W)")
    count = images.shape[0]
    beside = labels_file_beside(images_path)
    if labels_path:
        labels = load_tensor(labels_path, "--labels_path")
        if labels.dim() not in (1, 2) or labels.shape[0] != count:
            raise utils.UserError(f"--labels_path: {labels_path} holds {tuple(labels.shape)} for the {count} images of "
                                  f"{images_path}; expected ({count},) class indices or ({count}, K) logits")
    elif count % num_classes:
        raise utils.UserError(f"--syn_path: {images_path} holds {count} images without labels, not a multiple of the "
                              f"{num_classes} classes, so class-major labels cannot be assumed; give them with "
                              f"--labels_path {beside}")
    else:
        ipc = count // num_classes
        labels = torch.arange(num_classes).repeat_interleave(ipc)
        where = (f"{os.path.basename(beside)} lies beside it: pass --labels_path {beside} to use it"
                 if os.path.isfile(beside) else
                 f"to give labels, pass --labels_path {beside} (the labels file MTT/DATM/PAD save beside it)")
        logger.warning("--syn_path %s holds bare images without labels: assuming class-major labels, %d per class "
                       "(images 0..%d are class 0, the next %d class 1, ...); %s", images_path, ipc, ipc - 1, ipc, where)
    meta = {}
    lr_beside = lr_file_beside(images_path)
    if not lr_path and lr_beside is not None and os.path.isfile(lr_beside):
        lr_path = lr_beside
        logger.info("--syn_path %s: the learned step size from %s beside it", images_path, os.path.basename(lr_beside))
    if lr_path:
        lr = load_tensor(lr_path, "--lr_path")
        if lr.numel() != 1 or lr.is_complex() or lr.dtype == torch.bool:
            raise utils.UserError(f"--lr_path: {lr_path} holds a {lr.dtype} tensor of shape {tuple(lr.shape)}; "
                                  "expected the learned step size, one number (a 0-dim tensor, as lr_best.pt)")
        meta["syn_lr"] = [float(lr.reshape(-1)[0])]
    return {"data": [[images, labels]], "meta": meta, "accs_all_exps": {}}


BEST_IMAGES = "images_best.pt"


def is_logged_run(path: str) -> bool:
    """Whether ``path`` is a directory of trajectory-matching logs: it holds ``images_best.pt``
    (GeorgeCazenavette/mtt-distillation, NUS-HPC-AI-Lab/DATM and PAD ``distill.py``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, BEST_IMAGES))


def logged_run_as_results(folder: str, num_classes: int, labels_path: Optional[str] = None,
                          lr_path: Optional[str] = None) -> dict:
    """A directory of trajectory-matching logs as one result entry: ``images_best.pt`` with the
    ``labels_best.pt`` (class indices or soft-label logits) and ``lr_best.pt`` (learned step size)
    that lie beside it, unless ``labels_path`` / ``lr_path`` name others; one INFO line says which
    files are used. Without a labels file the labels are assumed (:func:`tensor_files_as_results`).

    Raises:
        utils.UserError: see :func:`tensor_files_as_results`.
    """
    images_path = os.path.join(folder, BEST_IMAGES)
    labels_beside, lr_beside = os.path.join(folder, "labels_best.pt"), os.path.join(folder, "lr_best.pt")
    labels_path = labels_path or (labels_beside if os.path.isfile(labels_beside) else None)
    lr_path = lr_path or (lr_beside if os.path.isfile(lr_beside) else None)
    used = [os.path.basename(path) for path in (labels_path, lr_path) if path in (labels_beside, lr_beside)]
    if used:
        logger.info("--syn_path %s: the MTT/DATM/PAD layout: %s with %s beside it", folder, BEST_IMAGES,
                    " and ".join(used))
    return tensor_files_as_results(images_path, num_classes, labels_path, lr_path)


def read_set_file(path: str, num_classes: int, labels_path: Optional[str] = None,
                  lr_path: Optional[str] = None) -> dict:
    """A result dict from either layout (module docstring), or from a directory of
    trajectory-matching logs (:func:`logged_run_as_results`).

    Raises:
        utils.UserError: see :func:`load_results` and :func:`tensor_files_as_results`.
    """
    if is_logged_run(path):
        return logged_run_as_results(path, num_classes, labels_path, lr_path)
    if is_tensor_file(path):
        return tensor_files_as_results(path, num_classes, labels_path, lr_path)
    return load_results(path)


def expand_syn_paths(paths: Sequence[str]) -> List[str]:
    """``--syn_path`` values with each directory replaced by the ``res_*.pt`` files in it (sorted);
    a directory without them that holds ``images_best.pt`` (trajectory-matching logs,
    :func:`is_logged_run`) stays as it is, for :func:`read_set_file`.

    Raises:
        utils.UserError: a directory holds neither ``res_*.pt`` nor ``images_best.pt``.
    """
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "res_*.pt")))
            if not found and is_logged_run(path):
                found = [path]
            if not found:
                raise utils.UserError(f"--syn_path {path}: a directory without res_*.pt or images_best.pt (give a "
                                      "distill.py run directory or an MTT/DATM/PAD logged-files directory)")
            files += found
        else:
            files.append(path)
    return files
