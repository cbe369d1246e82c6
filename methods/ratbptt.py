"""RaT-BPTT: dataset distillation by random truncated backpropagation through time.

Source: Feng, Vedantam & Kempe, "Embarrassingly Simple Dataset Distillation", ICLR 2024
(Algorithm 1); reference fengyzpku/RaT-BPTT: the flags of ``main.py``, the outer loop of
``framework/base2.py`` (``main_worker``, ``train``) and the inner loop of
``framework/distill_higher.py`` (``Distill.forward``, ``subsample``, ``ema_update``). The
reference's RaT-BPTT run is its ``--ddtype curriculum --cctype 2`` mode, the only one here.

One iteration (one outer step):

1. a fresh network ``w_0`` (``cfg.model``, the toolkit's initialisation);
2. ``k`` inner steps without a graph, then ``W = --window`` steps with one (``create_graph``),
   each on ``--batch_per_class`` synthetic images of every class drawn at random (sorted, as
   the reference), with the inner optimiser ``--inner_optim`` at ``--inner_lr`` (SGD: momentum
   0.9, weight decay 5e-4, the momentum buffer carried from the detached steps into the window, as
   ``higher`` copies the optimiser's state; Adam: torch's defaults) written functionally on the
   flat parameters (:func:`inner_step`);
3. the meta-loss: the cross-entropy of the trained network (train mode) on a real batch of
   ``--batch_real`` images (the reference's ``--batch_size``, 200), back-propagated into the
   images (and, with ``--train_y``, the label weights);
4. the image gradient is clipped to twice an exponential moving average of its norm
   (:class:`EmaClip`, ``--clip_coef`` 0.9) and Adam (``--lr_img``, the reference's ``--lr``
   0.01, betas (0.9, 0.999)) steps; learned labels are clipped at 0.

``k`` is uniform in ``[--minwindow, --totwindow - --window]`` (inclusive), so the unrolled length
``k + W`` is uniform in ``[minwindow + W, T]``: drawn once per epoch (a pass over the real training
set in batches of ``--batch_real``, whose order is one permutation per epoch), or every iteration
with ``--complete_random``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import progress
import utils
from methods.addons.base import AFTER_IMAGE_UPDATE, IMAGE_LOSS
from methods.base import DistillConfig, DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.mtt import FlatModel
from methods.options import MethodOptions, option
from precision import scaled_backward

RAT_REFERENCE = "fengyzpku/RaT-BPTT main.py"
INNER_OPTIMS = ("SGD", "Adam")
SGD_MOMENTUM, SGD_WEIGHT_DECAY = 0.9, 5e-4  # distill_higher.py: optim.SGD(..., momentum=0.9, weight_decay=5e-4)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults (inner and outer)
SQRT_GUARD = 1e-30  # keeps d sqrt(v)/dv finite where v = 0 (a parameter with a zero gradient)
TINY_LABEL = 1e-30  # the smallest label weight written as a logit (log 0 is -inf)


@dataclass(frozen=True)
class RaTBPTTOptions(MethodOptions):
    """RaT-BPTT's flags, with the names and defaults of the reference's ``main.py`` (note: with
    the defaults ``--window 20 --totwindow 20`` the unroll length is not random; the paper's runs
    set ``--totwindow`` above ``--window``)."""

    window: int = option(20, "RaT-BPTT: inner steps back-propagated through (W)", minimum=1, source=RAT_REFERENCE)
    totwindow: int = option(20, "RaT-BPTT: longest unroll (T); the unroll length is uniform in "
                            "[minwindow + window, totwindow]", minimum=1, source=RAT_REFERENCE)
    minwindow: int = option(0, "RaT-BPTT: fewest detached steps before the window", minimum=0, source=RAT_REFERENCE)
    complete_random: bool = option(False, "RaT-BPTT: draw the unroll length every iteration (default: once per "
                                   "epoch over the real training set)", source=RAT_REFERENCE)
    inner_optim: str = option("SGD", "RaT-BPTT: inner optimiser, SGD (momentum 0.9, weight decay 5e-4) or Adam",
                              choices=INNER_OPTIMS, source=RAT_REFERENCE)
    inner_lr: float = option(0.01, "RaT-BPTT: inner learning rate", minimum=0.0, exclusive_minimum=True,
                             source=RAT_REFERENCE)
    batch_per_class: int = option(1, "RaT-BPTT: synthetic images per class in each inner step", minimum=1,
                                  source=RAT_REFERENCE)
    train_y: bool = option(False, "RaT-BPTT: learn the labels (non-negative weights, initialised one-hot)",
                           source=RAT_REFERENCE)
    label_lr_scale: float = option(1.0, "RaT-BPTT --train_y: the labels' lr is --lr_img divided by this",
                                   minimum=0.0, exclusive_minimum=True, source=RAT_REFERENCE)
    clip_coef: float = option(0.9, "RaT-BPTT: EMA coefficient of the image-gradient norm; gradients are clipped "
                              "to twice the average", minimum=0.0, source=RAT_REFERENCE)


def inner_step(params: torch.Tensor, grad: torch.Tensor, state: dict, optim: str, lr: float) -> Tuple[torch.Tensor, dict]:
    """One step of the inner optimiser on flat parameters, differentiable in ``params`` and ``grad``.

    SGD as ``torch.optim.SGD(lr, momentum=0.9, weight_decay=5e-4)``: ``d = g + 5e-4 w``,
    ``b = d`` at the first step else ``0.9 b + d``, ``w - lr b``. Adam as ``torch.optim.Adam(lr)``:
    bias-corrected moments, ``w - lr m^ / (sqrt(v^) + 1e-8)`` (``v^`` offset by 1e-30 under the
    square root, so that a zero-gradient entry back-propagates 0, not NaN). Source:
    fengyzpku/RaT-BPTT ``framework/distill_higher.py`` (the optimisers ``higher`` differentiates).

    Args:
        params, grad: (P,) parameters and the loss gradient at them.
        state: the optimiser's state from the previous step (``{}`` at the first).
        optim: ``SGD`` or ``Adam``.
        lr: the learning rate.

    Returns:
        ``(new params (P,), new state)``.

    Raises:
        ValueError: unknown ``optim``.
    """
    if optim == "SGD":
        d = grad + SGD_WEIGHT_DECAY * params
        buf = d if "buf" not in state else SGD_MOMENTUM * state["buf"] + d
        return params - lr * buf, {"buf": buf}
    if optim == "Adam":
        (b1, b2), t = ADAM_BETAS, state.get("t", 0) + 1
        m = (1 - b1) * grad if "m" not in state else b1 * state["m"] + (1 - b1) * grad
        v = (1 - b2) * grad * grad if "v" not in state else b2 * state["v"] + (1 - b2) * grad * grad
        denom = torch.sqrt(v / (1 - b2 ** t) + SQRT_GUARD) + ADAM_EPS
        return params - lr * (m / (1 - b1 ** t)) / denom, {"m": m, "v": v, "t": t}
    raise ValueError(f"--inner_optim {optim!r}: expected one of {', '.join(INNER_OPTIMS)}")


def truncated_unroll(loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                     start: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                     batches: Sequence[torch.Tensor], detached: int, optim: str, lr: float) -> torch.Tensor:
    """Train from ``start`` by ``len(batches)`` inner steps; the first ``detached`` run without a
    graph, the rest keep one (``create_graph``) to ``images`` and ``targets`` (RaT-BPTT's window).
    The optimiser state carries over from the detached steps into the window.

    Args:
        loss_fn: ``loss_fn(params (P,), images (B, ...), targets (B,) or (B, K))`` -> scalar.
        start: (P,) initial parameters (no gradient is taken with respect to them).
        images: (N, ...) the synthetic images (with a graph to the learned set).
        targets: (N,) class labels or (N, K) label weights (with a graph when learned).
        batches: one index tensor per inner step.
        detached: how many leading steps carry no graph (0 <= detached <= len(batches)).
        optim, lr: the inner optimiser (:func:`inner_step`).

    Returns:
        (P,) the trained parameters, with a graph through the last ``len(batches) - detached`` steps.
    """
    params, state = start.detach(), {}
    for t, index in enumerate(batches):
        progress.tick()  # a progress line / a stop inside a long iteration
        keep = t >= detached
        if not keep or not params.requires_grad:
            params = params.detach().requires_grad_(True)
        x = images[index] if keep else images.detach()[index]
        y = targets[index] if keep else targets.detach()[index]
        grad = torch.autograd.grad(loss_fn(params, x, y), params, create_graph=keep)[0]
        params, state = inner_step(params, grad, state, optim, lr)
        if not keep:
            params = params.detach()
            state = {key: value.detach() if torch.is_tensor(value) else value for key, value in state.items()}
    return params


class EmaClip:
    """RaT-BPTT's gradient clipping: an exponential moving average ``s`` of the image-gradient norm
    (``s = n`` at the first step, then ``s <- s - (1 - coef)(s - n)``, updated with the current norm
    first), and the gradient clipped to norm ``2 s`` as ``torch.nn.utils.clip_grad_norm_`` does.
    Source: fengyzpku/RaT-BPTT ``framework/distill_higher.py`` (``ema_init``, ``ema_update``) and
    ``framework/base2.py`` (``train``: ``clip_grad_norm_(data, max_norm=2 * ema)``).

    Args:
        coef: the EMA coefficient (``--clip_coef``).
    """

    def __init__(self, coef: float):
        self.coef = coef
        self.shadow: Optional[float] = None

    def update(self, norm: float) -> float:
        """Fold the norm ``norm`` into the average; returns the new average."""
        self.shadow = norm if self.shadow is None else self.shadow - (1 - self.coef) * (self.shadow - norm)
        return self.shadow

    def clip_(self, tensor: torch.Tensor) -> float:
        """Update the average with ``tensor.grad``'s norm and clip the gradient in place to twice
        the average. Returns the norm before clipping (0 when there is no gradient)."""
        if tensor.grad is None:
            return 0.0
        norm = float(tensor.grad.detach().norm())
        torch.nn.utils.clip_grad_norm_([tensor], max_norm=2 * self.update(norm))
        return norm


@register_method("RaT-BPTT")
class RaTBPTT(DistillMethod):
    """RaT-BPTT (see the module docstring). ``--lr_img`` is the reference's ``--lr`` (outer Adam),
    ``--batch_real`` its ``--batch_size``, ``--ipc`` its ``--num_per_class``; ``--Iteration`` counts
    outer steps (the reference counts epochs of ``ceil(num_train / batch_size)`` steps)."""

    reference_model_source = "the RaT-BPTT paper's ConvNet (fengyzpku/RaT-BPTT; its --arch default is mnistnet)"
    defaults = dict(ipc=1, iterations=25000, lr_img=0.01, lr_net=0.01, batch_real=200, batch_train=256,
                    init="noise", dsa_strategy="", eval_mode="S")
    options_type = RaTBPTTOptions
    options: RaTBPTTOptions
    default_eval_it = 1000
    addon_hooks = frozenset({IMAGE_LOSS, AFTER_IMAGE_UPDATE})
    unused_flags = ("dsa_strategy", "dis_metric", "outer_loop", "inner_loop")
    unused_hint = "RaT-BPTT trains without augmentation here; evaluate.py --dsa_strategy evaluates with DiffAugment"
    eval_epochs = (1000, 300)  # the shared protocol: DC's epochs (300 without augmentation)
    run_counts = (1, 10)  # main.py: one distillation, --num_train_eval 10

    def __init__(self, cfg: DistillConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        try:
            self.check_config(cfg)
        except ValueError as error:
            raise utils.UserError(str(error)) from None
        self.student_net = self.new_network()
        self.student = FlatModel(self.student_net)
        self.per_pass = math.ceil(len(self.sampler) / cfg.batch_real)
        self.detached = self.options.minwindow  # redrawn at the first iteration
        self.clip = EmaClip(self.options.clip_coef)
        self.label_weights: Optional[nn.Parameter] = None
        self.real_order: Optional[torch.Tensor] = None

    @classmethod
    def check_config(cls, cfg: DistillConfig) -> None:
        """``--window <= --totwindow`` and ``--minwindow <= --totwindow - --window``.

        Raises:
            ValueError: one line naming the flags.
        """
        opts = cls.resolve_options(cfg.extra)
        if opts.window > opts.totwindow:
            raise ValueError(f"--window {opts.window} exceeds --totwindow {opts.totwindow}")
        if opts.minwindow > opts.totwindow - opts.window:
            raise ValueError(f"--minwindow {opts.minwindow} exceeds --totwindow - --window = "
                             f"{opts.totwindow - opts.window} (the most detached steps)")

    def configure(self, syn: SyntheticSet) -> None:
        """Adam(lr_img, betas (0.9, 0.999)) over the images and, with ``--train_y``, over the label
        weights (one-hot at the start; lr ``lr_img / label_lr_scale``), which the set stores as
        logits ``log(max(weights, 1e-30))``; then the add-ons."""
        groups = [{"params": [syn.images]}]
        if self.options.train_y:
            self.label_weights = nn.Parameter(F.one_hot(syn.labels, self.num_classes).float())
            syn.learn_soft_labels(self.label_weights.detach().clamp_min(TINY_LABEL).log())
            groups.append({"params": [self.label_weights], "lr": self.cfg.lr_img / self.options.label_lr_scale})
        self.optimizer_img = torch.optim.Adam(groups, lr=self.cfg.lr_img, betas=ADAM_BETAS, eps=ADAM_EPS)
        for addon in self.addons:
            addon.attach(syn)

    # ---- pieces of an iteration ---------------------------------------------------------
    def draw_window(self, iteration: int) -> None:
        """At the first iteration of an epoch (or every iteration with ``--complete_random``) draw
        the detached steps ``k`` uniform in ``[minwindow, totwindow - window]``, and (each epoch)
        the order of the real images."""
        opts = self.options
        new_epoch = (iteration - 1) % self.per_pass == 0 or self.real_order is None
        if new_epoch:
            self.real_order = torch.randperm(len(self.sampler), generator=self.generator)
        if new_epoch or opts.complete_random:
            high = opts.totwindow - opts.window
            self.detached = int(torch.randint(opts.minwindow, high + 1, (1,), generator=self.generator))

    def real_batch(self, iteration: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """This iteration's slice of the epoch's permutation of the real training set (the last
        one of an epoch may be short, as a DataLoader without ``drop_last``)."""
        position = (iteration - 1) % self.per_pass
        index = self.real_order[position * self.cfg.batch_real:(position + 1) * self.cfg.batch_real].to(self.device)
        return self.sampler.images[index], self.sampler.labels[index]

    def inner_batches(self, steps: int) -> List[torch.Tensor]:
        """Per inner step, ``min(ipc, batch_per_class)`` random images of every class (sorted
        within the class), class-major indices into the set (``Distill.subsample``)."""
        ipc, per_class = self.cfg.ipc, min(self.cfg.ipc, self.options.batch_per_class)
        batches = []
        for _ in range(steps):
            picks = [torch.randperm(ipc, generator=self.generator)[:per_class].sort().values + ipc * c
                     for c in range(self.num_classes)]
            batches.append(torch.cat(picks).to(self.device))
        return batches

    def inner_loss(self, params: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the student at ``params`` (P,); ``targets`` (B,) classes or (B, K)
        label weights (taken as given, not normalised, as ``nn.CrossEntropyLoss`` does)."""
        return F.cross_entropy(self.student(params, images), targets)

    def targets(self, syn: SyntheticSet) -> torch.Tensor:
        """The inner steps' targets: the learned label weights (N, K) or the class labels (N,)."""
        return self.label_weights if self.label_weights is not None else syn.labels

    def loss(self, syn: SyntheticSet, iteration: int = 1) -> torch.Tensor:
        """The meta-loss of one iteration: ``CE(f(x_real; w_{k+W}), y_real)`` with the student in
        train mode (as ``higher``'s ``fnet``), a graph through the window to the images (and
        label weights)."""
        if self.real_order is None:  # called before any step
            self.draw_window(iteration)
        real, label_real = self.real_batch(iteration)
        start = torch.cat([p.detach().reshape(-1) for p in self.new_network().parameters()]).to(self.device)
        self.student_net.train()
        batches = self.inner_batches(self.detached + self.options.window)
        final = truncated_unroll(self.inner_loss, start, syn.images, self.targets(syn), batches, self.detached,
                                 self.options.inner_optim, self.options.inner_lr)
        return F.cross_entropy(self.student(final, real), label_real)

    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """Draw the window, back-propagate the meta-loss (plus the add-ons' image terms), clip the
        image gradient (:class:`EmaClip`), step Adam, clip learned labels at 0.

        Returns:
            ``{'loss', 'unroll' (k + W), 'grad_norm' (before clipping)}``, detached.
        """
        self.draw_window(iteration)
        with self.precision.autocast(self.device):
            total = self.loss(syn, iteration)
            loss = total.detach()
            for addon in self.addons:
                term = addon.image_loss(syn)
                if term is not None:
                    total = total + term
        self.optimizer_img.zero_grad(set_to_none=True)
        scaled_backward(total, self.image_scaler)
        if self.image_scaler is not None:
            self.image_scaler.unscale_(self.optimizer_img)
        norm = self.clip.clip_(syn.images)
        if self.image_scaler is None:
            self.optimizer_img.step()
        else:
            self.image_scaler.step(self.optimizer_img)
            self.image_scaler.update()
        if self.label_weights is not None:
            with torch.no_grad():
                self.label_weights.clamp_(min=0)
                syn.label_logits.copy_(self.label_weights.clamp_min(TINY_LABEL).log())
        self.after_image_update(syn)
        return {"loss": loss, "unroll": torch.tensor(float(self.detached + self.options.window)),
                "grad_norm": torch.tensor(norm)}

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Adam, the EMA of the gradient norm, this epoch's real order and detached steps, and the
        label weights."""
        state = super().state_dict()
        state.update(ema=self.clip.shadow, detached=self.detached, real_order=self.real_order,
                     label_weights=None if self.label_weights is None else self.label_weights.detach().cpu().clone())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`init_synthetic`)."""
        super().load_state_dict(state)
        self.clip.shadow, self.detached, self.real_order = state["ema"], state["detached"], state["real_order"]
        if self.label_weights is not None and state.get("label_weights") is not None:
            with torch.no_grad():
                self.label_weights.copy_(state["label_weights"].to(self.label_weights.device))
