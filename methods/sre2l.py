"""SRe2L and CDA: images recovered from noise by matching a frozen teacher's BatchNorm statistics.

* **SRe2L** (Yin, Xing & Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale
  From A New Perspective", NeurIPS 2023; VILA-Lab/SRe2L ``SRe2L/recover/data_synthesis.py`` with the
  settings of ``recover.sh``). Each batch holds one image per class (``batch_size`` classes at a
  time), starts from N(0, 1) noise and is optimised against the teacher (eval mode, frozen) with

      L = CE(teacher(A(x)), y) + r_bn * sum_l m_l (||sigma^2_l - running_var_l||_2 + ||mu_l - running_mean_l||_2)

  where mu_l, sigma^2_l are the per-channel mean and biased variance of the input of the teacher's
  l-th ``BatchNorm2d`` over the augmented batch, m_1 = ``first_bn_multiplier`` (10) and m_l = 1
  after (``BNFeatureHook`` in the reference's ``utils.py``). A is one RandomResizedCrop (scale
  0.08-1, ratio 3/4-4/3) and one horizontal flip (p 0.5) shared by the batch, then a ``torch.roll``
  by (0..jitter, 0..jitter) pixels. Adam (lr ``--lr_img`` 0.25, betas (0.5, 0.9), eps 1e-8) with a
  cosine decay to 0 and no warm-up (``lr_cosine_policy``); after each step every pixel is clipped to
  the valid normalised range; the last iterate is kept.
* **CDA** (Yin & Shen, "Dataset Distillation via Curriculum Data Synthesis in Large Data Era",
  TMLR 2024; ``CDA/recover_cda_in1k.py``): SRe2L with a curriculum on the crop scale's lower bound,
  from 1.0 down to 0.08 over the first ``milestone`` x ``--Iteration`` iterations
  (``--easy2hard_mode`` cosine, linear or step).

The ipc batches of a run are optimised together, one independent batch per ipc index: each batch
has its own augmentation draw and BatchNorm statistics, and Adam works per pixel, so one step on
the sum of the batches' losses is the reference's separate loops run side by side.

The BatchNorm term's size depends on the teacher's architecture (ResNet-50's is about 100 times
ResNet-18's), so a fixed ``r_bn`` does not transfer: the unweighted sum at the first step is
logged and recorded (:attr:`SRe2L.bn_report`) so that ``r_bn`` can be rescaled.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from methods.base import DistillConfig, DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.options import MethodOptions, option

logger = logging.getLogger(__name__)

SRE2L_REFERENCE = "VILA-Lab/SRe2L SRe2L/recover/data_synthesis.py"
SRE2L_SCRIPT = "VILA-Lab/SRe2L SRe2L/recover/recover.sh"
CDA_REFERENCE = "VILA-Lab/SRe2L CDA/recover_cda_in1k.py"
SRE2L_SMALL = "VILA-Lab/SRe2L SRe2L/*small_dataset/recover_cifar.py and recover_cifar.sh"
# Datasets of at most 32 pixels a side: SRe2L recovers them as its CIFAR code does (SRE2L_SMALL).
SMALL_DATASETS = ("mnist", "fashionmnist", "svhn", "cifar10", "cifar100")


def sre2l_dataset_defaults(dataset: str) -> Dict[str, Any]:
    """SRe2L's settings for images of at most 32 pixels (``SRe2L/*small_dataset/recover_cifar.py``:
    ``--jitter`` default 4; ``recover_cifar.sh``: ``--iteration 1000``) on MNIST, Fashion-MNIST,
    SVHN, CIFAR-10 and CIFAR-100; none for larger images (ImageNet's ``recover.sh``: jitter 32,
    4000 iterations, the class defaults).

    Args:
        dataset: a ``--dataset`` name in any case.

    Returns:
        ``{'jitter': 4, 'Iteration': 1000}`` or ``{}``.
    """
    return {"jitter": 4, "Iteration": 1000} if dataset.lower() in SMALL_DATASETS else {}
CDA_README = "VILA-Lab/SRe2L CDA/README.md (recover commands)"
EASY2HARD_MODES = ("cosine", "linear", "step")

# The evaluation the references pair with these sets (SRe2L validate/train_FKD.py): the relabelled
# soft labels, AdamW with a cosine schedule, RandomResizedCrop + flip views and CutMix
# (``evaluation.EvalProtocol`` fields of the soft-label protocol).
SOFT_LABEL_PROTOCOL = {"labels": "soft", "optimizer": "adamw", "student_aug": "rrc", "mix_type": "cutmix"}


# --------------------------------------------------------------------------------------------
# The BatchNorm statistics loss (pure functions and a hook)
# --------------------------------------------------------------------------------------------
def bn_feature_distance(features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """``||var - running_var||_2 + ||mean - running_mean||_2`` for one BatchNorm layer's input,
    with the per-channel mean and biased variance over batch and space (SRe2L ``BNFeatureHook``).

    Args:
        features: (B, C, H, W) the input of a ``BatchNorm2d`` (computed in float32).
        running_mean, running_var: (C,) that layer's running statistics.

    Returns:
        A scalar tensor (graph to ``features``).
    """
    x = features.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
    return torch.norm(running_var.float() - var, 2) + torch.norm(running_mean.float() - mean, 2)


class BNStatistics:
    """The BatchNorm statistics loss of a teacher: inside ``with`` it holds forward hooks on every
    ``BatchNorm2d`` of ``networks`` recording, at each forward pass, :func:`bn_feature_distance` of
    the layer's input; :meth:`loss` sums them with the first layer of each network weighted by
    ``first_multiplier`` (SRe2L ``loss_r_bn_feature``). The hooks are removed on leaving, so the
    teacher's other uses (relabelling, evaluation) never run them.

    Args:
        networks: the teacher's networks (several teachers: each network's first layer is weighted).
        first_multiplier: m_1 (``--first_bn_multiplier``).

    Raises:
        utils.UserError: no network has a ``BatchNorm2d`` layer (nothing to match).
    """

    def __init__(self, networks: Sequence[nn.Module], first_multiplier: float):
        self.layers: List[nn.BatchNorm2d] = []
        self.weights: List[float] = []
        for net in networks:
            layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
            self.layers += layers
            self.weights += ([first_multiplier] + [1.0] * (len(layers) - 1)) if layers else []
        if not self.layers:
            raise utils.UserError("SRe2L/CDA match the teacher's BatchNorm statistics, but the teacher has no "
                                  "BatchNorm2d layer: give a BatchNorm model (e.g. --teacher_model ConvNetBN)")
        self.distances: Dict[int, torch.Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> "BNStatistics":
        self.distances = {}
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.distances = [], {}

    def _hook(self, index: int):
        def record(module: nn.BatchNorm2d, inputs, output) -> None:
            self.distances[index] = bn_feature_distance(inputs[0], module.running_mean, module.running_var)
        return record

    def loss(self) -> torch.Tensor:
        """sum_l m_l * distance_l of the last forward pass (a scalar with a graph to its input).

        Raises:
            RuntimeError: a layer was not reached by the last forward pass.
        """
        if len(self.distances) != len(self.layers):
            raise RuntimeError("BNStatistics: the last forward pass did not reach every BatchNorm layer")
        total = sum(w * self.distances[i] for i, w in enumerate(self.weights))
        self.distances = {}
        return total


# --------------------------------------------------------------------------------------------
# Augmentation shared by a batch (RandomResizedCrop + flip + roll), drawn from a generator
# --------------------------------------------------------------------------------------------
def random_resized_crop_box(height: int, width: int, scale: Tuple[float, float], generator: torch.Generator,
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` with ``generator``: up to 10 draws of an area
    fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, else the central crop.

    Returns:
        (top, left, h, w) in pixels.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        target_area = area * (scale[0] + (scale[1] - scale[0]) * float(u[0]))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(u[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def batch_view(images: torch.Tensor, min_scale: float, jitter: int, generator: torch.Generator) -> torch.Tensor:
    """One augmentation for the whole batch (SRe2L's transforms applied to the batched tensor):
    RandomResizedCrop (scale ``min_scale``-1, bilinear back to the input size), a horizontal flip
    with probability 0.5, then ``torch.roll`` by (0..jitter, 0..jitter) pixels.

    Args:
        images: (B, C, H, W).

    Returns:
        (B, C, H, W) with a graph to ``images``.
    """
    height, width = images.shape[-2:]
    top, left, h, w = random_resized_crop_box(height, width, (min_scale, 1.0), generator)
    view = F.interpolate(images[..., top:top + h, left:left + w], size=(height, width), mode="bilinear",
                         align_corners=False)
    if float(torch.rand(1, generator=generator)) < 0.5:
        view = view.flip(-1)
    shifts = torch.randint(0, jitter + 1, (2,), generator=generator)
    return torch.roll(view, shifts=(int(shifts[0]), int(shifts[1])), dims=(2, 3))


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """SRe2L ``lr_cosine_policy(base_lr, 0, total)`` at 0-based ``step``: 0.5 (1 + cos(pi step / total)) base_lr."""
    return 0.5 * (1 + math.cos(math.pi * step / total)) * base_lr


def curriculum_min_scale(step: int, total: int, mode: str, milestone: float, final: float = 0.08) -> float:
    """CDA's lower bound of the crop scale at 0-based ``step`` of ``total``: before
    ``milestone * total`` it is 1 (``step``), falls linearly from 1 (``linear``) or along a half
    cosine from 1 (``cosine``) towards ``final``; ``final`` (0.08) afterwards (``recover_cda_in1k.py``).

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in EASY2HARD_MODES:
        raise ValueError(f"--easy2hard_mode {mode!r}: expected one of {', '.join(EASY2HARD_MODES)}")
    span = milestone * total
    if step >= span:
        return final
    if mode == "step":
        return 1.0
    if mode == "linear":
        return final + (1.0 - final) * (1 - step / span)
    return final + (1.0 - final) * (1 + math.cos(math.pi * step / span)) / 2


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SRe2LOptions(MethodOptions):
    """SRe2L's recovery flags (``recover.sh``; the code defaults in brackets in the help)."""

    r_bn: float = option(0.01, "SRe2L/CDA: weight of the BatchNorm statistics loss (code default 0.05; rescale it "
                         "per teacher architecture: the first step's BN loss is logged)", minimum=0.0,
                         source=SRE2L_SCRIPT)
    first_bn_multiplier: float = option(10.0, "SRe2L/CDA: multiplier of the first BatchNorm layer's term",
                                        minimum=0.0, source=SRE2L_REFERENCE)
    jitter: int = option(32, "SRe2L/CDA: random shift (torch.roll) of 0..jitter pixels each step (the reference's "
                         "32 for 224 px; its CIFAR code's 4 on datasets of at most 32 px)", minimum=0,
                         source=SRE2L_REFERENCE)
    batch_size: int = option(100, "SRe2L/CDA: classes optimised together in one batch (one image each); the "
                             "BatchNorm statistics span the batch", minimum=1, source=SRE2L_REFERENCE)


@dataclass(frozen=True)
class CDAOptions(SRe2LOptions):
    """SRe2L's flags plus CDA's crop-scale curriculum."""

    easy2hard_mode: str = option("cosine", "CDA: how the crop scale's lower bound falls from 1 to 0.08",
                                 choices=EASY2HARD_MODES, source=CDA_REFERENCE)
    milestone: float = option(1.0, "CDA: fraction of --Iteration over which the lower bound falls (0: none; "
                              "code default 0, the published commands 1)", minimum=0.0, maximum=1.0,
                              source=CDA_README)


@register_method("SRe2L")
class SRe2L(DistillMethod):
    """SRe2L recovery (module docstring): ``--Iteration`` steps of Adam on noise images against a
    frozen teacher's cross-entropy and BatchNorm statistics; no real image is used."""

    reference_model = None  # teacher-driven: the reference networks are ImageNet/CIFAR ResNets
    defaults = dict(ipc=10, iterations=4000, lr_img=0.25, init="noise", dsa_strategy="", eval_mode="S")
    options_type = SRe2LOptions
    options: SRe2LOptions
    init_choices = ("noise",)
    unused_flags = ("dis_metric", "outer_loop", "inner_loop", "batch_real", "dsa_strategy")
    unused_hint = "SRe2L/CDA recover images from the teacher alone"
    needs_teacher = True
    # Add-ons act on the matching family's losses and networks; none is tested here.
    addon_hooks = frozenset()
    loss_functions = ("recovery_loss",)
    # Only the last iterate is kept: evaluate at the end unless --eval_it says otherwise.
    default_eval_it = 0
    run_counts = (1, 5)
    # SRe2L validate/train_FKD.py trains the student 300 epochs (ImageNet-1K).
    eval_epochs = (300, 300)
    eval_student_defaults = SOFT_LABEL_PROTOCOL

    @classmethod
    def resolved_defaults(cls, dataset: str, ipc: int, given: Mapping[str, Any]) -> Mapping[str, Any]:
        """:func:`sre2l_dataset_defaults` (``--jitter`` and ``--Iteration`` of the CIFAR code on
        datasets of at most 32 px) for the flags left out."""
        return sre2l_dataset_defaults(dataset)

    def __init__(self, cfg: DistillConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.bn_hooks: Optional[BNStatistics] = None
        self.pixel_range: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        # The unweighted BatchNorm loss and the cross-entropy at the first step (bn_report).
        self.first_step: Optional[Dict[str, float]] = None

    def configure(self, syn: SyntheticSet) -> None:
        """Adam(lr_img, betas (0.5, 0.9), eps 1e-8) on the images (the rate is set every step)."""
        self.optimizer_img = torch.optim.Adam([syn.images], lr=self.cfg.lr_img, betas=(0.5, 0.9), eps=1e-8)

    def init_synthetic(self) -> SyntheticSet:
        """N(0, 1) noise, class-major; the teacher's BatchNorm hooks and the valid pixel range.

        Raises:
            utils.UserError: no teacher was given, or it has no BatchNorm layer.
        """
        teacher = self.teacher
        self.bn_hooks = BNStatistics(list(getattr(teacher, "networks", [teacher])), self.options.first_bn_multiplier)
        # Per channel, the range the real training images span in the normalised space: the valid
        # range [-m/s, (1-m)/s] of SRe2L's clip() wherever some pixel reaches 0 and 1.
        real = self.sampler.images.transpose(0, 1).reshape(self.channel, -1)
        shape = (1, self.channel, 1, 1)
        self.pixel_range = (real.min(dim=1).values.view(shape), real.max(dim=1).values.view(shape))
        return super().init_synthetic()

    def batches(self, syn: SyntheticSet) -> List[torch.Tensor]:
        """The positions in ``syn`` of each batch: for each ipc index, the classes in chunks of
        ``batch_size`` (one image per class), as the reference's loops over ``ipc_id`` and classes."""
        k, ipc, size = self.num_classes, syn.ipc, self.options.batch_size
        return [torch.arange(start, min(start + size, k)) * ipc + j
                for j in range(ipc) for start in range(0, k, size)]

    def min_scale(self, step: int) -> float:
        """The crop scale's lower bound at 0-based ``step``: 0.08 (SRe2L)."""
        return 0.08

    def recovery_loss(self, syn: SyntheticSet, step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Sum over the batches of CE(teacher(A(x)), y) + r_bn * BN(x) (module docstring).

        Returns:
            (the summed loss with a graph to ``syn.images``, per-batch means of ``loss``, ``loss_ce``
            and ``loss_bn`` (unweighted) for the log).
        """
        total, ce_sum, bn_sum = 0.0, 0.0, 0.0
        batches = self.batches(syn)
        with self.bn_hooks as hooks:
            for index in batches:
                index = index.to(syn.images.device)
                view = batch_view(syn.images[index], self.min_scale(step), self.options.jitter, self.generator)
                ce = F.cross_entropy(self.teacher(view).float(), syn.labels[index])
                bn = hooks.loss()
                total = total + ce + self.options.r_bn * bn
                ce_sum, bn_sum = ce_sum + ce.detach(), bn_sum + bn.detach()
        n = len(batches)
        return total, {"loss": total.detach() / n, "loss_ce": ce_sum / n, "loss_bn": bn_sum / n}

    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """One Adam step at the cosine rate of ``iteration`` (1-based; the reference's 0-based
        ``iteration - 1``), then the pixels clipped to the valid range.

        Returns:
            ``{'loss', 'loss_ce', 'loss_bn'}`` (per-batch means, detached).
        """
        step = iteration - 1
        for group in self.optimizer_img.param_groups:
            group["lr"] = cosine_lr(self.cfg.lr_img, step, self.cfg.iterations)
        with self.precision.autocast(self.device):
            loss, logs = self.recovery_loss(syn, step)
        self.update_images(syn, loss)
        with torch.no_grad():
            syn.images.data = torch.maximum(torch.minimum(syn.images.data, self.pixel_range[1]), self.pixel_range[0])
        if self.first_step is None:
            self.first_step = {"loss_bn": float(logs["loss_bn"]), "loss_ce": float(logs["loss_ce"])}
            report = self.bn_report
            logger.info("%s: BatchNorm loss at the first step %.4g over %d layers of the teacher (r_bn x BN = %.4g "
                        "beside CE %.4g): rescale --r_bn when the teacher's architecture changes",
                        self.name, report["bn_loss_first_step"], report["bn_layers"], report["weighted_bn_first_step"],
                        report["ce_first_step"])
        return logs

    @property
    def bn_report(self) -> Optional[dict]:
        """The BatchNorm-loss weight of this teacher's architecture: the unweighted BN loss (mean
        over the batches) and the cross-entropy at the first step, ``r_bn`` times the former, and
        the number of BatchNorm layers; ``None`` before the first step."""
        if self.first_step is None:
            return None
        return {"bn_loss_first_step": self.first_step["loss_bn"], "ce_first_step": self.first_step["loss_ce"],
                "r_bn": self.options.r_bn, "weighted_bn_first_step": self.options.r_bn * self.first_step["loss_bn"],
                "bn_layers": len(self.bn_hooks.layers) if self.bn_hooks is not None else None}

    def run_records(self) -> dict:
        """What ``results.json`` records of this run beside the configuration: ``bn_report``."""
        return {"bn_report": self.bn_report}

    def state_dict(self) -> dict:
        """The image optimiser's moments and the first step's losses."""
        return {**super().state_dict(), "first_step": self.first_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`init_synthetic`)."""
        super().load_state_dict(state)
        self.first_step = state.get("first_step")


@register_method("CDA")
class CDA(SRe2L):
    """SRe2L with CDA's crop-scale curriculum (:func:`curriculum_min_scale`)."""

    options_type = CDAOptions
    options: CDAOptions

    def min_scale(self, step: int) -> float:
        """CDA's curriculum bound at 0-based ``step`` of ``--Iteration``."""
        return curriculum_min_scale(step, self.cfg.iterations, self.options.easy2hard_mode, self.options.milestone)
