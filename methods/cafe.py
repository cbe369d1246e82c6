"""CAFE: aligning features of class means layer by layer, with a discrimination loss and a
dynamic bi-level optimisation.

Source: Wang et al., "CAFE: Learning to Condense Dataset by Aligning Features", CVPR 2022
(eq. 5-7 and Algorithm 1); reference ``distill.py`` of kaiwang960112/CAFE (its quirks:
docs/reference-notes.md, *CAFE*).
``--method CAFE`` is plain CAFE; adding ``--dsa_strategy ...`` gives CAFE+DSA (siamese
DiffAugment in matching, DiffAugment in the inner loop and in evaluation).

Where this differs from the reference (docs/distribution-matching.md, "Where this differs from the reference code"):
- Features come from the networks' ``embed_with_feature_maps`` interface, so any number of
  classes, image size, depth and network with intermediate features works (the reference
  slices a depth-3 ConvNet and reshapes to 10 classes of 3x32x32).
- The per-layer weights map deepest-first: the embedding gets ``--first_weight``, the last
  stage ``--second_weight``, the one before ``--third_weight``, every shallower stage
  ``--fourth_weight``. For a depth-3 ConvNet that is the reference's mapping.
- The real-image cross-entropy term is left out: its gradient with respect to the images is
  zero and the network gradients it leaves are cleared before any network update.
- Both loops are bounded by ``--max_outer_steps`` / ``--max_inner_steps``.

The accuracy watchers follow the reference by default (``--watcher reference``): its accumulator
adds each new mean per-class accuracy to 1/K of the previous accumulated value (K classes; it
sums per-class accuracies onto the previous value, then divides by K) and is zeroed when a network
is drawn (outer watcher) and at the start of each inner loop. With a steady accuracy m and K = 10,
ten readings span about 0.111 m, so for m above about 0.27 each inner loop stops after 10 epochs
and for m above about 0.36 the outer loop needs at least 11 steps. ``--watcher clean`` watches
the plain mean per-class accuracy instead.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

import chunked
import evaluation
import progress
from methods.addons.base import IMAGE_LOSS, TRAINING_TERM
from methods.base import DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.options import TOOLKIT, MethodOptions, option
from methods.features import real_class_statistics, syn_class_statistics
from methods.losses import class_means, discrimination_loss, feature_alignment_loss, mean_embedding_distance

# The image learning rate is halved at each of these iterations (reference ``adjust_learning_rate``).
LR_MILESTONES = (1200, 1600, 1800)


WATCHERS = ("reference", "clean")


class AccuracyWatcher:
    """The last ``window`` accuracy readings of one CAFE loop and their span.

    With ``carry`` > 0 each stored value is ``reading + carry * previous stored value`` (the
    reference's accumulator, ``carry = 1 / K``; it starts from 0); with ``carry = 0`` the readings
    are stored as they are.

    Source: ``acc_watcher`` / ``acc_inner_watcher`` of kaiwang960112/CAFE ``distill.py``.
    """

    def __init__(self, window: int, carry: float = 0.0):
        self.values: deque = deque(maxlen=window)
        self.carry = carry
        self.accumulated = 0.0

    def add(self, reading: float) -> float:
        """Store ``reading`` (an accuracy in [0, 1]), carried as above; returns the stored value."""
        self.accumulated = reading + self.carry * self.accumulated
        self.values.append(self.accumulated)
        return self.accumulated

    def span(self) -> Optional[float]:
        """max - min of the stored values once ``window`` are held, else ``None``."""
        if len(self.values) < self.values.maxlen:
            return None
        return max(self.values) - min(self.values)


def layer_weights(num_layers: int, first: float, second: float, third: float, fourth: float) -> List[float]:
    """CAFE's per-layer weights, shallowest layer first.

    The deepest layer (the embedding) gets ``first``, the next ``second``, then ``third``, and
    every shallower one ``fourth``; for the reference's 4 taps of a depth-3 ConvNet this is
    ``[fourth, third, second, first]``.

    Raises:
        ValueError: ``num_layers < 1``.
    """
    if num_layers < 1:
        raise ValueError(f"CAFE needs at least one feature layer, got {num_layers}")
    deepest_first = [first, second, third] + [fourth] * max(0, num_layers - 3)
    return deepest_first[:num_layers][::-1]


def image_lr(lr_img: float, iteration: int) -> float:
    """The image learning rate at ``iteration`` (1-based): ``lr_img`` halved at every milestone
    of ``LR_MILESTONES`` reached (the reference counts iterations from 0)."""
    return lr_img * 0.5 ** sum(iteration - 1 >= milestone for milestone in LR_MILESTONES)


CAFE_REFERENCE = "kaiwang960112/CAFE distill.py"


@dataclass(frozen=True)
class CAFEOptions(MethodOptions):
    """CAFE's own flags: the layer and loss weights and the watcher thresholds (defaults: its
    reference ``distill.py``), the watchers' window and reading size (the values that script uses),
    and this toolkit's loop bounds and watcher choice."""

    first_weight: float = option(1.0, "CAFE: weight of the embedding (deepest) layer", minimum=0.0,
                                 source=CAFE_REFERENCE)
    second_weight: float = option(1.0, "CAFE: weight of the last intermediate stage", minimum=0.0,
                                  source=CAFE_REFERENCE)
    third_weight: float = option(0.1, "CAFE: weight of the stage before it", minimum=0.0, source=CAFE_REFERENCE)
    fourth_weight: float = option(0.1, "CAFE: weight of every shallower stage", minimum=0.0, source=CAFE_REFERENCE)
    inner_weight: float = option(0.01, "CAFE: weight of the discrimination cross-entropy", minimum=0.0,
                                 source=CAFE_REFERENCE)
    lambda_1: float = option(0.04, "CAFE: leave the outer loop when the real-accuracy watcher spans less", minimum=0.0,
                             source=CAFE_REFERENCE)
    lambda_2: float = option(0.03, "CAFE: leave the inner loop when the real-accuracy watcher spans more", minimum=0.0,
                             source=CAFE_REFERENCE)
    watcher_window: int = option(10, "CAFE: readings a watcher compares", minimum=2,
                                 source=CAFE_REFERENCE + " (acc_watcher length; no flag)")
    watcher_images: int = option(128, "CAFE: real images per class per accuracy reading", minimum=1,
                                 source=CAFE_REFERENCE + " (real batch of a reading; no flag)")
    max_outer_steps: int = option(100, "CAFE: bound on image updates per iteration", minimum=1, source=TOOLKIT)
    max_inner_steps: int = option(100, "CAFE: bound on network epochs per inner loop", minimum=1, source=TOOLKIT)
    watcher: str = option("reference", "CAFE: accuracy the watchers compare: reference (each reading plus 1/K of "
                          "the previous accumulated value, as the reference) or clean (the plain reading)",
                          choices=WATCHERS, source=CAFE_REFERENCE + " (its accumulator; clean: this toolkit)")


@register_method("CAFE")
class CAFE(DistillMethod):
    """Per iteration: a fresh network and SGD(lr_net); then repeat (at most ``max_outer_steps``):

    1. per class, ``batch_real`` real images and the synthetic images (siamese DiffAugment with
       DSA); L = sum_l w_l ||class-mean features_l(real) - class-mean features_l(S)||^2
       + ||class-mean embedding(real) - class-mean embedding(S)||^2
       + inner_weight * sum_i CE(embedding(real_i) . P^T, y_i), P the synthetic class-mean
       embeddings (eq. 5-7); one SGD step on the images;
    2. the real accuracy of the network (``watcher_images`` fresh real images per class) joins
       the outer watcher (:class:`AccuracyWatcher`, carried as ``--watcher`` says); once it holds
       ``watcher_window`` values, stop when they span less than ``lambda_1``;
    3. train the network on the detached synthetic set one epoch at a time (at most
       ``max_inner_steps``), each epoch's real accuracy joining the inner watcher, until
       ``watcher_window`` values span more than ``lambda_2``.
    """

    reference_model_source = "kaiwang960112/CAFE distill.py (--model ConvNet)"
    defaults = dict(ipc=1, iterations=2000, lr_img=0.1, lr_net=0.01, batch_real=256, batch_train=256,
                    init="noise", dsa_strategy="", dis_metric="ours", eval_mode="S")
    options_type = CAFEOptions
    options: CAFEOptions
    default_eval_it = 100
    run_counts = (1, 20)  # reference distill.py: --num_exp 1 --num_eval 20
    cifar100_stats = "cifar10"  # reference utils.get_dataset: CIFAR100 with CIFAR10's mean/std

    # 1000 epochs with DSA or an active DC augmentation, else 600 (reference ``distill.py``).
    eval_epochs = (1000, 600)
    # CAFE's own step runs its networks through watcher loops: it honours image-update terms but
    # runs no work after an image update (so a learned add-on state would never be learned).
    addon_hooks = frozenset({IMAGE_LOSS, TRAINING_TERM})
    unused_flags = ("dis_metric", "outer_loop", "inner_loop")
    loss_functions = ("matching_loss",)  # one per image update; watchers and inner epochs are not

    # ---- pieces -------------------------------------------------------------------------
    def matching_loss(self, net: nn.Module, syn: SyntheticSet) -> torch.Tensor:
        """Eq. 7 without the real cross-entropy: layer-wise alignment of class means (eq. 5) plus
        the discrimination loss (eq. 6), for one network. A graph to ``syn.images``."""
        opts = self.options
        real, label_real, image_syn, label_syn = self.sample_batches(syn)
        means_real, embed_real = real_class_statistics(net, real, label_real, self.num_classes)
        means_syn, center_syn = syn_class_statistics(net, image_syn, label_syn, self.num_classes)
        center_real = class_means(embed_real, label_real, self.num_classes)
        weights = layer_weights(len(means_syn) + 1, opts.first_weight, opts.second_weight, opts.third_weight,
                                opts.fourth_weight)
        aligned = feature_alignment_loss(means_real + [center_real], means_syn + [center_syn], weights)
        return (aligned + mean_embedding_distance(center_real, center_syn)
                + opts.inner_weight * discrimination_loss(embed_real, label_real, center_syn))

    def real_accuracy(self, net: nn.Module) -> float:
        """Mean per-class accuracy of ``net`` (in its current mode) on ``watcher_images`` fresh
        real images per class. A BatchNorm network in training mode sees one class per batch,
        as in the reference."""
        n = self.options.watcher_images
        per_class = [self.sampler.get_images(c, n, self.generator) for c in range(self.num_classes)]
        batches = per_class if chunked.batch_dependent(net) else [torch.cat(per_class)]
        correct = []
        with torch.no_grad(), self.precision.autocast(self.device):
            for images in batches:
                predictions = torch.cat([net(chunk).argmax(dim=1) for chunk in images.split(chunked.pass_size(net, images))])
                correct.append(predictions)
        predictions = torch.cat(correct)
        labels = torch.cat([torch.full((x.shape[0],), c, device=self.device) for c, x in enumerate(per_class)])
        hits = torch.bincount(labels[predictions == labels], minlength=self.num_classes).float()
        counts = torch.bincount(labels, minlength=self.num_classes).clamp_min(1).float()
        return float((hits / counts).mean())

    def new_watcher(self) -> AccuracyWatcher:
        """An empty watcher of ``watcher_window`` readings, carrying 1/K of the previous value
        with ``--watcher reference`` and nothing with ``--watcher clean``."""
        carry = 1.0 / self.num_classes if self.options.watcher == "reference" else 0.0
        return AccuracyWatcher(self.options.watcher_window, carry)

    def train_network(self, net: nn.Module, optimizer: torch.optim.Optimizer, syn: SyntheticSet, augmenter) -> int:
        """The inner loop: epochs on the detached synthetic set until the real-accuracy watcher
        (a new one per inner loop) spans more than ``lambda_2`` (or ``max_inner_steps`` epochs).
        Returns the epochs run."""
        opts = self.options
        watcher = self.new_watcher()
        scaler = self.precision.grad_scaler(self.device)
        images, labels = syn.images.detach(), syn.labels
        for epoch in range(1, opts.max_inner_steps + 1):
            progress.tick()  # a progress line / a stop inside a long iteration
            evaluation.train_epoch(net, images, labels, optimizer, self.cfg.batch_train, self.generator, augmenter,
                              precision=self.precision, scaler=scaler)
            watcher.add(self.real_accuracy(net))
            span = watcher.span()
            if span is not None and span > opts.lambda_2:
                break
        return epoch

    # ---- one iteration ------------------------------------------------------------------
    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """One CAFE iteration (the outer loop above) under a fresh network.

        Returns:
            ``{'loss': mean loss over the image updates, 'outer_steps': image updates,
            'inner_epochs': network epochs}`` (detached scalar tensors).
        """
        opts = self.options
        for group in self.optimizer_img.param_groups:
            group["lr"] = image_lr(self.cfg.lr_img, iteration)
        net = self.new_network()
        net.train()
        optimizer_net = torch.optim.SGD(net.parameters(), lr=self.cfg.lr_net)
        augmenter = evaluation.make_augmenter(self.dsa_strategy)
        watcher = self.new_watcher()  # one per network; the inner loops do not reset it
        losses, inner_epochs = [], 0
        for _ in range(opts.max_outer_steps):
            progress.tick()  # a progress line / a stop inside a long iteration
            net.requires_grad_(False)  # only the images learn here; skip the weight gradients
            with self.precision.autocast(self.device):
                loss = self.matching_loss(net, syn)
            self.update_images(syn, loss)
            net.requires_grad_(True)
            losses.append(loss.detach())
            watcher.add(self.real_accuracy(net))
            span = watcher.span()
            if span is not None and span < opts.lambda_1:
                break
            inner_epochs += self.train_network(net, optimizer_net, syn, augmenter)
        return {"loss": torch.stack(losses).mean(), "outer_steps": torch.tensor(float(len(losses))),
                "inner_epochs": torch.tensor(float(inner_epochs))}
