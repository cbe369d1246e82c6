"""KIP: kernel inducing points.

Sources: Nguyen, Chen, Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", ICLR 2021
(Algorithm 1, eq. 2); Nguyen, Novak, Xiao, Lee, "Dataset Distillation with Infinitely Wide
Convolutional Networks", NeurIPS 2021; reference google-research/google-research ``kip/KIP.ipynb``
(JAX, neural-tangents kernels) and, for the ConvNet random-feature kernel, Loo et al., "Efficient
Dataset Distillation using Random Feature Approximation", NeurIPS 2022 (yolky/RFAD).

One iteration: draw a class-balanced batch of ``target_batch_size`` real images (x_t, y_t), with
y = one_hot - 1/K; predict them by kernel ridge regression on the support set (x_s, y_s),
``pred = K_ts (K_ss + reg * tr(K_ss)/n_s * I)^-1 y_s``; minimise ``0.5 * mean((pred - y_t)^2)``
with Adam over the support images (and, with ``--learn_labels``, the support labels y_s).

``--kernel conv_rf`` takes RFAD's settings for the flags left out (:func:`rfad_defaults`,
yolky/RFAD ``run_distillation.py`` and ``distillation.py``): ``n_batches`` 4 batches of 1280
uniformly drawn targets, ridge 5e-3, AdaBelief at lr 1e-3; ``--platt`` replaces the squared
error by RFAD's Platt-scaled cross-entropy ``CE(exp(k) * pred, argmax y_t)`` with a learned
temperature ``k``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F

import evaluation
import progress
import utils
from methods import kernels
from methods.addons.base import AFTER_IMAGE_UPDATE, IMAGE_LOSS
from methods.base import DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.options import MethodOptions, option

KERNELS = ("fc_ntk", "fc_nngp", "conv_rf")


def kip_loss(prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KIP's loss ``0.5 * mean((pred - y_t)^2)`` over every entry (``loss_acc_fn`` of
    google-research ``kip/KIP.ipynb``).

    Args:
        prediction: (n_t, K) kernel ridge regression predictions.
        targets: (n_t, K) regression targets (one_hot - 1/K).

    Returns:
        A scalar tensor.
    """
    return 0.5 * ((prediction - targets.to(prediction.dtype)) ** 2).mean()


KIP_REFERENCE = "google-research/google-research kip/KIP.ipynb"
RFAD_REFERENCE = "yolky/RFAD"
RFAD_SCRIPT = "yolky/RFAD run_distillation.py"
RFAD_DISTILL = "yolky/RFAD distillation.py (distill_dataset)"
IMAGE_OPTIMIZERS = ("adam", "adabelief")
TARGET_SAMPLINGS = ("balanced", "uniform")
# RFAD distillation.py: the Platt temperature k (exp(k) scales the predictions) starts at 0 and
# is stepped with lr 1e-2 ("a larger learning rate for k usually helps").
PLATT_LR = 1e-2


def rfad_defaults() -> Dict[str, Any]:
    """RFAD's settings where they differ from the KIP colab's (yolky/RFAD ``run_distillation.py``
    flags and ``distillation.py::distill_dataset``): ``lr_img`` 1e-3 (``--lr``), ``reg`` 5e-3
    (``--jit``, the same trace-scaled ridge), the AdaBelief optimiser (``torch_optimizer.AdaBelief``,
    eps 1e-16), ``n_batches`` 4 (``--n_batches``) of ``target_batch_size`` 1280 targets drawn
    uniformly over the training set (``np.random.choice(N, 1280, replace=False)`` per batch). The
    network (``--rf_model`` ConvNetRFAD: width 256, no normalisation, no 28->32 padding) and
    ``n_models`` 8 are KIP's defaults already (they only serve ``conv_rf``).

    Returns:
        flag name -> value, applied to the flags left out when ``--kernel conv_rf`` is given.
    """
    return {"lr_img": 1e-3, "reg": 5e-3, "img_optimizer": "adabelief", "target_sampling": "uniform", "n_batches": 4,
            "target_batch_size": 1280}


@dataclass(frozen=True)
class KIPOptions(MethodOptions):
    """KIP's own flags (defaults: the KIP colab, neural-tangents' ``stax`` standard deviations as
    the colab sets them, RFAD for the random-feature kernel)."""

    kernel: str = option("fc_ntk", "KIP: fc_ntk, fc_nngp (exact fully connected ReLU kernels) or conv_rf (ConvNet "
                         "NNGP from random networks, RFAD)", choices=KERNELS, source=KIP_REFERENCE)
    depth: int = option(1, "KIP: hidden layers of the fully connected kernel (KIP.ipynb DEPTH)", minimum=0,
                        source=KIP_REFERENCE)
    reg: float = option(1e-6, "KIP: ridge relative to tr(K_ss)/n_s (KIP.ipynb reg; conv_rf: 5e-3, RFAD --jit)",
                        minimum=0.0, source=KIP_REFERENCE)
    target_batch_size: int = option(5000, "KIP: real target images per batch (conv_rf: 1280, RFAD)", minimum=1,
                                    source=KIP_REFERENCE)
    n_batches: int = option(1, "KIP: target batches per iteration (conv_rf: 4, RFAD --n_batches)", minimum=1,
                            source=KIP_REFERENCE + " (one batch); " + RFAD_SCRIPT)
    target_sampling: str = option("balanced", "KIP: targets drawn class-balanced (KIP.ipynb class_balanced_sample) "
                                  "or uniform over the training set (conv_rf: uniform, RFAD)",
                                  choices=TARGET_SAMPLINGS, source=KIP_REFERENCE)
    img_optimizer: str = option("adam", "KIP: optimiser of the support (and learned labels): adam (KIP.ipynb) or "
                                "adabelief (conv_rf: RFAD's torch_optimizer.AdaBelief, eps 1e-16)",
                                choices=IMAGE_OPTIMIZERS, source=KIP_REFERENCE)
    platt: bool = option(False, "KIP: Platt scaling, cross-entropy of exp(k) * predictions with a learned k, "
                         "instead of the squared error (RFAD --platt)", source=RFAD_SCRIPT)
    learn_labels: bool = option(False, "KIP: also learn the support labels (KIP.ipynb LEARN_LABELS)",
                                source=KIP_REFERENCE)
    W_std: float = option(kernels.W_STD, "KIP: weight standard deviation of the kernel's network (neural-tangents "
                          "W_std)", minimum=0.0, exclusive_minimum=True, source=KIP_REFERENCE)
    b_std: float = option(kernels.B_STD, "KIP: bias standard deviation of the kernel's network (neural-tangents "
                          "b_std)", minimum=0.0, source=KIP_REFERENCE)
    n_models: int = option(8, "KIP conv_rf: random networks per iteration (RFAD --n_models)", minimum=1,
                           source=RFAD_REFERENCE)
    rf_model: str = option("ConvNetRFAD", "KIP conv_rf: the random network (RFAD's ConvNet_wide: width 256, no "
                           "normalisation, no 28->32 padding)", source=RFAD_REFERENCE + " models.py")


@register_method("KIP")
class KIP(DistillMethod):
    """Kernel inducing points (module docstring). Kernels (``--kernel``): ``fc_ntk`` (the KIP
    colab's default: the NTK of a fully connected ReLU network of ``--depth`` hidden layers),
    ``fc_nngp`` (its NNGP), both exact (``methods/kernels.py``, float64); ``conv_rf``: the NNGP of
    ``--rf_model`` approximated by ``--n_models`` random networks drawn afresh every iteration
    (RFAD). The paper's convolutional results use neural-tangents' exact infinite-width conv
    kernels, which are not reimplemented here.

    The support images (and learned labels) are stepped by one Adam(``--lr_img``) optimiser, as
    the colab's ``optimizers.adam(LEARNING_RATE)`` over ``{'x', 'y'}``. Networks evaluated on the
    set fit its labels with the square loss averaged over the classes (``--label_loss mse``:
    one_hot - 1/K, or the learned labels as they are), as the KIP papers' finite networks were
    trained (``kip/nn_training.ipynb`` ``loss_type='mse'``, ``0.5 * mean``).
    """

    # KIP.ipynb: SUPPORT_SIZE 100 (ipc 10 on 10 classes), LEARNING_RATE 4e-2, ~1000 steps, images
    # initialised from a class-balanced real sample; no augmentation.
    reference_model = None  # --model is only the evaluation network; the kernel is --kernel
    defaults = dict(ipc=10, iterations=1000, lr_img=0.04, lr_net=0.01, batch_real=256, batch_train=256,
                    init="real", dsa_strategy="", eval_mode="S")
    options_type = KIPOptions
    options: KIPOptions
    unused_flags = ("batch_real", "dis_metric", "outer_loop", "inner_loop")
    unused_hint = "KIP draws --target_batch_size real images per iteration"
    # Image-update terms join the KRR loss; networks fit its regression labels with the square
    # loss, so no (cross-entropy) training term.
    addon_hooks = frozenset({IMAGE_LOSS, AFTER_IMAGE_UPDATE})
    eval_label_loss = "mse"
    run_counts = (1, 5)  # one set, as the colab distils one; 5 evaluation networks (no reference count)
    # The colab normalises with each dataset's own mean/std, computed from its training images
    # (get_normalization_data); --norm_stats dc selects DC's fixed values.
    norm_stats = "train"

    @classmethod
    def resolved_defaults(cls, dataset: str, ipc: int, given: Mapping[str, Any]) -> Mapping[str, Any]:
        """RFAD's settings (:func:`rfad_defaults`) for the flags left out when ``--kernel conv_rf``
        is given; none otherwise (the colab's)."""
        return rfad_defaults() if given.get("kernel") == "conv_rf" else {}

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        if self.options.kernel == "conv_rf":
            try:
                kernels.RandomConvFeatures(self.options.rf_model, 1, channel=self.channel,
                                           num_classes=self.num_classes, im_size=self.im_size,
                                           device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
            except (KeyError, ValueError) as error:
                raise utils.UserError(f"--rf_model {self.options.rf_model!r}: {error}") from None
        self.last_accuracy = torch.zeros(())
        # --platt: the learned log-temperature k of RFAD (exp(k) scales the predictions), from 0.
        self.platt_k = torch.zeros((), dtype=torch.float64, device=self.device, requires_grad=True)

    # ---- set-up -------------------------------------------------------------------------
    def configure(self, syn: SyntheticSet) -> None:
        """The support's optimiser (``--img_optimizer``) at ``lr_img`` over the images and, with
        ``--learn_labels``, the labels (initialised at one_hot - 1/K), and with ``--platt`` the
        temperature at :data:`PLATT_LR`; then the add-ons attach."""
        params = [syn.images]
        if self.options.learn_labels:
            params.append(syn.learn_label_values(evaluation.centred_one_hot(syn.labels, self.num_classes)))
        groups = [{"params": params}] + ([{"params": [self.platt_k], "lr": PLATT_LR}] if self.options.platt else [])
        self.optimizer_img = image_optimizer(self.options.img_optimizer, groups, self.cfg.lr_img)
        for addon in self.addons:
            addon.attach(syn)

    # ---- the kernel ---------------------------------------------------------------------
    def support_labels(self, syn: SyntheticSet) -> torch.Tensor:
        """y_s (n_s, K): the learned labels (with a graph), or one_hot - 1/K of the classes."""
        if syn.label_values is not None:
            return syn.label_values
        return evaluation.centred_one_hot(syn.labels, self.num_classes)

    def sample_targets(self):
        """``n_batches`` batches of real targets and their labels one_hot - 1/K, concatenated:
        (n_t, C, H, W), (n_t, K). A ``balanced`` batch holds ``target_batch_size // K`` images per
        class (at least 1; clamped to the class size; the colab's ``class_balanced_sample``); a
        ``uniform`` one ``target_batch_size`` distinct images drawn over the whole training set
        (clamped to its size; RFAD's ``np.random.choice(N, 1280, replace=False)``). Batches are
        drawn independently (an image may appear in two)."""
        images, labels = [], []
        for _ in range(self.options.n_batches):
            if self.options.target_sampling == "uniform":
                count = len(self.sampler)
                index = torch.randperm(count, generator=self.generator)[:min(self.options.target_batch_size, count)]
                index = index.to(self.sampler.images.device)
                images.append(self.sampler.images[index])
                labels.append(self.sampler.labels[index].to(self.device))
                continue
            per_class = max(1, self.options.target_batch_size // self.num_classes)
            for c in range(self.num_classes):
                real = self.sampler.get_images(c, per_class, self.generator)
                images.append(real)
                labels.append(torch.full((real.shape[0],), c, dtype=torch.long, device=self.device))
        return torch.cat(images), evaluation.centred_one_hot(torch.cat(labels), self.num_classes)

    def kernel_matrices(self, image_syn: torch.Tensor, image_target: torch.Tensor):
        """``(K_ts (n_t, n_s), K_ss (n_s, n_s))`` in float64, with a graph to ``image_syn``."""
        opts = self.options
        if opts.kernel == "conv_rf":
            pool = kernels.RandomConvFeatures(opts.rf_model, opts.n_models, channel=self.channel,
                                              num_classes=self.num_classes, im_size=self.im_size, device=self.device,
                                              generator=self.generator, w_std=opts.W_std, b_std=opts.b_std)
            f_s = pool.features(image_syn)
            with torch.no_grad():
                f_t = torch.cat([pool.features(chunk) for chunk in image_target.split(1024)])
            return pool.kernel_from_features(f_t, f_s), pool.kernel_from_features(f_s, f_s)
        which = 1 if opts.kernel == "fc_ntk" else 0
        x_s, x_t = image_syn.double(), image_target.double()
        k_ss = kernels.fc_kernels(x_s, x_s, opts.depth, opts.W_std, opts.b_std)[which]
        k_ts = kernels.fc_kernels(x_t, x_s, opts.depth, opts.W_std, opts.b_std)[which]
        return k_ts, k_ss

    def amp_note(self) -> Optional[str]:
        """``fc_ntk`` / ``fc_nngp``: the exact kernels compute in float64 (:meth:`kernel_matrices`),
        so ``--amp`` leaves the distillation unchanged; ``conv_rf`` runs its random networks under
        autocast (``None``)."""
        if self.options.kernel == "conv_rf":
            return None
        return (f"--amp {self.precision.amp}: KIP --kernel {self.options.kernel} computes its kernel in float64, "
                f"so the distillation is unchanged (only the evaluation networks use {self.precision.amp}; "
                f"--kernel conv_rf runs its networks in {self.precision.amp})")

    def loss(self, syn: SyntheticSet) -> torch.Tensor:
        """KIP's loss on a fresh target batch (module docstring); keeps the batch's KRR accuracy
        in ``self.last_accuracy``.

        Returns:
            A float64 scalar with a graph to ``syn.images`` (and the learned labels).
        """
        image_target, y_target = self.sample_targets()
        k_ts, k_ss = self.kernel_matrices(syn.images, image_target)
        prediction = kernels.kernel_ridge_regression(k_ts, k_ss, self.support_labels(syn), self.options.reg)
        self.last_accuracy = (prediction.detach().argmax(1) == y_target.argmax(1)).float().mean()
        if self.options.platt:
            return platt_loss(prediction, y_target, self.platt_k)
        return kip_loss(prediction, y_target)

    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """The base step (loss, one optimiser step, add-on work), also logging ``krr_acc``: the KRR
        accuracy on this iteration's target batch before the step (the colab's ``train acc``), and
        with ``--platt`` the temperature ``platt_k``."""
        logs = super().step(syn, iteration)
        logs["krr_acc"] = self.last_accuracy
        if self.options.platt:
            logs["platt_k"] = self.platt_k.detach().clone()
        return logs

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The base state (optimiser moments, add-ons) and the Platt temperature."""
        return {**super().state_dict(), "platt_k": self.platt_k.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`configure`); checkpoints written
        before ``--platt`` existed have no temperature and keep 0."""
        super().load_state_dict(state)
        if state.get("platt_k") is not None:
            with torch.no_grad():
                self.platt_k.copy_(state["platt_k"])


def image_optimizer(name: str, groups: list, lr: float) -> torch.optim.Optimizer:
    """The support's optimiser over parameter ``groups`` (``torch.optim`` group dicts) at ``lr``:

    * ``adam``: ``torch.optim.Adam`` with its defaults (the colab's ``optimizers.adam``);
    * ``adabelief``: timm's ``AdaBelief`` (huggingface/pytorch-image-models
      ``timm/optim/adabelief.py``, a maintained package the toolkit already needs for LAMB) set to
      RFAD's ``torch_optimizer.AdaBelief(lr=lr, eps=1e-16)``: betas (0.9, 0.999), no weight decay,
      no rectification (its default there; timm rectifies unless told not to). The two agree to
      1e-17 over 50 steps on a test problem.

    Raises:
        ValueError: an unknown ``name``.
        utils.UserError: ``adabelief`` without timm installed.
    """
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name != "adabelief":
        raise ValueError(f"img_optimizer {name!r}: expected one of {', '.join(IMAGE_OPTIMIZERS)}")
    try:
        from timm.optim import AdaBelief
    except ImportError:
        raise utils.UserError("--img_optimizer adabelief needs timm (pip install timm)") from None
    return AdaBelief(groups, lr=lr, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, rectify=False)


def platt_loss(prediction: torch.Tensor, targets: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """RFAD's Platt-scaled loss (yolky/RFAD ``distillation.py``, ``--platt``):
    ``CrossEntropy(exp(k) * pred, argmax y_t)``, the mean over the targets.

    Args:
        prediction: (n_t, K) kernel ridge regression predictions.
        targets: (n_t, K) regression targets (one_hot - 1/K); their argmax is the class.
        k: scalar log-temperature (learned).

    Returns:
        A scalar tensor with graphs to ``prediction`` and ``k``.
    """
    return F.cross_entropy(torch.exp(k).to(prediction.dtype) * prediction, targets.argmax(1))


def krr_accuracy(image_syn: torch.Tensor, label_syn: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                 num_classes: int, kernel: str = "fc_ntk", depth: int = 1, reg: float = 1e-6,
                 w_std: float = kernels.W_STD, b_std: float = kernels.B_STD, chunk: int = 2000) -> float:
    """Accuracy of kernel ridge regression on a support set: the KIP papers' headline measure
    (the colab's ``test acc``), without training any network.

    Args:
        image_syn: (n_s, C, H, W) support images; label_syn: (n_s,) class indices (taken as
            one_hot - 1/K) or (n_s, K) real-valued labels.
        images, labels: (M, C, H, W) and (M,) the images to classify (e.g. the real test set).
        num_classes: K.
        kernel: ``fc_ntk`` or ``fc_nngp`` (the exact kernels; ``conv_rf`` is random, so not offered).
        depth, reg, w_std, b_std: as the KIP options.
        chunk: test images per kernel block (does not change the result).

    Returns:
        The fraction in [0, 1] of ``images`` whose KRR prediction's argmax is their label.

    Raises:
        ValueError: ``kernel`` is not an exact kernel.
    """
    if kernel not in ("fc_ntk", "fc_nngp"):
        raise ValueError(f"kernel {kernel!r}: krr_accuracy takes fc_ntk or fc_nngp")
    which = 1 if kernel == "fc_ntk" else 0
    x_s = image_syn.detach().double()
    y_s = evaluation.regression_targets(label_syn.detach(), num_classes).to(x_s.device)
    k_ss = kernels.fc_kernels(x_s, x_s, depth, w_std, b_std)[which]
    correct = 0
    for x, y in zip(images.split(chunk), labels.split(chunk)):
        progress.tick()
        k_ts = kernels.fc_kernels(x.double().to(x_s.device), x_s, depth, w_std, b_std)[which]
        prediction = kernels.kernel_ridge_regression(k_ts, k_ss, y_s, reg)
        correct += int((prediction.argmax(1).cpu() == y.cpu()).sum())
    return correct / max(labels.shape[0], 1)
