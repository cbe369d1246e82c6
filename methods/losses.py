"""Pure loss functions of the matching methods: tensors in, a scalar out; no config, no I/O.

- :func:`gradient_match_distance`: DC / DSA gradient matching (Zhao et al., ICLR 2021, eq. 10
  and the ``match_loss`` / ``distance_wb`` of the reference ``utils.py``).
- :func:`class_means` and :func:`mean_embedding_distance`: DM distribution matching (Zhao &
  Bilen, "Dataset Condensation with Distribution Matching", WACV 2023, eq. 4), reused by the
  attention and feature matching methods.
"""
from __future__ import annotations

from typing import Sequence

import torch

METRICS = ("ours", "mse", "cos")


def layerwise_distance(g_syn: torch.Tensor, g_real: torch.Tensor) -> torch.Tensor:
    """DC's per-layer distance (reference ``distance_wb``) for one parameter's gradient.

    A conv gradient (out, in, kh, kw) is viewed as ``out`` rows of ``in*kh*kw``; a 3-D gradient
    (LayerNorm's C, H, W) as C rows of H*W; a linear gradient (out, in) stays as it is. The
    distance is ``sum_rows [1 - <r, s> / (|r| |s| + 1e-6)]``.

    Quirk kept from the reference: 1-D gradients (biases, norm affine parameters) contribute 0.

    Args:
        g_syn, g_real: gradients of the same parameter, any shape.

    Returns:
        A scalar tensor (0 for 1-D inputs).
    """
    if g_real.dim() <= 1:
        return g_syn.new_zeros(())
    rows_syn = g_syn.reshape(g_syn.shape[0], -1)
    rows_real = g_real.reshape(g_real.shape[0], -1)
    dot = (rows_syn * rows_real).sum(dim=-1)
    norms = rows_syn.norm(dim=-1) * rows_real.norm(dim=-1)
    return (1.0 - dot / (norms + 1e-6)).sum()


def gradient_match_distance(g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor],
                            metric: str = "ours") -> torch.Tensor:
    """Distance between the synthetic and real gradients of a network (DC ``match_loss``).

    Args:
        g_syn: per-parameter gradients on the synthetic batch (built with ``create_graph=True``).
        g_real: per-parameter gradients on the real batch (detached), same shapes.
        metric: ``ours`` (layer-wise, row-wise cosine, 1-D parameters ignored), ``mse``
            (squared L2 of the concatenated gradients) or ``cos`` (1 - cosine of the
            concatenated gradients, with 1e-6 in the denominator).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: unknown ``metric`` or mismatched gradient lists.
    """
    if len(g_syn) != len(g_real):
        raise ValueError(f"gradient lists differ in length: {len(g_syn)} vs {len(g_real)}")
    if metric == "ours":
        return torch.stack([layerwise_distance(s, r) for s, r in zip(g_syn, g_real)]).sum()
    if metric not in METRICS:
        raise ValueError(f"--dis_metric {metric!r}: expected one of {', '.join(METRICS)}")
    vec_syn = torch.cat([g.reshape(-1) for g in g_syn])
    vec_real = torch.cat([g.reshape(-1) for g in g_real])
    if metric == "mse":
        return ((vec_syn - vec_real) ** 2).sum()
    return 1.0 - (vec_syn * vec_real).sum() / (vec_syn.norm() * vec_real.norm() + 1e-6)


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of a batch of feature vectors.

    Args:
        features: (N, D) (any trailing shape is flattened).
        labels: (N,) int64 in [0, num_classes).
        num_classes: K.

    Returns:
        (K, D) float32 means (features computed under ``--amp`` are averaged in float32); a class
        absent from the batch gets a zero row.
    """
    flat = features.reshape(features.shape[0], -1).float()
    sums = flat.new_zeros(num_classes, flat.shape[1]).index_add(0, labels, flat)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(flat.dtype)
    return sums / counts[:, None]


def mean_embedding_distance(mean_real: torch.Tensor, mean_syn: torch.Tensor) -> torch.Tensor:
    """DM's loss: ``sum_c || mean_real[c] - mean_syn[c] ||^2`` (sum of squares, no normalisation).

    Args:
        mean_real: (K, D) class means of real embeddings (detached by the caller).
        mean_syn: (K, D) class means of synthetic embeddings.

    Returns:
        A scalar tensor, zero when the means coincide.
    """
    return ((mean_real - mean_syn) ** 2).sum()


def spatial_attention(feature_map: torch.Tensor, power: float = 4.0, normalize: bool = True) -> torch.Tensor:
    """DataDAM's spatial attention map of one layer (Sajedi et al., ICCV 2023, eq. 1).

    ``a = sum_channels |A|^p``, flattened over space and L2-normalised per sample.

    Args:
        feature_map: (N, C, H, W) activations (a 2-D (N, D) input is treated as H*W = D, C = 1).
        power: p (the paper's table: 4; the released code calls it with 1).
        normalize: L2-normalise each sample's map (the paper's and the code's 'l2').

    Returns:
        (N, H*W) float32 attention vectors (a bfloat16 map from ``--amp`` is raised to float32 first).
    """
    feature_map = feature_map.float()
    if feature_map.dim() == 2:
        feature_map = feature_map[:, None]
    attention = feature_map.abs().pow(power).sum(dim=1).reshape(feature_map.shape[0], -1)
    if normalize:
        attention = torch.nn.functional.normalize(attention, p=2, dim=1)
    return attention


def attention_matching_loss(att_real: Sequence[torch.Tensor], att_syn: Sequence[torch.Tensor],
                            embed_real: torch.Tensor, embed_syn: torch.Tensor, task_balance: float = 0.01) -> torch.Tensor:
    """DataDAM's loss (eq. 2-3) from class means: attention matching on the intermediate layers
    plus the last-layer mean-embedding term, ``sum_l 100 * D(att_R^l, att_S^l) + 100 *
    task_balance * D(emb_R, emb_S)``, where ``D`` is the sum of squared differences of the
    class means (the reference's ``error_B`` with MSE).

    Args:
        att_real, att_syn: per layer, (K, H*W) class-mean attention vectors (real detached).
        embed_real, embed_syn: (K, D) class-mean last-layer embeddings.
        task_balance: lambda, ``--task_balance``.

    Returns:
        A scalar tensor; zero when every class's mean attention and embedding coincide.
    """
    loss = embed_syn.new_zeros(())
    for real, syn in zip(att_real, att_syn):
        loss = loss + 100.0 * mean_embedding_distance(real, syn)
    return loss + 100.0 * task_balance * mean_embedding_distance(embed_real, embed_syn)


def feature_alignment_loss(means_real: Sequence[torch.Tensor], means_syn: Sequence[torch.Tensor],
                           weights: Sequence[float]) -> torch.Tensor:
    """CAFE's layer-wise feature alignment (Wang et al., CVPR 2022, eq. 5, with the reference's
    per-layer weights): ``sum_l w_l * sum_c ||mean_real^l[c] - mean_syn^l[c]||^2``.

    Args:
        means_real, means_syn: per layer, (K, D_l) class means (real detached).
        weights: one weight per layer.

    Returns:
        A scalar tensor, zero when the class means coincide.

    Raises:
        ValueError: the three lists differ in length.
    """
    if not len(means_real) == len(means_syn) == len(weights):
        raise ValueError(f"{len(means_real)} real layers, {len(means_syn)} synthetic layers, {len(weights)} weights")
    loss = means_syn[0].new_zeros(())
    for real, syn, weight in zip(means_real, means_syn, weights):
        loss = loss + weight * mean_embedding_distance(real, syn)
    return loss


def discrimination_loss(embed_real: torch.Tensor, labels_real: torch.Tensor, centers_syn: torch.Tensor) -> torch.Tensor:
    """CAFE's discrimination loss (eq. 6): real embeddings are classified by their inner product
    with the synthetic class centres, ``sum_i CE(e_i . P^T, y_i)`` (summed, as the reference's
    ``CrossEntropyLoss(reduction='sum')``); its gradient reaches the synthetic images through P.

    Args:
        embed_real: (N, D) real last-layer embeddings (detached).
        labels_real: (N,) int64 in [0, K).
        centers_syn: (K, D) class-mean synthetic embeddings P.

    Returns:
        A scalar tensor.
    """
    logits = embed_real @ centers_syn.t()
    return torch.nn.functional.cross_entropy(logits, labels_real, reduction="sum")
