"""Coreset baselines: real images selected once per class, no image optimisation.

The selection baselines of the DC paper's tables (Zhao, Mopuri & Bilen, "Dataset Condensation with
Gradient Matching", ICLR 2021, §4.1: random, herding, k-center, forgetting). Each is a registered
:class:`~methods.base.DistillMethod` with ``selection_only = True``: its :meth:`init_synthetic`
returns the selected images, the runner runs no iteration, and the set is saved and evaluated like
any distilled set (same ``res_*.pt`` layout, same protocol).

* ``random``: ``ipc`` random real images per class (the run's generator).
* ``herding``: greedy mean matching per class in a network's embedding (Welling, "Herding dynamical
  weights to learn", ICML 2009; the exemplar selection of iCaRL, Rebuffi et al. CVPR 2017).
* ``kcenter``: greedy farthest-point selection per class in the same embedding (the 2-approximate
  k-center of Gonzalez 1985, as the core-set baseline of Sener & Savarese, ICLR 2018).
* ``forgetting``: the images forgotten most often while a network trains on the real data (Toneva
  et al., "An Empirical Study of Example Forgetting during Deep Neural Network Learning", ICLR 2019).

The embedding network is ``--model``, randomly initialised from the experiment's seed, or the
trained original model ``index`` found under ``--coreset_model_path`` (``train_original.py``'s
``--save_path``; :func:`original_files.load_original_models`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import chunked
import utils
from methods.base import DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.options import TOOLKIT, MethodOptions, option
from pretrained import original_files
from sets.selection import herding_select, kcenter_select  # noqa: F401  (also re-exported)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Pure selection rules
# --------------------------------------------------------------------------------------------
def count_forgetting_events(correct: torch.Tensor) -> torch.Tensor:
    """Forgetting events per example from its classification at each presentation.

    A forgetting event is a presentation ``t`` at which the example is misclassified after being
    classified correctly at presentation ``t - 1`` (Toneva et al. 2019, §2). Examples never
    classified correctly get ``inf`` ("unlearned examples are assigned an infinite number of
    forgetting events", ibid.), so they rank as the most forgotten.

    Args:
        correct: (T, N) bool, ``correct[t, i]``: example ``i`` was classified correctly at its
            ``t``-th presentation (T >= 1).

    Returns:
        (N,) float64 counts (``inf`` for never-learned examples).

    Raises:
        ValueError: ``correct`` is not 2-D with T >= 1.
    """
    if correct.dim() != 2 or correct.shape[0] < 1:
        raise ValueError(f"count_forgetting_events: expected (T >= 1, N), got {tuple(correct.shape)}")
    correct = correct.bool()
    events = (correct[:-1] & ~correct[1:]).sum(dim=0).double()
    events[~correct.any(dim=0)] = float("inf")
    return events


def most_forgotten(counts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the ``n`` largest forgetting counts; ties broken uniformly at random.

    The rows are shuffled with ``generator`` and then stably sorted by decreasing count, so equal
    counts (common: most examples are forgotten 0 or 1 times in a short run) come out in a random
    order that the run's seed fixes.

    Args:
        counts: (N,) counts (``inf`` allowed).
        n: how many, 0 <= n <= N.
        generator: CPU generator.

    Returns:
        (n,) int64 indices into ``counts`` (CPU).

    Raises:
        ValueError: ``n`` outside [0, N].
    """
    if not 0 <= n <= counts.shape[0]:
        raise ValueError(f"most_forgotten: cannot pick {n} of {counts.shape[0]}")
    shuffle = torch.randperm(counts.shape[0], generator=generator)
    order = torch.argsort(counts.cpu()[shuffle], descending=True, stable=True)
    return shuffle[order[:n]]


def forgetting_statistics(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
                          batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Train ``net`` on a real set and record, for each example at each presentation, whether the
    forward pass of its minibatch (before the update) classified it correctly (Toneva et al. 2019).

    Plain SGD (momentum 0.9, weight decay 5e-4, the DC family's optimiser) on the mean
    cross-entropy, no augmentation, ``epochs`` shuffled passes; every example is presented once
    per epoch.

    Args:
        net: a freshly initialised network on the images' device (trained in place).
        images: (N, C, H, W); labels: (N,) int64.
        epochs: passes over the data (>= 1).
        lr: SGD learning rate.
        batch_size: examples per step.
        generator: CPU generator for the shuffles.

    Returns:
        (epochs, N) bool on the CPU: ``correct[e, i]`` at example ``i``'s presentation in epoch ``e``.

    Raises:
        ValueError: ``epochs`` < 1.
        FloatingPointError: the training loss became NaN or infinite.
    """
    if epochs < 1:
        raise ValueError(f"--forgetting_epochs must be at least 1, got {epochs}")
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    correct = torch.zeros(epochs, images.shape[0], dtype=torch.bool, device=images.device)
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator).to(images.device)
        for start in range(0, images.shape[0], batch_size):
            batch = order[start:start + batch_size]
            logits = net(images[batch])
            correct[epoch, batch] = logits.detach().argmax(dim=1) == labels[batch]
            loss = F.cross_entropy(logits, labels[batch])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"forgetting: training loss became {float(loss)} in epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        logger.info("forgetting: epoch %d/%d, train accuracy %.4f", epoch + 1, epochs,
                    float(correct[epoch].float().mean()))
    return correct.cpu()


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
class CoresetMethod(DistillMethod):
    """Base of the selection baselines: :meth:`select` picks ``ipc`` training indices per class;
    the images are never optimised (``selection_only``), so ``--Iteration`` is not used."""

    selection_only = True
    reference_model = None  # selection baselines: no reference distils with a network
    defaults = dict(iterations=0, init="real", eval_mode="S")
    init_choices = ("real",)
    # The images are selected, never learned: no add-on has anything to act on.
    addon_hooks = frozenset()
    unused_flags = ("Iteration", "lr_img", "dis_metric", "outer_loop", "inner_loop")
    # Evaluated as DC evaluates its sets: 1000 epochs with augmentation, else 300.
    eval_epochs = (1000, 300)

    def class_indices(self, c: int) -> torch.Tensor:
        """(n_c,) int64 indices of class ``c``'s training images in the sampler, dataset order."""
        return torch.nonzero(self.sampler.labels == c, as_tuple=False).flatten()

    def select(self, c: int, indices: torch.Tensor) -> torch.Tensor:
        """Positions (into ``indices``) of the ``ipc`` images chosen for class ``c``."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Work shared by every class (an embedding network, a training run); default none."""

    def init_synthetic(self) -> SyntheticSet:
        """The selected real images, class-major, with hard labels.

        Raises:
            utils.UserError: a class has fewer than ``ipc`` training images.
        """
        chosen = []
        with self.precision.autocast(self.device):  # --amp: the embedding / training forward passes
            self.prepare()
            for c in range(self.num_classes):
                indices = self.class_indices(c)
                if indices.numel() < self.cfg.ipc:
                    raise utils.UserError(f"--ipc {self.cfg.ipc}: class {c} has only {indices.numel()} training images")
                picks = self.select(c, indices).to(indices.device)
                chosen.append(indices[picks])
        self.selected_indices = torch.cat(chosen).cpu()
        images = self.sampler.images[torch.cat(chosen)]
        labels = SyntheticSet.class_major_labels(self.num_classes, self.cfg.ipc, device=self.device)
        syn = SyntheticSet(images.to(self.device), labels, self.num_classes, self.cfg.ipc)
        syn.images.requires_grad_(False)
        return syn

    def step(self, syn: SyntheticSet, iteration: int):
        """Not used: selection methods run no iteration.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError(f"{self.name} selects images once and has no iterations")

    def state_dict(self) -> dict:
        """Nothing to resume beyond the set itself."""
        return {}


@register_method("random")
class RandomSelection(CoresetMethod):
    """``ipc`` real images per class drawn uniformly without replacement with the run's generator."""

    def amp_note(self) -> Optional[str]:
        """A random draw runs no network: ``--amp`` changes only the evaluation."""
        return (f"--amp {self.precision.amp}: random selection runs no network, so the selection is unchanged "
                f"(only the evaluation networks use {self.precision.amp})")

    def select(self, c: int, indices: torch.Tensor) -> torch.Tensor:
        """A uniform random ``ipc``-subset (positions into ``indices``)."""
        return torch.randperm(indices.numel(), generator=self.generator)[:self.cfg.ipc]


@dataclass(frozen=True)
class EmbeddingOptions(MethodOptions):
    """herding's and kcenter's flags: which network embeds (this toolkit's; the DC paper does not
    say which network its herding and k-center baselines embed with)."""

    coreset_model_path: str = option("", "herding/kcenter: train_original.py --save_path holding a trained --model "
                                     "to embed with (default: a randomly initialised --model)", source=TOOLKIT)
    coreset_model_index: int = option(0, "herding/kcenter: which original model index_{i} to load", minimum=0,
                                      source=TOOLKIT)


@dataclass(frozen=True)
class ForgettingOptions(MethodOptions):
    """forgetting's flag: the epochs of counting (this toolkit's CPU-sized default; Toneva et al.
    train ~200 epochs)."""

    forgetting_epochs: int = option(5, "forgetting: epochs of training on the real data to count "
                                    "forgetting events (Toneva et al. train ~200)", minimum=1, source=TOOLKIT)


class EmbeddingSelection(CoresetMethod):
    """Selection in the embedding ``net.embed`` (the flattened last feature map) of ``--model``:
    a fresh network from the experiment's seed, or a trained original model. The network is put in
    eval mode, so every image is embedded independently (no batch statistics)."""

    options_type = EmbeddingOptions
    options: EmbeddingOptions

    def embedding_network(self) -> nn.Module:
        """The network to embed with (see the class docstring).

        Raises:
            utils.UserError: ``--coreset_model_path`` holds no usable original model.
        """
        path = self.options.coreset_model_path
        if not path:
            return self.new_network().eval()
        expect = {"channel": self.channel, "num_classes": self.num_classes, "im_size": list(self.im_size),
                  "zca": self.cfg.zca}
        net = original_files.load_original_models(path, self.cfg.dataset, self.cfg.model, [self.options.coreset_model_index],
                                             self.device, expect=expect)[0]
        return net.eval()

    def prepare(self) -> None:
        """Build the embedding network once for every class."""
        self.net = self.embedding_network()

    def features(self, indices: torch.Tensor) -> torch.Tensor:
        """(n, D) embeddings of the training images ``indices``."""
        return chunked.embed_in_chunks(self.net, self.sampler.images[indices]).float()


@register_method("herding")
class Herding(EmbeddingSelection):
    """Herding per class (:func:`herding_select`) in the embedding of ``--model``."""

    def select(self, c: int, indices: torch.Tensor) -> torch.Tensor:
        """Herding picks of class ``c``."""
        return herding_select(self.features(indices), self.cfg.ipc)


@register_method("kcenter")
class KCenter(EmbeddingSelection):
    """Greedy k-center per class (:func:`kcenter_select`) in the embedding of ``--model``, starting
    from the image nearest the class mean."""

    def select(self, c: int, indices: torch.Tensor) -> torch.Tensor:
        """k-center picks of class ``c``."""
        return kcenter_select(self.features(indices), self.cfg.ipc)


@register_method("forgetting")
class Forgetting(CoresetMethod):
    """The ``ipc`` most-forgotten images per class (Toneva et al. 2019) while a fresh ``--model``
    trains on the whole real training set for ``--forgetting_epochs`` epochs (SGD ``--lr_net``,
    batch ``--batch_train``, no augmentation; :func:`forgetting_statistics`). Never-learned images
    count as infinitely forgotten; ties are broken at random by the run's seed
    (:func:`most_forgotten`). Toneva et al. train to convergence (200 epochs on CIFAR-10); the
    default here is CPU-sized, so the counts are coarse (most images are forgotten 0-2 times)."""

    options_type = ForgettingOptions
    options: ForgettingOptions

    def prepare(self) -> None:
        """Train once on every training image and count the forgetting events."""
        net = self.new_network()
        correct = forgetting_statistics(net, self.sampler.images, self.sampler.labels, self.options.forgetting_epochs,
                                        self.cfg.lr_net, self.cfg.batch_train, self.generator)
        self.counts = count_forgetting_events(correct)

    def select(self, c: int, indices: torch.Tensor) -> torch.Tensor:
        """The most-forgotten ``ipc`` of class ``c``."""
        return most_forgotten(self.counts[indices.cpu()], self.cfg.ipc, self.generator)
