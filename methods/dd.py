"""DD: dataset distillation by backpropagating through unrolled training.

Sources: Wang, Zhu, Torralba & Efros, "Dataset Distillation", arXiv 1811.10959, 2018 (Algorithm 1,
eq. 6-8: learned images x~ and step sizes eta~, ``theta_{i+1} = theta_i - eta~_i grad l(x~_i, theta_i)``,
minimise ``l(x_real, theta_T)`` over a distribution of initialisations); reference
``train_distilled_image.py`` and ``base_options.py`` of SsnL/dataset-distillation. Random truncated
backpropagation (``--rat_bptt``): Feng, Vedantam & Kempe, "Embarrassingly Simple Dataset
Distillation", ICLR 2024 (Algorithm 1, RaT-BPTT).

The set is ``distill_steps`` batches of ``distilled_images_per_class_per_step`` images per class;
one iteration trains a network from ``n_nets`` initialisations (fresh ones every iteration with
``--train_nets_type unknown_init``, fixed ones drawn once with ``known_init``) by
``T = distill_steps * distill_epochs`` differentiable gradient steps, batch ``t % distill_steps``
with the learned step size ``softplus(raw_t)`` at step ``t``, on a flat parameter vector
(``methods.mtt.FlatModel``), then takes the cross-entropy of the trained network on a batch of
real images. That loss, averaged over the initialisations, is the method's :meth:`DD.loss`; the
base class back-propagates it through the whole unroll into the images and the raw step sizes and
steps one Adam optimiser over both (the reference's ``optim.Adam(lr, betas=(0.5, 0.999))``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import evaluation
import progress
import utils
from methods.addons.base import AFTER_IMAGE_UPDATE, IMAGE_LOSS
from methods.base import DistillConfig, DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.options import TOOLKIT, MethodOptions, option
from methods.mtt import FlatModel

TRAIN_NETS_TYPES = ("unknown_init", "known_init")
EVAL_CHOICES = ("shared", "schedule", "both")


def inverse_softplus(value: float) -> float:
    """``log(exp(value) - 1)``: the raw value whose softplus is ``value`` (> 0). The reference
    stores the step sizes this way (``raw_init_distill_lr.expm1_().log_()``)."""
    return math.log(math.expm1(value))


def step_batches(num_classes: int, ipc: int, distill_steps: int, per_step: int) -> List[List[int]]:
    """Indices of each data step's images in a class-major set of ``num_classes * ipc`` images:
    step ``s`` takes images ``s*per_step .. (s+1)*per_step - 1`` of every class (the reference's
    per-step tensors, labels ``[0]*per_step + [1]*per_step + ...``).

    Raises:
        ValueError: ``distill_steps * per_step != ipc``.
    """
    if distill_steps * per_step != ipc:
        raise ValueError(f"{distill_steps} steps x {per_step} images per class != ipc {ipc}")
    return [[c * ipc + s * per_step + j for c in range(num_classes) for j in range(per_step)]
            for s in range(distill_steps)]


DD_REFERENCE = "SsnL/dataset-distillation base_options.py"


@dataclass(frozen=True)
class DDOptions(MethodOptions):
    """DD's own flags (defaults: its reference ``base_options.py``), and this toolkit's RaT-BPTT
    switch (Feng et al. 2024 give no flag of this name), truncation window and evaluation protocol."""

    distill_steps: int = option(10, "DD: data steps (batches of the set); default ipc / "
                                "distilled_images_per_class_per_step", minimum=1, source=DD_REFERENCE)
    distill_epochs: int = option(3, "DD: passes over the data steps per unroll", minimum=1, source=DD_REFERENCE)
    distilled_images_per_class_per_step: int = option(1, "DD: images per class in each data step", minimum=1,
                                                      source=DD_REFERENCE)
    distill_lr: float = option(0.02, "DD: initial value of every learned step size", minimum=0.0,
                               exclusive_minimum=True, source=DD_REFERENCE)
    n_nets: int = option(1, "DD: initialisations unrolled per iteration (meta-gradient averaged)", minimum=1,
                         source=DD_REFERENCE)
    train_nets_type: str = option("unknown_init", "DD: unknown_init (fresh initialisations every iteration) or "
                                  "known_init (n_nets fixed ones)", choices=TRAIN_NETS_TYPES, source=DD_REFERENCE)
    decay_epochs: int = option(40, "DD: multiply the outer lr by --decay_factor every N passes over the real "
                               "training set", minimum=1, source=DD_REFERENCE)
    decay_factor: float = option(0.5, "DD: outer lr decay factor", minimum=0.0, exclusive_minimum=True,
                                 source=DD_REFERENCE)
    rat_bptt: bool = option(False, "DD: random truncated backpropagation (Feng et al. 2024): unroll a random "
                            "number of steps, back-propagate through the last --truncation only", source=TOOLKIT)
    truncation: int = option(10, "DD --rat_bptt: steps back-propagated through (the window W)", minimum=1,
                             source=TOOLKIT)
    dd_eval: str = option("both", "DD: evaluation protocol: shared (fresh networks, the toolkit's protocol), "
                          "schedule (fresh networks trained by the learned step sizes, the reference's) or both",
                          choices=EVAL_CHOICES, source=TOOLKIT)


@register_method("DD")
class DD(DistillMethod):
    """Dataset distillation (Wang et al. 2018); see the module docstring.

    Flag mapping to the reference (SsnL/dataset-distillation ``base_options.py``):
    ``--lr_img`` is its ``--lr`` (Adam over images and raw step sizes, 0.01); ``--batch_real`` its
    ``--batch_size`` (real images of the meta-loss in total, 1024, drawn uniformly from the
    training set); ``--Iteration`` counts outer steps (the reference runs ``--epochs 400`` passes
    over the real training set, 59 steps each for 60,000 images at batch 1024: 23,600 steps);
    ``--decay_epochs`` / ``--decay_factor`` multiply the outer lr every so many such passes, where a
    pass is ``ceil(num_train / batch_real)`` iterations. ``--ipc`` is ``distill_steps *
    distilled_images_per_class_per_step``: ``distill_steps`` is derived from ``--ipc`` unless given.
    """

    reference_model_source = "SsnL/dataset-distillation base_options.py (--arch LeNet for MNIST, AlexCifarNet for CIFAR-10)"
    defaults = dict(ipc=10, iterations=23600, lr_img=0.01, lr_net=0.01, batch_real=1024, batch_train=256,
                    init="noise", dsa_strategy="", eval_mode="S")
    options_type = DDOptions
    options: DDOptions
    default_eval_it = 100
    # Image-update terms join the meta-loss; networks trained by the learned schedule use plain
    # cross-entropy, so no training term.
    addon_hooks = frozenset({IMAGE_LOSS, AFTER_IMAGE_UPDATE})
    unused_flags = ("dsa_strategy", "dis_metric", "outer_loop", "inner_loop")
    unused_hint = "DD trains without augmentation; evaluate.py --dsa_strategy evaluates with DiffAugment"
    eval_epochs = (1000, 300)  # the shared protocol: DC's epochs (300 without augmentation)
    run_counts = (1, 5)

    def __init__(self, cfg: DistillConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        try:
            self.check_config(cfg)
        except ValueError as error:
            raise utils.UserError(str(error)) from None
        opts = self.options
        self.per_step = opts.distilled_images_per_class_per_step
        self.distill_steps = cfg.ipc // self.per_step
        self.total_steps = self.distill_steps * opts.distill_epochs
        self.batches = step_batches(self.num_classes, cfg.ipc, self.distill_steps, self.per_step)
        self._batch_index = [torch.tensor(b, dtype=torch.long, device=self.device) for b in self.batches]
        self.student_net = self.new_network()
        self.student = FlatModel(self.student_net)
        # known_init: the fixed initialisations, drawn once from the experiment's seeded RNG.
        self.known_inits = (torch.stack([self.fresh_init() for _ in range(opts.n_nets)])
                            if opts.train_nets_type == "known_init" else None)
        self.last_unroll = self.total_steps

    # ---- configuration ------------------------------------------------------------------
    @classmethod
    def reference_network(cls, dataset: str) -> Tuple[Optional[str], str]:
        """LeNet for the 28 x 28 grey datasets (the reference's MNIST setting); for others ``(None, "")``
        (ConvNet, no line): the reference's CIFAR-10 network, AlexCifarNet, is not in networks.py."""
        if dataset.lower() in ("mnist", "fashionmnist"):
            return "LeNet", cls.reference_model_source
        return None, ""

    @classmethod
    def check_config(cls, cfg: DistillConfig) -> None:
        """``--ipc`` must be ``distill_steps x distilled_images_per_class_per_step`` (``distill_steps``
        is derived from ``--ipc`` when not given); ``--truncation`` needs ``--rat_bptt`` and at most
        ``distill_steps x distill_epochs`` steps.

        Raises:
            ValueError: one line naming the flags.
        """
        opts = cls.resolve_options(cfg.extra)
        per_step = opts.distilled_images_per_class_per_step
        if "distill_steps" in cfg.extra:
            if opts.distill_steps * per_step != cfg.ipc:
                raise ValueError(f"--ipc {cfg.ipc} but --distill_steps {opts.distill_steps} x "
                                 f"--distilled_images_per_class_per_step {per_step} = "
                                 f"{opts.distill_steps * per_step} images per class; give matching values "
                                 "(or leave --distill_steps out: it is --ipc / --distilled_images_per_class_per_step)")
        elif cfg.ipc % per_step:
            raise ValueError(f"--ipc {cfg.ipc} is not a multiple of --distilled_images_per_class_per_step {per_step}")
        steps = cfg.ipc // per_step * opts.distill_epochs
        if "truncation" in cfg.extra and not opts.rat_bptt:
            raise ValueError(f"--truncation {opts.truncation} applies only with --rat_bptt")
        if opts.rat_bptt and opts.truncation > steps:
            raise ValueError(f"--truncation {opts.truncation} exceeds the {steps} unrolled steps "
                             "(distill_steps x distill_epochs)")

    @classmethod
    def eval_protocols(cls, cfg: DistillConfig) -> Tuple[str, ...]:
        """``--dd_eval``: ``("shared",)``, ``("schedule",)`` or both."""
        choice = cls.resolve_options(cfg.extra).dd_eval
        return ("shared", "schedule") if choice == "both" else (choice,)

    def configure(self, syn: SyntheticSet) -> None:
        """The raw step sizes (T,), ``softplus(raw) = distill_lr``, and one Adam over images and raw
        step sizes (lr ``--lr_img``, betas (0.5, 0.999), as the reference); then the add-ons."""
        syn.learn_step_schedule(torch.full((self.total_steps,), inverse_softplus(self.options.distill_lr)))
        self.optimizer_img = torch.optim.Adam([syn.images, syn.step_lr_raw], lr=self.cfg.lr_img, betas=(0.5, 0.999))
        for addon in self.addons:
            addon.attach(syn)

    # ---- pieces of an iteration ---------------------------------------------------------
    def fresh_init(self) -> torch.Tensor:
        """A random initialisation of ``cfg.model`` as a flat vector (P,) (global torch RNG)."""
        net = self.new_network()
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def initialisations(self) -> List[torch.Tensor]:
        """This iteration's ``n_nets`` starting points (P,): fresh ones, or the known ones."""
        if self.known_inits is not None:
            return list(self.known_inits)
        return [self.fresh_init() for _ in range(self.options.n_nets)]

    def step_lrs(self, syn: SyntheticSet) -> torch.Tensor:
        """The T step sizes ``softplus(raw)`` (with a graph to ``syn.step_lr_raw``)."""
        return F.softplus(syn.step_lr_raw)

    def real_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``batch_real`` real training images drawn uniformly without replacement, and their labels."""
        count = len(self.sampler)
        index = torch.randperm(count, generator=self.generator)[:min(self.cfg.batch_real, count)].to(self.device)
        return self.sampler.images[index], self.sampler.labels[index]

    def unroll_length(self) -> Tuple[int, int]:
        """``(steps, window)``: how many steps to unroll and how many of the last ones carry a graph.
        Full unroll: ``(T, T)``. RaT-BPTT: steps uniform in ``[W, T]``, window ``W``."""
        if not self.options.rat_bptt:
            return self.total_steps, self.total_steps
        window = self.options.truncation
        steps = int(torch.randint(window, self.total_steps + 1, (1,), generator=self.generator))
        return steps, window

    def unroll(self, syn: SyntheticSet, start: torch.Tensor, steps: int, window: int) -> torch.Tensor:
        """Train from ``start`` (P,) by the first ``steps`` steps of the schedule; the last
        ``window`` keep their graph (``create_graph``) to the images and step sizes, the earlier
        ones run detached (RaT-BPTT). Returns the trained flat parameters (P,)."""
        lrs = self.step_lrs(syn)
        params = start.detach().clone().requires_grad_(True)
        self.student_net.train()
        for t in range(steps):
            progress.tick()  # a progress line / a stop inside a long iteration
            index = self._batch_index[t % self.distill_steps]
            keep_graph = t >= steps - window
            images = syn.images[index] if keep_graph else syn.images.detach()[index]
            loss = F.cross_entropy(self.student(params, images), syn.labels[index])
            grad = torch.autograd.grad(loss, params, create_graph=keep_graph)[0]
            if keep_graph:
                params = params - lrs[t] * grad
            else:
                params = (params - lrs[t].detach() * grad).detach().requires_grad_(True)
        return params

    def loss(self, syn: SyntheticSet) -> torch.Tensor:
        """The meta-loss: mean over the initialisations of ``CE(net_{theta_T}(x_real), y_real)``
        after the unroll (eval mode, as the reference's final objective), with a graph to the
        images and raw step sizes. The graphs of all ``n_nets`` unrolls are alive together."""
        real, label_real = self.real_batch()
        steps, window = self.unroll_length()
        self.last_unroll = steps
        total = torch.zeros((), device=self.device)
        starts = self.initialisations()
        for start in starts:
            final = self.unroll(syn, start.to(self.device), steps, window)
            self.student_net.eval()
            total = total + F.cross_entropy(self.student(final, real), label_real)
        return total / len(starts)

    def outer_lr(self, iteration: int) -> float:
        """``--lr_img`` decayed by ``decay_factor`` every ``decay_epochs`` passes over the real training
        set. The reference steps its StepLR at the start of every pass, so pass ``e`` (from 0) runs at
        ``lr * factor ** ((e + 1) // decay_epochs)``."""
        per_pass = math.ceil(len(self.sampler) / self.cfg.batch_real)
        epoch = (iteration - 1) // per_pass
        return self.cfg.lr_img * self.options.decay_factor ** ((epoch + 1) // self.options.decay_epochs)

    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """Set the outer lr (:meth:`outer_lr`), then the base step (:meth:`loss`, one Adam step).

        Returns:
            ``{'loss', 'lr_mean' (mean learned step size), 'unroll' (steps unrolled)}``, detached.
        """
        for group in self.optimizer_img.param_groups:
            group["lr"] = self.outer_lr(iteration)
        logs = super().step(syn, iteration)
        logs["lr_mean"] = self.step_lrs(syn).detach().mean()
        logs["unroll"] = torch.tensor(float(self.last_unroll))
        return logs

    # ---- the learned schedule -----------------------------------------------------------
    def step_schedule(self, syn: SyntheticSet) -> evaluation.StepSchedule:
        """The learned schedule as plain data: step ``t`` uses data step ``t % distill_steps`` with
        step size ``softplus(raw_t)``."""
        lrs = self.step_lrs(syn).detach().cpu().tolist()
        batches = tuple(tuple(self.batches[t % self.distill_steps]) for t in range(self.total_steps))
        return evaluation.StepSchedule(lrs=tuple(lrs), batches=batches, epochs=self.options.distill_epochs)

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The Adam state and, with ``known_init``, the fixed initialisations (n_nets, P)."""
        state = super().state_dict()
        if self.known_inits is not None:
            state["known_inits"] = self.known_inits.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`init_synthetic`)."""
        super().load_state_dict(state)
        if self.known_inits is not None and state.get("known_inits") is not None:
            self.known_inits = state["known_inits"].to(self.known_inits.device)
