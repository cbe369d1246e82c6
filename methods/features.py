"""Feature taps shared by the feature-statistics methods (DM, DataDAM, CAFE).

Every network in ``networks.py`` exposes ``embed_with_feature_maps(x) -> (embedding, maps)``:
the last-layer embedding (N, D) and the intermediate activations of each stage (for ConvNet,
the post-activation output of every block before its pooling). The methods compare per-class
means of these; on the real side only the means are needed, so they are accumulated chunk by
chunk without keeping a graph or every activation.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import chunked
from methods.losses import class_means

MapsTransform = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


def real_class_statistics(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          transform: Optional[MapsTransform] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Per-class means of (transformed) intermediate features of real images, and their embeddings.

    Runs without gradient, in chunks of :func:`chunked.pass_size` (one pass for a BatchNorm network
    in training mode, so its batch statistics span the whole real batch as in the references).

    Args:
        net: a ``networks.BaseNetwork`` in the mode the method wants.
        images: (N, C, H, W) real images.
        labels: (N,) int64 in [0, num_classes).
        num_classes: K.
        transform: maps the list of per-stage activations to the list of tensors to average
            (e.g. attention maps); identity when ``None``.

    Returns:
        ``(layer_means, embeddings)``: a list of (K, D_l) class means, one per transformed
        stage (flattened; a class absent from the batch gets zeros), and (N, D) embeddings, both
        float32 (features computed under ``--amp`` are accumulated in float32).
    """
    sums: Optional[List[torch.Tensor]] = None
    embeddings = []
    with torch.no_grad():
        size = chunked.pass_size(net, images)
        for chunk, chunk_labels in zip(images.split(size), labels.split(size)):
            embedding, maps = net.embed_with_feature_maps(chunk)
            layers = transform(maps) if transform is not None else maps
            flat = [layer.reshape(layer.shape[0], -1).float() for layer in layers]  # float32 under --amp
            if sums is None:
                sums = [f.new_zeros(num_classes, f.shape[1]) for f in flat]
            for total, f in zip(sums, flat):
                total.index_add_(0, chunk_labels, f)
            embeddings.append(embedding.float())
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(images.dtype)
    return [total / counts[:, None] for total in (sums or [])], torch.cat(embeddings)


def syn_class_statistics(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         transform: Optional[MapsTransform] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The synthetic-side counterpart of :func:`real_class_statistics`, with gradients to ``images``.

    Args and returns as :func:`real_class_statistics`, except the embeddings are replaced by
    their (K, D) class means. One forward pass over the whole synthetic batch.
    """
    embedding, maps = net.embed_with_feature_maps(images)
    layers = transform(maps) if transform is not None else maps
    return [class_means(layer, labels, num_classes) for layer in layers], class_means(embedding, labels, num_classes)
