"""FRePo: dataset distillation by neural feature regression with a pool of online models.

Source: Zhou, Nezhadarya & Ba, "Dataset Distillation using Neural Feature Regression", NeurIPS
2022 (Sec. 3, Algorithm 1); reference yongchao97/FRePo, ``script/distill.py`` (defaults) and
``lib/datadistillation/frepo.py`` (``nfr``, ``proto_train_step``, ``init_proto``, the model pool of
``proto_train_and_evaluate``).

One outer step: take a model from the pool, embed the synthetic images and a batch of real images
with its penultimate (flattened convolutional) features, fit kernel ridge regression on the
synthetic support with the kernel ``K = F F^T`` and predict the real batch's labels; the loss is
the squared error against the real images' centred one-hot labels plus the label-margin term, and
one LAMB step updates the images and the learned labels. Then the model takes one Adam step on
the synthetic set with the learned labels (or, older than ``max_online_updates``, is replaced by a
fresh initialisation), and the next model is drawn at random.

With ``--use_flip`` the support of the kernel regression is the synthetic set and its horizontal
mirror images (labels repeated); the stored set and the online models' training use the set
alone (``proto_train_step(use_flip=True)`` of ``lib/datadistillation/frepo.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

import chunked
import evaluation
import utils
from methods.addons.base import AFTER_IMAGE_UPDATE, IMAGE_LOSS
from methods.base import DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.options import MethodOptions, option
from methods.kernels import kernel_ridge_regression


def lamb_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """LAMB (You et al., "Large Batch Optimization for Deep Learning", ICLR 2020) as FRePo's
    ``optax.lamb(learning_rate)``: timm's ``Lamb`` (huggingface/pytorch-image-models
    ``timm/optim/lamb.py``) with betas (0.9, 0.999), eps 1e-6, no weight decay, the trust ratio
    ``||w|| / ||update||`` on every tensor (``always_adapt``; optax applies it regardless of weight
    decay) and no global gradient clipping (optax has none). timm is imported here, not at module
    import (it takes seconds).

    Raises:
        utils.UserError: timm is not installed.
    """
    try:
        from timm.optim import Lamb
    except ImportError:
        raise utils.UserError("--method FRePo needs LAMB from timm (pip install timm)") from None
    return Lamb(params, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, max_grad_norm=None, always_adapt=True)


def initial_label_values(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """FRePo's initial learned labels (``init_proto(scale_y=True)``): centred one-hot vectors
    divided by ``sqrt(K / 10)``; (N,) int64 -> (N, K) float."""
    return evaluation.centred_one_hot(labels, num_classes) / math.sqrt(num_classes / 10)


def label_margin_loss(label_values: torch.Tensor) -> torch.Tensor:
    """FRePo's label term ``mean_i -min(top1_i - top2_i, 1/K)`` over the learned labels (N, K)
    (``lb_margin_th`` in ``lib/datadistillation/frepo.py``): keeps the largest entry of every
    label ahead of the second by at least ``1/K``. A scalar."""
    top = label_values.topk(2, dim=1).values
    margin = torch.clamp(top[:, 0] - top[:, 1], max=1.0 / label_values.shape[1])
    return -margin.mean()


def regression_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FRePo's ``mean_squared_loss(...).mean()``: the batch mean of ``0.5 * sum_k (pred_k - target_k)^2``
    for (B, K) tensors. A scalar."""
    return 0.5 * ((pred - target) ** 2).sum(dim=1).mean()


class OnlineModel:
    """One model of FRePo's pool: a network, its Adam optimiser and its age (online steps taken).

    Args:
        net: a freshly initialised network.
        lr: Adam learning rate (FRePo ``config.online.learning_rate`` 0.0003).
        age: the initial age (the pool staggers them).
    """

    def __init__(self, net: nn.Module, lr: float, age: int = 0):
        self.net = net
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        self.age = age

    def state_dict(self) -> dict:
        """Weights, optimiser moments and age."""
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "age": self.age}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.age = int(state["age"])


FREPO_DISTILL = "yongchao97/FRePo script/distill.py"
FREPO_LIBRARY = "yongchao97/FRePo lib/datadistillation/frepo.py"


@dataclass(frozen=True)
class FRePoOptions(MethodOptions):
    """FRePo's own flags (defaults: its ``script/distill.py`` and the model pool and kernel
    regression of ``lib/datadistillation/frepo.py``)."""

    num_nn_state: int = option(10, "FRePo: models in the online pool", minimum=1, source=FREPO_DISTILL)
    max_online_updates: int = option(100, "FRePo: a model is re-initialised after this many online steps",
                                     minimum=1, source=FREPO_DISTILL)
    learn_label: bool = option(True, "FRePo: learn the real-valued labels with the images", source=FREPO_DISTILL)
    reg: float = option(1e-06, "FRePo: kernel ridge coefficient, relative to the mean diagonal of K_ss", minimum=0.0,
                        source=FREPO_LIBRARY + " (nfr)")
    online_lr: float = option(0.0003, "FRePo: Adam learning rate of the online models", minimum=0.0,
                              exclusive_minimum=True, source=FREPO_LIBRARY + " (proto_train_and_evaluate)")
    online_batch: int = option(1000, "FRePo: synthetic images per online step (all when fewer)", minimum=1,
                               source=FREPO_LIBRARY + " (proto_train_and_evaluate, eval_batch_size)")
    use_flip: bool = option(False, "FRePo: the kernel regression's support is the set plus its horizontal mirror "
                            "images (when left out: on for CIFAR10 at every ipc, CIFAR100 and TinyImageNet at ipc 1, "
                            "imagenette and imagewoof; off otherwise)",
                            source=FREPO_DISTILL + " (use_flip per dataset)")


def frepo_dataset_defaults(dataset: str, ipc: int) -> Dict[str, Any]:
    """FRePo's per-dataset settings of ``script/distill.py`` and ``lib/dataset/dataloader.py``
    (yongchao97/FRePo) for the toolkit's dataset names:

    * ``use_flip``: on for CIFAR-10 at every ipc and for imagenette and imagewoof (the script's
      default branch), for CIFAR-100 and TinyImageNet at ipc 1 only; off for MNIST and
      Fashion-MNIST and for datasets the reference does not have (SVHN, MHIST, the other
      ImageNet subsets);
    * ``zca``: on for CIFAR-10, CIFAR-100 and TinyImageNet (``preprocess_type = 'normalize_zca'``),
      off for MNIST and Fashion-MNIST (``'standard'``: mean/std only) and for the datasets the
      reference does not have or whitens block-wise at 128 pixels (imagenette, imagewoof), which the
      toolkit's ZCA does not reproduce.

    Args:
        dataset: a ``--dataset`` name in any case (``Tiny`` or ``TinyImageNet``).
        ipc: images per class.

    Returns:
        ``{'use_flip': bool, 'zca': bool}``.
    """
    name = dataset.lower()
    tiny = name in ("tiny", "tinyimagenet")
    use_flip = name in ("cifar10", "imagenette", "imagewoof") or ((name == "cifar100" or tiny) and ipc == 1)
    return {"use_flip": use_flip, "zca": name in ("cifar10", "cifar100") or tiny}


@register_method("FRePo")
class FRePo(DistillMethod):
    """Neural feature regression with a model pool (see the module docstring).

    The images and the learned labels share one LAMB optimiser (timm's ``Lamb`` set to optax's
    ``lamb``: no weight decay, trust ratio on every tensor, no gradient clipping) at ``--lr_img``
    with cosine decay to a tenth over ``--Iteration`` (FRePo ``proto_train_and_evaluate``).
    Evaluation fits the learned real-valued labels by squared error summed over the classes
    (``eval_label_loss`` ``mse_sum``: FRePo ``script/eval.py`` ``loss='mse'``, ``mean_squared_loss``).

    Raises:
        utils.UserError: timm (LAMB) is not installed (at :meth:`init_synthetic`).
    """

    reference_model = "ConvNetNN"
    reference_model_source = "yongchao97/FRePo script/distill.py (arch conv, width 128, depth 3, normalization identity)"
    defaults = dict(ipc=10, iterations=500000, lr_img=0.0003, lr_net=0.01, batch_real=1024, batch_train=500,
                    init="real", dsa_strategy="color_crop_cutout_rotate", eval_mode="S")
    options_type = FRePoOptions
    options: FRePoOptions
    unused_flags = ("dis_metric", "outer_loop", "inner_loop")
    # Image-update terms join the image loss; networks fit its regression labels with the square
    # loss, so no (cross-entropy) training term.
    addon_hooks = frozenset({IMAGE_LOSS, AFTER_IMAGE_UPDATE})
    default_eval_it = 1000
    eval_label_loss = "mse_sum"
    run_counts = (1, 5)  # script/eval.py num_eval=5
    eval_epochs = (1000, 1000)  # script/eval.py: 1000 steps for 10 images (2000 for 100)

    @classmethod
    def resolved_defaults(cls, dataset: str, ipc: int, given: Mapping[str, Any]) -> Mapping[str, Any]:
        """:func:`frepo_dataset_defaults` (``--use_flip`` and ``--zca`` when left out)."""
        return frepo_dataset_defaults(dataset, ipc)

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.pool: List[OnlineModel] = []
        self.current = 0
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.resets = 0  # models re-initialised so far (logged)

    # ---- set-up -------------------------------------------------------------------------
    def new_online_model(self, age: int = 0) -> OnlineModel:
        """A freshly initialised ``cfg.model`` with its Adam optimiser (global torch RNG)."""
        return OnlineModel(self.new_network(), self.options.online_lr, age)

    def init_synthetic(self) -> SyntheticSet:
        """Random real images per class (``--init real``, FRePo's ``init_proto``) or noise, the
        learned labels at :func:`initial_label_values`, the LAMB optimiser and the model pool:
        model ``i`` starts at age ``(max_online_updates // num_nn_state) * i``."""
        syn = super().init_synthetic()
        syn.learn_label_values(initial_label_values(syn.labels, self.num_classes))
        if not self.options.learn_label:
            syn.label_values.requires_grad_(False)
        params = [syn.images] + ([syn.label_values] if self.options.learn_label else [])
        self.optimizer_img = lamb_optimizer(params, self.cfg.lr_img)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer_img, T_max=max(self.cfg.iterations, 1), eta_min=0.1 * self.cfg.lr_img)
        stagger = self.options.max_online_updates // self.options.num_nn_state
        self.pool = [self.new_online_model(stagger * i) for i in range(self.options.num_nn_state)]
        self.current = self.draw_model()
        return syn

    def configure(self, syn: SyntheticSet) -> None:
        """Add-ons only; the LAMB optimiser is made in :meth:`init_synthetic` once the labels exist."""
        for addon in self.addons:
            addon.attach(syn)

    def draw_model(self) -> int:
        """Index of the next model, uniform over the pool (the method's generator)."""
        return int(torch.randint(len(self.pool), (1,), generator=self.generator))

    # ---- one iteration ------------------------------------------------------------------
    def sample_real(self):
        """``batch_real`` distinct random real images over all classes and their labels, (B, C, H, W)
        and (B,) (FRePo draws batches of 1024 from the shuffled training set, no augmentation)."""
        count = len(self.sampler)
        index = torch.randperm(count, generator=self.generator)[:min(self.cfg.batch_real, count)]
        index = index.to(self.sampler.images.device)
        return self.sampler.images[index], self.sampler.labels[index]

    def support(self, syn: SyntheticSet) -> Tuple[torch.Tensor, torch.Tensor]:
        """The kernel regression's support: ``(images (N, C, H, W), labels (N, K))`` of the set, or
        with ``--use_flip`` ``(2N, C, H, W)`` and ``(2N, K)``: the set followed by its horizontal
        mirror images (``torch.flip`` of the width axis; the reference's ``jnp.flip(x, axis=-2)``
        on NHWC arrays) with the same labels. Graphs to the images and labels are kept."""
        if not self.options.use_flip:
            return syn.images, syn.label_values
        return (torch.cat([syn.images, torch.flip(syn.images, dims=[-1])]),
                torch.cat([syn.label_values, syn.label_values]))

    def loss(self, syn: SyntheticSet) -> torch.Tensor:
        """FRePo's meta-training loss (Sec. 3) under the current pool model: the kernel ridge
        prediction of a real batch's centred one-hot labels from the support (:meth:`support`) in
        the model's feature space, squared error (``proto_train_step``), plus the label-margin term
        of the stored labels when labels are learned. A scalar with a graph to the images (and the
        labels)."""
        net = self.pool[self.current].net
        net.eval()  # features only (no dropout or normalisation statistics in these networks)
        real, label_real = self.sample_real()
        with torch.no_grad():
            feat_real = chunked.embed_in_chunks(net, real)
        images, labels = self.support(syn)
        feat_syn = net.embed(images)
        with torch.autocast(self.device.type, enabled=False):  # --amp: features only; kernel and solve in float32
            feat_real, feat_syn = feat_real.float(), feat_syn.float()
            pred = kernel_ridge_regression(feat_real @ feat_syn.T, feat_syn @ feat_syn.T, labels, self.options.reg)
        loss = regression_mse(pred, evaluation.centred_one_hot(label_real, self.num_classes))
        self.kernel_loss = loss.detach()
        if self.options.learn_label:
            loss = loss + label_margin_loss(syn.label_values)
        return loss

    def online_update(self, syn: SyntheticSet) -> None:
        """The current model's online step (FRePo ``proto_train_and_evaluate``): older than
        ``max_online_updates`` it is replaced by a fresh initialisation, else it takes one Adam
        step on the squared error of up to ``online_batch`` synthetic images against the learned
        labels; then the next model is drawn."""
        model = self.pool[self.current]
        if model.age > self.options.max_online_updates:
            self.pool[self.current] = self.new_online_model()
            self.resets += 1
        else:
            total = syn.images.shape[0]
            index = torch.randperm(total, generator=self.generator)[:min(self.options.online_batch, total)]
            index = index.to(syn.images.device)
            model.net.train()
            evaluation.sgd_step(model.net, syn.images.detach()[index], syn.label_values.detach()[index], model.optimizer,
                           label_loss="mse_sum", precision=self.precision)
            model.age += 1
        self.current = self.draw_model()

    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """:meth:`loss`, one LAMB step of the images and labels (:meth:`update_images`), the
        add-ons' work with the current model, the lr schedule, then :meth:`online_update`.

        Returns:
            ``{'loss', 'kernel_loss', 'resets'}`` (detached scalar tensors).
        """
        net = self.pool[self.current].net
        with self.precision.autocast(self.device):
            loss = self.loss(syn)
        self.update_images(syn, loss)
        self.after_image_update(syn, net)
        self.scheduler.step()
        self.online_update(syn)
        return {"loss": loss.detach(), "kernel_loss": self.kernel_loss, "resets": torch.tensor(float(self.resets))}

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """LAMB moments, the lr schedule, every pool model (weights, Adam moments, age) and the
        current model's index."""
        return {**super().state_dict(), "scheduler": self.scheduler.state_dict(),
                "pool": [model.state_dict() for model in self.pool], "current": self.current, "resets": self.resets}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`init_synthetic`)."""
        super().load_state_dict(state)
        self.scheduler.load_state_dict(state["scheduler"])
        for model, saved in zip(self.pool, state["pool"]):
            model.load_state_dict(saved)
        self.current, self.resets = int(state["current"]), int(state["resets"])
