"""Privileged feature labels (DRUPI): the network tap E(x), the distance D(E(x), F) and the
training loss CE(f(x), y) + lbd * D(E(x), F) used to train networks on a set (x, y, F).

Source: "Dataset Reduction Using Privileged Information" (DRUPI, arXiv 2410.01611) and its
repository turturturturtur/DRUPI (``DC/main.py``; docs/reference-notes.md, *DRUPI*). The network
is f = C o E; E(x) is the feature at ``layer_idx`` and C the network's own remaining layers. This
module knows no distillation method (``methods/addons/feature_labels.py`` learns F); the evaluation
protocol in ``utils.py`` uses it.

Taps (ConvNet family, depth d, blocks [conv, norm, act, pool]):
    ``layer_idx`` None: the last block's pooled output, (width, h, w) = 128x4x4 for 28/32 px.
    ``layer_idx`` k in 1..d: the output of block k after its pool (k = 1: 128x16x16 for 32 px).
Other networks support ``layer_idx`` None only, where E(x) is ``net.embed(x)`` (N, D).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

POOLINGS = ("avg", "max", "sum")
FEATURE_METRICS = ("mse", "cos", "mmd")
USE_FEATURE = ("mean", "random")


@dataclass(frozen=True)
class FeatureLossConfig:
    """How a network trained on (x, y, F) compares its features with F (DRUPI ``DC/main.py`` flags).

    Attributes:
        lbd: ``--lbd``, lambda of the feature term (reference default 0.01); 0 trains with CE only.
        layer_idx: ``--layer_idx``: ``None`` = last feature map, k = after block k's pool.
        pooling: ``--pooling`` ``avg`` / ``max`` / ``sum`` (adaptive to 1x1) or ``None``.
        metric: ``--feat_metric`` ``mse`` / ``cos`` / ``mmd``.
        norm: ``--feat_norm``: L2-normalise E(x) and F along the channel axis (dim 1).
        use_feature: ``--use_feature``: with K > 1 sets of F, ``mean`` averages them, ``random``
            takes one set per batch.
    """

    lbd: float = 0.01
    layer_idx: Optional[int] = None
    pooling: Optional[str] = None
    metric: str = "mse"
    norm: bool = False
    use_feature: str = "mean"

    def __post_init__(self):
        if self.lbd < 0:
            raise ValueError(f"--lbd must be >= 0, got {self.lbd}")
        if self.layer_idx is not None and self.layer_idx < 1:
            raise ValueError(f"--layer_idx must be >= 1 (or omitted for the last feature map), got {self.layer_idx}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"--pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)} (or omit it)")
        if self.metric not in FEATURE_METRICS:
            raise ValueError(f"--feat_metric {self.metric!r}: expected one of {', '.join(FEATURE_METRICS)}")
        if self.use_feature not in USE_FEATURE:
            raise ValueError(f"--use_feature {self.use_feature!r}: expected one of {', '.join(USE_FEATURE)}")

    def as_dict(self) -> dict:
        """JSON/YAML-ready fields."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# The tap E(x) and the remaining layers C
# --------------------------------------------------------------------------------------------
def _convnet_blocks(net: nn.Module, layer_idx: Optional[int]):
    """The blocks of a ConvNet-family network, checking ``layer_idx`` against its depth.

    Raises:
        ValueError: ``layer_idx`` is set for a network without ConvNet blocks, or exceeds the depth.
    """
    blocks = getattr(net, "blocks", None)
    if layer_idx is None:
        return blocks
    if blocks is None or not all(hasattr(b, "pool") for b in blocks):
        raise ValueError(f"--layer_idx {layer_idx}: {type(net).__name__} has no ConvNet blocks; "
                         "omit --layer_idx to use the last feature map")
    if layer_idx > len(blocks):
        raise ValueError(f"--layer_idx {layer_idx}: {type(net).__name__} has only {len(blocks)} blocks")
    return blocks


def forward_with_features(net: nn.Module, images: torch.Tensor,
                          layer_idx: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits f(x) and the feature E(x) at ``layer_idx`` from one forward pass.

    Args:
        net: a ``networks.BaseNetwork`` (ConvNet family for ``layer_idx`` set).
        images: (N, C, H, W).
        layer_idx: see the module docstring.

    Returns:
        ``(logits (N, K), features)``: features (N, width, h, w) for a ConvNet, else (N, D).
        ``logits`` equals ``net(images)``.

    Raises:
        ValueError: unsupported ``layer_idx`` for this network.
    """
    blocks = _convnet_blocks(net, layer_idx)
    if blocks is None:  # any other network: the embedding before the classifier
        embedding = net.embed(images)
        return net.classifier(embedding), embedding
    tap = len(blocks) if layer_idx is None else layer_idx
    out, features = images, None
    for depth, block in enumerate(blocks, start=1):
        out = block.pool(block.act(block.norm(block.conv(out))))
        if depth == tap:
            features = out
    return net.classifier(torch.flatten(out, 1)), features


def classify_features(net: nn.Module, features: torch.Tensor, layer_idx: Optional[int] = None,
                      tap_size: Optional[Tuple[int, int]] = None, pooling: Optional[str] = None) -> torch.Tensor:
    """h(F): logits of feature labels through the network's own remaining layers and classifier.

    The reference builds a new randomly initialised Linear layer on every call when
    ``layer_idx`` is None (docs/reference-notes.md, *DRUPI*); here the network's own classifier is used. A
    feature pooled to 1x1 (``--pooling``) is broadcast back over the tap's spatial size first
    (a constant map, whose average pool is the feature itself); with ``sum`` pooling it is
    divided by the area first so that the map's sum is the feature.

    Args:
        net: the network (as in :func:`forward_with_features`).
        features: (B, width, h, w) at the tap, or (B, width, 1, 1) pooled, or (B, D) for other networks.
        layer_idx: the tap.
        tap_size: (h, w) of the tap, needed to broadcast pooled features (default: ``features``' own).
        pooling: the ``--pooling`` that made pooled features (``sum`` divides by the area).

    Returns:
        (B, K) logits.

    Raises:
        ValueError: ``features`` does not fit the network at ``layer_idx``.
    """
    blocks = _convnet_blocks(net, layer_idx)
    if blocks is None:
        if features.dim() != 2 or features.shape[1] != net.classifier.in_features:
            raise ValueError(f"feature labels of shape {tuple(features.shape[1:])} do not fit "
                             f"{type(net).__name__}'s classifier ({net.classifier.in_features} inputs)")
        return net.classifier(features)
    tap = len(blocks) if layer_idx is None else layer_idx
    if features.dim() != 4 or features.shape[1] != blocks[tap - 1].conv.out_channels:
        raise ValueError(f"feature labels of shape {tuple(features.shape[1:])} do not fit block {tap} of "
                         f"{type(net).__name__} ({blocks[tap - 1].conv.out_channels} channels)")
    if tap_size is not None and tuple(features.shape[2:]) != tuple(tap_size):
        if tuple(features.shape[2:]) != (1, 1):
            raise ValueError(f"feature labels of size {tuple(features.shape[2:])} fit neither the tap {tuple(tap_size)} nor 1x1")
        area = tap_size[0] * tap_size[1]
        features = features / area if pooling == "sum" else features
        features = features.expand(-1, -1, *tap_size)
    out = features
    for block in blocks[tap:]:
        out = block.pool(block.act(block.norm(block.conv(out))))
    return net.classifier(torch.flatten(out, 1))


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------
def pool_features(features: torch.Tensor, pooling: Optional[str]) -> torch.Tensor:
    """Adaptive pooling of (B, C, h, w) features to (B, C, 1, 1): ``avg``, ``max`` or ``sum``
    (= avg x h*w); ``None`` or a 2-D tensor are returned unchanged."""
    if pooling is None or features.dim() != 4:
        return features
    if pooling == "avg":
        return F.adaptive_avg_pool2d(features, 1)
    if pooling == "max":
        return F.adaptive_max_pool2d(features, 1)
    if pooling == "sum":
        return features.sum(dim=(2, 3), keepdim=True)
    raise ValueError(f"--pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")


def gaussian_mmd(a: torch.Tensor, b: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Biased MMD^2 between the rows of ``a`` (B, D) and ``b`` (B', D) under a sum of
    ``kernel_num`` Gaussian kernels exp(-||u - v||^2 / s_i), s_i = s * kernel_mul^(i - kernel_num//2),
    s the mean off-diagonal squared distance of the pooled rows (detached), as in the widely
    copied DAN ``mmd_rbf``. The reference's exact kernel was not checked.

    Returns:
        A scalar >= 0 (up to rounding); 0 when ``a`` equals ``b``.
    """
    rows = torch.cat([a, b])
    squared = torch.cdist(rows, rows).pow(2)
    n = rows.shape[0]
    bandwidth = squared.detach().sum() / max(n * n - n, 1)
    bandwidth = bandwidth.clamp_min(1e-12) / (kernel_mul ** (kernel_num // 2))
    kernel = sum(torch.exp(-squared / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
    size = a.shape[0]
    return kernel[:size, :size].mean() + kernel[size:, size:].mean() - 2 * kernel[:size, size:].mean()


def feature_distance(features: torch.Tensor, labels: torch.Tensor, metric: str = "mse", norm: bool = False,
                     pooling: Optional[str] = None) -> torch.Tensor:
    """D(E(x), F): the distance between network features and feature labels.

    Both sides are pooled (``pooling``; a 1x1 side stays as it is) and, with ``norm``,
    L2-normalised along dim 1 (channels), as the reference applies pooling and normalisation to
    both sides (DRUPI ``DC/main.py``).

    Args:
        features: E(x), (B, C, h, w) or (B, D).
        labels: F, the same shape after pooling.
        metric: ``mse`` = mean of squared differences over all elements (``F.mse_loss``);
            ``cos`` = mean over samples of 1 - cos(flatten(E_i), flatten(F_i));
            ``mmd`` = :func:`gaussian_mmd` of the flattened samples.
        norm: L2-normalise along dim 1 first.
        pooling: see :func:`pool_features`.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: shapes differ after pooling, or an unknown metric.
    """
    features, labels = pool_features(features, pooling), pool_features(labels, pooling)
    if features.shape != labels.shape:
        raise ValueError(f"network features {tuple(features.shape[1:])} and feature labels "
                         f"{tuple(labels.shape[1:])} differ in shape (check --layer_idx / --pooling / the model)")
    if norm:
        features, labels = F.normalize(features, dim=1), F.normalize(labels, dim=1)
    if metric == "mse":
        return F.mse_loss(features, labels)
    flat_features, flat_labels = features.flatten(1), labels.flatten(1)
    if metric == "cos":
        return (1 - F.cosine_similarity(flat_features, flat_labels, dim=1)).mean()
    if metric == "mmd":
        return gaussian_mmd(flat_features, flat_labels)
    raise ValueError(f"--feat_metric {metric!r}: expected one of {', '.join(FEATURE_METRICS)}")


# --------------------------------------------------------------------------------------------
# Feature labels of a set and the training loss
# --------------------------------------------------------------------------------------------
def select_feature_set(features: torch.Tensor, use_feature: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Collapse the K sets of feature labels (K, B, ...) to one (B, ...): their mean, or one set
    drawn uniformly with ``generator`` (``random``; the mean when no generator is given)."""
    if features.shape[0] == 1:
        return features[0]
    if use_feature == "random" and generator is not None:
        return features[int(torch.randint(features.shape[0], (1,), generator=generator))]
    return features.mean(dim=0)


class FeatureTargets:
    """The feature labels F of a synthetic set, for training networks on (x, y, F).

    Args:
        features: (n_feat, N, ...) per image or (n_feat, K, ...) per class.
        num_images: N, the size of the set (class-major: image i has class i // (N / K)).
        num_classes: K.
        cfg: the loss settings.

    Raises:
        ValueError: ``features`` has neither N nor K rows along dim 1.
    """

    def __init__(self, features: torch.Tensor, num_images: int, num_classes: int, cfg: FeatureLossConfig):
        if features.dim() < 3 or features.shape[1] not in (num_images, num_classes):
            raise ValueError(f"feature labels of shape {tuple(features.shape)}: expected (n_feat, {num_images}, ...) "
                             f"per image or (n_feat, {num_classes}, ...) per class")
        self.features = features.detach()
        self.cfg = cfg
        ipc = max(1, num_images // num_classes)
        index = torch.arange(num_images, device=features.device)
        self.rows = index if features.shape[1] == num_images else index // ipc

    def note(self) -> str:
        """A few words for the printed evaluation table: ``feature labels, lbd x``."""
        return f"feature labels, lbd {self.cfg.lbd:g}"

    def describe(self) -> dict:
        """Fields added to an evaluation's protocol record: ``{'feature_labels_lbd': lbd}``."""
        return {"feature_labels_lbd": self.cfg.lbd}

    def to(self, device: torch.device) -> "FeatureTargets":
        """These targets on ``device``."""
        self.features, self.rows = self.features.to(device), self.rows.to(device)
        return self

    def batch(self, index: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """F of the images ``index`` (B,): (B, ...) after :func:`select_feature_set`."""
        return select_feature_set(self.features[:, self.rows[index]], self.cfg.use_feature, generator)

    def check(self, net: nn.Module, images: torch.Tensor) -> None:
        """Raise early if F does not fit ``net``'s features (one no-grad pass over two images in
        eval mode; the network's mode is restored).

        Raises:
            ValueError: the shapes differ (e.g. a cross-architecture evaluation network).
        """
        training = net.training
        net.eval()
        try:
            with torch.no_grad():
                index = torch.arange(min(2, images.shape[0]), device=images.device)
                _, features = forward_with_features(net, images[index], self.cfg.layer_idx)
                feature_distance(features, self.batch(index), self.cfg.metric, self.cfg.norm, self.cfg.pooling)
        except ValueError as error:
            raise ValueError(f"{type(net).__name__}: {error}") from None
        finally:
            net.train(training)

    def loss(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """CE(f(x), y) + lbd * D(E(x), F) on one batch (the DRUPI README's loss l').

        Args:
            images: (B, C, H, W), possibly augmented (F is not).
            labels: (B,) int64 or (B, K) probabilities.
            index: (B,) positions of the images in the set.
        """
        logits, features = forward_with_features(net, images, self.cfg.layer_idx)
        distance = feature_distance(features, self.batch(index, generator), self.cfg.metric, self.cfg.norm,
                                    self.cfg.pooling)
        return F.cross_entropy(logits, labels) + self.cfg.lbd * distance

    def sgd_step(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                 optimizer: torch.optim.Optimizer, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One optimiser step on :meth:`loss`; returns the loss before the step (detached)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(net, images, labels, index, generator)
        loss.backward()
        optimizer.step()
        return loss.detach()
