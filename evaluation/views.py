"""The student's views of a batch, drawn once and applied anywhere: per-image RandomResizedCrop +
horizontal flip, then CutMix or Mixup over the batch. One draw (:func:`draw_views`) serves the
relabelling (:mod:`evaluation.relabel`), the replay of a relabel store and the online teacher, so a
student trained on stored labels sees exactly the views the teacher labelled.

Sources: VILA-Lab/SRe2L ``relabel/utils_fkd.py`` (crop coordinates as fractions of the image,
flip status, mix permutation, coefficient and CutMix box, stored per batch; ``rand_bbox``);
torchvision ``RandomResizedCrop.get_params`` (area and aspect-ratio draw, ten attempts);
Yun et al., "CutMix", ICCV 2019; Zhang et al., "mixup", ICLR 2018.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# Attempts of the RandomResizedCrop draw before the whole image is taken (torchvision: 10).
CROP_ATTEMPTS = 10
# Aspect-ratio range of the crops (torchvision's default (3/4, 4/3)).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True, eq=False)
class Views:
    """The views of one batch, as plain data (CPU tensors).

    Attributes:
        index: (B,) int64 positions of the batch's images in the set.
        boxes: (B, 4) float32 crop boxes ``(top, left, height, width)`` as fractions of the image's
            height / width (SRe2L's coordinates), or ``None``: no crop, no flip.
        flips: (B,) bool horizontal flips (after the crop), or ``None`` with ``boxes``.
        mix_type: ``none``, ``cutmix`` or ``mixup``.
        permutation: (B,) int64 positions within the batch each image is mixed with, or ``None``.
        lam: the share of each image that is its own (Mixup: the Beta draw; CutMix: ``1 -`` the
            pasted box's area over the image's, as CutMix's reference code adjusts it); 1 without mixing.
        box: CutMix's pasted box ``(y1, y2, x1, x2)`` in pixels of the view, or ``None``.
    """

    index: torch.Tensor
    boxes: Optional[torch.Tensor] = None
    flips: Optional[torch.Tensor] = None
    mix_type: str = "none"
    permutation: Optional[torch.Tensor] = None
    lam: float = 1.0
    box: Optional[Tuple[int, int, int, int]] = None

    def __len__(self) -> int:
        return int(self.index.numel())


def draw_crops(count: int, im_size: Sequence[int], scale: Tuple[float, float],
               generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop boxes for ``count`` images of ``im_size`` (H, W): area a fraction
    U(``scale``) of the image, log aspect ratio uniform in ``CROP_RATIO``, the first of
    ``CROP_ATTEMPTS`` draws that fits, else the whole image; the corner uniform over the positions
    that fit (torchvision ``RandomResizedCrop.get_params``, drawn for all images at once).

    Returns:
        (count, 4) float32 ``(top, left, height, width)`` as fractions of H and W.
    """
    height, width = int(im_size[0]), int(im_size[1])
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(count, CROP_ATTEMPTS, generator=generator,
                                                                          dtype=torch.float64))
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(count, CROP_ATTEMPTS, generator=generator,
                                                              dtype=torch.float64))
    w = torch.round(torch.sqrt(area * ratio))
    h = torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(dim=1), fits.to(torch.int64).argmax(dim=1), torch.full((count,), -1))
    rows = torch.arange(count)
    h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.full((count,), float(height), dtype=torch.float64))
    w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.full((count,), float(width), dtype=torch.float64))
    corner = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(corner[:, 0] * (height - h + 1))
    left = torch.floor(corner[:, 1] * (width - w + 1))
    return torch.stack([top / height, left / width, h / height, w / width], dim=1).float()


def draw_views(index: torch.Tensor, im_size: Sequence[int], cfg, generator: torch.Generator) -> Views:
    """Draw the views of one batch from ``generator`` (always in the same order: crops, flips,
    then the mix), so the same generator state gives the same views wherever they are drawn.

    Args:
        index: (B,) int64 positions of the batch's images in the set.
        im_size: (H, W) of the images.
        cfg: the protocol's student settings (``evaluation.EvalConfig`` or anything with
            ``student_aug``, ``min_scale_crops``, ``max_scale_crops``, ``mix_type``, ``cutmix``, ``mixup``):
            crops and flips only under ``student_aug='rrc'``; a mix under ``mix_type`` when B > 1, and
            with ``mix_p`` < 1 only when a uniform draw is below ``mix_p`` (none drawn at 1).
        generator: a CPU generator.

    Returns:
        The batch's :class:`Views`.
    """
    index = index.detach().cpu().to(torch.int64)
    count = int(index.numel())
    boxes = flips = None
    if cfg.student_aug == "rrc":
        boxes = draw_crops(count, im_size, (cfg.min_scale_crops, cfg.max_scale_crops), generator)
        flips = torch.rand(count, generator=generator) < 0.5
    if cfg.mix_type == "none" or count < 2:
        return Views(index=index, boxes=boxes, flips=flips)
    mix_p = getattr(cfg, "mix_p", 1.0)
    if mix_p < 1.0 and not float(torch.rand((), generator=generator)) < mix_p:  # NCFM: a batch mixed with p
        return Views(index=index, boxes=boxes, flips=flips)
    permutation = torch.randperm(count, generator=generator)
    alpha = cfg.cutmix if cfg.mix_type == "cutmix" else cfg.mixup
    beta_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    lam = float(np.random.default_rng(beta_seed).beta(alpha, alpha))
    if cfg.mix_type == "mixup":
        return Views(index=index, boxes=boxes, flips=flips, mix_type="mixup", permutation=permutation, lam=lam)
    height, width = int(im_size[0]), int(im_size[1])
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = (int(v) for v in torch.randint(0, 1 << 30, (2,), generator=generator) % torch.tensor([height, width]))
    y1, y2 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    x1, x2 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
    return Views(index=index, boxes=boxes, flips=flips, mix_type="cutmix", permutation=permutation, lam=lam,
                 box=(y1, y2, x1, x2))


def crop_and_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Each image's crop box resized (bilinear) back to the image's size, then flipped where
    ``flips`` says: one ``grid_sample`` over the batch (deterministic in the forward direction).

    Args:
        images: (B, C, H, W).
        boxes: (B, 4) ``(top, left, height, width)`` fractions; flips: (B,) bool.

    Returns:
        (B, C, H, W) in ``images``' dtype.
    """
    count = images.shape[0]
    boxes = boxes.to(images.device, torch.float32)
    top, left, h, w = boxes.unbind(dim=1)
    sign = torch.where(flips.to(images.device), -1.0, 1.0)
    theta = torch.zeros(count, 2, 3, device=images.device)
    # normalised coordinates (align_corners=False): output x in [-1, 1] maps to the box's span
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False).to(images.dtype)


def apply_views(images: torch.Tensor, views: Views) -> torch.Tensor:
    """The batch as the student (and the teacher) sees it: crops and flips, then the mix.

    Args:
        images: (B, C, H, W), the set's images at ``views.index`` in that order.
        views: from :func:`draw_views`.

    Returns:
        (B, C, H, W) on ``images``' device (a new tensor; ``images`` is not changed).

    Raises:
        ValueError: the batch size is not the views'.
    """
    if images.shape[0] != len(views):
        raise ValueError(f"{images.shape[0]} images for views of {len(views)}")
    out = images if views.boxes is None else crop_and_flip(images, views.boxes, views.flips)
    if views.permutation is None:
        return out if out is not images else images.clone()
    permutation = views.permutation.to(images.device)
    if views.mix_type == "mixup":
        return views.lam * out + (1.0 - views.lam) * out[permutation]
    y1, y2, x1, x2 = views.box
    out = out.clone()
    out[:, :, y1:y2, x1:x2] = out[permutation, :, y1:y2, x1:x2]
    return out
