"""Original models: networks trained on the whole real training set, saved for CLoM and for
assessments of synthetic sets ("Original Model" accuracy).

Source (docs/reference-notes.md, *CLoM*; no reference code is reused):
yaolu-zjut/DDInterpreter ``train_original_models.py`` (Lu et al., "Can pre-trained models assist in
dataset distillation?", arXiv 2310.03295; the README's "Which Assessment Should be Prioritized in
Dataset Distillation?"). Each original model is a fresh ``networks.get_network`` network trained
on the full training set with SGD (lr 0.01, momentum 0.9, weight decay 0.005, batch 256) for 150
epochs, the lr multiplied by 0.1 at epochs 50 and 100 (``MultiStepLR``), with **no augmentation**
(as in the reference), on the normalised images every loader here returns.

On-disk layout (:func:`original_dir`)::

    {save_path}/{dataset}/original/{model}/index_{i}/checkpoint.pt          resumable state (below)
    {save_path}/{dataset}/original/{model}/index_{i}/{dataset}_{model}_original_epoch{E}.pth
                                              the finished weights (a plain state_dict, reference name)
    {save_path}/{dataset}/original/{model}/index_{i}/epoch_{E}.pt           the weights after epoch E
                                              (only with --save_epochs; layout below)
    {save_path}/{dataset}/original/{model}/summary.json                     one row per index folder
    {save_path}/{dataset}/original/{model}/log.txt                          (written by train_original.py)

``checkpoint.pt`` (``torch.load(..., weights_only=True)`` reads it) holds ``format``,
``format_version``, ``model``, ``dataset``, ``channel``, ``num_classes``, ``im_size`` [H, W],
``index``, ``seed``, ``epochs_done``, ``epochs_total``, ``finished``, ``config``
(:meth:`OriginalConfig.describe`), ``test_acc`` (in [0, 1] after the last epoch, else ``None``),
``num_params``, ``flops_per_image``, ``state_dict``, ``optimizer``, ``scheduler``, ``rng``
(the state of the generator every shuffle draws from; training draws nothing from the global RNG,
there is no augmentation and no dropout), ``history`` (one
``{epoch, loss, lr, seconds}`` per epoch), ``train_seconds``, ``device`` and ``torch_version``.

``epoch_{E}.pt`` (``--save_epochs``, :func:`parse_save_epochs`) holds the same keys except
``optimizer``, ``scheduler`` and ``rng``, with ``epochs_done`` = E and ``test_acc`` measured
after epoch E, so an early-stopped model can serve as a teacher ("A Label is Worth a Thousand
Images", Qin et al. 2024, Table 7: an early-epoch expert can be the better teacher). Keeping them
changes nothing in the training (the test pass draws no random numbers; ``evaluation.train_epoch``
puts the network back in training mode).

Model ``i`` is initialised from ``torch.manual_seed(seed + i)`` (in a forked RNG) and shuffled from
``utils.make_generator(seed + i)``, so a resumed model equals an uninterrupted one on the same
device. Because the lr milestones are absolute epochs, a model finished with ``--epochs 1`` is
exactly epoch 1 of a longer run: asking for more epochs later continues it.

Public API here: :class:`OriginalConfig`, :func:`parse_milestones`, :func:`parse_save_epochs`,
:func:`train_original`, :func:`train_originals`, :func:`check_existing`,
:class:`OriginalResult`, :class:`OriginalsSummary`. The folder layout, reading checkpoints, the
summary and loading finished models are ``pretrained/original_files.py``.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

import distributed
import networks
import evaluation
import storage
import utils
from pretrained import original_files
from progress import Progress
from precision import FP32, Precision

logger = logging.getLogger(__name__)


# Called after every epoch (after any checkpoint of that epoch is written): on_epoch(index, epoch, loss).
EpochCallback = Callable[[int, int, float], None]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def parse_milestones(text: Union[str, Sequence[int], None]) -> tuple:
    """Parse ``--lr_decay_step`` (``'50,100'``) into increasing positive epochs ``(50, 100)``.

    Entries may be separated by commas or spaces; an empty string, ``'none'`` or ``None`` means
    no decay. (DDInterpreter's ``validate.py`` hands such a string to ``MultiStepLR`` unparsed,
    docs/reference-notes.md, *CLoM*; here it is always parsed and checked.)

    Raises:
        utils.UserError: an entry is not a positive integer, or the epochs do not increase.
    """
    if text is None:
        return ()
    if isinstance(text, str):
        parts = [part.strip() for part in text.replace(" ", ",").split(",") if part.strip()]
        if len(parts) == 1 and parts[0].lower() == "none":
            return ()
    else:
        parts = list(text)
    try:
        if any(isinstance(part, bool) or not isinstance(part, (str, int)) for part in parts):
            raise TypeError(parts)
        values = tuple(int(part) for part in parts)
    except (TypeError, ValueError):
        raise utils.UserError(f"--lr_decay_step {text!r}: expected comma-separated epochs such as 50,100 "
                              "(or none)") from None
    if any(value < 1 for value in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise utils.UserError(f"--lr_decay_step {text!r}: epochs must be positive and increasing, e.g. 50,100")
    return values


SaveEpochs = Union[None, str, tuple]


def parse_save_epochs(text: Union[str, Sequence[int], None]) -> SaveEpochs:
    """Parse ``--save_epochs``: which epochs keep their weights in ``index_{i}/epoch_{E}.pt``.

    ``None``, ``''`` or ``'none'``: none (the default; the layout of before). ``'all'``: every
    epoch. ``'5,10,20'`` (commas or spaces): those epochs (1-based, after the epoch's update).

    Returns:
        ``None``, ``'all'`` or a sorted tuple of distinct positive epochs.

    Raises:
        utils.UserError: an entry is not a positive integer.
    """
    if text is None:
        return None
    if isinstance(text, str):
        word = text.strip().lower()
        if word in ("", "none"):
            return None
        if word == "all":
            return "all"
        parts = [part for part in text.replace(" ", ",").split(",") if part.strip()]
    else:
        parts = list(text)
    try:
        values = tuple(sorted({int(part) for part in parts}))
    except (TypeError, ValueError):
        values = ()
    if not values or any(value < 1 for value in values) or any(isinstance(p, bool) for p in parts):
        raise utils.UserError(f"--save_epochs {text!r}: expected all, none or comma-separated epochs such as 5,10")
    return values


def keeps_epoch(save_epochs: SaveEpochs, epoch: int) -> bool:
    """Whether :func:`parse_save_epochs`'s value ``save_epochs`` keeps the weights after ``epoch``."""
    return save_epochs == "all" or (isinstance(save_epochs, tuple) and epoch in save_epochs)


@dataclass(frozen=True)
class OriginalConfig:
    """How original models are trained (the ``train_original.py`` flags that change a model).

    Field names and defaults are the reference flags of ``train_original_models.py``
    (yaolu-zjut/DDInterpreter); ``seed`` is the toolkit's ``--seed`` (the reference's ``--random_seed``).

    Attributes:
        dataset, zca, subset, res: the training data (``data.load_dataset`` arguments).
        model: a ``networks.py`` name.
        epochs: total training epochs.
        batch_size: images per SGD step (the last batch of an epoch may be smaller).
        lr, momentum, weight_decay: SGD settings.
        lr_decay_step: ``MultiStepLR`` milestones: the lr is multiplied by 0.1 once that many
            epochs are done (with ``(50, 100)``: epochs 1-50 at ``lr``, 51-100 at ``lr/10``,
            101-150 at ``lr/100``, 1-based).
        seed: model ``i`` uses seed ``seed + i`` for its initialisation and its shuffles.
    """

    dataset: str
    model: str = "ConvNet"
    epochs: int = 150
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.005
    lr_decay_step: tuple = (50, 100)
    zca: bool = False
    subset: Optional[str] = None
    res: Optional[int] = None
    seed: int = 0

    def validate(self) -> None:
        """Check every value; raise ``utils.UserError`` naming the flag.

        Raises:
            utils.UserError: non-positive ``epochs``, ``batch_size`` or ``lr``, negative
                ``momentum``/``weight_decay``, bad milestones, or an unknown model.
        """
        utils.check_flag_ranges(self, at_least_one=("epochs", "batch_size"), positive=("lr",),
                                non_negative=("momentum", "weight_decay"))
        parse_milestones(self.lr_decay_step)
        if self.model not in networks.list_networks():
            raise utils.UserError(f"--model: unknown model {self.model!r}; choose from: "
                                  f"{', '.join(networks.list_networks())}")

    def describe(self) -> dict:
        """The configuration, JSON-ready, as stored in every checkpoint's ``config``; the dataset
        name is :func:`dataset_name`'s and the milestones a list."""
        record = asdict(self)
        record["dataset"] = original_files.dataset_name(self.dataset, self.subset)
        record["subset"] = self.subset.lower() if self.subset else None
        record["lr_decay_step"] = list(parse_milestones(self.lr_decay_step))
        record["augmentation"] = "none"
        return record

    def identity(self) -> dict:
        """:meth:`describe` without ``epochs``: what must match to resume a model or to add
        models beside others (a finished model may be continued to more epochs)."""
        record = self.describe()
        del record["epochs"]
        return record


def _check_resumable(path: str, state: dict, cfg: OriginalConfig) -> None:
    """Raise ``utils.UserError`` if the checkpoint at ``path`` cannot be continued with ``cfg``."""
    saved = dict(state.get("config", {}))
    saved.pop("epochs", None)
    differences = utils.config_differences(saved, cfg.identity())
    if differences:
        raise utils.UserError(f"{path} was trained with {'; '.join(differences)}; refusing to mix: use the same "
                              "flags, another --save_path, or delete that folder")
    done, total = int(state["epochs_done"]), int(state["epochs_total"])
    if done > cfg.epochs and done < total:
        raise utils.UserError(f"{path} is unfinished at {done} of {total} epochs, more than --epochs {cfg.epochs}; "
                              f"use --epochs {total} to finish it")


def check_existing(save_path: str, cfg: OriginalConfig, num: int) -> dict:
    """Refuse early (before the dataset is loaded) to continue or add to models of another
    configuration; report what a run of ``num`` models would do.

    Args:
        save_path: ``--save_path``.
        cfg: this run's configuration.
        num: models wanted (indices ``0 .. num - 1``).

    Returns:
        ``{'finished': [i, ...], 'resume': [(i, epochs_done), ...], 'new': [i, ...]}`` for indices
        below ``num`` (finished means at least ``cfg.epochs`` epochs done).

    Raises:
        utils.UserError: ``num`` < 1, or a checkpoint of this folder (any index) was trained with
            other flags (the message names them), or is unfinished beyond ``cfg.epochs``.
    """
    if num < 1:
        raise utils.UserError(f"--num must be at least 1, got {num}")
    directory = original_files.original_dir(save_path, cfg.dataset, cfg.model, cfg.subset)
    plan = {"finished": [], "resume": [], "new": []}
    existing = original_files.list_indices(directory)
    for index in existing:
        path = os.path.join(directory, f"index_{index}", original_files.CHECKPOINT_NAME)
        state = original_files.read_checkpoint(path)
        _check_resumable(path, state, cfg)
        if index < num:
            done = int(state["epochs_done"])
            if done >= cfg.epochs and done >= int(state["epochs_total"]):
                plan["finished"].append(index)
            else:
                plan["resume"].append((index, done))
    plan["new"] = [index for index in range(num) if index not in existing]
    return plan


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
@dataclass
class OriginalResult:
    """What :func:`train_original` did for one model.

    Attributes:
        index: the model index.
        path: its ``checkpoint.pt``.
        seed: its seed (``cfg.seed + index``).
        epochs_done, epochs_total: epochs trained in total / asked for.
        trained_epochs: epochs trained by this call (0: it was finished already).
        resumed_from: epochs the checkpoint had when this call started (0: a fresh model).
        test_acc: test accuracy in [0, 1] after the last epoch (``None`` if unfinished).
        num_params: :func:`count_parameters`.
        flops_per_image: :func:`flops_per_image`.
        train_seconds: training seconds summed over every call (testing excluded).
        closed: the checkpoint had exactly ``cfg.epochs`` epochs but a larger total; this call
            tested it and marked it finished without training.
    """

    index: int
    path: str
    seed: int
    epochs_done: int
    epochs_total: int
    trained_epochs: int
    resumed_from: int
    test_acc: Optional[float]
    num_params: int
    flops_per_image: int
    train_seconds: float
    closed: bool = False

    @property
    def status(self) -> str:
        """``'trained'``, ``'resumed from epoch k'``, ``'finished at epoch k'`` or ``'skipped (finished)'``."""
        if self.closed:
            return f"finished at epoch {self.epochs_done}"
        if self.trained_epochs == 0:
            return "skipped (finished)"
        return f"resumed from epoch {self.resumed_from}" if self.resumed_from else "trained"


def _record_fields(record) -> dict:
    return {"channel": int(record.channel), "num_classes": int(record.num_classes),
            "im_size": [int(s) for s in record.im_size]}


def train_original(net: nn.Module, record, cfg: OriginalConfig, path: str, *, index: int = 0,
                   seed: Optional[int] = None, save_every: int = 1, on_epoch: Optional[EpochCallback] = None,
                   images: Optional[tuple] = None, precision: Precision = FP32,
                   data_parallel: bool = False, save_epochs: SaveEpochs = None) -> OriginalResult:
    """Train (or continue, or skip) one original model and keep its checkpoint at ``path``.

    SGD(``cfg.lr``, ``cfg.momentum``, ``cfg.weight_decay``) on shuffled ``cfg.batch_size``
    minibatches of the whole training set (``evaluation.train_epoch``, no augmentation), the lr
    scheduled by ``MultiStepLR(cfg.lr_decay_step, gamma=0.1)`` stepped once per epoch. The
    checkpoint is written atomically after every ``save_every``-th epoch and after the last one
    (then with the test accuracy, and the reference-named weight file beside it).

    If ``path`` exists, its state (weights, optimizer, scheduler, generator) is loaded into
    ``net`` and training continues from there, also past the total it was started with (the
    milestones are absolute epochs, so this equals a run asked for ``cfg.epochs`` from the start).
    A finished checkpoint with at least ``cfg.epochs`` epochs is skipped (its weights are still
    loaded into ``net``); an unfinished one with exactly ``cfg.epochs`` epochs is tested and
    marked finished without training.

    Args:
        net: a freshly initialised ``cfg.model`` network on the training device.
        record: a ``data.DatasetRecord`` (training and test split).
        cfg: the configuration (validated here).
        path: the ``checkpoint.pt`` to resume from and write (:func:`checkpoint_path`).
        index: the model index (recorded, and named in the log).
        seed: the shuffling seed for a fresh model; default ``cfg.seed + index``.
        save_every: checkpoint every that many epochs (0: only after the last).
        on_epoch: ``on_epoch(index, epoch, loss)`` after each epoch and its checkpoint.
        images: ``(train_x, train_y, test_x, test_y)`` already on the device (saves copies
            when training several models); default: ``record``'s tensors moved there.
        precision: ``--amp`` of training and testing (``evaluation.train_epoch``; float16 scales the
            loss with a ``GradScaler`` that starts afresh on resume); recorded in the checkpoint.
        data_parallel: under torchrun, every rank trains this one model together
            (``--ddp``): ``DistributedDataParallel`` averages the gradients, each epoch every
            rank passes over its ``DistributedSampler`` share (seed: the model's seed) in batches
            of ``cfg.batch_size // world_size``, and rank 0 writes the checkpoint. The global
            batch is then ``cfg.batch_size`` but the order of the images differs from one
            process's, so the result is not the one-process result. No effect for one process.
        save_epochs: :func:`parse_save_epochs`'s value: after each such epoch the weights and the
            test accuracy go to ``index_{i}/epoch_{E}.pt`` beside ``path`` (rank 0 writes them).
            Epochs trained by an earlier call keep the files that call wrote.

    Returns:
        An :class:`OriginalResult`.

    Raises:
        utils.UserError: invalid ``cfg`` or ``save_every``, or the checkpoint was made with other
            flags or holds another dataset or model.
        FloatingPointError: the training loss became NaN or infinite (the last checkpoint is kept).
    """
    cfg.validate()
    if save_every < 0:
        raise utils.UserError(f"--save_every must be >= 0, got {save_every}")
    seed = cfg.seed + index if seed is None else seed
    device = next(net.parameters()).device
    if images is None:
        images = tuple(t.to(device) for t in (record.images_train, record.labels_train, record.images_test,
                                              record.labels_test))
    train_x, train_y, test_x, test_y = images
    parallel = data_parallel and distributed.world_size() > 1
    milestones = list(parse_milestones(cfg.lr_decay_step))
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    generator = utils.make_generator(seed)
    scaler = precision.grad_scaler(device)
    state: dict = {}
    if os.path.isfile(path):
        state = original_files.read_checkpoint(path)
        _check_resumable(path, state, cfg)
        wanted = {"dataset": cfg.describe()["dataset"], "model": cfg.model, **_record_fields(record)}
        for key, value in wanted.items():
            if state.get(key) != value:
                raise utils.UserError(f"{path} holds {key}={state.get(key)!r}, this run has {key}={value!r}")
        net.load_state_dict(state["state_dict"])
        seed = int(state["seed"])
    done = int(state.get("epochs_done", 0))
    history = list(state.get("history", []))
    num_params = networks.count_parameters(net)
    flops = int(state["flops_per_image"]) if state else networks.flops_per_image(net, record.channel, record.im_size)
    result = OriginalResult(index=index, path=path, seed=seed, epochs_done=done, epochs_total=cfg.epochs,
                            trained_epochs=0, resumed_from=done, test_acc=state.get("test_acc"),
                            num_params=num_params, flops_per_image=flops,
                            train_seconds=float(sum(h["seconds"] for h in history)))
    if done >= cfg.epochs and state.get("finished"):
        result.epochs_total = int(state["epochs_total"])
        logger.info("original %d: %s is finished (%d epochs): skipped", index, path, done)
        return result
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["rng"]["generator"])
        logger.info("original %d: resuming %s after epoch %d of %d", index, path, done, cfg.epochs)
    base = {"format": original_files.FORMAT, "format_version": original_files.FORMAT_VERSION, "model": cfg.model,
            "dataset": cfg.describe()["dataset"], **_record_fields(record), "index": int(index), "seed": int(seed),
            "config": cfg.describe(), "num_params": num_params, "flops_per_image": flops, "device": str(device),
            "amp": precision.describe(), "torch_version": str(torch.__version__)}

    def save(epochs_done: int, test_acc: Optional[float]) -> None:
        if parallel and not distributed.is_main():  # --ddp: every rank holds the same model; rank 0 writes
            return
        finished = epochs_done >= cfg.epochs
        storage.atomic_save({**base, "epochs_done": epochs_done, "epochs_total": cfg.epochs, "finished": finished,
                           "test_acc": test_acc, "state_dict": original_files.cpu_copy(net.state_dict()),
                           "optimizer": original_files.cpu_copy(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                           "rng": {"generator": generator.get_state()},
                           "history": history, "train_seconds": float(sum(h["seconds"] for h in history))}, path)
        if finished:
            storage.atomic_save(original_files.cpu_copy(net.state_dict()), os.path.join(
                os.path.dirname(path), original_files.reference_weights_name(base["dataset"], cfg.model, epochs_done)))

    def save_epoch(epochs_done: int, test_acc: Optional[float]) -> Optional[float]:
        """Keep ``epoch_{E}.pt`` when ``save_epochs`` asks for it; return the test accuracy used."""
        if not keeps_epoch(save_epochs, epochs_done) or (parallel and not distributed.is_main()):
            return test_acc
        if test_acc is None:
            test_acc = evaluation.test_accuracy(net, test_x, test_y, precision=precision)
        storage.atomic_save({**base, "epochs_done": epochs_done, "epochs_total": cfg.epochs,
                             "finished": epochs_done >= cfg.epochs, "test_acc": test_acc,
                             "state_dict": original_files.cpu_copy(net.state_dict()), "history": list(history),
                             "train_seconds": float(sum(h["seconds"] for h in history))},
                            os.path.join(os.path.dirname(path), f"epoch_{int(epochs_done)}.pt"))
        return test_acc

    if done >= cfg.epochs:  # unfinished at exactly --epochs (the milestones are absolute): finish it here
        result.test_acc, result.closed = evaluation.test_accuracy(net, test_x, test_y, precision=precision), True
        save(done, result.test_acc)
        save_epoch(done, result.test_acc)
        logger.info("original %d: %s has %d epochs: test acc %.2f%%", index, path, done, 100 * result.test_acc)
        return result
    model = distributed.data_parallel(net) if parallel else net  # after loading: DDP wraps the resumed weights
    for epoch in range(done, cfg.epochs):
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        if parallel:
            share = distributed.distributed_indices(train_x.shape[0], epoch, seed)
            batch = max(1, cfg.batch_size // distributed.world_size())
            loss = evaluation.train_epoch(model, train_x, train_y, optimizer, batch, generator, index=share,
                                     precision=precision, scaler=scaler)
            loss = float(distributed.sum_scalar(torch.tensor(loss))) / distributed.world_size()
        else:
            loss = evaluation.train_epoch(net, train_x, train_y, optimizer, cfg.batch_size, generator, precision=precision,
                                     scaler=scaler)
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise FloatingPointError(f"original {index}: training loss became {loss} in epoch {epoch + 1}; "
                                     f"{path} keeps the last saved epoch")
        scheduler.step()
        history.append({"epoch": epoch + 1, "loss": loss, "lr": lr, "seconds": seconds})
        result.trained_epochs += 1
        message = f"original {index} epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, lr {lr:g}, {seconds:.1f} s"
        last = epoch + 1 == cfg.epochs
        if last:
            result.test_acc = evaluation.test_accuracy(net, test_x, test_y, precision=precision)
            message += f", test acc {100 * result.test_acc:.2f}%"
        kept_acc = save_epoch(epoch + 1, result.test_acc if last else None)
        if kept_acc is not None and not last:
            message += f", kept epoch_{epoch + 1}.pt (test acc {100 * kept_acc:.2f}%)"
        logger.info(message)
        if last or (save_every and (epoch + 1) % save_every == 0):
            save(epoch + 1, result.test_acc if last else None)
        if on_epoch is not None:
            on_epoch(index, epoch + 1, loss)
    result.epochs_done = cfg.epochs
    result.train_seconds = float(sum(h["seconds"] for h in history))
    if parallel:
        distributed.barrier()  # rank 0's last checkpoint is on disk before any rank moves on
    return result


@dataclass
class OriginalsSummary:
    """What :func:`train_originals` did.

    Attributes:
        directory: :func:`original_dir`.
        results: one :class:`OriginalResult` per index ``0 .. num - 1`` of this run.
        summary: the ``summary.json`` content (every index folder of ``directory``).
        summary_path: where it was written.
    """

    directory: str
    results: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    summary_path: str = ""


def train_originals(cfg: OriginalConfig, record, save_path: str, num: int, *, device: torch.device,
                    save_every: int = 1, on_epoch: Optional[EpochCallback] = None,
                    precision: Precision = FP32, data_parallel: bool = False,
                    save_epochs: SaveEpochs = None) -> OriginalsSummary:
    """Train original models ``0 .. num - 1`` of ``cfg.model`` on ``record`` (skipping finished
    ones, continuing unfinished ones) and rewrite ``summary.json`` after each.

    Under torchrun the models are spread over the ranks (``distributed.shard``; model ``i`` is
    seeded ``cfg.seed + i`` whoever trains it, each in its own ``index_{i}`` folder, so the models
    equal one process's), or with ``data_parallel`` (``--ddp``) all ranks train each model together
    (:func:`train_original`). Rank 0 writes ``summary.json``; every rank returns all results.

    Args:
        cfg: the configuration.
        record: a ``data.DatasetRecord``; its name should be ``cfg.dataset``'s.
        save_path: the root folder (``--save_path``).
        num: models wanted.
        device: where to train.
        save_every: see :func:`train_original`.
        on_epoch: see :func:`train_original`.
        precision: ``--amp`` (see :func:`train_original`).
        data_parallel: see above.
        save_epochs: per-epoch weights to keep (see :func:`train_original`).

    Returns:
        An :class:`OriginalsSummary`.

    Raises:
        utils.UserError: see :func:`check_existing` and :func:`train_original`.
        FloatingPointError: a training loss became NaN or infinite.
    """
    cfg.validate()
    plan = check_existing(save_path, cfg, num)
    directory = original_files.original_dir(save_path, cfg.dataset, cfg.model, cfg.subset)
    logger.info("%s: %d finished, %d to resume, %d new", directory, len(plan["finished"]), len(plan["resume"]),
                len(plan["new"]))
    images = tuple(t.to(device) for t in (record.images_train, record.labels_train, record.images_test,
                                          record.labels_test))
    out = OriginalsSummary(directory=directory)
    mine = list(range(num)) if data_parallel else distributed.shard(num)  # all of them for one process
    done_before = (cfg.epochs * len([i for i in plan["finished"] if i in mine])
                   + sum(min(done, cfg.epochs) for i, done in plan["resume"] if i in mine))
    progress = Progress(len(mine) * cfg.epochs, f"original {cfg.model} models", unit="epoch",
                              initial=done_before)

    def each_epoch(index: int, epoch: int, loss: float) -> None:
        progress.update(1, f"model {index + 1}/{num}, epoch {epoch}/{cfg.epochs}")
        if on_epoch is not None:
            on_epoch(index, epoch, loss)

    with progress:
        for index in mine:
            net = original_files.build_network(cfg.model, record.channel, record.num_classes, record.im_size, device,
                                 cfg.seed + index)
            path = os.path.join(directory, f"index_{index}", original_files.CHECKPOINT_NAME)
            result = train_original(net, record, cfg, path, index=index, save_every=save_every, on_epoch=each_epoch,
                                    images=images, precision=precision, data_parallel=data_parallel,
                                    save_epochs=save_epochs)
            out.results.append(result)
            if (result.trained_epochs or result.closed) and index + 1 < num and distributed.is_main():
                original_files.write_summary(directory)  # kept current while later models train
    if distributed.world_size() > 1:
        if not data_parallel:
            out.results = list(distributed.gather_units({r.index: r for r in out.results}).values())
        distributed.barrier()  # every model's checkpoint is on disk
    if distributed.is_main():
        out.summary, out.summary_path = original_files.write_summary(directory)
    out.summary, out.summary_path = distributed.broadcast_object((out.summary, out.summary_path))
    return out
