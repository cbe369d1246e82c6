#!/usr/bin/env python3
"""Evaluate a saved synthetic set (ours or a reference repository's ``res_*.pt``), or ipc random
real images per class (``--baseline random``), by training fresh networks on it and testing them
on the real test set. Prints mean ± std per model; ``--out FILE.json`` writes
``{model: {"mean": .., "std": .., "accs": [..], "protocol": {..}}}`` with accuracies in [0, 1].

Examples:
    python evaluate.py --dataset FashionMNIST --syn_path result/DM_FashionMNIST_ConvNet_10ipc/res_DM_FashionMNIST_ConvNet_10ipc.pt
    python evaluate.py --dataset FashionMNIST --baseline random --ipc 10 --dsa_strategy color_crop_cutout_flip_scale_rotate

``--assess`` does not train: it prints the synthetic set's accuracy and loss on original models
(``train_original.py``) and its distances to real data (``sets/assess.py``), written to
``--out`` or ``{syn_path stem}_assess.json``:
    python evaluate.py --dataset FashionMNIST --assess --models_pool ConvNet --syn_path result/.../res_DC_FashionMNIST_ConvNet_1ipc.pt
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import torch

import augment
import cli
from sets import comparison
from cli import features as feature_cli
from methods.addons import feature_loss
import utils


def build_parser() -> argparse.ArgumentParser:
    """The ``evaluate.py`` flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--models", nargs="+", default=None, help="explicit evaluation networks (overrides --eval_mode)")
    parser.add_argument("--random_baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate ipc random real images per class under the same protocol (table row, IOR)")
    parser.add_argument("--original_path", default="pretrained_model",
                        help="train_original.py --save_path: whole-dataset accuracy row when its summary.json exists")
    parser.add_argument("--exp", type=int, nargs="*", default=None, help="which experiments of the file (default all)")
    parser.add_argument("--num_eval", type=int, default=5, help="networks per synthetic set (baseline: random subsets)")
    parser.add_argument("--epoch_eval_train", type=int, default=None,
                        help="training epochs (default: 1000 with DSA or DC augmentation, else 300)")
    parser.add_argument("--lr_net", type=float, default=None,
                        help="SGD learning rate (default: the step size learned with the set (MTT/DATM/PAD), else 0.01)")
    parser.add_argument("--batch_train", type=int, default=256, help="training batch size")
    parser.add_argument("--dsa_strategy", default=None,
                        help="DiffAugment strategy for training (default: the one saved with the set, else DC augmentation; "
                             "'none' for DC augmentation)")
    parser.add_argument("--out", default=None, help="write the accuracies as JSON here (and the table as .csv beside it)")
    parser.add_argument("--lbd", type=float, default=None,
                        help="sets saved with feature labels F (DRUPI): lambda of D(E(x), F) in training (default: the "
                             "value the set was distilled with, else 0.01); 0 trains with CE only")
    feature_cli.add_eval_option_args(parser)
    cli.add_data_args(parser)
    cli.add_runtime_args(parser)
    parser.add_argument("--assess", action="store_true",
                        help="instead of training: OM accuracy / loss and synthetic-real distances on original models "
                             "(assess.py); JSON to --out or next to --syn_path")
    parser.add_argument("--assess_real", type=int, default=500, help="--assess: real images per class (seeded draw)")
    cli.add_original_model_args(parser, clom=False)
    return parser


def _is_tensor_file(path: str) -> bool:
    """Whether ``path`` holds a bare tensor (MTT/DATM/PAD ``images_*.pt``) rather than a result dict."""
    if not os.path.isfile(path):
        return False
    try:
        return torch.is_tensor(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:
        return False


def _load_tensor(path: str, flag: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise utils.UserError(f"{flag}: no file at {path}")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise utils.UserError(f"{flag}: cannot read {path}: {error}") from None
    if not torch.is_tensor(value):
        raise utils.UserError(f"{flag}: {path} does not hold a tensor")
    return value


def _tensor_files(args, record) -> dict:
    """The logged files of MTT / DATM / PAD (``images_*.pt``, ``labels_*.pt``, ``lr_*.pt``) as one
    result entry: labels default to class-major hard labels, the lr to ``--lr_net``."""
    images = _load_tensor(args.syn_path, "--syn_path")
    if images.dim() != 4 or images.shape[0] % record.num_classes:
        raise utils.UserError(f"--syn_path: {args.syn_path} holds {tuple(images.shape)}; expected (K*ipc, C, H, W) "
                              f"with K = {record.num_classes}")
    if args.labels_path:
        labels = _load_tensor(args.labels_path, "--labels_path")
    else:
        labels = torch.arange(record.num_classes).repeat_interleave(images.shape[0] // record.num_classes)
    meta = {}
    if args.lr_path:
        meta["syn_lr"] = [float(_load_tensor(args.lr_path, "--lr_path").reshape(-1)[0])]
    return {"data": [[images, labels]], "meta": meta}


def single_set_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``syn_path`` as one path: a one-element ``--syn_path`` list (as the parser
    gives it) is unwrapped; a string is kept.

    Raises:
        utils.UserError: ``--syn_path`` holds several paths where one set is expected.
    """
    path = args.syn_path
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            raise utils.UserError(f"--syn_path: expected one synthetic set here, got {len(path)}")
        args = argparse.Namespace(**{**vars(args), "syn_path": path[0]})
    return args


def load_sets(args, record) -> tuple:
    """The synthetic sets to evaluate: a list of (images, labels, learned lr or None) and the
    saved DSA strategy. Float (N, K) labels are soft-label logits (DATM's format and ours) and
    become probabilities ``softmax(logits)``.

    Raises:
        utils.UserError: the file does not match ``--dataset`` or ``--exp``.
    """
    args = single_set_args(args)
    blob = _tensor_files(args, record) if _is_tensor_file(args.syn_path) else utils.load_results(args.syn_path)
    meta = blob.get("meta") or {}
    if meta.get("dataset") and meta["dataset"] != args.dataset:
        raise utils.UserError(f"--syn_path holds a {meta['dataset']} set but --dataset is {args.dataset}")
    entries = blob["data"]
    chosen = args.exp if args.exp else range(len(entries))
    sets = []
    for index in chosen:
        if not 0 <= index < len(entries):
            raise utils.UserError(f"--exp {index}: the file holds experiments 0..{len(entries) - 1}")
        images, labels = entries[index][0].float(), entries[index][1]
        if tuple(images.shape[1:]) != (record.channel, *record.im_size):
            raise utils.UserError(f"--syn_path images are {tuple(images.shape[1:])} but {args.dataset} images are "
                                  f"{(record.channel, *record.im_size)}")
        if labels.dim() == 1:
            labels = labels.long()
        elif labels.dim() == 2 and labels.shape[1] == record.num_classes:
            labels = torch.softmax(labels.float(), dim=1)
        else:
            raise utils.UserError(f"--syn_path labels of experiment {index} have shape {tuple(labels.shape)}; expected "
                                  f"({images.shape[0]},) class indices or ({images.shape[0]}, {record.num_classes}) logits")
        learned = meta.get("syn_lr") or []
        sets.append((images, labels, float(learned[index]) if index < len(learned) else None))
    return sets, meta.get("dsa_strategy")


def expand_syn_paths(paths) -> list:
    """``--syn_path`` values with each directory replaced by the ``res_*.pt`` files in it (sorted).

    Raises:
        utils.UserError: a directory holds no ``res_*.pt``.
    """
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "res_*.pt")))
            if not found:
                raise utils.UserError(f"--syn_path {path}: a directory without res_*.pt (give a distill.py run directory)")
            files += found
        else:
            files.append(path)
    return files


def set_method(path: str) -> str:
    """The method that made a saved set (``meta['method']``), else the file's name without extension."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        method = (blob.get("meta") or {}).get("method") if isinstance(blob, dict) else None
    except Exception:
        method = None
    return method or os.path.splitext(os.path.basename(path))[0]


def load_feature_labels(args, num_images: int, num_classes: int) -> list:
    """Per chosen experiment, the ``evaluate_synset`` keyword arguments for its feature labels:
    ``{}`` for a set without F, else F (the third entry of the ``data`` item, as DRUPI saves it)
    and the loss settings saved with the set (``meta.config.feature_labels``), ``--lbd`` overriding
    lambda. A file without our ``meta`` (the reference's) uses the DRUPI defaults, with avg
    pooling when F is 1x1.

    Raises:
        utils.UserError: ``--lbd`` is negative, or a saved setting is invalid.
    """
    args = single_set_args(args)
    if args.lbd is not None and args.lbd < 0:
        raise utils.UserError(f"--lbd must be >= 0, got {args.lbd}")
    if _is_tensor_file(args.syn_path):
        return [{}]
    blob = utils.load_results(args.syn_path)
    saved = ((blob.get("meta") or {}).get("config") or {}).get("feature_labels") or {}
    entries = blob["data"]
    chosen = args.exp if args.exp else range(len(entries))
    found = []
    for index in chosen:
        entry = entries[index]
        if len(entry) < 3 or not torch.is_tensor(entry[2]):
            found.append({})
            continue
        features = entry[2].float()
        pooling = saved.get("pooling", "avg" if features.dim() == 5 and tuple(features.shape[3:]) == (1, 1) else None)
        try:
            cfg = feature_loss.FeatureLossConfig(
                lbd=args.lbd if args.lbd is not None else saved.get("lbd", 0.01), layer_idx=saved.get("layer_idx"),
                pooling=pooling, metric=saved.get("feat_metric", "mse"), norm=saved.get("feat_norm", False),
                use_feature=saved.get("use_feature", "mean"))
            feature_loss.FeatureTargets(features, num_images, num_classes, cfg)  # checks the shape
        except ValueError as error:
            raise utils.UserError(f"--syn_path data[{index}] feature labels: {error}") from None
        found.append({"term": feature_loss.FeatureTargets(features, num_images, num_classes, cfg) if cfg.lbd > 0 else None,
                      "lbd": cfg.lbd})
    return found


def main(argv=None) -> int:
    """Parse, load the test set and the synthetic sets (or draw random real ones), evaluate them and
    ipc random real images per class under the same protocol, print one table (rows: sets,
    columns: networks), write JSON and CSV."""
    args = build_parser().parse_args(argv)
    with cli.user_errors():
        cli.setup_logging(quiet=True)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.num_eval < 1:
            raise utils.UserError(f"--num_eval must be at least 1, got {args.num_eval}")
        if args.assess and not args.syn_path:
            raise utils.UserError("--assess needs --syn_path (a saved synthetic set)")
        if args.baseline and (args.ipc is None or args.ipc < 1):
            raise utils.UserError("--baseline random needs --ipc N with N >= 1")
        cli.check_models([args.model], "--model")
        if args.models:
            cli.check_models(args.models, "--models")
            models = list(dict.fromkeys(args.models))
        else:
            models = cli.resolve_eval_models(args.eval_mode, args.model)
        device = utils.resolve_device(args.device)
        from data import load_dataset, sample_random_real

        record = load_dataset(args.dataset, args.data_path, zca=args.zca, download=args.download, res=args.res,
                              subset=args.subset)
        if args.assess:
            paths = expand_syn_paths(args.syn_path or [])
            if len(paths) != 1:
                raise utils.UserError(f"--assess takes one synthetic set (--syn_path), got {len(paths)}")
            from sets import assess

            single = argparse.Namespace(**{**vars(args), "syn_path": paths[0]})
            sets, _ = load_sets(single, record)
            return assess.run_cli(single, record, sets, device)
        loaded = []  # (path, method, ipc, sets, feature-label arguments per experiment)
        saved_strategies = set()
        for path in expand_syn_paths(args.syn_path or []):
            single = argparse.Namespace(**{**vars(args), "syn_path": path})
            sets, saved = load_sets(single, record)
            feature_args = load_feature_labels(single, sets[0][0].shape[0], record.num_classes)
            loaded.append((path, set_method(path), max(1, sets[0][0].shape[0] // record.num_classes), sets, feature_args))
            saved_strategies.add(saved or "")
        if args.dsa_strategy is None and len(saved_strategies) > 1:
            raise utils.UserError(f"--syn_path: the sets were saved with different augmentation ({', '.join(sorted(s or 'none' for s in saved_strategies))}); "
                                  "pass --dsa_strategy to evaluate every row under one protocol")
        ipcs = sorted({ipc for _, _, ipc, _, _ in loaded} | ({args.ipc} if args.baseline else set()))
        for ipc in ipcs:
            if ipc > int(record.labels_train.bincount().min()) and (args.baseline or args.random_baseline):
                raise utils.UserError(f"--ipc {ipc} exceeds the smallest class of {args.dataset}")
        saved_strategy = next(iter(saved_strategies)) if saved_strategies else ""
        strategy = args.dsa_strategy if args.dsa_strategy is not None else saved_strategy
        try:
            strategy = "_".join(augment.validate_strategy(strategy))
        except ValueError as error:
            raise utils.UserError(str(error)) from None
        test_images, test_labels = record.images_test.to(device), record.labels_test.to(device)

        def eval_config(model_eval: str, ipc: int, learned_lr=None) -> utils.EvalConfig:
            dc_aug = None if strategy else augment.get_daparam(args.dataset, args.model, model_eval, ipc)
            augmented = bool(strategy) or (dc_aug is not None and dc_aug.strategy not in ("", "none", "None"))
            epochs = args.epoch_eval_train if args.epoch_eval_train is not None else (1000 if augmented else 300)
            lr = args.lr_net if args.lr_net is not None else (learned_lr if learned_lr is not None else 0.01)
            return utils.EvalConfig(epochs=epochs, lr=lr, batch_train=args.batch_train, dsa_strategy=strategy,
                                    dc_aug=dc_aug, **feature_cli.eval_option_values(args))

        def report_line(model_eval, accs, cfg, what, seconds):
            print(f"{model_eval:<16} {utils.format_acc(accs)} %  ({len(accs)} networks, {cfg.epochs} epochs, "
                  f"{cfg.describe()['augmentation']}; {what}; {seconds:.1f} s)")

        rows = []
        for path, method, ipc, sets, feature_args in loaded:
            row = comparison.Row(name=f"{method} ipc {ipc} ({os.path.basename(path)})", kind="synthetic", ipc=ipc,
                                 method=method, dataset=args.dataset, path=path)
            for model_eval in models:
                accs, seconds, cfg = [], 0.0, None
                for index, (images, labels, learned_lr) in enumerate(sets):
                    cfg = eval_config(model_eval, ipc, learned_lr)
                    try:
                        result = utils.evaluate_synset(images.to(device), labels.to(device), model_eval,
                                                       record.num_classes, test_images, test_labels, cfg,
                                                       num_eval=args.num_eval, device=device, seed=args.seed + 1000 * index,
                                                       term=(feature_args[index].get("term").to(device)
                                                             if feature_args[index].get("term") else None))
                    except ValueError as error:
                        raise utils.UserError(f"{path}: feature labels of experiment {index}: {error} "
                                              "(--lbd 0 evaluates without them)") from None
                    accs += result.accs
                    seconds += result.train_time_s
                labels_kind = "soft" if sets[0][1].dim() == 2 else "hard"
                row.results[model_eval] = {**utils.EvalResult(model_eval, accs, seconds).as_dict(),
                                           "protocol": {**cfg.describe(), "labels": labels_kind}}
                what = os.path.basename(path)
                used = [a["lbd"] for a in feature_args if a and a["lbd"] > 0]
                if used:
                    what += f"; feature labels, lbd {used[0]:g}"
                    row.results[model_eval]["protocol"]["feature_labels_lbd"] = used[0]
                report_line(model_eval, accs, cfg, what, seconds)
            rows.append(row)
        if args.baseline or args.random_baseline:
            for ipc in ipcs:
                row = comparison.Row(name=f"random real ipc {ipc}", kind="random", ipc=ipc, method="random",
                                     dataset=args.dataset)
                for model_eval in models:
                    cfg, accs, seconds = eval_config(model_eval, ipc), [], 0.0
                    for run in range(args.num_eval):
                        images, labels = sample_random_real(record, ipc, utils.make_generator(args.seed + run))
                        result = utils.evaluate_synset(images.to(device), labels.to(device), model_eval,
                                                       record.num_classes, test_images, test_labels, cfg,
                                                       num_eval=1, device=device, seed=args.seed + run)
                        accs += result.accs
                        seconds += result.train_time_s
                    row.results[model_eval] = {**utils.EvalResult(model_eval, accs, seconds).as_dict(),
                                               "protocol": {**cfg.describe(), "labels": "hard"}}
                    report_line(model_eval, accs, cfg, f"random real ipc {ipc}", seconds)
                rows.append(row)
        whole = comparison.Row(name="whole dataset", kind="whole", ipc=None, method="whole", dataset=args.dataset)
        for model_eval in models:
            found = comparison.whole_dataset_accuracy(args.original_path, args.dataset, model_eval, args.subset)
            if found is not None:
                whole.results[model_eval] = found
        if whole.results:
            rows.append(whole)
        print()
        print(comparison.format_table(rows, models))
        if args.out:
            # Per-model keys of the first row, as before (scripts read them), plus the whole table.
            report = {model: result for model, result in rows[0].results.items()}
            protocol = {"num_eval": args.num_eval, "seed": args.seed, "dataset": args.dataset,
                        "evaluation": {m: rows[0].results[m]["protocol"] for m in rows[0].results}}
            json_path, csv_path = comparison.write_table(args.out, rows, models, protocol, extra=report)
            print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
