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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

import evaluation
import progress
import utils
from methods import kernels
from methods.addons.base import AFTER_IMAGE_UPDATE, IMAGE_LOSS
from methods.base import DistillMethod, SyntheticSet, register_method
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


@dataclass(frozen=True)
class KIPOptions(MethodOptions):
    """KIP's own flags (defaults: the KIP colab, neural-tangents' ``stax`` standard deviations as
    the colab sets them, RFAD for the random-feature kernel)."""

    kernel: str = option("fc_ntk", "KIP: fc_ntk, fc_nngp (exact fully connected ReLU kernels) or conv_rf (ConvNet "
                         "NNGP from random networks, RFAD)", choices=KERNELS, source=KIP_REFERENCE)
    depth: int = option(1, "KIP: hidden layers of the fully connected kernel (KIP.ipynb DEPTH)", minimum=0,
                        source=KIP_REFERENCE)
    reg: float = option(1e-6, "KIP: ridge relative to tr(K_ss)/n_s (KIP.ipynb reg)", minimum=0.0,
                        source=KIP_REFERENCE)
    target_batch_size: int = option(5000, "KIP: class-balanced real target images per iteration", minimum=1,
                                    source=KIP_REFERENCE)
    learn_labels: bool = option(False, "KIP: also learn the support labels (KIP.ipynb LEARN_LABELS)",
                                source=KIP_REFERENCE)
    W_std: float = option(kernels.W_STD, "KIP: weight standard deviation of the kernel's network (neural-tangents "
                          "W_std)", minimum=0.0, exclusive_minimum=True, source=KIP_REFERENCE)
    b_std: float = option(kernels.B_STD, "KIP: bias standard deviation of the kernel's network (neural-tangents "
                          "b_std)", minimum=0.0, source=KIP_REFERENCE)
    n_models: int = option(8, "KIP conv_rf: random networks per iteration (RFAD --n_models)", minimum=1,
                           source=RFAD_REFERENCE)
    rf_model: str = option("ConvNetNN", "KIP conv_rf: the random network (RFAD: ConvNet without normalisation)",
                           source=RFAD_REFERENCE)


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
    set fit its labels with the square loss (``--label_loss mse``: one_hot - 1/K, or the learned
    labels as they are), as the KIP papers' finite networks were trained (``kip/nn_training.ipynb``
    ``loss_type='mse'``).
    """

    # KIP.ipynb: SUPPORT_SIZE 100 (ipc 10 on 10 classes), LEARNING_RATE 4e-2, ~1000 steps, images
    # initialised from a class-balanced real sample; no augmentation.
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

    # ---- set-up -------------------------------------------------------------------------
    def configure(self, syn: SyntheticSet) -> None:
        """Adam(lr_img) over the images and, with ``--learn_labels``, the labels (initialised at
        one_hot - 1/K); then the add-ons attach."""
        params = [syn.images]
        if self.options.learn_labels:
            params.append(syn.learn_label_values(evaluation.centred_one_hot(syn.labels, self.num_classes)))
        self.optimizer_img = torch.optim.Adam(params, lr=self.cfg.lr_img)
        for addon in self.addons:
            addon.attach(syn)

    # ---- the kernel ---------------------------------------------------------------------
    def support_labels(self, syn: SyntheticSet) -> torch.Tensor:
        """y_s (n_s, K): the learned labels (with a graph), or one_hot - 1/K of the classes."""
        if syn.label_values is not None:
            return syn.label_values
        return evaluation.centred_one_hot(syn.labels, self.num_classes)

    def sample_targets(self):
        """``target_batch_size // K`` real images per class (at least 1; clamped to the class
        size) and their targets one_hot - 1/K: (n_t, C, H, W), (n_t, K)."""
        per_class = max(1, self.options.target_batch_size // self.num_classes)
        images, labels = [], []
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
        return kip_loss(prediction, y_target)

    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """The base step (loss, one Adam step, add-on work), also logging ``krr_acc``: the KRR
        accuracy on this iteration's target batch before the step (the colab's ``train acc``)."""
        logs = super().step(syn, iteration)
        logs["krr_acc"] = self.last_accuracy
        return logs


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
