"""Evaluating a synthetic set: ``num_eval`` fresh networks trained on it and tested on the real test
set, one after another or all together (:mod:`evaluation.stacked`), on one process or spread over
torchrun's ranks. The one evaluation routine of the toolkit, shared by ``distill.py`` and
``evaluate.py``. Knows no method."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import distributed
import networks
from evaluation.formation import decode_zoom
from evaluation.stacked import StackingUnsupported, check_stackable, train_and_test_stacked
from evaluation.protocol import LABEL_LOSSES, SQUARE_LOSSES, EvalConfig, EvalResult
from evaluation.student import student_epochs, train_and_test
from evaluation.training import (EvaluationStopped, TrainingTerm, deterministic_algorithms, regression_targets,
                                 test_accuracy)
from precision import FP32, Precision
from progress import Progress
from utils import make_generator

# Networks that --stacked_eval auto trains one at a time even on CUDA: large enough that one
# network's step fills the device (and N of them would hold N times the activations).
SEQUENTIAL_ON_AUTO = ("VGG", "ResNet")


def eval_path(stacked_eval: str, model: str, device: torch.device, num_networks: int,
              term: Optional[TrainingTerm] = None, label_loss: str = "cross_entropy",
              precision: Precision = FP32) -> Tuple[bool, str]:
    """Whether :func:`evaluate_synset` trains its networks together (``evaluation.stacked``) and why not.

    ``on`` stacks whenever it can; ``off`` never; ``auto`` stacks on CUDA unless ``model`` is one
    of :data:`SEQUENTIAL_ON_AUTO`, and trains one network at a time on CPU, where stacking was
    measured slower (docs/results.md, *Stacked evaluation*). A set's training term (feature
    labels), a label loss other than cross-entropy (``mse``), float16 autocast (its gradient
    scaler is per network) and a single network always go one at a time; bfloat16 stacks.

    Returns:
        ``(stacked, note)``; the note is empty when the setting was followed as asked.
    """
    if stacked_eval == "off":
        return False, ""
    if term is not None:
        return False, "sequential: the set's training term (feature labels) trains one network at a time"
    if label_loss != "cross_entropy":
        return False, f"sequential: --label_loss {label_loss} trains one network at a time"
    if precision.amp == "fp16":
        return False, f"sequential: --amp {precision.amp} trains one network at a time (per-network gradient scaling)"
    if num_networks < 2:
        return False, "sequential: one network" if stacked_eval == "on" else ""
    if stacked_eval == "on":
        return True, ""
    if device.type == "cpu":
        return False, "auto: sequential on CPU (measured faster)"
    if model.startswith(SEQUENTIAL_ON_AUTO):
        return False, f"auto: sequential for the large network {model}"
    return True, "auto: stacked"


def evaluate_synset(image_syn: torch.Tensor, label_syn: torch.Tensor, model: str, num_classes: int,
                    test_images: torch.Tensor, test_labels: torch.Tensor, cfg: EvalConfig, *,
                    num_eval: int = 1, device: Optional[torch.device] = None, seed: int = 0,
                    term: Optional[TrainingTerm] = None, progress: bool = True,
                    should_stop: Optional[Callable[[], bool]] = None,
                    indices: Optional[Sequence[int]] = None, teacher: Optional[Callable] = None,
                    soft_store=None, val: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> EvalResult:
    """Train ``num_eval`` fresh ``model`` networks on a synthetic set; report their test accuracy.

    The one evaluation routine of the toolkit, shared by ``distill.py`` and ``evaluate.py``.
    Network ``k`` is initialised and trained from seed ``seed + k`` inside a forked RNG, so the
    caller's global RNG stream is left where it was and the result does not depend on when the
    evaluation runs. Its initialisation is drawn from the global RNG seeded with ``seed + k``, its
    data order and augmentation from ``make_generator(seed + k)``, whichever path trains it:
    one network after another (:func:`train_and_test`) or all together (:func:`train_and_test_stacked`,
    ``cfg.stacked_eval``, :func:`eval_path`); an architecture ``torch.func.vmap`` cannot batch falls
    back to the former, and the result says which path ran (``path``, ``path_note``).

    Args:
        image_syn: (N, C, H, W) synthetic images in the dataset's normalised (or ZCA) space.
        label_syn: (N,) int64 labels or (N, K) soft labels (probabilities); with
            ``cfg.label_loss='mse'``, class indices become centred one-hot targets and (N, K)
            labels are real-valued regression targets (:func:`regression_targets`).
        model: a network name from ``networks.list_networks()``.
        num_classes: K.
        test_images, test_labels: the real test set, (M, C, H, W) and (M,).
        cfg: the protocol (epochs, lr, augmentation ...).
        num_eval: number of independently initialised networks (indices ``0 .. num_eval - 1``).
        device: where to train (default: the device of ``image_syn``).
        seed: base seed.
        term: what the set carries beyond images and labels that changes training (an add-on's
            :class:`TrainingTerm`, on ``device``), checked against the first network; ``None``
            is the plain protocol.
        progress: show progress over networks and epochs (:class:`Progress`: a bar on a
            terminal, else a log line every ``progress.PROGRESS_EVERY_S`` seconds and at the end).
            It does not change the result.
        should_stop: asked before every epoch of every network; ``True`` abandons the evaluation
            (a stop requested by a signal).
        indices: which of the ``num_eval`` networks to train (network ``k`` always from seed
            ``seed + k``, whoever trains it); default all, ``0 .. num_eval - 1``; the accuracies
            come in this order. :func:`evaluate_synset_sharded` spreads them over torchrun's ranks.
        teacher: under ``cfg.labels='teacher'``, the teacher queried on every augmented batch:
            ``teacher(x (B, C, H, W)) -> (B, K)`` logits, an ``nn.Module`` (put in eval mode, never
            trained) or any callable, on ``device``; ignored otherwise.
        soft_store: under ``cfg.labels='soft'``, an :class:`evaluation.relabel.SoftLabelStore` of
            ``image_syn`` (``label_syn`` then the (N,) classes); without one, ``label_syn`` must be
            (N, K) per-image teacher logits. Ignored otherwise.
        val: ``(images (V, C, H, W), labels (V,))``, a validation split (``distill.py --select_on
            val``): every trained network is also tested on it as on the test set
            (``EvalResult.val_accs``, in the order of ``accs``); the test accuracies do not change.

    With ``cfg.decode_factor`` > 1 the set is first decoded (:func:`evaluation.formation.decode_zoom`):
    ``decode_factor²`` training images per stored image, labels repeated.

    With student settings other than today's (``cfg.is_default_student`` false) every network is
    trained by :func:`evaluation.student.train_and_test_student`, one at a time (the result's
    ``path_note`` says so).

    Returns:
        An :class:`EvalResult` with one accuracy in [0, 1] per network of ``indices``, in that order.

    Raises:
        KeyError: unknown ``model``.
        ValueError: ``term`` does not fit ``model`` (:meth:`TrainingTerm.check`); a ``term`` with a
            label loss other than cross-entropy or a student protocol; labels that do not fit
            ``cfg.label_loss``; ``teacher`` labels without a teacher, ``soft`` labels with neither a
            store nor (N, K) logits, a store that does not fit (:meth:`SoftLabelStore.check_replay`);
            a label loss other than cross-entropy under soft or teacher labels; a relabel store with
            ``decode_factor`` > 1.
        FloatingPointError: a training loss became NaN or infinite.
        EvaluationStopped: ``should_stop`` said so.
    """
    device = device or image_syn.device
    images = image_syn.detach().to(device)
    labels = label_syn.detach().to(device)
    if cfg.decode_factor > 1:  # multi-formation: every stored image becomes decode_factor² training images
        if soft_store is not None:
            raise ValueError(f"--decode_factor {cfg.decode_factor} trains on decoded images; a relabel store of the "
                             "stored images does not fit them: use --labels teacher or hard")
        images, labels = decode_zoom(images, labels, cfg.decode_factor)
    if cfg.label_loss not in LABEL_LOSSES:
        raise ValueError(f"label loss {cfg.label_loss!r}: expected one of {', '.join(LABEL_LOSSES)}")
    if cfg.labels != "hard" and cfg.label_loss != "cross_entropy":
        raise ValueError(f"--label_loss {cfg.label_loss} applies to hard labels; --labels {cfg.labels} uses --soft_loss")
    if cfg.labels == "teacher":
        if teacher is None:
            raise ValueError("--labels teacher needs a teacher (none was given)")
        if isinstance(teacher, nn.Module):
            teacher.eval()
            teacher.requires_grad_(False)
    if cfg.labels == "soft" and soft_store is None and not (label_syn.dim() == 2 and label_syn.is_floating_point()):
        raise ValueError(f"--labels soft needs a relabel store or (N, K) per-image teacher logits; got labels of shape "
                         f"{tuple(label_syn.shape)}")
    if cfg.label_loss in SQUARE_LOSSES and cfg.labels == "hard":
        if term is not None:
            raise ValueError("a training term (feature labels) trains with cross-entropy; it cannot use --label_loss mse")
        labels = regression_targets(labels, num_classes)
    channel, im_size = images.shape[1], tuple(images.shape[2:])
    runs = list(range(num_eval)) if indices is None else [int(k) for k in indices]
    result = EvalResult(model=model)
    start = time.perf_counter()
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    epochs = student_epochs(cfg)

    def fresh_network(run: int) -> nn.Module:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed + run)
            return networks.get_network(model, channel, num_classes, im_size, device=device)

    stacked, note = eval_path(cfg.stacked_eval, model, device, len(runs), term, cfg.label_loss, cfg.precision)
    if stacked and not cfg.is_default_student:
        stacked, note = False, "sequential: the student protocol (" + ", ".join(
            f"{key} {value}" for key, value in cfg.student_fields().items()) + ") trains one network at a time"
    nets = []
    if stacked:
        nets = [fresh_network(run) for run in runs]
        try:
            with deterministic_algorithms(cfg.deterministic):
                check_stackable(nets[0], images, labels)
        except StackingUnsupported as error:
            stacked, nets = False, []
            note = f"sequential: {model} cannot be stacked ({error})"
    result.path, result.path_note = ("stacked" if stacked else "sequential"), note
    shown = Progress(len(runs) * epochs, f"evaluation {model}", unit="epoch", leave=False) if progress else None
    with shown or nullcontext():
        if stacked:
            def on_all_epochs(done: int) -> None:
                shown.update(len(runs), f"{len(runs)} networks together, epoch {done}/{epochs}")

            with torch.random.fork_rng(devices=fork_devices), deterministic_algorithms(cfg.deterministic):
                result.accs = train_and_test_stacked(nets, images, labels, test_images, test_labels, cfg,
                                                     [make_generator(seed + run) for run in runs],
                                                     on_epoch=on_all_epochs if progress else None,
                                                     should_stop=should_stop,
                                                     also_test=None if val is None else (*val, result.val_accs))
        for position, run in enumerate([] if stacked else runs):
            def on_epoch(done: int, network: int = position + 1) -> None:
                shown.update(1, f"network {network}/{len(runs)}, epoch {done}/{epochs}")

            with torch.random.fork_rng(devices=fork_devices), deterministic_algorithms(cfg.deterministic):
                torch.manual_seed(seed + run)
                net = networks.get_network(model, channel, num_classes, im_size, device=device)
                if term is not None and position == 0:
                    term.check(net, images)
                acc = train_and_test(net, images, labels, test_images, test_labels, cfg, make_generator(seed + run),
                                     term=term, on_epoch=on_epoch if progress else None,
                                     should_stop=should_stop, teacher=teacher, soft_store=soft_store)
                if val is not None:  # the same trained network on the validation split
                    result.val_accs.append(test_accuracy(net, val[0], val[1], cfg.batch_test, cfg.tta_mode,
                                                         cfg.deterministic, cfg.precision))
            result.accs.append(acc)
    result.train_time_s = time.perf_counter() - start
    return result


def evaluate_synset_sharded(image_syn: torch.Tensor, label_syn: torch.Tensor, model: str, num_classes: int,
                            test_images: torch.Tensor, test_labels: torch.Tensor, cfg: EvalConfig, *,
                            num_eval: int = 1, should_stop: Optional[Callable[[], bool]] = None,
                            **kwargs) -> EvalResult:
    """:func:`evaluate_synset` with its ``num_eval`` networks spread over torchrun's ranks
    (``distributed.shard``, round robin); every rank returns all accuracies in network order.

    Network ``k`` is trained from seed ``seed + k`` whichever rank trains it, so the accuracies
    do not depend on the number of processes; with one process this is :func:`evaluate_synset`.
    Every rank must call it with the same arguments. ``train_time_s`` is this rank's wall time.
    A stop (``should_stop``) seen by any rank abandons the evaluation on every rank.

    Raises:
        EvaluationStopped: ``should_stop`` said so on some rank.
        Otherwise as :func:`evaluate_synset`.
    """
    if distributed.world_size() == 1:
        return evaluate_synset(image_syn, label_syn, model, num_classes, test_images, test_labels, cfg,
                               num_eval=num_eval, should_stop=should_stop, **kwargs)
    start = time.perf_counter()
    mine = distributed.shard(num_eval)
    stopped, mine_result = False, EvalResult(model=model)
    try:
        mine_result = evaluate_synset(image_syn, label_syn, model, num_classes, test_images, test_labels, cfg,
                                      num_eval=num_eval, should_stop=should_stop, indices=mine, **kwargs)
    except EvaluationStopped:
        stopped = True
    if distributed.any_flag(stopped):
        raise EvaluationStopped
    val_accs = mine_result.val_accs or [None] * len(mine_result.accs)
    merged = distributed.gather_units(dict(zip(mine, zip(mine_result.accs, val_accs))))
    val = [merged[k][1] for k in range(num_eval)]
    return EvalResult(model=model, accs=[merged[k][0] for k in range(num_eval)],
                      train_time_s=time.perf_counter() - start,
                      val_accs=val if all(v is not None for v in val) else [])
