"""The evaluation protocol: what a synthetic set is trained with (:class:`EvalProtocol`, the one
resolver, saved with every set), its per-network form (:class:`EvalConfig`) and the outcome
(:class:`EvalResult`). The protocol of the DC family of reference implementations (Zhao et al.,
"Dataset Condensation with Gradient Matching", ICLR 2021; VICO-UoE/DatasetCondensation
``utils.py`` ``evaluate_synset``): a fresh random network, SGD with momentum 0.9 and weight decay
5e-4, learning rate x0.1 after epoch ``epochs // 2 + 1`` with a new optimiser, ``epochs + 1``
epochs in total, augmentation on every training batch, one test at the end. Knows no method."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

import augment
from precision import FP32, Precision

# How a network trained on a set is fitted to its labels (``EvalConfig.label_loss``, ``--label_loss``):
# cross-entropy, or a square loss on regression targets, averaged over the K outputs (``mse``, the
# KIP colab's) or summed over them (``mse_sum``, FRePo's ``mean_squared_loss``).
LABEL_LOSSES = ("cross_entropy", "mse", "mse_sum")
# The label losses that fit (N, K) regression targets (evaluation.training.regression_targets).
SQUARE_LOSSES = ("mse", "mse_sum")
# Test-time augmentations (``--tta_mode``).
TTA_MODES = ("hflip",)
# ``--stacked_eval``: train the networks of one evaluation together, one at a time, or pick.
STACKED_EVAL_CHOICES = ("auto", "on", "off")
# ``--labels``: what the student fits (``hard``: the set's own labels, today's protocol; ``soft``: teacher
# logits stored with the set, per image or per crop and epoch; ``teacher``: a teacher queried online).
LABEL_REGIMES = ("hard", "soft", "teacher")
# ``--soft_loss`` under ``soft`` / ``teacher`` labels (:mod:`evaluation.soft_labels`).
SOFT_LOSSES = ("kl", "sce", "mse_gt")
# ``--optimizer`` of the student: DC's SGD schedule or SRe2L's AdamW with a per-epoch cosine.
STUDENT_OPTIMIZERS = ("sgd", "adamw")
# ``--student_aug``: DC/DSA augmentation (today), RandomResizedCrop + flip views, or none.
STUDENT_AUGS = ("dc", "rrc", "none")
# ``--mix_type``: batch mixing of the student's views (SRe2L ``relabel``).
MIX_TYPES = ("none", "cutmix", "mixup")
# ``--adamw_schedule``: the AdamW student's learning-rate schedule: SRe2L's per-epoch cosine, or NCFM's
# x0.5 at each fifth of the epochs (gszfwsb/NCFM ``condenser/evaluate.py``).
ADAMW_SCHEDULES = ("cosine", "multistep")


@dataclass(frozen=True)
class StudentProtocol:
    """The student-side settings added for the decoupled (soft-label) family, shared by
    :class:`EvalProtocol` and :class:`EvalConfig` (a mixin of fields; every default is today's
    protocol, so a protocol that leaves them alone trains and records exactly as before).

    Sources: VILA-Lab/SRe2L ``relabel/generate_soft_label.py`` (views, mixing, temperature) and
    ``validate/train_FKD.py`` (KL loss, AdamW + cosine); LINs-lab/RDED ``validation/main.py`` (teacher
    queried online); NUS-HPC-AI-Lab/DD-Ranking (``sce``, ``mse_gt``); G-VBSM (``mse_gt`` weight 0.1).

    Attributes:
        labels: ``--labels`` (:data:`LABEL_REGIMES`).
        soft_loss: ``--soft_loss`` (:data:`SOFT_LOSSES`), used under ``soft`` and ``teacher`` labels.
        temperature: ``--temperature`` T of ``kl`` and ``sce`` (SRe2L: 20).
        soft_t2: ``--soft_t2``: multiply ``sce`` by T² (DD-Ranking's option; SRe2L's KL has no T²).
        mse_gt_weight: ``--mse_gt_weight`` w of ``mse_gt`` = MSE(s, t) + w·CE(s, y) (G-VBSM 0.1, EDC 0.025).
        optimizer: ``--optimizer`` (:data:`STUDENT_OPTIMIZERS`): ``sgd`` = the DC schedule with ``lr``;
            ``adamw`` = SRe2L's AdamW(``adamw_lr``, ``adamw_weight_decay``) with a per-epoch cosine.
        adamw_lr, adamw_weight_decay: ``--adamw_lr`` (1e-3), ``--adamw_weight_decay`` (0.01).
        student_aug: ``--student_aug`` (:data:`STUDENT_AUGS`).
        min_scale_crops, max_scale_crops: ``--min_scale_crops`` (0.08) / ``--max_scale_crops`` (1):
            the RandomResizedCrop area range of ``rrc`` views.
        mix_type: ``--mix_type`` (:data:`MIX_TYPES`).
        cutmix, mixup: ``--cutmix`` (1.0) / ``--mixup`` (0.8): the Beta(α, α) parameter of each mix.
        mix_p: ``--mix_p`` (1.0): the probability that a batch is mixed under ``mix_type`` (NCFM 0.5;
            gszfwsb/NCFM ``utils/train_val.py``); at 1 no draw is made, so the views are today's.
        adamw_schedule: ``--adamw_schedule`` (:data:`ADAMW_SCHEDULES`): the AdamW student's schedule.
        decode_factor: ``--decode_factor`` (1): multi-formation; every stored image holds a
            ``decode_factor x decode_factor`` grid of sub-images, each upsampled to a training image
            before training (:func:`evaluation.formation.decode_zoom`; IDC / NCFM ``factor``).
    """

    labels: str = "hard"
    soft_loss: str = "kl"
    temperature: float = 20.0
    soft_t2: bool = False
    mse_gt_weight: float = 0.1
    optimizer: str = "sgd"
    adamw_lr: float = 1e-3
    adamw_weight_decay: float = 0.01
    student_aug: str = "dc"
    min_scale_crops: float = 0.08
    max_scale_crops: float = 1.0
    mix_type: str = "none"
    cutmix: float = 1.0
    mixup: float = 0.8
    mix_p: float = 1.0
    adamw_schedule: str = "cosine"
    decode_factor: int = 1

    def check_student(self) -> None:
        """Raise ``ValueError`` (naming the flag) for a value outside its choices or range."""
        for name, choices in (("labels", LABEL_REGIMES), ("soft_loss", SOFT_LOSSES), ("optimizer", STUDENT_OPTIMIZERS),
                              ("student_aug", STUDENT_AUGS), ("mix_type", MIX_TYPES),
                              ("adamw_schedule", ADAMW_SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} {getattr(self, name)!r}: expected one of {', '.join(choices)}")
        if not 0 < self.min_scale_crops <= self.max_scale_crops <= 1:
            raise ValueError(f"--min_scale_crops {self.min_scale_crops} / --max_scale_crops {self.max_scale_crops}: "
                             "expected 0 < min <= max <= 1")
        for name in ("temperature", "cutmix", "mixup", "adamw_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} {getattr(self, name)}: expected a positive number")
        if not 0 <= self.mix_p <= 1:
            raise ValueError(f"--mix_p {self.mix_p}: expected a probability in [0, 1]")
        if int(self.decode_factor) != self.decode_factor or self.decode_factor < 1:
            raise ValueError(f"--decode_factor {self.decode_factor}: expected an integer >= 1")

    def student_fields(self) -> dict:
        """The student settings that differ from their defaults (``{}`` for today's protocol)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(StudentProtocol)
                if getattr(self, f.name) != f.default}

    @property
    def is_default_student(self) -> bool:
        """Whether every student setting is today's (hard labels, SGD, DC augmentation, no mixing)."""
        return not self.student_fields()


@dataclass(frozen=True)
class EvalConfig(StudentProtocol):
    """The evaluation protocol of the DC family (VICO-UoE/DatasetCondensation ``utils.py``
    ``evaluate_synset``; docs/reference-notes.md, *Evaluation protocol*).

    Attributes:
        epochs: ``--epoch_eval_train``; ``epochs + 1`` epochs are run, the lr drops x0.1 after
            epoch ``epochs // 2 + 1`` and the optimiser (with its momentum) is rebuilt.
        lr: ``--lr_net``, the SGD learning rate (MTT-style methods pass their learned lr).
        batch_train: ``--batch_train``, synthetic images per step.
        momentum: SGD momentum (0.9 in every reference).
        weight_decay: SGD weight decay (5e-4 in every reference).
        dsa_strategy: DiffAugment strategy; empty means DC augmentation (or none).
        dc_aug: DC's ``get_daparam`` setting, used when ``dsa_strategy`` is empty.
        batch_test: test images per forward pass (does not change the result).
        tta_mode: ``""`` or ``hflip``: test-time augmentation (:func:`test_accuracy`; ``--tta``).
        deterministic: ``--deterministic``: deterministic kernels while training and testing
            (:func:`deterministic_algorithms`) and a test pass size independent of ``batch_test``.
        stacked_eval: ``--stacked_eval``: ``on`` trains the networks of one evaluation together
            (``evaluation.stacked``), ``off`` one after another, ``auto`` picks the faster
            (:func:`eval_path`). The accuracies are the same up to float rounding.
        label_loss: ``--label_loss``: ``cross_entropy`` (hard or soft labels) or ``mse`` (square
            loss on :func:`regression_targets`: centred one-hot, or the set's real-valued labels).
        precision: ``--amp`` (:class:`precision.Precision`): forward passes of training and
            testing under autocast, float16 with a ``GradScaler``. An execution choice like the
            device: recorded with the result, not saved with the set's protocol.
        labels ... mixup: the student settings of :class:`StudentProtocol` (defaults: today's protocol).
    """

    epochs: int = 300
    lr: float = 0.01
    batch_train: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa_strategy: str = ""
    dc_aug: Optional["augment.DCAugParam"] = None
    batch_test: int = 1000
    tta_mode: str = ""
    deterministic: bool = False
    stacked_eval: str = "auto"
    label_loss: str = "cross_entropy"
    precision: Precision = FP32

    def __post_init__(self) -> None:
        if self.stacked_eval not in STACKED_EVAL_CHOICES:
            raise ValueError(f"--stacked_eval {self.stacked_eval!r}: expected one of {', '.join(STACKED_EVAL_CHOICES)}")
        self.check_student()

    def describe(self) -> dict:
        """A JSON-ready record of the protocol, written beside every result (``tta`` and
        ``deterministic`` only when set; the student settings only when not today's, so a default
        protocol's record is unchanged)."""
        record = {
            "epochs": self.epochs, "lr": self.lr, "batch_train": self.batch_train, "optimizer": "SGD",
            "momentum": self.momentum, "weight_decay": self.weight_decay,
            "lr_schedule": f"x0.1 after epoch {self.epochs // 2 + 1}, optimiser rebuilt",
            "augmentation": (f"DSA {self.dsa_strategy}" if self.dsa_strategy else
                             f"DC {self.dc_aug.strategy}" if self.dc_aug is not None else "none"),
            "label_loss": self.label_loss,
        }
        if self.tta_mode:
            record["tta"] = f"{self.tta_mode} (mean of softmax probabilities)"
        if self.deterministic:
            record["deterministic"] = True
        if self.precision.enabled:
            record["amp"] = self.precision.describe()
        # "labels" in a result's protocol record is the set's label kind (methods, sets): the regime is "label_regime"
        record.update({("label_regime" if key == "labels" else key): value for key, value in self.student_fields().items()})
        if self.labels != "hard":  # the loss that trains on soft or teacher labels, defaults included
            record["label_loss"] = self.soft_loss
            record["soft_loss"] = self.soft_loss
            if self.soft_loss in ("kl", "sce"):
                record["temperature"] = self.temperature
            if self.soft_loss == "sce":
                record["soft_t2"] = self.soft_t2
            if self.soft_loss == "mse_gt":
                record["mse_gt_weight"] = self.mse_gt_weight
        if self.optimizer == "adamw":
            schedule = ("x0.5 after each fifth of the epochs" if self.adamw_schedule == "multistep" else
                        "cosine per epoch, 0.5 (1 + cos(pi e / epochs))")
            record.update(optimizer="AdamW", lr=self.adamw_lr, weight_decay=self.adamw_weight_decay,
                          lr_schedule=schedule)
            record.pop("momentum")
        if self.student_aug == "rrc":
            record["augmentation"] = (f"RandomResizedCrop scale ({self.min_scale_crops}, {self.max_scale_crops}) "
                                      "+ horizontal flip")
        elif self.student_aug == "none":
            record["augmentation"] = "none"
        return record


# The flag each recorded protocol field stands for, where the names differ.
RECORD_FLAGS = {"epochs_augmented": "--epoch_eval_train", "epochs_plain": "--epoch_eval_train", "lr": "--lr_net",
                "batch_train": "--batch_train"}


@dataclass(frozen=True)
class EvalProtocol(StudentProtocol):
    """The one evaluation-protocol resolver: what a synthetic set is trained with, before the
    evaluation network is known. :meth:`resolve` turns it into the :class:`EvalConfig` of one
    network (DC ``get_daparam`` augmentation depends on it); it is saved with every set
    (``meta['protocol']``, :meth:`as_dict`) so that ``evaluate.py`` replays exactly the protocol
    ``distill.py`` evaluated with, unless flags override a field.

    It knows no method: the distillation layer fills ``epochs_augmented`` / ``epochs_plain`` from
    the method's reference defaults (DC/DSA 1000 with augmentation, else 300; CAFE 1000 / 600;
    DataDAM 1800; DM and the trajectory-matching family 1000) or from ``--epoch_eval_train``.

    Attributes:
        epochs_augmented: ``--epoch_eval_train`` when training is augmented (DSA, or an active DC
            augmentation).
        epochs_plain: ``--epoch_eval_train`` without augmentation.
        lr: SGD learning rate (``--lr_net``) unless the set learned a step size.
        batch_train: ``--batch_train``.
        dsa_strategy: DiffAugment strategy ("" : DC's ``get_daparam`` augmentation or none).
        tta_mode, deterministic, stacked_eval, label_loss: see :class:`EvalConfig` (the distillation
            layer fills ``label_loss`` from the method's default, e.g. ``mse`` for KIP, or ``--label_loss``).
        labels ... mixup: the student settings (:class:`StudentProtocol`); saved only when they differ
            from their defaults (:meth:`as_dict`), so older files and records stay as they were.

    Raises:
        ValueError: a student setting outside its choices (:meth:`StudentProtocol.check_student`).
    """

    epochs_augmented: int = 1000
    epochs_plain: int = 300
    lr: float = 0.01
    batch_train: int = 256
    dsa_strategy: str = ""
    tta_mode: str = ""
    deterministic: bool = False
    stacked_eval: str = "auto"
    label_loss: str = "cross_entropy"

    def __post_init__(self) -> None:
        self.check_student()

    def resolve(self, dataset: str, model: str, model_eval: str, ipc: int,
                learned_lr: Optional[float] = None, precision: Precision = FP32) -> EvalConfig:
        """The :class:`EvalConfig` of evaluation network ``model_eval``.

        Args:
            dataset: dataset name (DC's augmentation choice depends on it).
            model: the network the set was distilled with.
            model_eval: the network being trained.
            ipc: images per class.
            learned_lr: a step size learned with the set (trajectory matching), used instead of ``lr``.
            precision: ``--amp`` of this run (:attr:`EvalConfig.precision`).

        Raises:
            FloatingPointError: ``learned_lr`` is not a positive finite number (the learned step
                size diverged; SGD cannot train with it).
        """
        if learned_lr is not None and not (math.isfinite(float(learned_lr)) and float(learned_lr) > 0):
            raise FloatingPointError(f"the step size learned with the set is {float(learned_lr):.4g}, not a positive "
                                     "number, so no network can be trained with it (it diverged: lower --lr_lr)")
        if self.student_aug == "dc":
            dc_aug = None if self.dsa_strategy else augment.get_daparam(dataset, model, model_eval, ipc)
            augmented = bool(self.dsa_strategy) or (dc_aug is not None and dc_aug.strategy not in ("", "none", "None"))
            dsa_strategy = self.dsa_strategy
        else:  # rrc views replace DC/DSA augmentation; none trains on the images as they are
            dc_aug, augmented, dsa_strategy = None, self.student_aug == "rrc", ""
        return EvalConfig(epochs=self.epochs_augmented if augmented else self.epochs_plain,
                          lr=float(learned_lr) if learned_lr is not None else self.lr, batch_train=self.batch_train,
                          dsa_strategy=dsa_strategy, dc_aug=dc_aug, tta_mode=self.tta_mode,
                          deterministic=self.deterministic, stacked_eval=self.stacked_eval,
                          label_loss=self.label_loss, precision=precision, **self.student_fields())

    def with_epochs(self, epochs: Optional[int]) -> "EvalProtocol":
        """This protocol with both epoch counts set to ``epochs`` (unchanged when ``None``)."""
        return self if epochs is None else dataclasses.replace(self, epochs_augmented=epochs, epochs_plain=epochs)

    def as_dict(self) -> dict:
        """JSON-ready record (``meta['protocol']`` of a result file); the student settings only
        where they differ from their defaults, so a default protocol's record is what it was."""
        student = {f.name for f in dataclasses.fields(StudentProtocol)}
        record = {key: value for key, value in dataclasses.asdict(self).items() if key not in student}
        record.update(self.student_fields())
        return record

    @classmethod
    def from_dict(cls, record: dict) -> "EvalProtocol":
        """Inverse of :meth:`as_dict`; unknown keys are ignored (a newer file), missing ones default.
        Every recorded value is checked like the flag it stands for (:data:`RECORD_FLAGS`): its type
        (the field's default's: bool, int, float or str) and its range (:meth:`check_ranges`).

        Raises:
            ValueError: ``record`` is not a dict, or a value of the wrong type or out of its range,
                naming the field and its flag.
        """
        if not isinstance(record, dict):
            raise ValueError(f"the protocol record is a {type(record).__name__}; expected a dict")
        values = {}
        for f in dataclasses.fields(cls):
            if record.get(f.name) is None:  # unrecorded: the default, as for a missing key
                continue
            value, flag = record[f.name], RECORD_FLAGS.get(f.name, f"--{f.name}")
            kind = type(f.default)
            fits = (isinstance(value, bool) if kind is bool else
                    isinstance(value, int) and not isinstance(value, bool) if kind is int else
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    if kind is float else isinstance(value, str))
            if not fits:
                raise ValueError(f"protocol field {f.name} ({flag}) is {value!r}; expected {kind.__name__}")
            values[f.name] = value
        protocol = cls(**values)
        protocol.check_ranges()
        return protocol

    def check_ranges(self) -> None:
        """Raise ``ValueError`` naming the flag for a training setting out of range: epochs and
        ``batch_train`` at least 1, ``lr`` positive, weight decay and the MSE weight non-negative
        (the student settings' choices: :meth:`StudentProtocol.check_student`)."""
        for name in ("epochs_augmented", "epochs_plain", "batch_train"):
            if getattr(self, name) < 1:
                raise ValueError(f"protocol field {name} ({RECORD_FLAGS[name]}) is {getattr(self, name)}; "
                                 "expected at least 1")
        if not self.lr > 0:
            raise ValueError(f"protocol field lr (--lr_net) is {self.lr}; expected a positive number")
        for name in ("adamw_weight_decay", "mse_gt_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"protocol field {name} (--{name}) is {getattr(self, name)}; expected >= 0")


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate_synset`: accuracies in [0, 1], training seconds and how the
    networks were trained (``path``: ``stacked`` or ``sequential``; ``path_note``: why, when the
    choice was not ``--stacked_eval on`` honoured, e.g. a fallback); ``val_accs``: the same
    networks' accuracies in [0, 1] on a validation split when one was given (``distill.py
    --select_on val``), else empty."""

    model: str
    accs: list = field(default_factory=list)
    train_time_s: float = 0.0
    path: str = ""
    path_note: str = ""
    val_accs: list = field(default_factory=list)

    @property
    def acc_mean(self) -> float:
        """Mean accuracy in [0, 1] (NaN when empty)."""
        return float(np.mean(self.accs)) if self.accs else float("nan")

    @property
    def acc_std(self) -> float:
        """Population standard deviation of the accuracies (as the references report)."""
        return float(np.std(self.accs)) if self.accs else float("nan")

    @property
    def val_acc_mean(self) -> float:
        """Mean validation accuracy in [0, 1] (NaN without a validation split)."""
        return float(np.mean(self.val_accs)) if self.val_accs else float("nan")

    @property
    def val_acc_std(self) -> float:
        """Population standard deviation of the validation accuracies (NaN without a split)."""
        return float(np.std(self.val_accs)) if self.val_accs else float("nan")

    def as_dict(self) -> dict:
        """JSON-ready ``{"mean", "std", "accs", "train_time_s"}``, with ``eval_path`` (and
        ``eval_path_note``) when known and ``val_mean`` / ``val_accs`` with a validation split."""
        record = {"mean": self.acc_mean, "std": self.acc_std, "accs": list(self.accs),
                  "train_time_s": self.train_time_s}
        if self.val_accs:
            record.update(val_mean=self.val_acc_mean, val_accs=list(self.val_accs))
        if self.path:
            record["eval_path"] = self.path
        if self.path_note:
            record["eval_path_note"] = self.path_note
        return record
