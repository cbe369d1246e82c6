#!/usr/bin/env python3
"""Class-incremental continual learning with synthetic sets as memory (the DM paper's protocol).

Follows ``CL_DM.py`` of VICO-UoE/DatasetCondensation (Zhao & Bilen, "Dataset Condensation with
Distribution Matching", WACV 2023, §5 continual learning):

* 5 class orders, ``np.random.seed(s); np.random.permutation(K)`` for s = 0..4;
* ``--steps`` steps of ``K // steps`` new classes each (classes beyond ``steps * (K // steps)``
  are never used, as in the reference);
* at step t the memory is the set's images of every class seen so far (steps 0..t); a FRESH
  network with K outputs is trained on the memory (the reference's protocol, no fine-tuning of the
  previous network) and tested on the real test images of the seen classes only;
* every method is trained with the same DiffAugment (reference: DSA
  ``color_crop_cutout_flip_scale_rotate``, 1000 epochs, lr 0.01, batch 256), ``--num_eval``
  networks per order and step; the result of a step is mean ± std over orders x networks.

Differences, stated: a distilled set is given once (``--syn_path``, experiment ``--exp``) and its
class-c images serve every order (the reference loads one file per order and step made by
distilling step by step; for per-class methods such as DM they coincide); ``random`` draws ipc
real images per class with the order's seed; ``herding`` selects per class in the embedding of one
random ``--model`` from ``--seed`` (herding per class does not depend on the class order, so one
selection serves all orders; the reference's per-order files were made elsewhere).

Example (CPU-sized):
    python scripts/continual.py --dataset FashionMNIST --steps 5 --syn_path result/DM_FashionMNIST_ConvNet_10ipc \\
        --baselines random herding --num_eval 1 --epoch_eval_train 100 --out result/cl/fmnist_cl.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Sequence

import numpy as np
import pandas as pd
import torch

import augment
import cli
import evaluate
import networks
import utils
from methods.coreset import herding_select

NUM_ORDERS = 5
REFERENCE_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def class_orders(num_classes: int, num_orders: int = NUM_ORDERS) -> List[List[int]]:
    """The reference's class orders: ``np.random.seed(s); np.random.permutation(K)`` for s < num_orders
    (drawn from a local ``RandomState``, which gives the same permutation without touching the
    global NumPy RNG)."""
    return [np.random.RandomState(seed).permutation(num_classes).tolist() for seed in range(num_orders)]


def seen_classes(order: Sequence[int], steps: int, step: int) -> List[int]:
    """Classes seen after step ``step`` (0-based): ``order[:(step + 1) * (K // steps)]``.

    Raises:
        ValueError: ``steps`` is not in [1, K] or ``step`` not in [0, steps).
    """
    if not 1 <= steps <= len(order):
        raise ValueError(f"--steps {steps}: expected 1..{len(order)} (classes per step = K // steps >= 1)")
    if not 0 <= step < steps:
        raise ValueError(f"step {step} outside [0, {steps})")
    return list(order[:(step + 1) * (len(order) // steps)])


def restrict(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> tuple:
    """The rows of (images (N, C, H, W), labels (N,) int64) whose label is in ``classes``."""
    keep = torch.isin(labels, torch.tensor(list(classes), device=labels.device))
    return images[keep], labels[keep]


MemoryFn = Callable[[int], tuple]  # order index -> (images (N, C, H, W), labels (N,)) over all K classes


def run_continual(memories: Dict[str, MemoryFn], record, steps: int, model: str, cfg: utils.EvalConfig, *,
                  num_eval: int, device: torch.device, seed: int = 0, num_orders: int = NUM_ORDERS,
                  log: Callable[[str], None] = print) -> dict:
    """Accuracy after every step for every memory source.

    Args:
        memories: ``name -> f(order_index) -> (images, labels)``: the full memory (every class) of
            that source for that order; each step keeps the seen classes of it.
        record: the dataset (test images and labels, K).
        steps: number of steps.
        model: evaluation network name.
        cfg: the training protocol (the same for every source).
        num_eval: fresh networks per order and step.
        device: where to train.
        seed: base seed; order o, step t, network k trains from ``seed + 1000 o + 100 t + k``.
        num_orders: class orders (seeds 0..num_orders-1).
        log: progress printer.

    Returns:
        ``{"orders": [[...]], "accs": {name: [[acc per order x network] per step]}}``, accuracies in [0, 1].
    """
    orders = class_orders(record.num_classes, num_orders)
    test_images, test_labels = record.images_test.to(device), record.labels_test.to(device)
    accs = {name: [[] for _ in range(steps)] for name in memories}
    for name, memory in memories.items():
        for index, order in enumerate(orders):
            images, labels = memory(index)
            for step in range(steps):
                classes = seen_classes(order, steps, step)
                train_x, train_y = restrict(images.to(device), labels.to(device), classes)
                eval_x, eval_y = restrict(test_images, test_labels, classes)
                result = utils.evaluate_synset(train_x, train_y, model, record.num_classes, eval_x, eval_y, cfg,
                                               num_eval=num_eval, device=device, seed=seed + 1000 * index + 100 * step)
                accs[name][step] += result.accs
                log(f"{name} order {index} step {step + 1}/{steps}: {len(classes)} classes, {train_x.shape[0]} "
                    f"images, test {eval_x.shape[0]}: {utils.format_acc(result.accs)} %")
    return {"orders": orders, "accs": accs}


def step_table(accs: Dict[str, list]) -> pd.DataFrame:
    """Rows: sources; columns: steps 1..T; cells ``mean ± std`` (%) over orders x networks."""
    return pd.DataFrame({f"step {t + 1}": {name: utils.format_acc(per_step[t]) for name, per_step in accs.items()}
                         for t in range(len(next(iter(accs.values()))))})


def plot_steps(accs: Dict[str, list], classes_per_step: int, path: str, title: str) -> None:
    """Accuracy (%) vs number of seen classes, one line per source, error bars = std; saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, per_step in accs.items():
        seen = [classes_per_step * (t + 1) for t in range(len(per_step))]
        ax.errorbar(seen, [100 * np.mean(a) for a in per_step], yerr=[100 * np.std(a) for a in per_step],
                    marker="o", capsize=3, label=name)
    ax.set_xlabel("classes seen")
    ax.set_ylabel("test accuracy on seen classes (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The ``continual.py`` flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--syn_path", nargs="*", default=[], help="result files or distill.py run directories")
    parser.add_argument("--exp", type=int, default=0, help="which experiment of each result file")
    parser.add_argument("--baselines", nargs="*", default=["random", "herding"], choices=["random", "herding"],
                        help="selection baselines to add (default: random herding)")
    parser.add_argument("--ipc", type=int, default=None, help="images per class of the baselines (default: the sets')")
    parser.add_argument("--steps", type=int, default=5, help="number of class-incremental steps (5 or 10)")
    parser.add_argument("--model", default="ConvNet", help="network trained at every step (and herding's embedding)")
    parser.add_argument("--num_eval", type=int, default=3, help="networks per order and step (reference 3)")
    parser.add_argument("--epoch_eval_train", type=int, default=1000, help="training epochs (reference 1000)")
    parser.add_argument("--lr_net", type=float, default=0.01, help="SGD learning rate (reference 0.01)")
    parser.add_argument("--batch_train", type=int, default=256, help="training batch size (reference 256)")
    parser.add_argument("--dsa_strategy", default=REFERENCE_STRATEGY,
                        help=f"DiffAugment for every source (reference {REFERENCE_STRATEGY}; 'none' to disable)")
    parser.add_argument("--orders", type=int, default=NUM_ORDERS, help="class orders, seeds 0..N-1 (reference 5)")
    parser.add_argument("--out", default="result/continual/continual.json", help="JSON results; the plot goes beside it (.png)")
    cli.add_data_args(parser)
    cli.add_runtime_args(parser)
    return parser


def main(argv=None) -> int:
    """Parse, build the memories, run the protocol, print the table, save JSON and the plot."""
    args = build_parser().parse_args(argv)
    with cli.user_errors():
        cli.setup_logging(quiet=True)
        device = cli.setup_runtime(args)
        for flag in ("num_eval", "epoch_eval_train", "orders", "batch_train"):
            if getattr(args, flag) < 1:
                raise utils.UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
        cli.check_models([args.model], "--model")
        try:
            strategy = "_".join(augment.validate_strategy(args.dsa_strategy))
        except ValueError as error:
            raise utils.UserError(str(error)) from None
        from data import load_dataset, sample_random_real

        record = load_dataset(args.dataset, args.data_path, zca=args.zca, download=args.download, res=args.res,
                              subset=args.subset)
        if not 1 <= args.steps <= record.num_classes:
            raise utils.UserError(f"--steps {args.steps}: expected 1..{record.num_classes} for {args.dataset}")
        memories: Dict[str, MemoryFn] = {}
        ipcs = []
        for path in evaluate.expand_syn_paths(args.syn_path):
            namespace = argparse.Namespace(syn_path=path, exp=[args.exp], dataset=args.dataset, labels_path=None,
                                           lr_path=None)
            sets, _ = evaluate.load_sets(namespace, record)
            (images, labels, _), = sets
            if labels.dim() != 1:
                raise utils.UserError(f"--syn_path {path}: soft labels are not supported by the continual protocol")
            name = f"{evaluate.set_method(path)} ({os.path.basename(path)})"
            memories[name] = lambda index, images=images, labels=labels: (images, labels)
            ipcs.append(images.shape[0] // record.num_classes)
        ipc = args.ipc or (ipcs[0] if ipcs else None)
        if args.baselines and ipc is None:
            raise utils.UserError("--baselines need --ipc N when no --syn_path is given")
        if "random" in args.baselines:
            memories[f"random ipc {ipc}"] = lambda index: sample_random_real(record, ipc, utils.make_generator(index))
        if "herding" in args.baselines:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                net = networks.get_network(args.model, record.channel, record.num_classes, record.im_size, device=device)
            net.eval()
            picked = []
            for c in range(record.num_classes):
                class_images = record.images_train[record.labels_train == c]
                features = torch.cat([utils.embed_in_chunks(net, chunk.to(device)) for chunk in class_images.split(1024)])
                picked.append(class_images[herding_select(features, ipc).cpu()])
            herding = (torch.cat(picked), torch.arange(record.num_classes).repeat_interleave(ipc))
            memories[f"herding ipc {ipc}"] = lambda index: herding
        if not memories:
            raise utils.UserError("nothing to evaluate: give --syn_path and/or --baselines")
        cfg = utils.EvalConfig(epochs=args.epoch_eval_train, lr=args.lr_net, batch_train=args.batch_train,
                               dsa_strategy=strategy)
        outcome = run_continual(memories, record, args.steps, args.model, cfg, num_eval=args.num_eval, device=device,
                                seed=args.seed, num_orders=args.orders)
        table = step_table(outcome["accs"])
        print(f"\n{args.steps}-step class-incremental {args.dataset}, {args.model}, accuracy (%) on seen classes, "
              f"mean ± std over {args.orders} orders x {args.num_eval} networks ({args.epoch_eval_train} epochs, "
              f"{cfg.describe()['augmentation']}):")
        print(table.to_markdown())
        plot_path = os.path.splitext(args.out)[0] + ".png"
        plot_steps(outcome["accs"], record.num_classes // args.steps, plot_path,
                   f"{args.dataset}, {args.steps} steps, {args.model}")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"dataset": args.dataset, "steps": args.steps, "model": args.model, "orders": outcome["orders"],
                       "protocol": {**cfg.describe(), "labels": "hard", "num_eval": args.num_eval,
                                    "reference": "CL_DM.py (VICO-UoE/DatasetCondensation)"},
                       "accs": outcome["accs"],
                       "summary": {name: [{"mean": float(np.mean(a)), "std": float(np.std(a))} for a in per_step]
                                   for name, per_step in outcome["accs"].items()}}, handle, indent=2)
        print(f"wrote {args.out} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
