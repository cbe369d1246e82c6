"""Class-incremental continual learning with synthetic sets as memory (the DM paper's protocol).

Follows ``CL_DM.py`` of VICO-UoE/DatasetCondensation (Zhao & Bilen, "Dataset Condensation with
Distribution Matching", WACV 2023, continual learning):

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

Command (CPU-sized):
    python scripts/continual.py --dataset FashionMNIST --steps 5 --syn_path result/DM_FashionMNIST_ConvNet_10ipc \\
        --baselines random herding --num_eval 1 --epoch_eval_train 100 --out result/cl/fmnist_cl.json
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import networks
import chunked
import evaluation
import tables
import utils
from progress import Progress
from sets.selection import herding_select

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


def run_continual(memories: Dict[str, MemoryFn], record, steps: int, model: str, cfg: evaluation.EvalConfig, *,
                  num_eval: int, device: torch.device, seed: int = 0, num_orders: int = NUM_ORDERS,
                  log: Callable[[str], None] = tqdm.write) -> dict:
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
        log: prints a line per step (default ``tqdm.write``: stdout, without breaking a progress bar).

    Returns:
        ``{"orders": [[...]], "accs": {name: [[acc per order x network] per step]}}``, accuracies in [0, 1].
    """
    orders = class_orders(record.num_classes, num_orders)
    test_images, test_labels = record.images_test.to(device), record.labels_test.to(device)
    accs = {name: [[] for _ in range(steps)] for name in memories}
    # One unit per (source, order, step); each evaluation shows its networks and epochs itself.
    with Progress(len(memories) * len(orders) * steps, f"continual {model}", unit="step") as progress:
        for name, memory in memories.items():
            for index, order in enumerate(orders):
                images, labels = memory(index)
                for step in range(steps):
                    classes = seen_classes(order, steps, step)
                    train_x, train_y = restrict(images.to(device), labels.to(device), classes)
                    eval_x, eval_y = restrict(test_images, test_labels, classes)
                    result = evaluation.evaluate_synset(train_x, train_y, model, record.num_classes, eval_x, eval_y, cfg,
                                                   num_eval=num_eval, device=device,
                                                   seed=seed + 1000 * index + 100 * step)
                    accs[name][step] += result.accs
                    log(f"{name} order {index} step {step + 1}/{steps}: {len(classes)} classes, {train_x.shape[0]} "
                        f"images, test {eval_x.shape[0]}: {tables.format_acc(result.accs)} %")
                    progress.update(1, f"{name}, order {index + 1}/{len(orders)}, step {step + 1}/{steps}")
    return {"orders": orders, "accs": accs}


def step_table(accs: Dict[str, list]) -> pd.DataFrame:
    """Rows: sources; columns: steps 1..T; cells ``mean ± std`` (%) over orders x networks."""
    return pd.DataFrame({f"step {t + 1}": {name: tables.format_acc(per_step[t]) for name, per_step in accs.items()}
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


def herding_memory(record, model: str, ipc: int, seed: int, device) -> tuple:
    """``ipc`` herding-selected real training images per class in the embedding of one random
    ``model`` initialised from ``seed``, and their labels (class-major, CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = networks.get_network(model, record.channel, record.num_classes, record.im_size, device=device)
    net.eval()
    picked = []
    for c in range(record.num_classes):
        class_images = record.images_train[record.labels_train == c]
        features = torch.cat([chunked.embed_in_chunks(net, chunk.to(device)) for chunk in class_images.split(1024)])
        picked.append(class_images[herding_select(features, ipc).cpu()])
    return torch.cat(picked), torch.arange(record.num_classes).repeat_interleave(ipc)
