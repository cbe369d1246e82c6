"""Assessing a synthetic set without training on it (``evaluate.py --assess``).

Source: the README of yaolu-zjut/DDInterpreter ("Which Assessment Should be Prioritized in Dataset
Distillation?"; Lu et al., arXiv 2310.03295): the classification accuracy of the synthetic images on Original
Models (networks trained on the whole real training set, ``train_original.py``) correlates with
the accuracy of networks trained on the set; it compares that with image-, feature- and
semantic-level distances between synthetic and real data. No reference code is reused; the
definitions below are this toolkit's.

Assessments (:data:`METRICS`), each a float for one synthetic set:

* ``om_acc``: fraction of synthetic images an original model classifies as their label
  (argmax of soft labels), averaged over the models of the pool; in [0, 1].
* ``om_loss``: mean cross-entropy of the original models on the synthetic images (nats).
* ``feat_mean_dist``: per class, the Euclidean distance between the mean embedding
  (``model.embed``) of the synthetic images and that of real images of the class; averaged over
  the classes, then over the models.
* ``feat_mmd``: per class, the squared maximum mean discrepancy (biased V-statistic, Gretton et
  al. 2012) between the synthetic and real embeddings with the Gaussian kernel
  ``k(a, b) = exp(-||a - b||^2 / h)``; bandwidth ``h`` = the median of the squared pairwise
  distances over the pooled synthetic and real embeddings of that class (median heuristic;
  1 when that median is 0); averaged over classes and models. 0 when the two samples are equal.
* ``pixel_mean_dist``, ``pixel_std_dist``: per class, the root-mean-square over pixels and
  channels of the difference between the per-pixel mean (resp. population standard deviation)
  image of the synthetic and of the real images; averaged over the classes. Computed in the
  space the images are stored in (normalised, or ZCA-whitened).

Real images are ``real_per_class`` random training images per class (one seeded draw, shared by
every set and model). Classes without synthetic images are skipped in the class averages.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import tables
import utils

logger = logging.getLogger(__name__)

# (key, short description, True when a larger value should mean a better set)
METRICS: Tuple[Tuple[str, str, bool], ...] = (
    ("om_acc", "OM accuracy (synthetic images on original models)", True),
    ("om_loss", "OM loss (mean CE, nats)", False),
    ("feat_mean_dist", "feature class-mean distance (L2, embed)", False),
    ("feat_mmd", "feature MMD^2 (RBF, median bandwidth)", False),
    ("pixel_mean_dist", "pixel class-mean distance (RMS)", False),
    ("pixel_std_dist", "pixel class-std distance (RMS)", False),
)
BANDWIDTH_RULE = ("k(a,b) = exp(-||a-b||^2 / h), h = median squared pairwise distance of the pooled synthetic "
                  "and real embeddings of the class (1 if that is 0); biased MMD^2")


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------
def hard_labels(label_syn: torch.Tensor) -> torch.Tensor:
    """(N,) int64 class indices from (N,) labels or (N, K) soft labels / logits (argmax)."""
    return label_syn.argmax(dim=1) if label_syn.dim() == 2 else label_syn.long()


@torch.no_grad()
def forward_in_batches(fn, images: torch.Tensor, device, batch_size: int = 500) -> torch.Tensor:
    """``fn`` applied to ``images`` in batches on ``device``, without gradients.

    Args:
        fn: a callable (N, C, H, W) -> (N, D), e.g. a model or ``model.embed``.
        images: (N, C, H, W) on any device.
        device: where ``fn`` runs.
        batch_size: images per call.

    Returns:
        (N, D) float tensor on ``device``.
    """
    outs = [fn(images[i:i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs)


def om_scores(logits: torch.Tensor, label_syn: torch.Tensor) -> Tuple[float, float]:
    """Accuracy and mean cross-entropy of one original model on the synthetic set.

    Args:
        logits: (N, K) outputs of the model on the synthetic images.
        label_syn: (N,) class indices or (N, K) probabilities (soft labels; accuracy uses argmax).

    Returns:
        (accuracy in [0, 1], mean CE in nats).
    """
    targets = label_syn.to(logits.device)
    if targets.dim() == 2:
        targets = targets.float()
    loss = float(F.cross_entropy(logits.float(), targets))
    acc = float((logits.argmax(dim=1) == hard_labels(targets)).float().mean())
    return acc, loss


def class_mean_distance(feat_syn: torch.Tensor, label_syn: torch.Tensor, feat_real: torch.Tensor,
                        label_real: torch.Tensor, num_classes: int) -> float:
    """Mean over classes of ``||mean(feat_syn[c]) - mean(feat_real[c])||_2``.

    Args:
        feat_syn: (N_syn, D); label_syn: (N_syn,) int64.
        feat_real: (N_real, D); label_real: (N_real,) int64.
        num_classes: K; classes without synthetic or real samples are skipped.

    Returns:
        The distance (same units as the features).

    Raises:
        ValueError: no class has both synthetic and real samples.
    """
    distances = [torch.linalg.vector_norm(feat_syn[label_syn == c].mean(0) - feat_real[label_real == c].mean(0))
                 for c in _shared_classes(label_syn, label_real, num_classes)]
    return float(torch.stack(distances).mean())


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> float:
    """The median heuristic: median of ``||a - b||^2`` over distinct pairs of ``cat(x, y)``
    (1.0 when that median is 0 or there is a single point).

    Args:
        x: (N, D); y: (M, D).
    """
    pooled = torch.cat([x, y]).double()
    if pooled.shape[0] < 2:
        return 1.0
    squared = torch.cdist(pooled, pooled).pow(2)
    rows, cols = torch.triu_indices(pooled.shape[0], pooled.shape[0], offset=1)
    median = float(squared[rows, cols].median())
    return median if median > 0 else 1.0


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: Optional[float] = None) -> float:
    """Biased squared MMD ``mean k(x,x') + mean k(y,y') - 2 mean k(x,y)`` with
    ``k(a, b) = exp(-||a - b||^2 / h)`` (Gretton et al., JMLR 2012, eq. 5 V-statistic).

    Args:
        x: (N, D); y: (M, D).
        bandwidth: ``h``; default :func:`median_bandwidth` of ``x`` and ``y``.

    Returns:
        MMD^2 >= 0 (clamped against rounding); 0 when ``x`` and ``y`` hold the same points.
    """
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    x, y = x.double(), y.double()

    def kernel(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / h).mean()

    return max(float(kernel(x, x) + kernel(y, y) - 2 * kernel(x, y)), 0.0)


def class_mmd(feat_syn: torch.Tensor, label_syn: torch.Tensor, feat_real: torch.Tensor, label_real: torch.Tensor,
              num_classes: int) -> float:
    """Mean over classes of :func:`mmd_rbf` between the synthetic and real features of the class
    (per-class median bandwidth).

    Raises:
        ValueError: no class has both synthetic and real samples.
    """
    values = [mmd_rbf(feat_syn[label_syn == c], feat_real[label_real == c])
              for c in _shared_classes(label_syn, label_real, num_classes)]
    return float(sum(values) / len(values))


def pixel_statistics_distance(image_syn: torch.Tensor, label_syn: torch.Tensor, image_real: torch.Tensor,
                              label_real: torch.Tensor, num_classes: int) -> Dict[str, float]:
    """Per-class pixel statistics of the synthetic vs the real images.

    Args:
        image_syn: (N_syn, C, H, W); label_syn: (N_syn,) int64.
        image_real: (N_real, C, H, W); label_real: (N_real,) int64.
        num_classes: K.

    Returns:
        ``{'pixel_mean_dist': mean_c RMS(mu_syn_c - mu_real_c), 'pixel_std_dist':
        mean_c RMS(sigma_syn_c - sigma_real_c)}`` with per-pixel means and population standard
        deviations (one synthetic image per class has sigma 0).

    Raises:
        ValueError: no class has both synthetic and real samples.
    """
    mean_d, std_d = [], []
    for c in _shared_classes(label_syn, label_real, num_classes):
        syn, real = image_syn[label_syn == c].double(), image_real[label_real == c].double()
        mean_d.append(float((syn.mean(0) - real.mean(0)).pow(2).mean().sqrt()))
        std_d.append(float((syn.std(0, unbiased=False) - real.std(0, unbiased=False)).pow(2).mean().sqrt()))
    return {"pixel_mean_dist": sum(mean_d) / len(mean_d), "pixel_std_dist": sum(std_d) / len(std_d)}


def _shared_classes(label_syn: torch.Tensor, label_real: torch.Tensor, num_classes: int) -> List[int]:
    syn_counts = torch.bincount(label_syn.cpu(), minlength=num_classes)
    real_counts = torch.bincount(label_real.cpu(), minlength=num_classes)
    shared = [c for c in range(num_classes) if syn_counts[c] > 0 and real_counts[c] > 0]
    if not shared:
        raise ValueError("no class has both synthetic and real images")
    return shared


# --------------------------------------------------------------------------------------------
# One set, several sets
# --------------------------------------------------------------------------------------------
def assess_set(image_syn: torch.Tensor, label_syn: torch.Tensor, models: Sequence[nn.Module],
               image_real: torch.Tensor, label_real: torch.Tensor, num_classes: int, device,
               real_features: Optional[List[torch.Tensor]] = None, batch_size: int = 500) -> dict:
    """Every assessment of :data:`METRICS` for one synthetic set.

    Args:
        image_syn: (N_syn, C, H, W) synthetic images (the space the models were trained in).
        label_syn: (N_syn,) class indices or (N_syn, K) soft labels.
        models: original models (frozen, eval mode), e.g. from ``originals.load_original_models``.
        image_real: (N_real, C, H, W) real training images; label_real: (N_real,) int64.
        num_classes: K.
        device: where the models run.
        real_features: ``model.embed(image_real)`` per model, if already computed.
        batch_size: images per forward pass.

    Returns:
        ``{metric: float}`` for every key of :data:`METRICS`, plus ``om_acc_per_model`` and
        ``om_loss_per_model`` (lists in ``models`` order).

    Raises:
        ValueError: ``models`` is empty, or no class has both synthetic and real images.
    """
    if not models:
        raise ValueError("assess_set: no original models")
    labels = hard_labels(label_syn).to(device)
    label_real = label_real.to(device)
    accs, losses, mean_d, mmds = [], [], [], []
    for index, model in enumerate(models):
        acc, loss = om_scores(forward_in_batches(model, image_syn, device, batch_size), label_syn)
        accs.append(acc)
        losses.append(loss)
        feat_syn = forward_in_batches(model.embed, image_syn, device, batch_size)
        feat_real = (real_features[index] if real_features is not None
                     else forward_in_batches(model.embed, image_real, device, batch_size))
        mean_d.append(class_mean_distance(feat_syn, labels, feat_real, label_real, num_classes))
        mmds.append(class_mmd(feat_syn, labels, feat_real, label_real, num_classes))
    out = {"om_acc": sum(accs) / len(accs), "om_loss": sum(losses) / len(losses),
           "feat_mean_dist": sum(mean_d) / len(mean_d), "feat_mmd": sum(mmds) / len(mmds)}
    out.update(pixel_statistics_distance(image_syn.cpu(), labels.cpu(), image_real.cpu(), label_real.cpu(),
                                         num_classes))
    out["om_acc_per_model"], out["om_loss_per_model"] = accs, losses
    return out


def sample_real(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int,
                seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random real images of every class (all of a smaller class), class-major.

    Args:
        images: (N, C, H, W); labels: (N,) int64; num_classes: K.
        per_class: images per class (>= 1).
        seed: seed of the draw.

    Returns:
        images (M, C, H, W) and labels (M,) on the input's device.

    Raises:
        ValueError: ``per_class`` < 1.
    """
    if per_class < 1:
        raise ValueError(f"real images per class must be at least 1, got {per_class}")
    generator = utils.make_generator(seed)
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels.cpu() == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    index = torch.cat(picks).to(images.device)
    return images[index], labels[index]


def assess_sets(sets: Sequence[Tuple[torch.Tensor, torch.Tensor]], models: Sequence[nn.Module],
                image_real: torch.Tensor, label_real: torch.Tensor, num_classes: int, device,
                batch_size: int = 500) -> dict:
    """:func:`assess_set` for every experiment of a result file; real embeddings computed once.

    Args:
        sets: ``[(image_syn, label_syn), ...]``.
        models, image_real, label_real, num_classes, device, batch_size: see :func:`assess_set`.

    Returns:
        ``{'metrics': {metric: mean over sets}, 'experiments': [per-set dicts]}``.
    """
    real_features = [forward_in_batches(model.embed, image_real, device, batch_size) for model in models]
    experiments = [assess_set(images, labels, models, image_real, label_real, num_classes, device,
                              real_features=real_features, batch_size=batch_size) for images, labels in sets]
    metrics = {key: sum(e[key] for e in experiments) / len(experiments) for key, _, _ in METRICS}
    return {"metrics": metrics, "experiments": experiments}


def format_table(report: dict) -> str:
    """A plain-text table: one row per assessment, one column per experiment and their mean."""
    experiments = report["experiments"]
    header = ["assessment", *[f"exp {i}" for i in range(len(experiments))], "mean"]
    rows = [[description, *[f"{e[key]:.4g}" for e in experiments], f"{report['metrics'][key]:.4g}"]
            for key, description, _ in METRICS]
    return tables.format_table(header, rows)


def default_output(syn_path: str) -> str:
    """``{syn_path without extension}_assess.json``: where ``evaluate.py --assess`` writes by default."""
    return os.path.splitext(syn_path)[0] + "_assess.json"
