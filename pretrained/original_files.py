"""Original models on disk: the folder layout, reading checkpoints, the per-folder summary and
loading finished models for CLoM, coresets and assessments. ``pretrained/originals.py`` trains them
(yaolu-zjut/DDInterpreter ``train_original_models.py``); its docstring describes the layout and the
checkpoint's keys."""
from __future__ import annotations

import os
import re
import logging
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

import networks
import storage
import tables
import utils
from data import PlainDataError, load_plain

logger = logging.getLogger("pretrained.originals")

FORMAT = "dd-toolkit original model"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
SUMMARY_NAME = "summary.json"
DEFAULT_SAVE_PATH = "pretrained_model"
INDEX_RE = re.compile(r"^index_(\d+)$")
EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")
FLOPS_DEFINITION = networks.FLOPS_DEFINITION


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------
def dataset_name(dataset: str, subset: Optional[str] = None) -> str:
    """The folder name of a dataset: its registered spelling (case-insensitive match), or the
    subset name for ``ImageNet`` with ``subset``; an unregistered name is returned unchanged."""
    from data import DATASETS

    name = str(dataset)
    if name not in DATASETS:
        matches = [key for key in DATASETS if key.lower() == name.lower()]
        if len(matches) == 1:
            name = matches[0]
    if name == "ImageNet" and subset:
        return str(subset).lower()
    return name


def original_dir(save_path: str, dataset: str, model: str, subset: Optional[str] = None) -> str:
    """``{save_path}/{dataset}/original/{model}`` (the reference layout)."""
    return os.path.join(os.fspath(save_path), dataset_name(dataset, subset), "original", model)


def index_dir(save_path: str, dataset: str, model: str, index: int, subset: Optional[str] = None) -> str:
    """``{original_dir}/index_{index}``: the folder of model ``index``."""
    return os.path.join(original_dir(save_path, dataset, model, subset), f"index_{int(index)}")


def checkpoint_path(save_path: str, dataset: str, model: str, index: int, subset: Optional[str] = None) -> str:
    """``{index_dir}/checkpoint.pt``: model ``index``'s resumable checkpoint."""
    return os.path.join(index_dir(save_path, dataset, model, index, subset), CHECKPOINT_NAME)


def epoch_checkpoint_path(save_path: str, dataset: str, model: str, index: int, epoch: int,
                          subset: Optional[str] = None) -> str:
    """``{index_dir}/epoch_{epoch}.pt``: the weights of model ``index`` after ``epoch`` epochs, kept
    by ``train_original.py --save_epochs`` (the checkpoint layout without optimizer, scheduler and
    generator state; ``read_checkpoint`` reads it)."""
    return os.path.join(index_dir(save_path, dataset, model, index, subset), f"epoch_{int(epoch)}.pt")


def list_epochs(directory: str) -> list:
    """The epochs ``E`` of the ``epoch_{E}.pt`` files in the ``index_{i}`` folder ``directory``, sorted."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(EPOCH_RE.match, os.listdir(directory)) if m)


def reference_weights_name(dataset: str, model: str, epoch: int) -> str:
    """``{dataset}_{model}_original_epoch{epoch}.pth``: the reference's per-epoch weight file name."""
    return f"{dataset}_{model}_original_epoch{int(epoch)}.pth"


def list_indices(directory: str) -> list:
    """Indices ``i`` of the ``index_{i}`` folders of ``directory`` holding a ``checkpoint.pt``, sorted."""
    return [index for index, _ in storage.numbered_entries(directory, INDEX_RE, require=CHECKPOINT_NAME)]


def train_command(dataset: str = "DATASET", model: str = "MODEL", num: Optional[int] = None,
                  save_path: Optional[str] = None, subset: Optional[str] = None,
                  epochs: Optional[int] = None, save_epochs: Optional[str] = None) -> str:
    """The ``train_original.py`` command line that makes such models (for error messages);
    ``save_epochs`` adds ``--save_epochs`` with that value."""
    parts = ["python train_original.py", f"--dataset {dataset}", f"--model {model}"]
    if subset:
        parts.append(f"--subset {subset}")
    if num is not None:
        parts.append(f"--num {int(num)}")
    if epochs is not None:
        parts.append(f"--epochs {int(epochs)}")
    if save_epochs is not None:
        parts.append(f"--save_epochs {save_epochs}")
    if save_path is not None and os.path.normpath(os.fspath(save_path)) != DEFAULT_SAVE_PATH:
        parts.append(f"--save_path {save_path}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def cpu_copy(obj):
    """``obj`` with every tensor detached and moved to the CPU (plain dicts, lists, tuples)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if type(obj) is dict:
        return {key: cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(value) for value in obj)
    return obj


def build_network(model: str, channel: int, num_classes: int, im_size: Sequence[int], device,
                   seed: Optional[int] = None) -> nn.Module:
    """``networks.get_network`` inside a forked RNG (seeded with ``seed`` when given), so the
    caller's global RNG stream does not move."""
    device = torch.device(device)
    fork = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        if seed is not None:
            torch.manual_seed(seed)
        return networks.get_network(model, channel, num_classes, tuple(im_size), device=device)


def read_checkpoint(path: str) -> dict:
    """Read one ``checkpoint.pt`` (``weights_only``) and check its layout.

    Raises:
        utils.UserError: the file is missing, unreadable, or not an original-model checkpoint of
            this toolkit (or of a newer layout).
    """
    if not os.path.isfile(path):
        raise utils.UserError(f"no original-model checkpoint at {path}")
    try:
        state = load_plain(path, "original-model checkpoint")
    except PlainDataError as error:  # truncated or foreign file, or a pickle that would run code
        raise utils.UserError(str(error)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise utils.UserError(f"{path} is not an original-model checkpoint of this toolkit (made by train_original.py)")
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise utils.UserError(f"{path} has layout version {state['format_version']}; this toolkit reads up to "
                              f"{FORMAT_VERSION}")
    return state


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
def _row(state: dict, directory: str) -> dict:
    history = state.get("history", [])
    seconds = float(sum(h["seconds"] for h in history))
    return {"index": int(state["index"]), "seed": int(state["seed"]), "epochs_done": int(state["epochs_done"]),
            "epochs_total": int(state["epochs_total"]), "finished": bool(state["finished"]),
            "test_acc": state.get("test_acc"), "num_params": int(state["num_params"]),
            "flops_per_image": int(state["flops_per_image"]), "macs_per_image": int(state["flops_per_image"]) // 2,
            "train_seconds": round(seconds, 3),
            "seconds_per_epoch": round(seconds / len(history), 3) if history else None,
            "checkpoint": os.path.join(f"index_{int(state['index'])}", CHECKPOINT_NAME)}


def collect_summary(directory: str) -> dict:
    """The summary of every ``index_{i}/checkpoint.pt`` under ``directory``.

    Returns:
        ``{'format', 'dataset', 'model', 'channel', 'im_size', 'num_classes', 'config',
        'flops_definition', 'models': [row, ...], 'test_acc_mean', 'test_acc_std', 'finished'}``;
        each row has ``index, seed, epochs_done, epochs_total, finished, test_acc (in [0, 1]),
        num_params, flops_per_image, macs_per_image, train_seconds, seconds_per_epoch,
        checkpoint``; mean and (population) std are over the finished models (``None`` if none).

    Raises:
        utils.UserError: an unreadable checkpoint.
    """
    rows, first = [], None
    for index in list_indices(directory):
        state = read_checkpoint(os.path.join(directory, f"index_{index}", CHECKPOINT_NAME))
        first = first or state
        rows.append(_row(state, directory))
    accs = [row["test_acc"] for row in rows if row["finished"] and row["test_acc"] is not None]
    summary = {"format": f"{FORMAT} summary", "format_version": FORMAT_VERSION,
               "dataset": first["dataset"] if first else None, "model": first["model"] if first else None,
               "channel": first["channel"] if first else None, "im_size": first["im_size"] if first else None,
               "num_classes": first["num_classes"] if first else None,
               "config": first["config"] if first else None, "flops_definition": FLOPS_DEFINITION, "models": rows,
               "finished": len(accs), "test_acc_mean": float(np.mean(accs)) if accs else None,
               "test_acc_std": float(np.std(accs)) if accs else None}
    return summary


def write_summary(directory: str) -> tuple:
    """Write :func:`collect_summary` to ``{directory}/summary.json`` atomically.

    Returns:
        ``(summary, path)``.
    """
    summary = collect_summary(directory)
    path = os.path.join(directory, SUMMARY_NAME)
    storage.write_json(path, summary)
    return summary, path


def format_table(summary: dict, status: Optional[dict] = None) -> str:
    """A plain-text table of a :func:`collect_summary` dict (Table I of the seed report: test
    accuracy, parameters and FLOPs of each original model), with an optional ``status`` column
    (``{index: text}``) and a mean ± std line."""
    header = ["index", "seed", "epochs", "test acc %", "params", "MFLOPs/img", "MMACs/img", "train s", "s/epoch"]
    if status is not None:
        header.append("this run")
    lines = []
    for row in summary["models"]:
        cells = [str(row["index"]), str(row["seed"]), f"{row['epochs_done']}/{row['epochs_total']}",
                 "-" if row["test_acc"] is None else f"{100 * row['test_acc']:.2f}", f"{row['num_params']:,}",
                 f"{row['flops_per_image'] / 1e6:.2f}", f"{row['macs_per_image'] / 1e6:.2f}",
                 f"{row['train_seconds']:.1f}",
                 "-" if row["seconds_per_epoch"] is None else f"{row['seconds_per_epoch']:.1f}"]
        if status is not None:
            cells.append(status.get(row["index"], "not asked"))
        lines.append(cells)
    text = [tables.format_table(header, lines, numeric_right=False)]
    if summary.get("test_acc_mean") is not None:
        text.append(f"test accuracy {100 * summary['test_acc_mean']:.2f} ± {100 * summary['test_acc_std']:.2f} % "
                    f"over {summary['finished']} finished model(s) of {summary['model']} on {summary['dataset']}")
    text.append(FLOPS_DEFINITION)
    return "\n".join(text)


# --------------------------------------------------------------------------------------------
# Loading for CLoM and assessments
# --------------------------------------------------------------------------------------------
def load_original_models(save_path: str, dataset: str, model: str,
                         indices: Union[None, int, Sequence[int]] = None, device="cpu", *,
                         allow_unfinished: bool = False, subset: Optional[str] = None,
                         expect: Optional[dict] = None, epoch: Optional[int] = None) -> list:
    """Load trained original models, frozen, for the CLoM regulariser and for assessments.

    Each network is rebuilt with ``networks.get_network`` from the checkpoint's model name,
    channel, classes and image size (in a forked RNG: the caller's RNG does not move), gets the
    saved weights (strict), and is returned with ``requires_grad=False`` on every parameter and in
    eval mode (BatchNorm uses its running statistics; the reference leaves the saved mode).

    Args:
        save_path: ``train_original.py --save_path``.
        dataset: the dataset the models were trained on (the folder name; case-insensitive).
        model: the network name.
        indices: ``None`` for every ``index_{i}`` folder found, an int ``n`` for indices
            ``0 .. n - 1``, or a sequence of indices.
        device: where to put the networks.
        allow_unfinished: also accept a checkpoint that has not reached its total epochs.
        subset: the ImageNet subset when ``dataset`` is ``'ImageNet'``.
        expect: further values the checkpoint must have: ``channel``, ``num_classes``,
            ``im_size`` or any key of its ``config`` (``zca``, ``epochs``, ``lr`` ...).
        epoch: read ``index_{i}/epoch_{epoch}.pt`` (``train_original.py --save_epochs``) where it
            exists instead of ``checkpoint.pt`` (then finished or not).

    Returns:
        A list of ``nn.Module``, one per index, in the order asked.

    Raises:
        utils.UserError: a checkpoint is missing (the message names the expected path and the
            ``train_original.py`` command that makes it), unreadable, holds another dataset or
            model or another expected value, or is unfinished (the message says how many epochs
            it has) without ``allow_unfinished``.
        ValueError: ``indices`` is an int below 1 or empty; ``expect`` names an unknown field.
    """
    directory = original_dir(save_path, dataset, model, subset)
    name = dataset_name(dataset, subset)
    if indices is None:
        chosen = list_indices(directory)
        if not chosen:
            raise utils.UserError(f"no original models in {directory} (no index_*/{CHECKPOINT_NAME}); make them with: "
                                  f"{train_command(name, model, 1, save_path, subset)}")
    elif isinstance(indices, int) and not isinstance(indices, bool):
        if indices < 1:
            raise ValueError(f"load_original_models: indices must be at least 1, got {indices}")
        chosen = list(range(indices))
    else:
        chosen = [int(i) for i in indices]
        if not chosen:
            raise ValueError("load_original_models: indices is empty")
    device = torch.device(device)
    models = []
    for index in chosen:
        path = os.path.join(directory, f"index_{index}", CHECKPOINT_NAME)
        kept = os.path.join(directory, f"index_{index}", f"epoch_{int(epoch)}.pt") if epoch is not None else ""
        if kept and os.path.isfile(kept):
            path = kept
        if not os.path.isfile(path):
            raise utils.UserError(f"no original model {index}: {path} is missing; make it with: "
                                  f"{train_command(name, model, max(chosen) + 1, save_path, subset)}")
        state = read_checkpoint(path)
        for key, wanted in (("dataset", name), ("model", model)):
            if str(state.get(key)).lower() != str(wanted).lower():
                raise utils.UserError(f"{path} holds a {state.get('model')} trained on {state.get('dataset')}, not "
                                      f"a {model} on {name}; make the right one with: "
                                      f"{train_command(name, model, max(chosen) + 1, save_path, subset)}")
        for key, wanted in (expect or {}).items():
            if key in ("channel", "num_classes", "im_size"):
                have = state[key]
                wanted = [int(s) for s in wanted] if key == "im_size" else wanted
            elif key in state.get("config", {}):
                have = state["config"][key]
            else:
                raise ValueError(f"load_original_models: unknown expectation {key!r}")
            if have != wanted:
                raise utils.UserError(f"{path} was made with {key}={have!r} but {key}={wanted!r} is needed")
        done, total = int(state["epochs_done"]), int(state["epochs_total"])
        if done < total and not allow_unfinished and path != kept:
            raise utils.UserError(f"{path} is unfinished: {done} of {total} epochs; finish it by running "
                                  f"{train_command(name, model, max(chosen) + 1, save_path, subset, total)} "
                                  "with its other flags again, or pass allow_unfinished=True")
        net = build_network(state["model"], state["channel"], state["num_classes"], state["im_size"], device)
        try:
            net.load_state_dict(state["state_dict"])
        except RuntimeError as error:
            raise utils.UserError(f"{path} does not fit networks.get_network({state['model']!r}): "
                                  f"{' '.join(str(error).split())[:300]}") from None
        net.requires_grad_(False)
        net.eval()
        models.append(net)
    logger.info("loaded %d original %s model(s) of %s from %s", len(models), model, name, directory)
    return models


def load_initial_models(save_path: str, dataset: str, model: str, indices: int, device, *,
                        subset: Optional[str] = None) -> list:
    """The networks trained original models ``0 .. indices - 1`` started from: each rebuilt with
    :func:`build_network` from its checkpoint's model, shape and recorded seed, as ``train_original.py``
    built it (``cfg.seed + index``), frozen, in eval mode. NCFM interpolates between these and the
    trained weights (gszfwsb/NCFM ``premodel{i}_init.pth.tar``, which this toolkit does not store).

    Args:
        save_path, dataset, model, subset: as :func:`load_original_models`.
        indices: how many models (indices ``0 .. indices - 1``), >= 1.
        device: where to put them (the same kind of device the models were trained on gives the
            same initial weights).

    Returns:
        A list of ``nn.Module``, one per index.

    Raises:
        utils.UserError: a checkpoint is missing or unreadable (the message names the path and the
            ``train_original.py`` command that makes it).
    """
    directory = original_dir(save_path, dataset, model, subset)
    name = dataset_name(dataset, subset)
    models = []
    for index in range(int(indices)):
        path = os.path.join(directory, f"index_{index}", CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise utils.UserError(f"no original model {index}: {path} is missing; make it with: "
                                  f"{train_command(name, model, int(indices), save_path, subset)}")
        state = read_checkpoint(path)
        net = build_network(state["model"], state["channel"], state["num_classes"], state["im_size"], device,
                            seed=int(state["seed"]))
        net.requires_grad_(False)
        net.eval()
        models.append(net)
    return models


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
        epoch: ``None`` for finished models; else the weights after ``epoch`` epochs: each
            index's ``epoch_{epoch}.pt`` (``train_original.py --save_epochs``) where it exists,
            else a ``checkpoint.pt`` holding exactly ``epoch`` trained epochs (finished or not).
        subset: the ImageNet subset, if any.
        expect: checkpoint values that must match (``channel``, ``im_size``, ``num_classes``,
            ``zca`` ...), passed to ``load_original_models``.

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
            directory = original_dir(pretrained_path, dataset, arch, subset)
            indices = range(model_num) if model_num is not None else list_indices(directory)
            for index in indices:
                path = checkpoint_path(pretrained_path, dataset, arch, index, subset)
                if os.path.isfile(epoch_checkpoint_path(pretrained_path, dataset, arch, index, epoch, subset)):
                    continue
                if not os.path.isfile(path):
                    break  # load_original_models below reports the missing file with its command
                done = int(read_checkpoint(path)["epochs_done"])
                if done != epoch:
                    raise utils.UserError(
                        f"--epoch {epoch}: {path} holds {done} trained epochs and there is no epoch_{epoch}.pt "
                        f"beside it; train models with --save_epochs {epoch} (or --epochs {epoch}) under "
                        f"another --save_path, or leave --epoch out")
        pool[arch] = load_original_models(pretrained_path, dataset, arch, model_num, device,
                                                    allow_unfinished=epoch is not None, subset=subset,
                                                    expect=expect, epoch=epoch)
    return pool
