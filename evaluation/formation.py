"""Multi-formation: a stored image holding a ``factor x factor`` grid of smaller images, decoded into
``factor²`` full-size images before anything trains on them (and, for methods that learn such sets,
before matching).

Source: Kim et al., "Dataset Condensation via Efficient Synthetic-Data Parameterization", ICML 2022
(IDC, section 3.1); the decoder of gszfwsb/NCFM ``condenser/decode.py`` (``decode_zoom``, the
``single`` decode type), which NCFM uses with ``factor: 2``, and its ``mix`` initialisation
(``condenser/Condenser.py``). Knows no method.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def decode_zoom(images: torch.Tensor, labels: torch.Tensor, factor: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cut every image into ``factor x factor`` crops of ``ceil(H / factor)`` pixels and upsample each
    crop (bilinear, ``align_corners=False``) to the image's size.

    The crops come crop-major, as the reference concatenates them: crop (0, 0) of every image, then
    crop (0, 1) of every image, ... (row-major over the grid); the labels are repeated the same way.
    Where ``H`` is not a multiple of ``factor`` the images are padded at the bottom and right with 0
    (the dataset mean in the normalised space; the reference pads its [0, 1] pixels with 0.5).
    ``factor`` 1 returns the inputs unchanged (the same tensors).

    Args:
        images: (N, C, H, W), square (H == W).
        labels: (N,) class indices or (N, K) label rows, repeated with their images.
        factor: grid size, >= 1.

    Returns:
        ``(images (factor² N, C, H, W), labels (factor² N, ...))``, differentiable in ``images``.

    Raises:
        ValueError: ``factor`` below 1, non-square or non-4-D images, or labels of another length.
    """
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"decode factor must be >= 1, got {factor}")
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"multi-formation decoding needs (N, C, H, H) images, got {tuple(images.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if factor == 1:
        return images, labels
    size = images.shape[-1]
    remainder = size % factor
    if remainder:
        images = F.pad(images, (0, factor - remainder, 0, factor - remainder), value=0.0)
    crop = math.ceil(size / factor)
    crops = [images[:, :, i * crop:(i + 1) * crop, j * crop:(j + 1) * crop]
             for i in range(factor) for j in range(factor)]
    decoded = F.interpolate(torch.cat(crops), size=(size, size), mode="bilinear", align_corners=False)
    return decoded, torch.cat([labels] * (factor * factor))


def mix_grid(images: torch.Tensor, factor: int, n: int) -> torch.Tensor:
    """``n`` images each holding a ``factor x factor`` grid of ``images`` (``init: mix`` of NCFM's
    ``Condenser.load_condensed_data``; the multi-formation random-real baseline): cell k (row-major)
    of image j is ``images[k n + j]`` shrunk (nearest) to the cell; with H = s factor + r the first r
    rows / columns of cells are s + 1 pixels.

    Args:
        images: (factor² n, C, H, H).
        factor: grid size; n: images out.

    Returns:
        (n, C, H, H).

    Raises:
        ValueError: not factor² n images.
    """
    if images.shape[0] != factor * factor * n:
        raise ValueError(f"mix_grid needs {factor * factor * n} images, got {images.shape[0]}")
    size = images.shape[-1]
    out = images.new_empty((n,) + tuple(images.shape[1:]))
    s, remainder = divmod(size, factor)
    k, top = 0, 0
    for i in range(factor):
        height = s + 1 if i < remainder else s
        left = 0
        for j in range(factor):
            width = s + 1 if j < remainder else s
            out[:, :, top:top + height, left:left + width] = F.interpolate(images[k * n:(k + 1) * n],
                                                                           size=(height, width))
            left += width
            k += 1
        top += height
    return out
