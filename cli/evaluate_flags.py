"""The ``evaluate.py`` command line: its flags, reading the saved sets (``sets.files``) and the
evaluation protocol each set is trained with: the protocol saved with it (``meta['protocol']``,
``evaluation.EvalProtocol``) replayed exactly, each flag given overriding its field; for files of an
older version of this toolkit, the protocol of the method that made them; for the references'
files, the DC protocol (1000 epochs with augmentation, else 300; lr 0.01; batch 256).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

import augment
import cli
import methods
import networks
import evaluation
import storage
import utils
from cli import clom as cli_clom
from cli import features as feature_cli
from methods.addons.feature_labels import training_term_from_saved
from sets import assess, comparison, files
from pretrained import originals


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The ``evaluate.py`` flags. Protocol flags default to ``None``: the set's saved protocol."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--syn_path", nargs="+", help="result file(s) {'data': [[image_syn, label_syn], ...], ...} "
                        "or distill.py run directories (their res_*.pt); several give one table")
    source.add_argument("--baseline", choices=["random"], help="evaluate ipc random real images per class instead")
    parser.add_argument("--labels_path", default=None,
                        help="with --syn_path images_*.pt of MTT/DATM/PAD logs: their labels_*.pt (class indices or "
                             "soft-label logits; default: class-major hard labels)")
    parser.add_argument("--lr_path", default=None, help="with --syn_path images_*.pt: the learned lr_*.pt")
    parser.add_argument("--ipc", type=int, default=None, help="images per class for --baseline")
    parser.add_argument("--model", default="ConvNet", help="the model the set was distilled with")
    parser.add_argument("--eval_mode", default="SS", help="evaluation pool: S, SS, M, B, W, D, A, P, N, C")
    parser.add_argument("--pool_family", default="DC", choices=tuple(networks.FAMILY_POOLS),
                        help="whose --eval_mode pools: DC (DatasetCondensation, DM, DataDAM, CAFE) or MTT "
                             "(mtt-distillation, DATM, PAD; its M pool is ConvNet AlexNet VGG11 ResNet18_AP ResNet18)")
    parser.add_argument("--models", nargs="+", default=None, help="explicit evaluation networks (overrides --eval_mode)")
    parser.add_argument("--random_baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate ipc random real images per class under the same protocol (table row, IOR)")
    parser.add_argument("--original_path", default="pretrained_model",
                        help="train_original.py --save_path: whole-dataset accuracy row when its summary.json exists")
    parser.add_argument("--exp", type=int, nargs="*", default=None, help="which experiments of the file (default all)")
    parser.add_argument("--num_eval", type=int, default=5, help="networks per synthetic set (baseline: random subsets)")
    parser.add_argument("--epoch_eval_train", type=int, default=None,
                        help="training epochs (default: the protocol saved with the set, e.g. DataDAM 1800; files "
                             "without one: 1000 with DSA or DC augmentation, else 300)")
    parser.add_argument("--lr_net", type=float, default=None,
                        help="SGD learning rate (default: the step size learned with the set (MTT/DATM/PAD), else the "
                             "saved --lr_net, else 0.01)")
    parser.add_argument("--batch_train", type=int, default=None,
                        help="training batch size (default: the saved protocol's, else 256)")
    parser.add_argument("--dsa_strategy", default=None,
                        help="DiffAugment strategy for training (default: the one saved with the set, else DC augmentation; "
                             "'none' for DC augmentation)")
    parser.add_argument("--dd_eval", default=None, choices=("shared", "schedule", "both"),
                        help="sets with a learned step schedule (DD): train fresh networks with the shared protocol, "
                             "by the learned schedule (DD's own), or both (default: what distill.py evaluated with; "
                             "sets without a schedule: shared)")
    parser.add_argument("--out", default=None, help="write the accuracies as JSON here (and the table as .csv beside it)")
    parser.add_argument("--lbd", type=float, default=None,
                        help="sets saved with feature labels F (DRUPI): lambda of D(E(x), F) in training (default: the "
                             "value the set was distilled with, else 0.01); 0 trains with CE only")
    feature_cli.add_eval_option_args(parser, saved_default=True)
    cli.add_data_args(parser)
    cli.add_runtime_args(parser)
    cli.add_amp_arg(parser)
    parser.add_argument("--assess", action="store_true",
                        help="instead of training: OM accuracy / loss and synthetic-real distances on original models "
                             "(assess.py); JSON to --out or next to --syn_path")
    parser.add_argument("--assess_real", type=int, default=500, help="--assess: real images per class (seeded draw)")
    cli_clom.add_original_model_args(parser, clom=False)
    return parser


def resolve_models(args: argparse.Namespace) -> List[str]:
    """The evaluation networks: ``--models`` or the ``--eval_mode`` pool.

    Raises:
        utils.UserError: an unknown network or mode.
    """
    cli.check_models([args.model], "--model")
    if args.models:
        cli.check_models(args.models, "--models")
        return list(dict.fromkeys(args.models))
    return cli.resolve_eval_models(args.eval_mode, args.model, args.pool_family)


def check_args(args: argparse.Namespace) -> None:
    """Value checks that need no data.

    Raises:
        utils.UserError: one line naming the flag.
    """
    if args.num_eval < 1:
        raise utils.UserError(f"--num_eval must be at least 1, got {args.num_eval}")
    if args.assess and not args.syn_path:
        raise utils.UserError("--assess needs --syn_path (a saved synthetic set)")
    if args.baseline and (args.ipc is None or args.ipc < 1):
        raise utils.UserError("--baseline random needs --ipc N with N >= 1")
    for flag in ("epoch_eval_train", "batch_train"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise utils.UserError(f"--{flag} must be at least 1, got {value}")
    if args.lr_net is not None and not args.lr_net > 0:
        raise utils.UserError(f"--lr_net must be positive, got {args.lr_net}")
    if args.lbd is not None and args.lbd < 0:
        raise utils.UserError(f"--lbd must be >= 0, got {args.lbd}")
    if args.dsa_strategy is not None:
        try:
            augment.validate_strategy(args.dsa_strategy)
        except ValueError as error:
            raise utils.UserError(str(error)) from None


def saved_protocol(meta: dict) -> evaluation.EvalProtocol:
    """The protocol a set was evaluated with when it was made (module docstring)."""
    if meta.get("protocol"):
        return evaluation.EvalProtocol.from_dict(meta["protocol"])
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
    changes.update(feature_cli.eval_option_values(args, given_only=True))
    return dataclasses.replace(protocol, **changes).with_epochs(args.epoch_eval_train)


def read_experiments(path: str, record, exp: Optional[Sequence[int]] = None, labels_path: Optional[str] = None,
                     lr_path: Optional[str] = None, lbd: Optional[float] = None,
                     use_learned_lr: bool = True, dataset: Optional[str] = None,
                     label_loss: str = "cross_entropy", blob: Optional[dict] = None) -> Tuple[dict, List[comparison.SetToEvaluate]]:
    """A saved set's file and its chosen experiments, ready for the protocol.

    Float (N, K) labels are soft-label logits (DATM's format and ours) and become probabilities;
    under the ``mse`` label loss they are real-valued regression targets (KIP's learned labels)
    and are kept as they are.
    A set saved with feature labels (a third ``data`` entry) trains with them (``lbd`` overrides
    lambda; 0 trains with CE only).

    Args:
        path: a result file or an ``images_*.pt`` (with ``labels_path`` / ``lr_path``).
        record: the ``data.DatasetRecord`` the set must fit.
        exp: experiment indices (default all).
        use_learned_lr: train with the step size saved with the set (``False`` when ``--lr_net`` is given).
        dataset: ``--dataset`` as given (default ``record.name``), which the file's must equal.
        label_loss: the protocol's label loss (``evaluation.LABEL_LOSSES``).
        blob: the file's content when already read (``files.read_set_file``), else it is read here.

    Raises:
        utils.UserError: the file does not match the dataset or ``exp``, or cannot be read.
    """
    blob = blob if blob is not None else files.read_set_file(path, record.num_classes, labels_path, lr_path)
    meta = blob.get("meta") or {}
    dataset = dataset or record.name
    if meta.get("dataset") and meta["dataset"] not in (dataset, record.name):
        raise utils.UserError(f"--syn_path holds a {meta['dataset']} set but --dataset is {dataset}")
    entries = blob["data"]
    chosen = exp if exp else range(len(entries))
    learned = meta.get("syn_lr") or []
    schedules = meta.get("step_schedule") or []
    saved_features = (meta.get("config") or {}).get("feature_labels") or {}
    experiments = []
    for index in chosen:
        if not 0 <= index < len(entries):
            raise utils.UserError(f"--exp {index}: the file holds experiments 0..{len(entries) - 1}")
        images, labels = entries[index][0].float(), entries[index][1]
        if tuple(images.shape[1:]) != (record.channel, *record.im_size):
            raise utils.UserError(f"--syn_path images are {tuple(images.shape[1:])} but {dataset} images are "
                                  f"{(record.channel, *record.im_size)}")
        if not torch.isfinite(images).all():
            raise utils.UserError(f"--syn_path {path}: data[{index}] images hold NaN or infinite values "
                                  f"({int((~torch.isfinite(images)).sum())} entries); the set is not usable")
        if labels.dim() == 1:
            labels = labels.long()
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= record.num_classes):
                raise utils.UserError(f"--syn_path {path}: data[{index}] labels run {int(labels.min())}..{int(labels.max())}; "
                                      f"{dataset} has classes 0..{record.num_classes - 1}")
        elif labels.dim() == 2 and labels.shape[1] == record.num_classes:
            labels = labels.float() if label_loss == "mse" else torch.softmax(labels.float(), dim=1)
        else:
            raise utils.UserError(f"--syn_path labels of experiment {index} have shape {tuple(labels.shape)}; expected "
                                  f"({images.shape[0]},) class indices or ({images.shape[0]}, {record.num_classes}) logits")
        term = None
        if len(entries[index]) > 2 and torch.is_tensor(entries[index][2]):
            try:
                term = training_term_from_saved(entries[index][2], saved_features, images.shape[0], record.num_classes,
                                                lbd)
            except ValueError as error:
                raise utils.UserError(f"--syn_path data[{index}] feature labels: {error}") from None
        lr = float(learned[index]) if index < len(learned) and use_learned_lr else None
        schedule = None
        if index < len(schedules) and schedules[index] is not None:
            try:
                schedule = evaluation.StepSchedule.from_dict(schedules[index])
                schedule.check(images.shape[0])
            except ValueError as error:
                raise utils.UserError(f"--syn_path {path}: data[{index}] step schedule: {error}") from None
        experiments.append(comparison.SetToEvaluate(images, labels, lr, term, schedule))
    return blob, experiments


def load_set(path: str, args: argparse.Namespace, record) -> Tuple[dict, List[comparison.SetToEvaluate], evaluation.EvalProtocol]:
    """:func:`read_experiments` with ``evaluate.py``'s flags, and the set's protocol after the flags.

    Raises:
        utils.UserError: see :func:`read_experiments`; or the set records another mean/std than the
            test set's (CIFAR100 distilled by MTT/DATM/PAD/CAFE: ``--cifar100_stats cifar10``).
    """
    blob = files.read_set_file(path, record.num_classes, args.labels_path, args.lr_path)
    protocol = apply_flags(saved_protocol(blob.get("meta") or {}), args)
    blob, experiments = read_experiments(path, record, args.exp, args.labels_path, args.lr_path, args.lbd,
                                         use_learned_lr=args.lr_net is None, dataset=args.dataset,
                                         label_loss=protocol.label_loss, blob=blob)
    check_normalization(path, blob.get("meta") or {}, record)
    return blob, experiments, protocol


def check_normalization(path: str, meta: dict, record) -> None:
    """Refuse a set whose saved ``meta`` mean/std (images in [0, 1] pixel units normalised per
    channel) differ from those the test set was normalised with; ZCA sets and files without
    them (the references' ``res_*.pt``) are not checked.

    Raises:
        utils.UserError: one line naming both and ``--cifar100_stats``.
    """
    if record.zca is not None or meta.get("zca") or meta.get("mean") is None or meta.get("std") is None:
        return
    same = all(abs(float(a) - float(b)) < 1e-6 for a, b in zip([*meta["mean"], *meta["std"]], [*record.mean, *record.std]))
    if not same or len(meta["mean"]) != len(record.mean):
        raise utils.UserError(f"--syn_path {path}: the set was distilled on images normalised with mean {meta['mean']} "
                              f"std {meta['std']}, the test set here with mean {record.mean} std {record.std}; "
                              "pass --cifar100_stats to match (CIFAR100 sets of MTT/DATM/PAD/CAFE: cifar10)")


def set_protocols(blob: dict, experiments: Sequence[comparison.SetToEvaluate], args: argparse.Namespace,
                  path: str) -> Tuple[str, ...]:
    """Which protocols evaluate a set: ``--dd_eval`` when given, else the ones ``distill.py`` used
    (``meta['eval_protocols']``), else ``("shared",)``.

    Raises:
        utils.UserError: the schedule protocol is asked for a set that learned no step schedule.
    """
    choice = getattr(args, "dd_eval", None)
    if choice is not None:
        protocols = ("shared", "schedule") if choice == "both" else (choice,)
    else:
        saved = tuple((blob.get("meta") or {}).get("eval_protocols") or ("shared",))
        protocols = tuple(p for p in saved if p in ("shared", "schedule")) or ("shared",)
    if "schedule" in protocols and any(e.schedule is None for e in experiments):
        raise utils.UserError(f"--dd_eval {choice or 'schedule'}: {path} holds no learned step schedule "
                              "(only DD sets do); use --dd_eval shared")
    return protocols


def baseline_protocol(args: argparse.Namespace) -> evaluation.EvalProtocol:
    """The protocol of ``--baseline random`` alone: the DC defaults and the flags."""
    return apply_flags(evaluation.EvalProtocol(), args)


def run_assess(args: argparse.Namespace, record, experiments: List[comparison.SetToEvaluate], device) -> int:
    """The ``evaluate.py --assess`` branch: load the original models, assess every experiment of
    ``--syn_path``, print the table, write the JSON (``--out`` or ``sets.assess.default_output``).

    Raises:
        utils.UserError: missing original models (the message names the directory and the
            ``train_original.py`` command), or ``--assess_real`` < 1.
    """
    if args.assess_real < 1:
        raise utils.UserError(f"--assess_real must be at least 1, got {args.assess_real}")
    pool_names = cli_clom.split_list(args.models_pool) or [args.model]
    cli.check_models(pool_names, "--models_pool")
    expect = {"channel": record.channel, "im_size": list(record.im_size), "num_classes": record.num_classes,
              "zca": bool(args.zca)}
    pool = originals.load_pool(args.pretrained_path, args.dataset, pool_names, args.model_num, device,
                               epoch=args.epoch, subset=args.subset, expect=expect)
    models = [model for arch in pool_names for model in pool[arch]]
    image_real, label_real = assess.sample_real(record.images_train, record.labels_train, record.num_classes,
                                                args.assess_real, seed=args.seed)
    report = assess.assess_sets([(e.images, e.labels) for e in experiments], models, image_real, label_real,
                                record.num_classes, device)
    report.update({"syn_path": args.syn_path, "dataset": args.dataset,
                   "models": {arch: len(pool[arch]) for arch in pool_names}, "pretrained_path": args.pretrained_path,
                   "real_per_class": args.assess_real, "seed": args.seed, "mmd_kernel": assess.BANDWIDTH_RULE,
                   "definitions": {key: text for key, text, _ in assess.METRICS}})
    print(f"assessment of {args.syn_path} on {len(models)} original model(s) "
          f"({', '.join(f'{a} x{n}' for a, n in report['models'].items())}), "
          f"{len(label_real)} real images (up to {args.assess_real} per class)")
    print(assess.format_table(report))
    out = args.out or assess.default_output(args.syn_path)
    storage.write_json(out, report)
    print(f"written: {out}")
    return 0
