"""Per-sample difficulty scores and the easy-to-hard class orders PAD's expert schedule reads.

EL2N and GraNd: Paul et al., "Deep Learning on a Data Diet: Finding Important Examples Early in
Training", NeurIPS 2021; uncertainty: least confidence. PAD (NUS-HPC-AI-Lab/PAD, ``data_indices/``)
ships one LongTensor [K, n] per score: each row lists a class's training-set indices, easiest first.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


import chunked
import storage
import utils
from data import PlainDataError, load_plain
from pretrained.buffers import canonical_dataset, imagenet_subset
from pretrained.experts import ExpertConfig, new_seeded_network, train_expert

logger = logging.getLogger(__name__)

SCORE_FORMAT = "dd-toolkit difficulty scores"
SCORE_FORMAT_VERSION = 1

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
    size = chunked.chunk_size(images.device, 1000)
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
    name = imagenet_subset(dataset, subset) or canonical_dataset(dataset)
    return os.path.join(os.fspath(buffer_path), "scores", f"{name}_{score_method_name(method)}.pt")


def save_scores(path: str, method: str, scores: torch.Tensor, labels: torch.Tensor, num_classes: int,
                meta: Optional[dict] = None) -> list:
    """Write a score file: ``{'format', 'format_version', 'method', 'scores' (N,), 'labels' (N,),
    'order' (K easiest-first index tensors), **meta}``, atomically. Returns the order."""
    order = class_order(scores, labels, num_classes)
    storage.atomic_save({"format": SCORE_FORMAT, "format_version": SCORE_FORMAT_VERSION,
                       "method": score_method_name(method), "scores": scores.detach().cpu().float(),
                       "labels": labels.detach().cpu().long(), "order": order, **(meta or {})}, path)
    return order


def resolve_sort_file(sort_method: str, buffer_path: str, dataset: str, subset: Optional[str] = None) -> str:
    """Find the index file of ``--sort_method``: an existing path, else
    ``{buffer_path}/scores/{sort_method}[.pt]`` (the reference's ``CIFAR10_GraNd`` style), else
    ``{buffer_path}/scores/{dataset}_{sort_method}.pt`` (a bare method name such as ``EL2N``).

    Raises:
        utils.UserError: none exists; the message lists the paths tried and the ``scripts/score.py``
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
                          f"one with: python scripts/score.py --dataset {dataset} --method {method} --buffer_path {buffer_path}")


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
        blob = load_plain(path, "score file")
    except PlainDataError as error:  # truncated or foreign file, or a pickle that would run code
        raise utils.UserError(f"--sort_method: {error}") from None
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
        raise utils.UserError(f"--sort_method {path}: expected a score file of scripts/score.py or a (K, n) index tensor")
    if len(rows) != num_classes:
        raise utils.UserError(f"--sort_method {path} orders {len(rows)} classes, the dataset has {num_classes}")
    for c, row in enumerate(rows):
        members = torch.nonzero(labels == c).flatten()
        if row.dim() != 1 or row.numel() != members.numel() or not torch.equal(torch.sort(row).values, members):
            raise utils.UserError(f"--sort_method {path}: row {c} is not a permutation of the {members.numel()} "
                                  f"training indices of class {c} (a file for another dataset?)")
    return rows
