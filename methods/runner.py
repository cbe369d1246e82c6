"""The distillation run: experiments x iterations of a method, periodic evaluation, pictures,
summaries, checkpoints and resume. ``distill.py`` parses flags and calls :func:`run_distillation`.

Layout of a run directory (``--run_dir``):
    config.yaml                                  the resolved configuration, written before step 1
    last.pt                                      checkpoint (``--checkpoint_every``, and on a stop)
    res_{method}_{dataset}_{model}_{ipc}ipc.pt   the result, in the reference layout (DC ``main.py``)
    vis_{method}_{dataset}_{model}_{ipc}ipc_exp{e}_iter{it}.png   pixel-space grid per evaluation
    summary.csv                                  one row per (evaluation, model)
    results.json                                 final accuracies, protocol, timings
    log.txt                                      the log
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import yaml
from tqdm import tqdm

import augment
from sets import resources
import utils
from data import RealSampler
from methods.addons import clom
from methods.base import DistillConfig, DistillMethod, get_method_class

logger = logging.getLogger(__name__)


class RunInterrupted(Exception):
    """The run was asked to stop (SIGINT / SIGTERM); a checkpoint was written first."""


class StopFlag:
    """Turns SIGINT and SIGTERM into a request to stop after the current iteration.

    A second SIGINT while a stop is pending raises ``KeyboardInterrupt`` at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested (signal %d): finishing this iteration, then writing a checkpoint", signum)

    def install(self) -> "StopFlag":
        """Install the handlers (remembering the previous ones); returns ``self``."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous SIGINT / SIGTERM handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class RunOptions:
    """How to run and evaluate, independent of the method.

    Attributes:
        num_exp: independent experiments (``--num_exp``), seeds ``seed + exp``.
        num_eval: networks per evaluation (``--num_eval``; 0 skips evaluation).
        eval_it: evaluate every ``eval_it`` iterations (and at iteration 0 and the end); 0 only
            at the end.
        eval_models: networks to evaluate with (from ``--eval_mode``).
        epoch_eval_train: evaluation epochs; ``None`` takes the method's default.
        seed: base seed.
        run_dir: where everything is written.
        checkpoint_every: write ``last.pt`` every so many iterations (0: only when stopped).
        resume: continue from ``run_dir/last.pt`` if it exists.
        save_vis: write a picture at each evaluation.
        tta_mode: test-time augmentation of the evaluation (``--tta --tta_mode hflip``; ``""`` off).
        deterministic: deterministic evaluation (``--deterministic``; ``utils.EvalConfig``).
    """

    num_exp: int = 1
    num_eval: int = 5
    eval_it: int = 0
    eval_models: tuple = ("ConvNet",)
    epoch_eval_train: Optional[int] = None
    seed: int = 0
    run_dir: str = "runs/default"
    checkpoint_every: int = 0
    resume: bool = False
    save_vis: bool = True
    tta_mode: str = ""
    deterministic: bool = False


@dataclass
class RunOutcome:
    """What a finished run produced: per-model final accuracies and the files written."""

    accs_all_exps: Dict[str, List[float]]
    result_path: str
    run_dir: str
    seconds_per_iteration: float
    vis_paths: List[str] = field(default_factory=list)


def eval_config_for(method: DistillMethod, model_eval: str, opts: RunOptions, syn=None) -> utils.EvalConfig:
    """The evaluation protocol of ``method`` for one evaluation network (VICO-UoE/DatasetCondensation
    ``utils.py`` ``evaluate_synset``; docs/reference-notes.md, *Evaluation protocol*):
    DSA when the method trains with DiffAugment, else DC's ``get_daparam`` augmentation; epochs
    from ``--epoch_eval_train`` or the method's default; the learning rate is ``--lr_net``, or
    the step size the synthetic set learned (``syn.syn_lr``, MTT's alpha) when it has one."""
    cfg = method.cfg
    dc_aug = None if method.uses_dsa else augment.get_daparam(cfg.dataset, cfg.model, model_eval, cfg.ipc)
    dc_active = dc_aug is not None and dc_aug.strategy not in ("", "none", "None")
    epochs = opts.epoch_eval_train if opts.epoch_eval_train is not None else method.default_eval_epochs(dc_active)
    lr = float(syn.syn_lr.detach()) if syn is not None and syn.syn_lr is not None else cfg.lr_net
    return utils.EvalConfig(epochs=epochs, lr=lr, batch_train=cfg.batch_train,
                            dsa_strategy=method.dsa_strategy, dc_aug=dc_aug, tta_mode=opts.tta_mode,
                            deterministic=opts.deterministic)


def _check_resumable(saved: dict, cfg: DistillConfig, opts: RunOptions, path: str) -> None:
    """Refuse to resume a checkpoint written by a different configuration."""
    current = dataclasses.asdict(cfg)
    differing = [key for key in current if saved["config"].get(key) != current[key]]
    if saved.get("num_exp") != opts.num_exp:
        differing.append("num_exp")
    if saved.get("seed") != opts.seed:
        differing.append("seed")
    if differing:
        raise utils.UserError(f"--resume: {path} was written with other values of: {', '.join(differing)} "
                              "(use the same flags, or another --run_dir)")


def run_distillation(cfg: DistillConfig, opts: RunOptions, record, device: torch.device,
                     stop: Optional[StopFlag] = None,
                     on_iteration: Optional[Callable[[int, int, dict], None]] = None) -> RunOutcome:
    """Distil ``opts.num_exp`` synthetic sets with ``cfg.method`` and evaluate them.

    Args:
        cfg: the method configuration.
        opts: run options.
        record: a ``data.DatasetRecord`` (train and test tensors, shapes, normalisation).
        device: where to work.
        stop: a :class:`StopFlag`; when set, the run checkpoints after the current iteration and
            raises :class:`RunInterrupted`.
        on_iteration: called as ``on_iteration(exp, iteration, logs)`` after every iteration.

    Returns:
        A :class:`RunOutcome`.

    Raises:
        RunInterrupted: a stop was requested (a checkpoint was written).
        utils.UserError: ``--resume`` found an incompatible checkpoint, or ``cfg.clom`` asks for
            original models that are missing or do not fit (``methods.clom.load_for_run``).
        FloatingPointError: the loss became NaN or infinite (the last checkpoint is kept).
    """
    stop = stop or StopFlag()
    method_class = get_method_class(cfg.method)
    clom_pool = clom.load_for_run(cfg, record, device)  # original models, loaded once (None: CLoM off)
    os.makedirs(opts.run_dir, exist_ok=True)
    tag = f"{cfg.method}_{cfg.dataset}_{cfg.model}_{cfg.ipc}ipc"
    result_path = os.path.join(opts.run_dir, utils.result_filename(cfg.method, cfg.dataset, cfg.model, cfg.ipc))
    checkpoint_path = os.path.join(opts.run_dir, "last.pt")
    summary_path = os.path.join(opts.run_dir, "summary.csv")
    with open(os.path.join(opts.run_dir, "config.yaml"), "w") as handle:
        yaml.safe_dump({"distill": dataclasses.asdict(cfg),
                        "run": {**dataclasses.asdict(opts), "eval_models": list(opts.eval_models)},
                        "device": str(device), "torch": str(torch.__version__)}, handle, sort_keys=False)

    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, device)
    test_images, test_labels = record.images_test.to(device), record.labels_test.to(device)
    dims = dict(channel=record.channel, num_classes=record.num_classes, im_size=record.im_size)

    data_save: list = []
    learned_lr: list = []  # per experiment, when the method learns the step size
    accs_all_exps: Dict[str, List[float]] = {m: [] for m in opts.eval_models}
    summary_rows: list = []
    start_exp, start_iteration, resumed = 0, 0, None
    step_seconds, steps_timed = 0.0, 0
    if opts.resume and os.path.isfile(checkpoint_path):
        resumed = utils.load_checkpoint(checkpoint_path)
        _check_resumable(resumed, cfg, opts, checkpoint_path)
        data_save, accs_all_exps = resumed["data_save"], resumed["accs_all_exps"]
        learned_lr = resumed.get("learned_lr", [])
        summary_rows = resumed["summary_rows"]
        start_exp, start_iteration = resumed["exp"], resumed["iteration"]
        logger.info("resuming %s from experiment %d, iteration %d", checkpoint_path, start_exp, start_iteration)
    elif opts.resume:
        logger.info("--resume: no checkpoint in %s yet, starting from scratch", opts.run_dir)

    vis_paths: list = []

    def write_summary() -> None:
        fields = ["exp", "iteration", "model", "acc_mean", "acc_std", "num_eval", "loss", "eval_seconds", "elapsed_s"]
        with open(summary_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(summary_rows)

    def evaluate(method, syn, exp, iteration, loss_value, elapsed) -> Dict[str, utils.EvalResult]:
        results = {}
        if opts.save_vis:
            path = os.path.join(opts.run_dir, f"vis_{tag}_exp{exp}_iter{iteration}.png")
            utils.save_image_grid(record.denormalize(syn.images.detach()), path, nrow=cfg.ipc)
            vis_paths.append(path)
        if opts.num_eval <= 0:
            return results
        for model_eval in opts.eval_models:
            eval_cfg = eval_config_for(method, model_eval, opts, syn)
            result = utils.evaluate_synset(syn.images, syn.targets(), model_eval, record.num_classes, test_images,
                                           test_labels, eval_cfg, num_eval=opts.num_eval, device=device,
                                           seed=1_000_000 + 1000 * opts.seed + 100 * exp,
                                           **_feature_eval_args(cfg, syn))
            results[model_eval] = result
            summary_rows.append(dict(exp=exp, iteration=iteration, model=model_eval, acc_mean=result.acc_mean,
                                     acc_std=result.acc_std, num_eval=opts.num_eval, loss=loss_value,
                                     eval_seconds=round(result.train_time_s, 2), elapsed_s=round(elapsed, 2)))
            logger.info("exp %d iter %d: %s %s (%d nets, %d epochs, %.1f s)", exp, iteration, model_eval,
                        utils.format_acc(result.accs), opts.num_eval, eval_cfg.epochs, result.train_time_s)
        write_summary()
        return results

    def keep(syn, results) -> None:  # the final set of an experiment and its accuracies
        data_save.append([syn.images.detach().cpu().clone(), syn.export_labels()]
                         + ([syn.features.detach().cpu().clone()] if syn.features is not None else []))
        if syn.syn_lr is not None:
            learned_lr.append(float(syn.syn_lr.detach()))
        for model_eval, result in results.items():
            accs_all_exps[model_eval].extend(result.accs)

    def checkpoint(exp, iteration, method, syn, generator) -> None:
        utils.save_checkpoint(checkpoint_path, exp=exp, iteration=iteration, config=dataclasses.asdict(cfg),
                              num_exp=opts.num_exp, seed=opts.seed, syn=syn.state_dict() if syn is not None else None,
                              method=method.state_dict() if method is not None else None,
                              generator=generator.get_state() if generator is not None else None,
                              rng=utils.rng_state(), data_save=data_save, learned_lr=learned_lr,
                              accs_all_exps=accs_all_exps,
                              summary_rows=summary_rows)

    method, syn = None, None
    # Selection baselines (methods/coreset.py) run no iteration: their initial set is the result.
    iterations = 0 if method_class.selection_only else cfg.iterations
    log_every = max(1, iterations // 20)
    distill_seconds = 0.0  # set-up (init_synthetic: selection, buffers) plus iterations, all experiments
    resources.reset_peak_memory(device)
    for exp in range(start_exp, opts.num_exp):
        utils.seed_everything(opts.seed + exp)
        generator = utils.make_generator(opts.seed + exp)
        method = method_class(cfg, sampler=sampler, device=device, generator=generator, **dims)
        clom.attach(method, clom_pool)
        tick = time.perf_counter()
        syn = method.init_synthetic()
        distill_seconds += time.perf_counter() - tick
        first_iteration = 1
        if resumed is not None and exp == start_exp and resumed["syn"] is not None:
            syn.load_state_dict(resumed["syn"])
            method.load_state_dict(resumed["method"])
            generator.set_state(resumed["generator"])
            utils.set_rng_state(resumed["rng"])
            first_iteration = start_iteration + 1
        run_start = time.perf_counter()
        last_acc = "-"
        loss_value = float("nan")
        if first_iteration == 1 and opts.eval_it > 0 and iterations > 0:
            evaluate(method, syn, exp, 0, loss_value, 0.0)
        if iterations == 0:  # the initial (selected) set is final: evaluate and keep it
            keep(syn, evaluate(method, syn, exp, 0, loss_value, 0.0))
        bar = tqdm(range(first_iteration, iterations + 1), desc=f"{tag} exp {exp}", unit="it",
                   initial=first_iteration - 1, total=iterations, dynamic_ncols=True,
                   disable=None)
        for iteration in bar:
            tick = time.perf_counter()
            logs = method.step(syn, iteration)
            for regularizer in method.regularizers:  # their per-iteration values (e.g. the CLoM term)
                logs.update(regularizer.pop_logs() if hasattr(regularizer, "pop_logs") else {})
            loss_value = float(logs["loss"])  # the one device sync per iteration
            step_seconds += time.perf_counter() - tick
            distill_seconds += time.perf_counter() - tick
            steps_timed += 1
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{cfg.method} loss became {loss_value} at experiment {exp}, "
                                         f"iteration {iteration} (try a smaller --lr_img)")
            if on_iteration is not None:
                on_iteration(exp, iteration, logs)
            is_last = iteration == iterations
            if is_last or (opts.eval_it > 0 and iteration % opts.eval_it == 0):
                results = evaluate(method, syn, exp, iteration, loss_value, time.perf_counter() - run_start)
                if results:
                    first = next(iter(results.values()))
                    last_acc = f"{100 * first.acc_mean:.2f}%"
                if is_last:
                    keep(syn, results)
            # Other scalars a method reports (CAFE: outer steps, inner epochs) go beside the loss.
            extras = {key: f"{float(value):.4g}" for key, value in logs.items() if key != "loss"}
            bar.set_postfix(loss=f"{loss_value:.4f}", acc=last_acc, **extras)
            if bar.disable and (iteration % log_every == 0 or is_last):  # batch jobs: no bar, log lines
                logger.info("exp %d iter %d/%d loss %.4f acc %s%s (%.2f s/iteration)", exp, iteration, iterations,
                            loss_value, last_acc, "".join(f" {k} {v}" for k, v in extras.items()),
                            step_seconds / max(steps_timed, 1))
            if stop.requested and not is_last:
                checkpoint(exp, iteration, method, syn, generator)
                bar.close()
                raise RunInterrupted(f"stopped at experiment {exp}, iteration {iteration}; checkpoint {checkpoint_path}")
            if opts.checkpoint_every > 0 and iteration % opts.checkpoint_every == 0 and not is_last:
                checkpoint(exp, iteration, method, syn, generator)
        bar.close()
        _save(result_path, data_save, accs_all_exps, cfg, opts, record, method, learned_lr)
        # The finished experiment is in data_save; the next resume starts the next experiment.
        checkpoint(exp + 1, 0, None, None, None)
        if stop.requested and exp + 1 < opts.num_exp:
            raise RunInterrupted(f"stopped after experiment {exp}; checkpoint {checkpoint_path}")

    seconds_per_iteration = step_seconds / max(steps_timed, 1)
    if method is None:  # every experiment was already finished in the checkpoint
        method = method_class(cfg, sampler=sampler, device=device, generator=utils.make_generator(opts.seed), **dims)
    outcome = RunOutcome(accs_all_exps=accs_all_exps, result_path=result_path, run_dir=opts.run_dir,
                         seconds_per_iteration=seconds_per_iteration, vis_paths=vis_paths)
    with open(os.path.join(opts.run_dir, "results.json"), "w") as handle:
        json.dump({"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model, "ipc": cfg.ipc,
                   "iterations": iterations, "num_exp": opts.num_exp,
                   "seconds_per_iteration": seconds_per_iteration,
                   "cost": run_cost(cfg, record, device, distill_seconds, seconds_per_iteration, syn, opts.num_exp),
                   "protocol": {m: {**eval_config_for(method, m, opts, syn).describe(),
                                    "labels": "soft" if syn is not None and syn.label_logits is not None else "hard"}
                                for m in opts.eval_models},
                   "accuracy": {m: {"mean": utils.EvalResult(m, a).acc_mean, "std": utils.EvalResult(m, a).acc_std,
                                    "accs": a} for m, a in accs_all_exps.items()},
                   "result_file": result_path, "clom": dict(cfg.clom) if cfg.clom else None,
                   "feature_labels": (dataclasses.asdict(cfg.feature_labels.loss_config())
                                      if cfg.feature_labels is not None else None)}, handle, indent=2)
    return outcome


def run_cost(cfg: DistillConfig, record, device: torch.device, distill_seconds: float, seconds_per_iteration: float,
             syn, num_exp: int) -> dict:
    """The ``cost`` record of ``results.json``: distillation wall time (selection / set-up plus
    iterations, summed over the experiments run by this process; evaluation excluded), seconds per
    iteration, peak memory (:func:`resources.peak_memory`), the storage of one synthetic set
    (images + labels + learned extras, bytes as saved) and the distillation network's parameters
    and FLOPs per image (``torch.utils.flop_counter``)."""
    cost = {"distill_seconds": round(distill_seconds, 3), "seconds_per_iteration": seconds_per_iteration,
            "experiments": num_exp, "peak_memory": resources.peak_memory(device),
            "storage_bytes": resources.synthetic_storage(syn) if syn is not None else None}
    try:
        cost["network"] = resources.network_cost(cfg.model, record.channel, record.im_size, record.num_classes)
    except (KeyError, ValueError) as error:  # an exotic model the counter cannot trace
        cost["network"] = {"model": cfg.model, "error": str(error)}
    return cost


def _feature_eval_args(cfg: DistillConfig, syn) -> dict:
    """``evaluate_synset`` keyword arguments for a set with feature labels (DRUPI): F and the
    loss settings of ``--feature_labels``; empty without them. A cross-architecture evaluation
    network whose features do not fit F is an error (evaluate.py --lbd 0 evaluates without F)."""
    if syn is None or syn.features is None or cfg.feature_labels is None:
        return {}
    loss_cfg = cfg.feature_labels.loss_config()
    if loss_cfg.lbd <= 0:
        return {}
    from methods.addons.feature_loss import FeatureTargets
    return {"term": FeatureTargets(syn.features.detach(), syn.images.shape[0], syn.num_classes, loss_cfg)}


def _save(path, data_save, accs_all_exps, cfg, opts, record, method, learned_lr) -> None:
    """Write the reference-layout result file with a ``meta`` record beside it (``syn_lr``: the
    learned step size of each experiment, which ``evaluate.py`` trains with)."""
    meta = {"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model, "ipc": cfg.ipc,
            "channel": record.channel, "im_size": list(record.im_size), "num_classes": record.num_classes,
            "mean": list(record.mean), "std": list(record.std),
            "zca": record.zca.state_dict() if getattr(record, "zca", None) is not None else None,
            "dsa_strategy": method.dsa_strategy, "iterations": cfg.iterations, "seed": opts.seed,
            "config": dataclasses.asdict(cfg), "syn_lr": list(learned_lr) or None}
    utils.save_results(path, data_save, accs_all_exps, meta=meta)
