"""RDED: real patches the teacher is most confident about, stitched into synthetic images.

Source: Sun, Shi, Zhang, Ji, Zhou, Zhu & Lin, "On the Diversity and Realism of Distilled Dataset: An
Efficient Dataset Distillation Paradigm", CVPR 2024; LINs-lab/RDED ``synthesize/main.py``
(``init_images``) and ``synthesize/utils.py`` (``MultiRandomCrop``, ``selector``, ``mix_images``).

Per class:

1. ``mipc`` real training images are drawn at random (all of them when the class has fewer).
2. From each, ``num_crop`` square RandomResizedCrop patches (scale 0.08-1, ratio 1) of side
   ``size // factor`` are cut (bilinear, antialiased).
3. Each patch, zero-padded (centred) to the full image size, is scored by the teacher's
   cross-entropy on its class, ``-log softmax(teacher(patch))_y``; each image keeps its lowest-CE
   patch, and the ``ipc * factor^2`` lowest of those are kept, in increasing CE.
4. ``factor x factor`` patches are stitched into each of the ``ipc`` images: grid cell k (row-major)
   of every image takes the kept patches ``k*ipc .. (k+1)*ipc - 1`` resized (nearest) to the cell,
   the first ``size % factor`` rows and columns one pixel larger.

A selection method: no iteration; the set is the result (like ``methods/coreset.py``). ``factor``
is 1 below 128 px and 2 from 128 px on (the reference's scripts: CIFAR and Tiny 1, ImageNet
subsets at 128 and 224 px 2) unless given.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from methods.base import SyntheticSet
from methods.registry import register_method
from methods.coreset import CoresetMethod
from methods.options import MethodOptions, option
from methods.sre2l import random_resized_crop_box

logger = logging.getLogger(__name__)

RDED_SCRIPTS = "LINs-lab/RDED scripts/*_cr5.sh"
RDED_ARGUMENTS = "LINs-lab/RDED argument.py"

# RDED validation/main.py: the teacher is queried online on every CutMix batch (nothing stored);
# AdamW with a cosine schedule, RandomResizedCrop views (``evaluation.EvalProtocol`` fields).
TEACHER_LABEL_PROTOCOL = {"labels": "teacher", "optimizer": "adamw", "student_aug": "rrc", "mix_type": "cutmix"}


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------
def auto_factor(im_size: Tuple[int, int]) -> int:
    """RDED's ``factor`` for an image size: 2 from 128 px on, else 1 (the reference's scripts)."""
    return 2 if min(im_size) >= 128 else 1


def pad_to(patches: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) zero-padded to (B, C, *size), centred (the extra pixel after), as RDED's ``pad``."""
    dh, dw = size[0] - patches.shape[-2], size[1] - patches.shape[-1]
    return F.pad(patches, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def patch_cross_entropy(teacher: nn.Module, patches: torch.Tensor, label: int, size: Tuple[int, int],
                        chunk: int = 256) -> torch.Tensor:
    """The teacher's cross-entropy of each patch on class ``label``, ``-log softmax(teacher(pad(p)))_label``
    (RDED ``selector``'s ``cross_entropy`` on zero-padded patches).

    Args:
        teacher: (B, C, H, W) -> (B, K) logits, eval mode.
        patches: (P, C, h, w).
        size: (H, W) the teacher's input size.
        chunk: patches per forward pass.

    Returns:
        (P,) float32.
    """
    scores = []
    with torch.no_grad():
        for start in range(0, patches.shape[0], chunk):
            logits = teacher(pad_to(patches[start:start + chunk], size)).float()
            scores.append(-F.log_softmax(logits, dim=1)[:, label])
    return torch.cat(scores)


def select_patches(scores: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """RDED ``selector``: each image's lowest-score crop, then the ``count`` lowest images.

    Args:
        scores: (N, M) cross-entropy of crop m of image n.
        count: how many to keep (<= N).

    Returns:
        (image indices (count,), crop indices (count,)) in increasing score (ties: lower index first).
    """
    best, crop = scores.min(dim=1)
    order = torch.argsort(best, stable=True)[:count]
    return order, crop[order]


def stitch(patches: torch.Tensor, factor: int, n: int, size: Tuple[int, int]) -> torch.Tensor:
    """RDED ``mix_images``: ``n`` images of ``size`` each a ``factor x factor`` grid; cell k
    (row-major) of image i is ``patches[k * n + i]`` resized (nearest) to the cell; the first
    ``size % factor`` rows / columns of cells are one pixel larger.

    Args:
        patches: (factor^2 * n, C, h, w).

    Returns:
        (n, C, *size).
    """
    out = patches.new_zeros((n, patches.shape[1], *size))
    base_h, extra_h = divmod(size[0], factor)
    base_w, extra_w = divmod(size[1], factor)
    k, top = 0, 0
    for i in range(factor):
        cell_h = base_h + 1 if i < extra_h else base_h
        left = 0
        for j in range(factor):
            cell_w = base_w + 1 if j < extra_w else base_w
            out[:, :, top:top + cell_h, left:left + cell_w] = F.interpolate(patches[k * n:(k + 1) * n],
                                                                            size=(cell_h, cell_w))
            left += cell_w
            k += 1
        top += cell_h
    return out


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RDEDOptions(MethodOptions):
    """RDED's synthesis flags (the published scripts' values; ``argument.py``'s code defaults in the help)."""

    mipc: int = option(300, "RDED: real candidate images drawn per class (argument.py default 600)", minimum=1,
                       source=RDED_SCRIPTS)
    num_crop: int = option(5, "RDED: RandomResizedCrop patches scored per candidate (argument.py default 1)",
                           minimum=1, source=RDED_SCRIPTS)
    factor: int = option(0, "RDED: factor x factor patches stitched into each image (0: 1 below 128 px, else 2)",
                         minimum=0, source=RDED_SCRIPTS)


@register_method("RDED")
class RDED(CoresetMethod):
    """RDED synthesis (module docstring) with the run's teacher and generator."""

    defaults = dict(ipc=10, iterations=0, init="real", eval_mode="S")
    options_type = RDEDOptions
    options: RDEDOptions
    needs_teacher = True
    run_counts = (1, 5)
    # RDED validation/main.py --re-epochs 300.
    eval_epochs = (300, 300)
    eval_student_defaults = TEACHER_LABEL_PROTOCOL

    @property
    def factor(self) -> int:
        """``--factor``, or :func:`auto_factor` of the image size when 0."""
        return self.options.factor or auto_factor(self.im_size)

    def crops(self, images: torch.Tensor) -> torch.Tensor:
        """``num_crop`` square patches of side ``size // factor`` per image (RDED ``MultiRandomCrop``),
        drawn image by image from the run's generator.

        Args:
            images: (N, C, H, W).

        Returns:
            (N, num_crop, C, H // factor, W // factor).
        """
        height, width = self.im_size
        out = (height // self.factor, width // self.factor)
        patches = []
        for image in images:
            for _ in range(self.options.num_crop):
                top, left, h, w = random_resized_crop_box(height, width, (0.08, 1.0), self.generator, ratio=(1.0, 1.0))
                patches.append(F.interpolate(image[None, :, top:top + h, left:left + w], size=out, mode="bilinear",
                                             align_corners=False, antialias=True))
        return torch.cat(patches).view(images.shape[0], self.options.num_crop, images.shape[1], *out)

    def synthesize_class(self, c: int) -> torch.Tensor:
        """Class ``c``'s ``ipc`` stitched images (steps 1-4 of the module docstring).

        Raises:
            utils.UserError: fewer than ``ipc * factor^2`` candidates (``--mipc`` or the class too small).
        """
        indices = self.class_indices(c)
        chosen = indices[torch.randperm(indices.numel(), generator=self.generator)[:self.options.mipc].to(indices.device)]
        need = self.cfg.ipc * self.factor ** 2
        if chosen.numel() < need:
            raise utils.UserError(f"--mipc {self.options.mipc}: class {c} gives {chosen.numel()} candidates, but "
                                  f"--ipc {self.cfg.ipc} with --factor {self.factor} needs {need}")
        patches = self.crops(self.sampler.images[chosen])
        n, m = patches.shape[:2]
        scores = patch_cross_entropy(self.teacher, patches.flatten(0, 1), c, self.im_size).view(n, m)
        images, crops = select_patches(scores, need)
        return stitch(patches[images, crops], self.factor, self.cfg.ipc, self.im_size)

    def init_synthetic(self) -> SyntheticSet:
        """The stitched images of every class, class-major, with hard labels.

        Raises:
            utils.UserError: no teacher, or too few candidates (:meth:`synthesize_class`).
        """
        with self.precision.autocast(self.device):
            images = torch.cat([self.synthesize_class(c) for c in range(self.num_classes)]).float()
        logger.info("RDED: %d images per class from %d candidates x %d crops, factor %d", self.cfg.ipc,
                    self.options.mipc, self.options.num_crop, self.factor)
        labels = SyntheticSet.class_major_labels(self.num_classes, self.cfg.ipc, device=self.device)
        syn = SyntheticSet(images.to(self.device), labels, self.num_classes, self.cfg.ipc)
        syn.images.requires_grad_(False)
        return syn
