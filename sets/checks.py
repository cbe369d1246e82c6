"""The one validator of a synthetic set before it is trained on, evaluated or assessed.

``sets.saved.read_saved_set`` calls :func:`check_record` on the file's top-level record and
:func:`check_images` / :func:`check_labels` on every experiment it reads, so that ``evaluate.py``,
``--assess``, ``scripts/continual.py`` and the comparison tables never train on a set that is not
what it claims to be. Each refusal is one line (``utils.UserError``) naming the file, the entry
and what was expected:

* images: a floating-point (N, C, H, W) tensor with N >= 1, finite, in the dataset's normalised (or
  ZCA-whitened) space, so at most :data:`MAX_ABS_PIXEL` in magnitude. Integer images (uint8 0..255,
  int64) and booleans are refused rather than used as normalised values; a float set whose values
  are all whole numbers in 0..255 is used, with a warning that it looks like unnormalised pixels;
* labels: (N,) class indices in 0..K-1 (integers, or floats holding whole numbers: legacy files),
  each class at least once; or (N, K) finite soft labels. Fractional, boolean, NaN labels refused;
* ``meta``: a dict whose known fields have their types (:data:`META_TYPES`); the protocol record is
  range-checked like the flags it stands for (``evaluation.EvalProtocol.from_dict``);
* preprocessing: the recorded ZCA setting and normalisation statistics must be the test set's
  (:func:`check_preprocessing`), else one line naming both and the flag that fixes it;
* ``accs_all_exps``: ``{model name: [accuracy, ...]}`` with real-number accuracies;
* at most :data:`MAX_EXPERIMENTS` experiments per file.

Sources of the conventions: the DC-family result layout (VICO-UoE/DatasetCondensation ``main.py``:
``data_save.append([copy.deepcopy(image_syn.detach().cpu()), copy.deepcopy(label_syn.detach().cpu())])``,
images normalised with the dataset's mean/std) and the trajectory-matching logs
(GeorgeCazenavette/mtt-distillation ``distill.py``: ``images_best.pt`` in ZCA space when ``--zca``).
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Mapping

import torch

import utils

logger = logging.getLogger(__name__)

# A normalised (or ZCA-whitened) image lies within a few tens of standard deviations; a value past
# this is not an image of the dataset's space (pixels times 255 squared, or a corrupt file).
MAX_ABS_PIXEL = 1e4
# Experiments one file may hold: the references save 1-10 (DC's --num_exp 5); each is trained
# --num_eval times, so a file of 100 000 experiments would train for months.
MAX_EXPERIMENTS = 1000

_TEXT, _NUMBER, _LIST, _DICT = (str,), (numbers.Real,), (list, tuple), (dict,)
# meta field -> the types it may hold (None is always allowed: unrecorded). ``zca``: the whitening's
# state (``data.ZCA.state_dict``) in distill.py's files, a bool in the coreset/NCFM/FRePo records.
META_TYPES: Mapping[str, tuple] = {
    "method": _TEXT, "dataset": _TEXT, "model": _TEXT, "ipc": (int,), "zca": (bool, int, dict),
    "mean": _LIST, "std": _LIST, "normalize_like": _TEXT, "dsa_strategy": _TEXT,
    "syn_lr": _LIST, "step_schedule": _LIST, "protocol": _DICT, "eval_protocols": _LIST,
    "addon_entries": _LIST, "config": _DICT, "teacher": _DICT,
}


def _kind(value: object) -> str:
    """A value's type for a message (``'a str'``, ``'a list'``)."""
    return f"a {type(value).__name__}"


def check_record(blob: Mapping, path: str) -> dict:
    """Check a set file's top-level record and return its ``meta`` (``{}`` when absent).

    Args:
        blob: the loaded dict (``{'data': [...], 'accs_all_exps': {...}, 'meta': {...}}``).
        path: the file, for messages.

    Raises:
        utils.UserError: more than :data:`MAX_EXPERIMENTS` experiments; ``meta`` not a dict or a
            known field of the wrong type (:data:`META_TYPES`), ``ipc`` below 1, ``mean``/``std``/
            ``syn_lr`` holding non-numbers; ``accs_all_exps`` not a dict of lists of real numbers.
    """
    count = len(blob.get("data") or ())
    if count > MAX_EXPERIMENTS:
        raise utils.UserError(f"--syn_path {path} holds {count} experiments, more than the {MAX_EXPERIMENTS} a "
                              "set file may hold (each one trains --num_eval networks); refused")
    meta = blob.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise utils.UserError(f"--syn_path {path}: 'meta' is {_kind(meta)}; expected a dict (the set's record)")
    for key, types in META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, types) or (types == (int,) and isinstance(value, bool))):
            raise utils.UserError(f"--syn_path {path}: meta['{key}'] is {_kind(value)}; expected "
                                  f"{' or '.join(t.__name__ for t in types)}")
    if meta.get("ipc") is not None and meta["ipc"] < 1:
        raise utils.UserError(f"--syn_path {path}: meta['ipc'] is {meta['ipc']}; expected at least 1")
    for key in ("mean", "std"):
        values = meta.get(key) or ()
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise utils.UserError(f"--syn_path {path}: meta['{key}'] holds {list(values)[:4]}; expected finite numbers")
    # a learned step size per experiment: a number (a diverged one is refused when used), or None
    if not all(v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)) for v in meta.get("syn_lr") or ()):
        raise utils.UserError(f"--syn_path {path}: meta['syn_lr'] holds {list(meta['syn_lr'])[:4]}; expected one "
                              "learned step size (a number) per experiment")
    if not all(isinstance(v, (str, bool)) or v is None for v in meta.get("addon_entries") or ()):
        raise utils.UserError(f"--syn_path {path}: meta['addon_entries'] must list add-on names")
    accs = blob.get("accs_all_exps")
    if accs is not None:
        if not isinstance(accs, dict):
            raise utils.UserError(f"--syn_path {path}: 'accs_all_exps' is {_kind(accs)}; expected "
                                  "{model: [accuracy, ...]}")
        for model, values in accs.items():
            if (not isinstance(values, (list, tuple))
                    or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)):
                shown = values if not isinstance(values, (list, tuple)) else list(values)[:3]
                raise utils.UserError(f"--syn_path {path}: accs_all_exps[{model!r}] holds {shown!r}; expected a list "
                                      "of accuracies (numbers)")
    return meta


def check_images(images: torch.Tensor, index: int, path: str) -> torch.Tensor:
    """One experiment's images checked and returned as float32.

    Args:
        images: (N, C, H, W) as saved (already checked against the dataset's C, H, W by the caller).
        index: the experiment (``data[index]``); path: the file.

    Returns:
        (N, C, H, W) float32.

    Raises:
        utils.UserError: N is 0; the dtype is integer, boolean or complex; values are NaN/inf or
            larger than :data:`MAX_ABS_PIXEL` in magnitude.
    """
    where = f"--syn_path {path}: data[{index}] images"
    if images.shape[0] == 0:
        raise utils.UserError(f"{where} hold 0 images; a set needs at least one image per class")
    if images.dtype == torch.bool or images.is_complex() or not images.is_floating_point():
        hint = (" (pixels 0..255: convert them with (x / 255 - mean) / std of the dataset, or --zca's whitening)"
                if images.dtype == torch.uint8 or not (images.dtype == torch.bool or images.is_complex()) else "")
        raise utils.UserError(f"{where} are {str(images.dtype).replace('torch.', '')}; expected floating-point images "
                              f"in the dataset's normalised space{hint}")
    images = images.float()
    finite = torch.isfinite(images)
    if not finite.all():
        first = int((~finite).flatten(1).any(1).nonzero()[0])
        raise utils.UserError(f"{where} hold NaN or infinite values ({int((~finite).sum())} entries, the first in "
                              f"image {first}); the set is not usable")
    largest = float(images.abs().max())
    if largest > MAX_ABS_PIXEL:
        raise utils.UserError(f"{where} reach {largest:.4g}; images normalised with the dataset's mean/std (or "
                              f"whitened) stay within +-{MAX_ABS_PIXEL:g}: this is not a set of the dataset's space")
    if largest > 1.5 and float(images.min()) >= 0 and bool((images == images.round()).all()):
        logger.warning("%s are whole numbers in 0..%d: they look like unnormalised pixel values; they are used as "
                       "they are (normalised values), which is wrong if they are pixels", where, int(largest))
    return images


def check_labels(labels: torch.Tensor, count: int, num_classes: int, index: int, path: str,
                 dataset: str) -> torch.Tensor:
    """One experiment's labels checked and cast.

    Args:
        labels: as saved: (N,) class indices or (N, K) soft labels (logits or real-valued targets).
        count: N, the number of images; num_classes: K; index: the experiment; path, dataset: for messages.

    Returns:
        (N,) int64 in 0..K-1, or (N, K) float32.

    Raises:
        utils.UserError: another shape; boolean or complex labels; NaN/inf; fractional or
            out-of-range class indices; a class without any image (hard labels).
    """
    where = f"--syn_path {path}: data[{index}] labels"
    if labels.dtype == torch.bool or labels.is_complex():
        raise utils.UserError(f"{where} are {str(labels.dtype).replace('torch.', '')}; expected class indices "
                              f"0..{num_classes - 1} or ({count}, {num_classes}) soft labels")
    if labels.dim() == 2 and labels.shape == (count, num_classes):
        labels = labels.float()
        if not torch.isfinite(labels).all():
            raise utils.UserError(f"{where} hold NaN or infinite values ({int((~torch.isfinite(labels)).sum())} "
                                  "entries); the set is not usable")
        return labels
    if labels.dim() != 1 or labels.shape[0] != count:
        raise utils.UserError(f"{where} have shape {tuple(labels.shape)}; expected ({count},) class indices or "
                              f"({count}, {num_classes}) soft labels")
    if labels.is_floating_point():
        if not torch.isfinite(labels).all():
            raise utils.UserError(f"{where} hold NaN or infinite values; expected class indices 0..{num_classes - 1}")
        if not bool((labels == labels.round()).all()):
            fraction = float(labels[labels != labels.round()][0])
            raise utils.UserError(f"{where} hold fractional values (e.g. {fraction:g}); expected whole class indices "
                                  f"0..{num_classes - 1} (soft labels are ({count}, {num_classes}))")
    labels = labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise utils.UserError(f"{where} run {low}..{high}; {dataset} has classes 0..{num_classes - 1}")
    missing = (torch.bincount(labels, minlength=num_classes) == 0).nonzero().flatten().tolist()
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise utils.UserError(f"{where} give no image to class(es) {shown} of {dataset}'s {num_classes}; a set needs "
                              "at least one image per class")
    return labels


def check_preprocessing(path: str, meta: Mapping, record) -> None:
    """Refuse a set whose saved ``meta`` mean/std (images in [0, 1] pixel units normalised per
    channel) differ from those the test set was normalised with, or that was ZCA-whitened when the
    test set is not (or the reverse: the toolkit's files record ``zca``; FRePo whitens CIFAR by
    default); files without these records (the references' ``res_*.pt``) are not checked.

    Raises:
        utils.UserError: one line naming both and ``--zca``, ``--cifar100_stats`` or ``--norm_stats``.
    """
    if "zca" in meta and bool(meta["zca"]) != (record.zca is not None):
        raise utils.UserError(f"--syn_path {path}: the set was distilled on "
                              f"{'ZCA-whitened' if meta['zca'] else 'mean/std-normalised'} images, the test set here "
                              f"is {'not whitened: pass --zca' if meta['zca'] else 'ZCA-whitened: leave --zca out'}")
    if record.zca is not None or meta.get("zca") or meta.get("mean") is None or meta.get("std") is None:
        return
    same = all(abs(float(a) - float(b)) < 1e-6 for a, b in zip([*meta["mean"], *meta["std"]], [*record.mean, *record.std]))
    if not same or len(meta["mean"]) != len(record.mean):
        raise utils.UserError(f"--syn_path {path}: the set was distilled on images normalised with mean {meta['mean']} "
                              f"std {meta['std']}, the test set here with mean {record.mean} std {record.std}; "
                              "pass --cifar100_stats to match (CIFAR100 sets of MTT/DATM/PAD/CAFE: cifar10) or "
                              "--norm_stats (KIP sets: train)")
