"""The ``evaluate.py`` command line: its flags, the saved sets (read by ``sets.saved``) made ready
for training, and the evaluation of their rows. Each set is trained with the evaluation protocol
saved with it (``meta['protocol']``, ``evaluation.EvalProtocol``) replayed exactly, each flag given
overriding its field; for files of an older version of this toolkit, the protocol of the method
that made them; for MTT/DATM/PAD's logged files (``images_best.pt`` directories, bare
``images_*.pt``), the protocol those references evaluate them with (DSA, 1000 epochs, the learned
step size: :func:`reference_log_protocol`); for the DC family's ``res_*.pt``, the DC protocol
(1000 epochs with augmentation, else 300; lr 0.01; batch 256). The network a set was distilled
with and its ipc come from its record; ``--model`` only overrides the former.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import augment
import cli
import distributed
import evaluation
import methods
import networks
import storage
import tables
import utils
from cli import eval_options, evaluate_regimes
from methods import addons
from methods.addons.clom import add_original_model_args, split_list
from sets import assess, comparison, files, ranking
from sets.saved import SavedSet, read_saved_set
from pretrained import original_files

DEFAULT_MODEL = "ConvNet"  # a set that records no network, and --baseline random alone

logger = logging.getLogger(__name__)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The ``evaluate.py`` flags. Protocol flags default to ``None``: the set's saved protocol."""
    parser = cli.OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--syn_path", nargs="+", help="result file(s) {'data': [[image_syn, label_syn], ...], ...} "
                        "or distill.py run directories (their res_*.pt); several give one table")
    source.add_argument("--baseline", choices=["random"], help="evaluate ipc random real images per class instead")
    parser.add_argument("--labels_path", default=None,
                        help="with --syn_path images_*.pt of MTT/DATM/PAD logs: their labels_*.pt (class indices or "
                             "soft-label logits; default: class-major hard labels)")
    parser.add_argument("--lr_path", default=None, help="with --syn_path images_*.pt: the learned lr_*.pt (default: the lr_*.pt beside the "
                        "images, if any)")
    parser.add_argument("--ipc", type=cli.positive_int, default=None,
                        help="images per class for --baseline random (a set's ipc comes from its record)")
    parser.add_argument("--model", default=None,
                        help="the model the set was distilled with (default: the one its record names, else "
                             "ConvNet); decides the --eval_mode pool")
    parser.add_argument("--eval_mode", default="SS", help="evaluation pool: S, SS, M, B, W, D, A, P, N, C")
    parser.add_argument("--pool_family", default="DC", choices=tuple(networks.FAMILY_POOLS),
                        help="whose --eval_mode pools: DC (DatasetCondensation, DM, DataDAM, CAFE) or MTT "
                             "(mtt-distillation, DATM, PAD; its M pool is ConvNet AlexNet VGG11 ResNet18_AP ResNet18)")
    parser.add_argument("--models", nargs="+", default=None, help="explicit evaluation networks (overrides --eval_mode)")
    parser.add_argument("--random_baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate ipc random real images per class under the same protocol (table row, IOR)")
    parser.add_argument("--original_path", default="pretrained_model",
                        help="train_original.py --save_path: whole-dataset accuracy row when its summary.json exists")
    parser.add_argument("--exp", type=cli.non_negative_int, nargs="*", default=None, help="which experiments of the file (default all)")
    parser.add_argument("--num_eval", type=cli.positive_int, default=5, help="networks per synthetic set (baseline: random subsets)")
    parser.add_argument("--epoch_eval_train", type=cli.positive_int, default=None,
                        help="training epochs (default: the protocol saved with the set, e.g. DataDAM 1800; MTT/DATM/PAD "
                             "logged files: 1000; other files without one: 1000 with DSA or DC augmentation, else 300)")
    parser.add_argument("--lr_net", type=cli.positive_float, default=None,
                        help="SGD learning rate (default: the step size learned with the set (MTT/DATM/PAD), else the "
                             "saved --lr_net, else 0.01, said in one line for MTT's logged files)")
    parser.add_argument("--batch_train", type=cli.positive_int, default=None,
                        help="training batch size (default: the saved protocol's, else 256)")
    parser.add_argument("--dsa_strategy", default=None,
                        help="DiffAugment strategy for training (default: the one saved with the set; MTT/DATM/PAD logged "
                             "files: color_crop_cutout_flip_scale_rotate; else DC augmentation; 'none' for DC augmentation)")
    parser.add_argument("--dd_eval", default=None, choices=("shared", "schedule", "both"),
                        help="sets with a learned step schedule (DD): train fresh networks with the shared protocol, "
                             "by the learned schedule (DD's own), or both (default: what distill.py evaluated with; "
                             "sets without a schedule: shared)")
    parser.add_argument("--out", default=None, help="write the accuracies as JSON here and the table as CSV beside it "
                             "(the same name with .csv: --out DIR/eval.json writes DIR/eval.json and DIR/eval.csv, so "
                             "--out may not end in .csv); never an input (a --syn_path file or a file of its run "
                             "directory)")
    add_score_args(parser)
    evaluate_regimes.add_regime_args(parser)
    addons.add_eval_args(parser)  # every registered add-on's own evaluate.py flags (feature labels: --lbd)
    eval_options.add_eval_option_args(parser, saved_default=True)
    cli.add_data_args(parser, zca_default="the set's record")
    cli.add_runtime_args(parser)
    cli.add_amp_arg(parser)
    parser.add_argument("--assess", action="store_true",
                        help="instead of training: OM accuracy / loss and synthetic-real distances on original models "
                             "(assess.py); JSON to --out or next to --syn_path")
    parser.add_argument("--assess_real", type=cli.positive_int, default=500, help="--assess: real images per class (seeded draw)")
    add_original_model_args(parser.add_argument_group("original models for --assess"), clom=False)
    return parser


def add_score_args(parser: argparse.ArgumentParser) -> None:
    """DD-Ranking's score flags (``sets.ranking``; names as its ``compute_metrics`` arguments)."""
    group = parser.add_argument_group("DD-Ranking scores (HLR, IOR, LRS, ARS; docs/evaluation.md)")
    group.add_argument("--lrs_lambda", type=cli.fraction, default=ranking.LRS_LAMBDA,
                       help="LRS weight: alpha = lrs_lambda*IOR - (1-lrs_lambda)*HLR (DD-Ranking default 0.5)")
    group.add_argument("--ars_lambda", type=cli.fraction, default=ranking.ARS_LAMBDA,
                       help="ARS weight of the augmented gain over random against the gain without augmentation "
                            "(DD-Ranking default 0.5)")
    group.add_argument("--score_units", default="points", choices=tuple(ranking.SCORE_UNITS),
                       help="accuracies entering alpha and beta: points (percentage points, DD-Ranking's code) or "
                            "fraction (in [0, 1], the [-1, 1] range its documentation's normalisation assumes)")
    group.add_argument("--ars", action="store_true",
                       help="also train every set and random row without any training augmentation (same epochs) "
                            "and report DD-Ranking's augmentation-robust score ARS")


def score_settings(args: argparse.Namespace) -> ranking.ScoreSettings:
    """The :class:`sets.ranking.ScoreSettings` of the flags.

    Raises:
        utils.UserError: a lambda outside [0, 1] (one line naming the flag).
    """
    try:
        return ranking.ScoreSettings(lrs_lambda=args.lrs_lambda, ars_lambda=args.ars_lambda, units=args.score_units)
    except ValueError as error:
        raise utils.UserError(str(error)) from None


def resolve_models(args: argparse.Namespace, model: Optional[str] = None) -> List[str]:
    """The evaluation networks: ``--models`` or the ``--eval_mode`` pool of ``model`` (the network
    the sets were distilled with, :func:`distilled_with`; default ``--model``, else ConvNet).

    Raises:
        utils.UserError: an unknown network or mode.
    """
    model = model or args.model or DEFAULT_MODEL
    cli.check_models([model], "--model")
    if args.models:
        cli.check_models(args.models, "--models")
        return list(dict.fromkeys(args.models))
    return cli.resolve_eval_models(args.eval_mode, model, args.pool_family)


def check_args(args: argparse.Namespace) -> None:
    """Value checks that need no data (the ``--lr_path`` file is checked where it is read, ``sets.files``).

    Raises:
        utils.UserError: one line naming the flag.
    """
    if args.assess and not args.syn_path:
        raise utils.UserError("--assess needs --syn_path (a saved synthetic set)")
    if args.baseline and args.ipc is None:
        raise utils.UserError("--baseline random needs --ipc N with N >= 1")
    if args.syn_path and args.ipc is not None:
        raise utils.UserError("--ipc is for --baseline random; a set's ipc comes from its record (leave --ipc out)")
    if args.model is not None:
        cli.check_models([args.model], "--model")
    if args.models:
        cli.check_models(args.models, "--models")
    score_settings(args)
    try:
        addons.check_eval_flags(vars(args))
    except ValueError as error:
        raise utils.UserError(str(error)) from None
    if args.dsa_strategy is not None:
        try:
            augment.validate_strategy(args.dsa_strategy)
        except ValueError as error:
            raise utils.UserError(str(error)) from None


def reference_log_protocol() -> evaluation.EvalProtocol:
    """The protocol MTT, DATM and PAD evaluate the sets they log with (GeorgeCazenavette/mtt-distillation,
    NUS-HPC-AI-Lab/DATM and PAD ``distill.py``: DSA ``color_crop_cutout_flip_scale_rotate``,
    ``--epoch_eval_train 1000``, ``--batch_train 256``, lr = the learned step size ``syn_lr``), taken
    from our MTT method's evaluation defaults (``methods.mtt.MTT``). Its ``lr`` applies only where no
    step size is recorded: MTT's ``--lr_teacher`` default 0.01, where its learned step size starts."""
    mtt = methods.get_method_class("MTT")
    augmented, plain = mtt.eval_epochs
    return evaluation.EvalProtocol(epochs_augmented=augmented, epochs_plain=plain,
                                   lr=mtt.options_type.__dataclass_fields__["lr_teacher"].default,
                                   batch_train=mtt.defaults["batch_train"], dsa_strategy=mtt.defaults["dsa_strategy"])


def saved_protocol(saved: SavedSet) -> evaluation.EvalProtocol:
    """The protocol a set was evaluated with when it was made (module docstring)."""
    if saved.protocol is not None:
        return saved.protocol
    if saved.is_reference_log:
        return reference_log_protocol()
    meta = saved.meta
    config = meta.get("config") or {}
    strategy = meta.get("dsa_strategy") or ""
    if meta.get("method") in methods.METHODS:  # an older file of ours: its method's defaults
        method_class = methods.get_method_class(meta["method"])
        augmented, plain = method_class.eval_epochs
        return evaluation.EvalProtocol(epochs_augmented=augmented, epochs_plain=plain, lr=config.get("lr_net", 0.01),
                                  batch_train=config.get("batch_train", 256), dsa_strategy=strategy,
                                  label_loss=method_class.eval_label_loss)
    return evaluation.EvalProtocol(dsa_strategy=strategy)


def apply_flags(protocol: evaluation.EvalProtocol, args: argparse.Namespace) -> evaluation.EvalProtocol:
    """``protocol`` with every protocol flag the user gave (``None``: not given) put in."""
    changes = {}
    if args.lr_net is not None:
        changes["lr"] = args.lr_net
    if args.batch_train is not None:
        changes["batch_train"] = args.batch_train
    if args.dsa_strategy is not None:
        changes["dsa_strategy"] = "_".join(augment.validate_strategy(args.dsa_strategy))
    changes.update(eval_options.eval_option_values(args, given_only=True))
    return dataclasses.replace(protocol, **changes).with_epochs(args.epoch_eval_train)


def training_term(saved: SavedSet, index: int, addon_flags: Optional[Mapping[str, Any]] = None):
    """Experiment ``index``'s training term from its add-ons' raw saved entries, in one call into the
    add-ons (``methods.addons.saved_term``; ``addon_flags``, the add-ons' ``evaluate.py`` flag values
    such as ``--lbd``, override their saved settings), or ``None``.

    Raises:
        utils.UserError: a saved entry does not fit the set, or its add-on is not installed.
    """
    experiment = saved.experiments[index]
    try:
        return addons.saved_term(experiment.addons, saved.meta.get("config"), experiment.images.shape[0],
                                 saved.num_classes, addon_flags or {})
    except ValueError as error:
        raise utils.UserError(f"--syn_path data[{saved.indices[index]}] {error}") from None


def to_evaluate(saved: SavedSet, label_loss: str = "cross_entropy", addon_flags: Optional[Mapping[str, Any]] = None,
                use_learned_lr: bool = True) -> List[comparison.SetToEvaluate]:
    """The experiments of a saved set ready for the protocol: labels as networks fit them
    (``SavedExperiment.training_labels`` under ``label_loss``), the learned step size unless
    ``use_learned_lr`` is off (``--lr_net`` given), the add-ons' training term (:func:`training_term`)
    and the learned step schedule.

    Raises:
        utils.UserError: see :func:`training_term`.
    """
    return [comparison.SetToEvaluate(e.images, e.training_labels(label_loss), e.learned_lr if use_learned_lr else None,
                                     training_term(saved, index, addon_flags), e.schedule)
            for index, e in enumerate(saved.experiments)]


def read_experiments(path: str, record, exp: Optional[Sequence[int]] = None, labels_path: Optional[str] = None,
                     lr_path: Optional[str] = None, addon_flags: Optional[Mapping[str, Any]] = None,
                     use_learned_lr: bool = True,
                     dataset: Optional[str] = None,
                     label_loss: str = "cross_entropy") -> Tuple[SavedSet, List[comparison.SetToEvaluate]]:
    """``sets.saved.read_saved_set`` and :func:`to_evaluate` in one call (``scripts/continual.py``).

    Float (N, K) labels are soft-label logits (DATM's format and ours) and become probabilities;
    under the ``mse`` label loss they are real-valued regression targets (KIP's learned labels)
    and are kept as they are. A set saved with an add-on's entry trains with its term (:func:`training_term`;
    e.g. feature labels, ``addon_flags={'lbd': x}`` overriding lambda; 0 trains with CE only).

    Raises:
        utils.UserError: the file does not match the dataset or ``exp``, or cannot be read.
    """
    saved = read_saved_set(path, record, exp, labels_path, lr_path, dataset=dataset)
    return saved, to_evaluate(saved, label_loss, addon_flags, use_learned_lr)


def load_set(path: str, args: argparse.Namespace, record) -> Tuple[SavedSet, List[comparison.SetToEvaluate], evaluation.EvalProtocol]:
    """A saved set with ``evaluate.py``'s flags: its record, its experiments ready for training and
    its protocol after the flags.

    Raises:
        utils.UserError: see ``sets.saved.read_saved_set`` (which refuses a set recording another
            preprocessing than the test set's) and :func:`training_term`.
    """
    saved = read_saved_set(path, record, args.exp, args.labels_path, args.lr_path, dataset=args.dataset)
    protocol = apply_flags(saved_protocol(saved), args)
    experiments = to_evaluate(saved, protocol.label_loss, vars(args), use_learned_lr=args.lr_net is None)
    if saved.is_reference_log and args.lr_net is None and any(e.learned_lr is None for e in saved.experiments):
        images = os.path.join(path, files.BEST_IMAGES) if saved.layout == "logged" else path
        logger.warning("--syn_path %s: no learned step size is recorded with the set (MTT saves images_best.pt and "
                       "labels_best.pt without an lr file), so its networks train at lr %g (MTT's --lr_teacher "
                       "default, where the learned step size starts); give another with --lr_net LR or "
                       "--lr_path %s", path, protocol.lr, files.lr_file_beside(images) or "lr_best.pt")
    return saved, experiments, protocol


def adopt_recorded_data_flags(args: argparse.Namespace, paths: Sequence[str]) -> argparse.Namespace:
    """``args`` with the data flags left out taken from what the sets record, so that a set is tested
    on images preprocessed as it was distilled without the user repeating the flags: ``--zca`` (on
    when every set was distilled on whitened images, else off), ``--norm_stats train`` (the KIP
    colab's own-statistics normalisation) and ``--cifar100_stats cifar10`` when every set records
    it (``meta['normalize_like']``). A flag given is kept (``sets.checks.check_preprocessing`` then refuses a
    set that disagrees). One line names what was taken. Files without a ``meta`` record (the
    references' ``res_*.pt``, logged directories) decide nothing.

    Args:
        args: the parsed flags (``--zca`` None when left out); paths: the expanded ``--syn_path`` files.

    """
    metas = []
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            meta = files.load_results(path).get("meta")
        except utils.UserError:  # a bare tensor file, or one load_set reports in its own words
            continue
        if isinstance(meta, dict) and "zca" in meta:
            metas.append(meta)
    values, taken = dict(vars(args)), []
    if args.zca is None:
        values["zca"] = bool(metas) and all(meta.get("zca") for meta in metas)
        if values["zca"]:
            taken.append("--zca")
    likes = {meta.get("normalize_like") for meta in metas if "normalize_like" in meta}
    if len(likes) == 1 and not values["zca"]:
        like = likes.pop()
        from data import TRAIN_STATS

        if like == TRAIN_STATS and args.norm_stats is None:
            values["norm_stats"] = "train"
            taken.append("--norm_stats train")
        elif like == "CIFAR10" and args.cifar100_stats is None and args.dataset.lower() == "cifar100":
            values["cifar100_stats"] = "cifar10"
            taken.append("--cifar100_stats cifar10")
    if taken:
        print(f"data: {' '.join(taken)} as the set(s) record", file=sys.stderr)
    return argparse.Namespace(**values)


def set_protocols(saved: SavedSet, args: argparse.Namespace) -> Tuple[str, ...]:
    """Which protocols evaluate a set: ``--dd_eval`` when given, else the ones ``distill.py`` used
    (``SavedSet.eval_protocols``).

    Raises:
        utils.UserError: the schedule protocol is asked for a set that learned no step schedule.
    """
    choice = getattr(args, "dd_eval", None)
    protocols = saved.eval_protocols if choice is None else ("shared", "schedule") if choice == "both" else (choice,)
    if "schedule" in protocols and not saved.has_schedule:
        raise utils.UserError(f"--dd_eval {choice or 'schedule'}: {saved.path} holds no learned step schedule "
                              "(only DD sets do); use --dd_eval shared")
    return protocols


def distilled_with(args: argparse.Namespace, sets: Sequence[SavedSet]) -> str:
    """The network the sets were distilled with: ``--model`` when given, else the one their records
    name (ConvNet when none does).

    Raises:
        utils.UserError: the records name different networks and ``--model`` is not given.
    """
    if args.model:
        return args.model
    recorded = sorted({saved.model for saved in sets if saved.model})
    if len(recorded) > 1:
        raise utils.UserError(f"--syn_path: the sets were distilled with different models ({', '.join(recorded)}); "
                              "pass --model to choose the one whose --eval_mode pool and protocol apply")
    return recorded[0] if recorded else DEFAULT_MODEL


@dataclasses.dataclass(frozen=True)
class EvaluationPlan:
    """What ``evaluate.py`` trains: the evaluation networks, the network the sets were distilled
    with, the protocol every row shares (its ``labels`` replaced per row), the ipc of every
    random-real row, the variants every set and random row is trained under: ``(label regime,
    augmented)`` pairs (``cli.evaluate_regimes.label_regimes``; with ``--ars`` each again without
    training augmentation), and the teacher that labels the ``soft`` / ``teacher`` rows (its spec,
    and the record it replays when it comes from the sets)."""

    models: Tuple[str, ...]
    model: str
    protocol: evaluation.EvalProtocol
    ipcs: Tuple[int, ...]
    variants: Tuple[Tuple[str, bool], ...] = (("hard", True),)
    teacher: Optional[Any] = None  # pretrained.teachers.TeacherSpec
    teacher_record: Optional[dict] = None
    teacher_from_flags: bool = False


def plan_evaluation(args: argparse.Namespace, record, loaded: Sequence[tuple]) -> EvaluationPlan:
    """The :class:`EvaluationPlan` of the loaded sets (:func:`load_set` triples) and the flags: the
    model from the records (:func:`distilled_with`), one protocol for every row
    (``sets.comparison.common_protocol``), the ipcs of the sets (and ``--ipc`` with ``--baseline``).

    Raises:
        utils.UserError: the sets disagree on their protocol or model; an unknown network; an ipc
            larger than the smallest class where random real images are drawn.
    """
    model = distilled_with(args, [saved for saved, _, _ in loaded])
    spec, recorded = evaluate_regimes.resolve_teacher(args, [saved for saved, _, _ in loaded])
    own = [protocol for _, _, protocol in loaded] or [baseline_protocol(args)]
    regimes = evaluate_regimes.label_regimes(args, own, spec is not None)
    try:  # the label regime is varied per row, so the sets need only agree on the rest
        protocol = (comparison.common_protocol([dataclasses.replace(p, labels="hard") for _, _, p in loaded])
                    or dataclasses.replace(baseline_protocol(args), labels="hard"))
    except ValueError as error:
        raise utils.UserError(f"--syn_path: {error}; pass the protocol's flags (--epoch_eval_train, --batch_train, "
                              "--dsa_strategy, --optimizer, --student_aug, --mix_type) to evaluate every row under one") from None
    ipcs = sorted({saved.ipc for saved, _, _ in loaded} | ({args.ipc} if args.baseline else set()))
    for ipc in ipcs:
        if ipc > int(record.labels_train.bincount().min()) and (args.baseline or args.random_baseline):
            raise utils.UserError(f"--ipc {ipc} exceeds the smallest class of {args.dataset}")
    variants = tuple((regime, True) for regime in regimes) + tuple((regime, False) for regime in regimes if args.ars)
    needed = any(regime != "hard" for regime in regimes)
    return EvaluationPlan(tuple(resolve_models(args, model)), model, protocol, tuple(ipcs), variants,
                          spec if needed else None, recorded, teacher_flags_given(args))


def teacher_flags_given(args: argparse.Namespace) -> bool:
    """Whether the teacher flags name a teacher (else a teacher comes from the sets' record)."""
    return bool(getattr(args, "teacher_model", None) or getattr(args, "teacher_path", None))


def row_suffix_of(row: comparison.Row) -> str:
    """The regime / augmentation part of a row's name, for its report lines."""
    return comparison.row_suffix(row.labels, row.augmented)


def _report(model_eval: str, accs: List[float], cfg: evaluation.EvalConfig, what: str, seconds: float) -> None:
    """One printed line per evaluated model of a row trained by a shared protocol."""
    print(f"{model_eval:<16} {tables.format_acc(accs)} %  ({len(accs)} networks, {cfg.epochs} epochs, "
          f"{cfg.describe()['augmentation']}; {what}; {seconds:.1f} s)")


def set_rows(args: argparse.Namespace, record, plan: EvaluationPlan, saved: SavedSet,
             experiments: List[comparison.SetToEvaluate], protocol: evaluation.EvalProtocol, test_images, test_labels,
             device, precision, teacher=None) -> List[comparison.Row]:
    """The table rows of one saved set: trained by ``protocol`` (``shared``: one row per variant of
    the plan, label regime and augmentation, with ``teacher`` for the soft and teacher regimes)
    and/or by its learned step schedule (``schedule``, DD) as :func:`set_protocols` says; a line
    printed per model.

    Raises:
        utils.UserError: the schedule protocol for a set without one; a training term that does not
            fit an evaluation network.
        FloatingPointError: a training loss became NaN or infinite.
    """
    name, rows = os.path.basename(saved.path), []
    # An add-on's training term (e.g. feature labels): a note in the report, fields in the record.
    term = next((e.term for e in experiments if e.term is not None), None)
    what = name + (f"; {term.note()}" if term is not None else "")
    common = dict(ipc=saved.ipc, method=saved.method, dataset=args.dataset, path=saved.path)
    protocols = set_protocols(saved, args)
    shared = []
    for labels, augmented in (plan.variants if "shared" in protocols else ()):
        row = comparison.Row(name=f"{saved.method} ipc {saved.ipc} ({name}){comparison.row_suffix(labels, augmented)}",
                             kind="synthetic", labels=labels, augmented=augmented, **common)
        try:
            rows.append(comparison.evaluate_set_row(
                row, experiments, plan.models, protocol, plan.model, test_images, test_labels, record.num_classes,
                num_eval=args.num_eval, device=device, seed=args.seed, precision=precision, teacher=teacher,
                report=lambda model_eval, accs, cfg, _, seconds, row=row: _report(model_eval, accs, cfg,
                                                                                 what + row_suffix_of(row), seconds)))
        except ValueError as error:
            raise utils.UserError(f"{saved.path}: {error} (--lbd 0 evaluates without feature labels)") from None
        shared.append(row)
    if "schedule" in protocols:  # DD's own protocol: fresh networks trained by the learned steps
        scheduled = comparison.Row(name=f"{saved.method} ipc {saved.ipc}, learned schedule ({name})", kind="schedule",
                                   **common)
        rows.append(comparison.evaluate_schedule_row(
            scheduled, experiments, plan.models, test_images, test_labels, record.num_classes,
            num_eval=args.num_eval, device=device, seed=args.seed,
            report=lambda model_eval, accs, described, _, seconds: print(
                f"{model_eval:<16} {tables.format_acc(accs)} %  ({len(accs)} networks, {described['steps']} "
                f"learned steps; {name}; {seconds:.1f} s)")))
    if term is not None:
        for row in shared:
            for result in row.results.values():
                result["protocol"].update(term.describe())
    return rows


def evaluate_rows(args: argparse.Namespace, record, plan: EvaluationPlan, loaded: Sequence[tuple], device,
                  precision) -> List[comparison.Row]:
    """Every row of ``evaluate.py``'s table: each loaded set's (:func:`set_rows`), the random-real
    rows of :attr:`EvaluationPlan.ipcs` under the common protocol (``--baseline`` /
    ``--random_baseline``) and the whole-dataset row when ``train_original.py`` summaries exist.

    Raises:
        utils.UserError, FloatingPointError: see :func:`set_rows`.
    """
    test_images, test_labels = record.images_test.to(device), record.labels_test.to(device)
    teacher = None
    if plan.teacher is not None:
        teacher = evaluate_regimes.load_evaluation_teacher(plan.teacher, plan.teacher_record, plan.teacher_from_flags,
                                                           record, args, device)
        print(f"teacher: {teacher.describe()} (labels {', '.join(r for r, a in plan.variants if a and r != 'hard')})")
    rows = [row for saved, experiments, protocol in loaded
            for row in set_rows(args, record, plan, saved, experiments, protocol, test_images, test_labels, device,
                                precision, teacher)]
    if args.baseline or args.random_baseline:
        rows += [comparison.random_real_row(record, ipc, plan.models, plan.protocol, plan.model, test_images,
                                            test_labels, num_eval=args.num_eval, device=device, seed=args.seed,
                                            report=_report, precision=precision, augmented=augmented, labels=labels,
                                            teacher=teacher)
                 for ipc in plan.ipcs for labels, augmented in plan.variants]
    whole = comparison.whole_dataset_row(args.original_path, args.dataset, plan.models, args.subset)
    return rows + ([whole] if whole is not None else [])


def write_out(args: argparse.Namespace, plan: EvaluationPlan, rows: Sequence[comparison.Row], precision) -> None:
    """``--out``: the JSON (``sets.comparison.evaluation_record``) and the CSV beside it, rescued to
    another path when the write fails (``cli.write_or_rescue``); rank 0 only."""
    if not args.out or not distributed.is_main():
        return
    scores = score_settings(args)
    protocol, first = comparison.evaluation_record(rows, plan.protocol, num_eval=args.num_eval, seed=args.seed,
                                                   dataset=args.dataset, amp=precision.describe(), scores=scores)
    json_path, csv_path = cli.write_or_rescue(
        lambda path: comparison.write_table(path, rows, plan.models, protocol, extra=first, scores=scores),
        args.out, "--out")
    print(f"wrote {json_path} and {csv_path}")


def baseline_protocol(args: argparse.Namespace) -> evaluation.EvalProtocol:
    """The protocol of ``--baseline random`` alone: the DC defaults and the flags."""
    return apply_flags(evaluation.EvalProtocol(), args)


def run_assess(args: argparse.Namespace, record, loaded: tuple, device) -> int:
    """The ``evaluate.py --assess`` branch: load the original models (``--models_pool``, default the
    network the set was distilled with, :func:`distilled_with`), assess every experiment of the
    loaded set (a :func:`load_set` triple), print the table, write the JSON (``--out`` or
    ``sets.assess.default_output``); rank 0 alone (the others return 0 at once).

    Raises:
        utils.UserError: missing original models (the message names the directory and the
            ``train_original.py`` command).
    """
    if not distributed.is_main():  # trains nothing: rank 0 alone assesses and writes
        return 0
    saved, experiments, _ = loaded
    pool_names = split_list(args.models_pool) or [distilled_with(args, [saved])]
    cli.check_models(pool_names, "--models_pool")
    expect = {"channel": record.channel, "im_size": list(record.im_size), "num_classes": record.num_classes,
              "zca": bool(args.zca)}
    pool = original_files.load_pool(args.pretrained_path, args.dataset, pool_names, args.model_num, device,
                               epoch=args.epoch, subset=args.subset, expect=expect)
    models = [model for arch in pool_names for model in pool[arch]]
    image_real, label_real = assess.sample_real(record.images_train, record.labels_train, record.num_classes,
                                                args.assess_real, seed=args.seed)
    report = assess.assess_sets([(e.images, e.labels) for e in experiments], models, image_real, label_real,
                                record.num_classes, device)
    report.update({"syn_path": saved.path, "dataset": args.dataset,
                   "models": {arch: len(pool[arch]) for arch in pool_names}, "pretrained_path": args.pretrained_path,
                   "real_per_class": args.assess_real, "seed": args.seed, "mmd_kernel": assess.BANDWIDTH_RULE,
                   "definitions": {key: text for key, text, _ in assess.METRICS}})
    print(f"assessment of {saved.path} on {len(models)} original model(s) "
          f"({', '.join(f'{a} x{n}' for a, n in report['models'].items())}), "
          f"{len(label_real)} real images (up to {args.assess_real} per class)")
    print(assess.format_table(report))
    out = args.out or assess.default_output(saved.path)
    storage.write_json(out, report)
    print(f"written: {out}")
    return 0
