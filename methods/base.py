"""The method interface: the configuration, the synthetic set and the base class.

A distillation method is a class registered with :func:`methods.registry.register_method`. The runner
(``methods/runner.py``) builds it from a frozen :class:`DistillConfig`, asks it for the initial
:class:`SyntheticSet`, then calls :meth:`DistillMethod.step` once per iteration. The base
``step`` is ``loss -> zero_grad -> backward -> step`` on the synthetic images; methods with an
inner network loop (DC) override it. A method knows no command line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

import augment
import distributed
import networks
from methods.addons.base import AFTER_IMAGE_UPDATE, IMAGE_LOSS, TRAINING_TERM
from precision import FP32, Precision, scaled_backward
import chunked
from methods.options import MethodOptions, Option, option_specs, resolve
from methods.synthetic import SyntheticSet  # noqa: F401  (re-exported: the set lives in methods/synthetic.py)
import utils
from pretrained import teachers

@dataclass(frozen=True)
class DistillConfig:
    """Everything a method needs to know, resolved from flags and method defaults; never mutated.

    Attributes mirror the reference flags (``main.py`` / ``main_DM.py`` of
    VICO-UoE/DatasetCondensation): ``iterations`` is ``--Iteration``. Flags only one family of
    methods uses are declared by the method (its options dataclass, ``methods/options.py``) and
    travel in ``extra``; the method receives them typed (:meth:`DistillMethod.resolve_options`).
    """

    method: str
    dataset: str
    model: str = "ConvNet"
    ipc: int = 1
    iterations: int = 1000
    lr_img: float = 0.1
    lr_net: float = 0.01
    batch_real: int = 256
    batch_train: int = 256
    init: str = "noise"
    dsa_strategy: str = ""
    dis_metric: str = "ours"
    outer_loop: Optional[int] = None
    inner_loop: Optional[int] = None
    # The data flags a method may need beyond the loaded tensors (trajectory matching finds its
    # expert buffer by dataset, model, ZCA setting and ImageNet subset / resolution).
    zca: bool = False
    subset: Optional[str] = None
    res: Optional[int] = None
    # ``data.load_dataset(normalize_like=...)``: None (the dataset's own mean/std) or "CIFAR10"
    # (CIFAR100 normalised with CIFAR10's statistics, as MTT/DATM/PAD/CAFE; ``--cifar100_stats``).
    normalize_like: Optional[str] = None
    # Method-specific options given (flag name -> value; ``DistillMethod.options_type``), the others default.
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The add-ons turned on: ``{add-on name: its frozen settings}`` (``methods.addons``; each
    # add-on builds its settings from its flags and records them under its own key).
    addons: Mapping[str, Any] = field(default_factory=dict)
    # The teacher of the decoupled family (``--teacher_model`` / ``--teacher_arch``): a
    # ``pretrained.teachers.TeacherSpec.as_dict()``, or None. A method with ``needs_teacher``
    # loads it (:attr:`DistillMethod.teacher`); the others never look at it.
    teacher: Optional[Mapping[str, Any]] = None

    def replace(self, **changes) -> "DistillConfig":
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)


class DistillMethod:
    """Base class of a distillation method.

    Subclasses set ``defaults`` (their reference script's defaults of the shared flags),
    ``options_type`` (the frozen dataclass of their own flags, ``methods/options.py``), implement
    :meth:`loss` (or override :meth:`step`), and may extend :meth:`state_dict`. ``self.options``
    is the resolved ``options_type`` instance.

    The class-level settings below are grouped by concern: the shared flags' defaults and the
    method's own options; the algorithm's capabilities (what the runner, the add-ons and torchrun
    may do with it); the evaluation protocol's defaults; data normalisation; output layout.

    Args:
        cfg: the resolved configuration.
        channel, num_classes, im_size: the dataset's image shape and class count.
        sampler: a ``data.RealSampler`` holding the real training set on ``device``.
        device: where the synthetic set and the networks live.
        generator: CPU generator for real-image sampling and augmentation parameters.
    """

    name: ClassVar[str] = ""

    # ---- flags: the shared flags' defaults and the method's own options --------------------
    # Reference flag defaults of this method (override the DistillConfig field defaults).
    defaults: ClassVar[dict] = {}
    # The network the reference script distils with (``--model`` when it is left out) and where
    # that is written (:meth:`reference_network`; per dataset where the reference changes it).
    reference_model: ClassVar[Optional[str]] = "ConvNet"
    reference_model_source: ClassVar[str] = "the reference scripts' --model ConvNet"
    # This method's own flags (``distill.py --{field}``): a frozen MethodOptions dataclass.
    options_type: ClassVar[Type[MethodOptions]] = MethodOptions
    # Accepted values of --init (the first is never implied: defaults name theirs).
    init_choices: ClassVar[Tuple[str, ...]] = ("noise", "real")
    # Shared flags this method does not use: giving one is refused (``distill.py``), so a value
    # is never recorded as if it had been used.
    unused_flags: ClassVar[Tuple[str, ...]] = ()

    # ---- algorithm capabilities ---------------------------------------------------------
    # True for selection baselines (methods/coreset.py): init_synthetic returns the final set and
    # the runner runs no iteration, whatever --Iteration says.
    selection_only: ClassVar[bool] = False
    # The add-on hook points (``methods.addons.base.HOOKS``) this method honours; an add-on whose
    # ``requires`` they do not meet is refused before anything is loaded. The base class calls
    # ``image_loss`` (every :meth:`update_images`) and ``after_image_update`` (its :meth:`step`), and
    # the runner trains evaluation networks with :meth:`training_term`; a method that overrides
    # ``step``, or whose networks do not train with such a term, lists what it still honours.
    addon_hooks: ClassVar[FrozenSet[str]] = frozenset({IMAGE_LOSS, AFTER_IMAGE_UPDATE, TRAINING_TERM})
    # Names of this method's own functions that compute its matching / meta loss with the graph to
    # the set, as ``step`` calls them. A cost measurement (scripts/cost_study.py) times these calls
    # together with :meth:`update_images` (the backward to the set and the optimiser step) as "the
    # loss"; the rest of ``step`` (inner network training, loading experts) counts only to the whole
    # iteration. A method that overrides ``step`` names the functions it calls (DC:
    # ``matching_loss``; MTT: ``unroll`` and ``matching_loss``).
    loss_functions: ClassVar[Tuple[str, ...]] = ("loss",)
    # True when the loss is a sum of per-class terms, each depending only on its class's real and
    # synthetic images (DC, DSA, DM, DataDAM): under torchrun each rank then computes its classes'
    # terms (:meth:`owned_classes`) and the image gradients are summed over the ranks.
    shards_classes: ClassVar[bool] = False
    # True when BatchNorm is frozen (eval mode) wherever the sharded loss runs (DC matches gradients
    # after setting the statistics from every class), so a BatchNorm network does not stop sharding.
    frozen_batchnorm_in_loss: ClassVar[bool] = False

    # ---- evaluation protocol defaults ---------------------------------------------------
    # Evaluate every so many iterations when --eval_it is not given (eval modes S and SS).
    default_eval_it: ClassVar[int] = 2000
    # Evaluation epochs when no --epoch_eval_train is given: (with augmentation, without), where
    # augmentation is DSA or an active DC augmentation (evaluation.EvalProtocol).
    eval_epochs: ClassVar[Tuple[int, int]] = (1000, 1000)
    # (--num_exp, --num_eval) when not given: the reference script's run counts (DC/DSA main.py and
    # DM main_DM.py: 5 experiments x 20 evaluation networks).
    run_counts: ClassVar[Tuple[int, int]] = (5, 20)
    # Whose --eval_mode pools (networks.FAMILY_POOLS): "DC" or "MTT" (its M pool differs).
    pool_family: ClassVar[str] = "DC"
    # How networks trained on the set fit its labels when --label_loss is not given
    # (evaluation.LABEL_LOSSES): cross-entropy, or a square loss (mse, mse_sum) for kernel methods whose
    # labels are regression targets.
    eval_label_loss: ClassVar[str] = "cross_entropy"
    # The evaluation protocol's fields this method sets beside the ones above (``evaluation.EvalProtocol``
    # field -> value; the decoupled family's label regime, student optimiser, views and mixing);
    # flags given override them. Empty: today's protocol.
    eval_student_defaults: ClassVar[Mapping[str, Any]] = {}
    # True when the method matches against networks trained by train_original.py (NCFM's pool):
    # scripts that run every method without such models (scripts/cost_study.py) leave it out.
    needs_pretrained: ClassVar[bool] = False

    # ---- teacher (the decoupled family: methods/sre2l.py, methods/rded.py) ----------------
    # True when the method needs a trained teacher (``DistillConfig.teacher``): it is refused
    # before any data is loaded when none is given (:meth:`check_config`) and reads it as
    # :attr:`teacher`.
    needs_teacher: ClassVar[bool] = False

    # ---- data normalisation -------------------------------------------------------------
    # --cifar100_stats when not given: "cifar100" (its own mean/std, DC/DSA/DM) or "cifar10"
    # (CIFAR10's, as the CIFAR100 loaders of mtt-distillation, DATM, PAD and CAFE).
    cifar100_stats: ClassVar[str] = "cifar100"
    # --norm_stats when not given: "dc" (the fixed per-dataset mean/std of DC's utils.get_dataset)
    # or "train" (computed from the training images, as the KIP colab's get_normalization_data).
    norm_stats: ClassVar[str] = "dc"

    # ---- output layout ------------------------------------------------------------------
    # True for the trajectory-matching family (MTT, DATM, PAD): the runner also writes their
    # reference repositories' logged files (images_best.pt, labels_best.pt, lr_best.pt, ...).
    writes_reference_layout: ClassVar[bool] = False

    # The resolved options (an ``options_type`` instance), set by ``__init__``.
    options: MethodOptions

    def __init__(self, cfg: DistillConfig, *, channel: int, num_classes: int, im_size, sampler,
                 device: torch.device, generator: torch.Generator, precision: Precision = FP32):
        self.cfg = cfg
        # --amp: losses (their forward passes) run under its autocast; fp16 scales the image loss.
        self.precision = precision
        self.image_scaler = precision.grad_scaler(device)
        self.channel = channel
        self.num_classes = num_classes
        self.im_size = tuple(im_size)
        self.sampler = sampler
        self.device = device
        self.generator = generator
        self.dsa_strategy = self.training_dsa(cfg)
        self.options = self.resolve_options(cfg.extra)
        self.optimizer_img: Optional[torch.optim.Optimizer] = None
        # The add-ons the run attached (``methods.addons.base.AddOn``; :meth:`attach_addons`).
        self.addons: list = []
        self._owned_classes: Optional[list] = None
        self._owned_known = False
        self._teacher: Optional[nn.Module] = None

    @classmethod
    def option_specs(cls) -> Tuple[Option, ...]:
        """This method's own flags, one per field of ``options_type`` (``methods.options.Option``)."""
        return option_specs(cls.options_type)

    @classmethod
    def resolve_options(cls, extra: Mapping[str, Any]) -> MethodOptions:
        """This method's options: an ``options_type`` instance with the defaults overridden by
        ``extra`` (flag name -> value), each converted and validated.

        Raises:
            ValueError: a key of ``extra`` is not an option of this method, or a value is out of range.
        """
        return resolve(cls.options_type, extra, cls.name)

    def attach_addons(self, addons: Sequence) -> None:
        """Give the method its add-ons (before :meth:`init_synthetic`, which attaches them to the set).

        Raises:
            ValueError: an add-on whose requirements :attr:`addon_hooks` do not meet (``AddOn.hostable``).
        """
        for addon in addons:
            if not addon.hostable(self.addon_hooks):
                raise ValueError(f"{addon.flag}: --method {self.name} does not support the {addon.name} add-on")
        self.addons = list(addons)

    # ---- add-on hooks (methods/addons/base.py) -------------------------------------------
    def after_image_update(self, syn: SyntheticSet, net: Optional[nn.Module] = None) -> None:
        """Run every add-on's work after an image update (``net``: the method's network, if any)."""
        for addon in self.addons:
            addon.after_image_update(syn, net)

    def training_term(self, syn: SyntheticSet):
        """The ``evaluation.TrainingTerm`` networks trained on ``syn`` use (inner loops, evaluation), or ``None``.

        Raises:
            ValueError: two add-ons both change network training.
        """
        terms = [(addon.name, term) for addon in self.addons if (term := addon.training_term(syn)) is not None]
        if len(terms) > 1:
            raise ValueError(f"add-ons {', '.join(n for n, _ in terms)} both change how networks train on the set")
        return terms[0][1] if terms else None

    def addon_optimizers(self) -> list:
        """The optimisers of the add-ons' learned state, stepped with the images."""
        return [optimizer for addon in self.addons for optimizer in addon.optimizers()]

    def pop_addon_logs(self) -> Dict[str, torch.Tensor]:
        """Every add-on's values since the last call, for the per-iteration log."""
        logs: Dict[str, torch.Tensor] = {}
        for addon in self.addons:
            logs.update(addon.pop_logs())
        return logs

    def saved_entries(self, syn: SyntheticSet) -> list:
        """Tensors the add-ons append to an experiment's ``[image_syn, label_syn]`` result entry."""
        return [tensor for addon in self.addons for tensor in addon.saved_entries(syn)]

    @classmethod
    def reference_network(cls, dataset: str) -> Tuple[Optional[str], str]:
        """``(name, source)``: the network the method's reference distils ``dataset`` with, which
        ``distill.py`` uses when ``--model`` is left out and names in one line when ``--model``
        differs; ``(None, "")`` when the reference has no network for this dataset (then ConvNet,
        with no line). The base class: :attr:`reference_model` for every dataset.

        Args:
            dataset: the ``--dataset`` value as given (any case).
        """
        return cls.reference_model, cls.reference_model_source

    @classmethod
    def resolved_defaults(cls, dataset: str, ipc: int, given: Mapping[str, Any]) -> Mapping[str, Any]:
        """Defaults that depend on the dataset, ipc or the method's own flags given, as the method's
        reference scripts set them: ``zca`` (the ``--zca`` data flag), shared flags with
        method-dependent defaults (``lr_img``, ...) and names of the method's own options.
        ``distill.py`` applies them once, when resolving flags, to the flags left out (a flag or
        ``--config`` value given wins), so the frozen config records what was used. None in the
        base class.

        Args:
            dataset: the ``--dataset`` value as given (any case; ``Tiny`` for TinyImageNet).
            ipc: the resolved images per class.
            given: the method's own options given (flag name -> value).
        """
        return {}

    # ---- evaluation defaults ------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: DistillConfig) -> None:
        """Checks across flags that need the whole configuration (run by ``distill.py`` before
        any data is loaded); none in the base class (a missing teacher: :meth:`check_teacher`).

        Raises:
            ValueError: one line naming the flags and what was expected.
        """

    @classmethod
    def student_defaults(cls, cfg: DistillConfig) -> Mapping[str, Any]:
        """The evaluation protocol's fields this method sets for ``cfg`` (``evaluation.EvalProtocol``
        field -> value): :attr:`eval_student_defaults`; a method whose options decide a field (NCFM's
        multi-formation ``decode_factor``) adds it."""
        return dict(cls.eval_student_defaults)

    @classmethod
    def check_files(cls, cfg: DistillConfig) -> None:
        """That the files the method reads exist (``distill.py`` runs it before any data is loaded;
        resolving flags alone does not); none in the base class (NCFM: its pool of models).

        Raises:
            utils.UserError: one line naming the flag, the path and the command that makes the files.
        """

    @classmethod
    def check_teacher(cls, cfg: DistillConfig, labels: str = "hard") -> None:
        """That a teacher is given when the method (``needs_teacher``) or the evaluation's label
        regime (``labels`` soft or teacher) needs one; ``distill.py`` runs it before any data is
        loaded (resolving flags alone, e.g. for ``docs/flags.md``, does not).

        Raises:
            utils.UserError: :meth:`missing_teacher`.
        """
        if cfg.teacher is None and (cls.needs_teacher or labels != "hard"):
            raise utils.UserError(cls.missing_teacher(labels))

    @classmethod
    def missing_teacher(cls, labels: str = "hard") -> str:
        """The one line saying what needs a teacher (this method, or ``--labels``) and which flags give one."""
        who = f"--method {cls.name}" if cls.needs_teacher else f"--labels {labels}"
        return (f"{who} needs a teacher: give --teacher_model MODEL (a train_original.py model under "
                "--teacher_dir) or --teacher_arch ARCH --teacher_path FILE")

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (``pretrained.teachers.Teacher``: eval mode, ``forward(x (B, C, H, W))
        -> (B, K)`` logits), loaded from ``cfg.teacher`` on first use for this run's dataset, class
        count, image shape and ZCA setting; tests may assign one (``method.teacher = Teacher(networks=[net])``).

        Raises:
            utils.UserError: no teacher was given, or its files are missing or do not fit the data
                (one line, ``pretrained.teachers.load_teacher``).
        """
        if self._teacher is None:
            self._teacher = self.load_teacher()
        return self._teacher

    @teacher.setter
    def teacher(self, value: nn.Module) -> None:
        self._teacher = value

    def teacher_record(self) -> Optional[dict]:
        """What the result files record of the teacher: the loaded teacher's ``record`` (its spec,
        and per network the file, sha256, epoch and accuracy), or ``{"spec": cfg.teacher}`` before it
        is loaded; ``None`` for a method without ``needs_teacher``."""
        if not self.needs_teacher:
            return None
        record = getattr(self._teacher, "record", None)
        return dict(record) if record is not None else {"spec": dict(self.cfg.teacher or {})}

    def load_teacher(self) -> nn.Module:
        """``pretrained.teachers.load_teacher`` of ``cfg.teacher`` for this run's data (what
        :attr:`teacher` calls once).

        Raises:
            utils.UserError: see :attr:`teacher`.
        """
        if self.cfg.teacher is None:
            raise utils.UserError(self.missing_teacher("teacher"))
        spec = teachers.TeacherSpec.from_dict(self.cfg.teacher)
        return teachers.load_teacher(spec, device=self.device, dataset=self.cfg.dataset, num_classes=self.num_classes,
                                     channel=self.channel, im_size=self.im_size, zca=self.cfg.zca, subset=self.cfg.subset)

    @classmethod
    def eval_protocols(cls, cfg: DistillConfig) -> Tuple[str, ...]:
        """Which protocols evaluate this method's sets: ``("shared",)`` (``evaluation.evaluate_synset``)
        here; a method that learns a step schedule may add ``"schedule"``
        (``evaluation.evaluate_schedule`` with :meth:`step_schedule`)."""
        return ("shared",)

    def run_records(self) -> dict:
        """What ``results.json`` records of this run beside the configuration (e.g. SRe2L's
        BatchNorm-loss report); none in the base class."""
        return {}

    def step_schedule(self, syn: SyntheticSet):
        """The learned training schedule of ``syn`` as plain data (``evaluation.StepSchedule``), or
        ``None`` when the method learns none (every method but DD)."""
        return None

    @classmethod
    def training_dsa(cls, cfg: DistillConfig) -> str:
        """The DiffAugment strategy this method trains networks on the set with (its inner loops and
        its evaluation): ``cfg.dsa_strategy``, or ``""`` for none.

        Raises:
            ValueError: an unknown DiffAugment operation.
        """
        return cfg.dsa_strategy if augment.validate_strategy(cfg.dsa_strategy) else ""

    @property
    def uses_dsa(self) -> bool:
        """Whether training on the synthetic set (inner loops, evaluation) uses DiffAugment."""
        return bool(self.dsa_strategy)

    # ---- set-up -------------------------------------------------------------------------
    def new_network(self) -> nn.Module:
        """A fresh randomly initialised ``cfg.model`` on the device (global torch RNG)."""
        return networks.get_network(self.cfg.model, self.channel, self.num_classes, self.im_size, device=self.device)

    def amp_note(self) -> Optional[str]:
        """One line when ``--amp`` changes none of this method's own arithmetic (it computes in
        float64, which ``torch.autocast`` leaves alone, or runs no network), else ``None``. The
        runner logs it once as a warning when ``--amp`` is on; the evaluation networks train under
        ``--amp`` in every case. Source: PyTorch's autocast documentation (only float32 operations
        of the listed kinds are cast)."""
        return None

    def init_synthetic(self) -> SyntheticSet:
        """The initial synthetic set: N(0, 1) noise (``--init noise``) or ``ipc`` random real
        images per class (``--init real``), class-major.

        Raises:
            ValueError: unknown ``--init``.
        """
        ipc, k = self.cfg.ipc, self.num_classes
        if self.cfg.init == "real":
            images = torch.cat([self.sampler.get_images(c, ipc, self.generator) for c in range(k)])
        elif self.cfg.init == "noise":
            images = torch.randn(k * ipc, self.channel, *self.im_size, generator=self.generator).to(self.device)
        else:
            raise ValueError(f"--init {self.cfg.init!r}: expected noise or real")
        labels = SyntheticSet.class_major_labels(k, ipc, device=self.device)
        syn = SyntheticSet(images.to(self.device), labels, k, ipc)
        self.configure(syn)
        return syn

    def configure(self, syn: SyntheticSet) -> None:
        """Create the optimiser of the synthetic images: SGD(lr_img, momentum 0.5) as in DC/DM;
        then every add-on attaches its learned state to ``syn`` (:meth:`AddOn.attach`)."""
        self.optimizer_img = torch.optim.SGD([syn.images], lr=self.cfg.lr_img, momentum=0.5)
        for addon in self.addons:
            addon.attach(syn)

    # ---- several processes (torchrun) ---------------------------------------------------
    def owned_classes(self) -> Optional[list]:
        """The classes whose loss terms this rank computes, or ``None``: all of them, as one process.

        Not ``None`` only under torchrun (``distributed.world_size() > 1``) for a method with
        ``shards_classes`` and a network that is not batch-dependent in training mode
        (``chunked.batch_dependent``: a BatchNorm network's batch statistics span every class, so
        its per-class terms cannot be computed apart), unless the method freezes BatchNorm in its
        loss (``frozen_batchnorm_in_loss``); classes go round robin
        (``distributed.shard``). Decided once per method, on a probe network built without
        touching the global RNG.
        """
        if not self._owned_known:
            self._owned_known = True
            if self.shards_classes and distributed.world_size() > 1:
                with torch.random.fork_rng(devices=[]):
                    probe = networks.get_network(self.cfg.model, self.channel, self.num_classes, self.im_size,
                                                 device=torch.device("cpu"))
                if self.frozen_batchnorm_in_loss or not chunked.batch_dependent(probe.train()):
                    self._owned_classes = distributed.shard(self.num_classes)
        return self._owned_classes

    def skip_class_draws(self, c: int, num_syn: int) -> None:
        """Draw from the generator what one class's real batch and siamese augmentation would
        draw, without computing them: a rank skipping another rank's class keeps its generator
        in step with one process (every rank draws the whole stream)."""
        self.sampler.get_images(c, self.cfg.batch_real, self.generator)
        if self.dsa_strategy:
            augment.sample_diffaug_params(self.dsa_strategy, num_syn, self.im_size, self.generator, True)

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """A loss value summed over the ranks when the classes are sharded (so that every rank logs
        and checks the whole loss); ``value`` itself otherwise."""
        return distributed.sum_scalar(value) if self.owned_classes() is not None else value

    # ---- one iteration ------------------------------------------------------------------
    def augment_pair(self, real: torch.Tensor, syn: torch.Tensor):
        """Siamese DiffAugment of a real and a synthetic batch of one class (same operation and
        parameters for both); identity when DSA is off."""
        if not self.dsa_strategy:
            return real, syn
        return augment.siamese_augment(real, syn, self.dsa_strategy, self.generator)

    def sample_batches(self, syn: SyntheticSet, classes: Optional[Sequence[int]] = None):
        """Per class: ``batch_real`` real images and the synthetic images, siamese-augmented.

        Args:
            classes: keep only these classes (:meth:`owned_classes`); the others' draws are made
                and dropped (:meth:`skip_class_draws`). ``None``: every class.

        Returns:
            real (sum_c n_c, C, H, W), real labels, synthetic (K'*ipc, C, H, W), synthetic labels
            (K' = K, or the kept classes).
        """
        reals, syns, real_labels = [], [], []
        for c in range(self.num_classes):
            if classes is not None and c not in classes:
                self.skip_class_draws(c, syn.ipc)
                continue
            real = self.sampler.get_images(c, self.cfg.batch_real, self.generator)
            real, image_syn = self.augment_pair(real, syn.class_images(c))
            reals.append(real)
            syns.append(image_syn)
            real_labels.append(torch.full((real.shape[0],), c, dtype=torch.long, device=self.device))
        if classes is not None:
            label_syn = syn.labels[[c * syn.ipc + i for c in classes for i in range(syn.ipc)]]
            empty = syn.images[:0]
            return (torch.cat(reals) if reals else empty.detach(), torch.cat(real_labels) if reals else syn.labels[:0],
                    torch.cat(syns) if syns else empty, label_syn)
        return torch.cat(reals), torch.cat(real_labels), torch.cat(syns), syn.labels

    def loss(self, syn: SyntheticSet) -> torch.Tensor:
        """The matching loss of one iteration (a scalar with a graph to ``syn.images``)."""
        raise NotImplementedError

    def update_images(self, syn: SyntheticSet, loss: torch.Tensor, optimizers: Optional[list] = None) -> None:
        """The one place a method updates the synthetic set: zero the gradients, back-propagate
        ``loss`` plus every add-on's :meth:`AddOn.image_loss` on ``syn``, step.

        Args:
            syn: the synthetic set.
            loss: the method's loss, a scalar with a graph to ``syn``.
            optimizers: what to step (default: the image optimiser).
        """
        optimizers = optimizers or [self.optimizer_img]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.owned_classes() is not None:
            # Sharded classes: this rank's share of the loss, the image gradients summed over the
            # ranks, then the add-ons' terms (computed alike on every rank) once on top.
            if loss.requires_grad:
                scaled_backward(loss, self.image_scaler)
            distributed.all_reduce_gradients([syn.images])
            total = None
        else:
            total = loss
        with self.precision.autocast(self.device):
            for addon in self.addons:
                term = addon.image_loss(syn)
                if term is not None:
                    total = term if total is None else total + term
        if total is not None:
            scaled_backward(total, self.image_scaler)
        for optimizer in optimizers:
            if self.image_scaler is None:
                optimizer.step()
            else:
                self.image_scaler.step(optimizer)
        if self.image_scaler is not None:
            self.image_scaler.update()

    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """One outer iteration: the loss, :meth:`update_images`, then the add-ons' work after an
        image update (:meth:`after_image_update`; with no network of its own, an add-on that needs
        one uses a fresh random network).

        Returns:
            ``{'loss': scalar tensor}`` (detached; converted to float once by the runner). Add-on
            values come from :meth:`pop_addon_logs`.
        """
        with self.precision.autocast(self.device):
            loss = self.loss(syn)
        self.update_images(syn, loss)
        self.after_image_update(syn)
        return {"loss": self.sum_over_ranks(loss.detach())}

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Method state beyond the synthetic set (optimiser moments ...), for resuming."""
        state = {"optimizer_img": self.optimizer_img.state_dict() if self.optimizer_img else None}
        if self.addons:  # their draws and optimisers continue after a resume
            state["addons"] = {addon.name: addon.state_dict() for addon in self.addons}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (call after :meth:`init_synthetic`)."""
        if state.get("optimizer_img") is not None and self.optimizer_img is not None:
            self.optimizer_img.load_state_dict(state["optimizer_img"])
        saved = state.get("addons") or {}
        for addon in self.addons:
            # Checkpoints written before the add-on interface kept add-on state elsewhere (AddOn.legacy_state).
            addon_state = saved.get(addon.name)
            addon_state = addon_state if addon_state is not None else addon.legacy_state(state)
            if addon_state is not None:
                addon.load_state_dict(addon_state)

