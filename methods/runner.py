"""The distillation run: experiments x iterations of a method, periodic evaluation, pictures,
summaries, checkpoints and resume. ``distill.py`` parses flags and calls :func:`run_distillation`.

Layout of a run directory (``--run_dir``):
    config.yaml                                  the resolved configuration, written before step 1
    last.pt                                      checkpoint (``--checkpoint_every``, and on a stop)
    res_{method}_{dataset}_{model}_{ipc}ipc.pt   the result, in the reference layout (DC ``main.py``)
    best_{method}_{dataset}_{model}_{ipc}ipc.pt  per experiment, the evaluated set of highest accuracy, mean
                                                 over the evaluation models, on the test set (what the
                                                 references report as Max_Accuracy) or with --select_on val
                                                 on a held-out validation split (methods/run_selection.py)
    logged_files/exp{e}/                         the MTT family only: GeorgeCazenavette/mtt-distillation and
                                                 NUS-HPC-AI-Lab/DATM ``distill.py``'s logged files:
                                                 images_best.pt, labels_best.pt, lr_best.pt, and every
                                                 ``--save_every`` iterations images_{it}.pt, labels_{it}.pt,
                                                 lr_{it}.pt (images_zca_{it}.pt: the pixels, with ``--zca``)
    vis_{method}_{dataset}_{model}_{ipc}ipc_exp{e}_iter{it}.png   pixel-space grid per evaluation
    summary.csv                                  one row per (evaluation, model)
    results.json                                 final accuracies, protocol, timings
    log.txt                                      the log
    .lock                                        the owner's lock (storage.lock_directory): its process id

A run directory is owned by one process: the run holds ``.lock`` (``fcntl.flock``) from start to
end, and a second ``distill.py`` on the same directory, with or without ``--resume``, is refused
in one line naming the first one's process id (:func:`claim_run_dir`). ``distill.py`` also
refuses a directory that is neither empty nor a run of this toolkit (``methods.run_dir.RUN_FILES``).

Under torchrun (``distributed``) every rank runs the same experiments in step: a method that
shards its classes (``DistillMethod.shards_classes``) computes its ranks' share of the loss and
the image gradients are summed, the evaluation networks are spread over the ranks, and rank 0
alone writes every file above; a stop requested on any rank stops all at the same iteration.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Callable, Dict, List, Optional

import torch

import distributed
import evaluation
import pictures
import progress
import storage
import tables
import utils
from data import RealSampler
from methods import addons
from methods.base import DistillConfig, DistillMethod
from methods.registry import get_method_class
# The run's options, outcome, protocol and stop types live in methods/run_config.py; importing them from here
# (the run's entry point) keeps working.
from methods.run_config import (RunInterrupted, RunOptions, RunOutcome, StopFlag, eval_config_for,  # noqa: F401
                                 eval_protocol)
# The writers of config.yaml, summary.csv, the result files and results.json live in methods/run_results.py.
from methods.run_results import RunFiles, run_cost, schedule_key, schedule_record  # noqa: F401
# Choosing the best-so-far set (on test accuracy or a held-out validation split): methods/run_selection.py.
from methods.run_selection import BestSoFar, hold_out_validation
from methods.run_dir import claim_run_dir
from methods.run_checks import (check_checkpoint, divergence_message, evaluation_failure_message, kept_message,
                                non_finite_parts, restore_position)
from sets import files, resources

logger = logging.getLogger(__name__)

class DistillationRun(RunFiles, BestSoFar):
    """One ``distill.py`` run: ``opts.num_exp`` experiments of ``cfg.method``, each a synthetic set
    learned for ``cfg.iterations`` iterations, evaluated every ``opts.eval_it`` iterations and at
    the end, with pictures, ``summary.csv``, checkpoints, the result file and ``results.json``
    (module docstring). :func:`run_distillation` is the entry point. Under ``opts.select_on='val'``
    a validation split is held out of ``record``'s training images first: the method, its add-ons
    and its sampler see only the rest (``methods.run_selection.hold_out_validation``).

    Raises:
        utils.UserError: ``--resume`` found an incompatible checkpoint, or an add-on's files are
            missing (e.g. pre-trained models an add-on loads); ``--select_on`` / ``--val_per_class``
            out of range.
    """

    def __init__(self, cfg: DistillConfig, opts: RunOptions, record, device: torch.device,
                 stop: Optional[StopFlag] = None, on_iteration: Optional[Callable[[int, int, dict], None]] = None):
        record, self.validation = hold_out_validation(record, opts.select_on, opts.val_per_class, opts.seed, cfg.ipc)
        self.val_pair = (None if self.validation is None else
                         (self.validation.images.to(device), self.validation.labels.to(device)))
        self.cfg, self.opts, self.record, self.device = cfg, opts, record, device
        self.stop = stop or StopFlag()
        self.on_iteration = on_iteration
        self.method_class = get_method_class(cfg.method)
        self.protocol = eval_protocol(self.method_class, cfg, opts)
        self.shared = addons.load_shared(cfg, record, device)  # loaded once (e.g. an add-on's pre-trained models)
        self.tag = f"{cfg.method}_{cfg.dataset}_{cfg.model}_{cfg.ipc}ipc"
        self.result_path = os.path.join(opts.run_dir, files.result_filename(cfg.method, cfg.dataset, cfg.model, cfg.ipc))
        self.checkpoint_path = os.path.join(opts.run_dir, "last.pt")
        self.best_path = os.path.join(opts.run_dir, f"best_{self.tag}.pt")
        self.sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, device)
        self.test_images, self.test_labels = record.images_test.to(device), record.labels_test.to(device)
        self.dims = dict(channel=record.channel, num_classes=record.num_classes, im_size=record.im_size)
        # Selection baselines (methods/coreset.py) run no iteration: their initial set is the result.
        self.iterations = 0 if self.method_class.selection_only else cfg.iterations
        # What a checkpoint carries across a stop, one entry per finished experiment.
        self.data_save: list = []
        self.learned_lr: list = []  # when the method learns the step size
        self.schedules: list = []  # when the method learns a step schedule (DD): StepSchedule.as_dict()
        # (result key, evaluation model, protocol) of every evaluation: "shared" under the model's
        # name, "schedule" (the learned step schedule, DD) under "{model}:schedule".
        protocols = self.method_class.eval_protocols(cfg)
        self.eval_keys = [(schedule_key(m) if protocol == "schedule" else m, m, protocol)
                          for protocol in protocols for m in opts.eval_models]
        self.accs_by_exp: List[Dict[str, List[float]]] = []
        # Where each finished experiment ended (set, method, RNG), so that a larger --Iteration
        # can continue it on --resume.
        self.finished: list = []
        # Per experiment (also the one in progress), the evaluated set of highest accuracy (test or
        # validation, mean over the evaluation models: :meth:`note_evaluation`); None before its first evaluation.
        self.best: list = []
        self.summary_rows: list = []
        self.vis_paths: list = []
        self.soft_labels: dict = {}  # model -> size of its last relabel store ({"mb_per_epoch", "epochs"})
        self.eval_paths: dict = {}  # model -> how its last evaluation trained ({"path", "note"}; results.json)
        self.step_seconds, self.steps_timed, self.distill_seconds = 0.0, 0, 0.0
        self.method: Optional[DistillMethod] = None
        self.syn = None
        self.checkpointed: Optional[tuple] = None  # (exp, iteration) of last.pt, once written or resumed
        self.running: tuple = (0, 0)  # (exp, iteration) in progress, for the message of an abandoned one

    # ---- files --------------------------------------------------------------------------
    @property
    def accs_all_exps(self) -> Dict[str, List[float]]:
        """Per evaluation key (model, or ``{model}:schedule``), the final accuracies of every
        finished experiment, in order."""
        return {k: [acc for accs in self.accs_by_exp for acc in accs.get(k, [])] for k, _, _ in self.eval_keys}

    @staticmethod
    def position(iteration: int, method=None, syn=None, generator=None) -> dict:
        """Where an experiment stands after ``iteration``: its set, its method's state and the RNG
        states (what :meth:`run_experiment` continues from)."""
        return {"iteration": iteration, "syn": syn.state_dict() if syn is not None else None,
                "method": method.state_dict() if method is not None else None,
                "generator": generator.get_state() if generator is not None else None, "rng": utils.rng_state()}

    def checkpoint(self, exp: int, iteration: int, method=None, syn=None, generator=None,
                   pending_eval: bool = False) -> None:
        """Write ``last.pt``: version, position (``exp``, ``iteration``; with ``pending_eval`` the
        evaluation of ``iteration`` was stopped and runs again on resume), configuration, the set,
        the method's state, RNG states, and every finished experiment (set, accuracies, end state).

        Under torchrun rank 0 writes it (every rank holds the same state) and the others wait until
        it is on disk, so that none leaves before it (torchrun ends the job when one rank exits)."""
        if distributed.is_main():
            storage.save_checkpoint(self.checkpoint_path, exp=exp, config=addons.config_record(self.cfg),
                                  num_exp=self.opts.num_exp, seed=self.opts.seed, pending_eval=pending_eval,
                                  **self.position(iteration, method, syn, generator),
                                  data_save=self.data_save, learned_lr=self.learned_lr, schedules=self.schedules,
                                  accs_by_exp=self.accs_by_exp, finished=self.finished, best=self.best,
                                  summary_rows=self.summary_rows, selection=self.selection_settings())
            self.checkpointed = (exp, iteration)
        distributed.barrier()
        self.checkpointed = (exp, iteration)  # the other ranks know it is on disk once rank 0 has arrived

    def refuse_overwrite(self) -> None:
        """A run directory that already holds a run (its checkpoint or result file) is continued
        with ``--resume``, never overwritten.

        Raises:
            utils.UserError: the directory holds a run and ``--resume`` is off; or ``--run_dir``
                names a file.
        """
        run_dir = self.opts.run_dir
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise utils.UserError(f"--run_dir {run_dir}: a file, not a directory")
        found = [os.path.basename(p) for p in (self.checkpoint_path, self.result_path) if os.path.isfile(p)]
        if found and not self.opts.resume:
            raise utils.UserError(f"--run_dir {run_dir} already holds a run ({', '.join(found)}); add --resume to "
                                  "continue it, or choose another --run_dir (or --save_path)")

    def resume(self) -> Optional[dict]:
        """The checkpoint to continue from (``--resume`` and ``last.pt`` exists), its progress restored.
        Every setting must match the checkpoint's except ``--Iteration``, which may grow: finished
        experiments then continue from where they ended.

        Raises:
            utils.UserError: the checkpoint was written with other settings (each difference named,
                saved value → this run's), or with more iterations than this run asks for.
        """
        if not self.opts.resume:
            return None
        if not os.path.isfile(self.checkpoint_path):
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", self.opts.run_dir)
            return None
        saved = storage.load_checkpoint(self.checkpoint_path)
        check_checkpoint(saved, self.checkpoint_path)  # fields, types, finite values: one line naming the field
        before = {**saved["config"], "num_exp": saved.get("num_exp"), "seed": saved.get("seed"),
                  **(saved.get("selection") or {"select_on": "test"})}  # older checkpoints: chosen on test
        now = {**addons.config_record(self.cfg), "num_exp": self.opts.num_exp, "seed": self.opts.seed,
                **self.selection_settings()}
        saved_iterations = before.pop("iterations", None)
        now.pop("iterations")
        differing = utils.config_differences(before, now, flag_names={"iterations": "Iteration"})
        if differing:
            raise utils.UserError(f"--resume: {self.checkpoint_path} was written with other values "
                                  f"({'; '.join(differing)}); use the same flags (only --Iteration may grow), "
                                  "or another --run_dir")
        if saved_iterations is not None and self.cfg.iterations < saved_iterations:
            raise utils.UserError(f"--resume: --Iteration {saved_iterations} → {self.cfg.iterations}: a run can be "
                                  "extended, not shortened; use another --run_dir")
        self.data_save, self.learned_lr = saved["data_save"], saved.get("learned_lr", [])
        self.schedules = saved.get("schedules", [])
        self.summary_rows = saved["summary_rows"]
        self.finished = saved.get("finished") or []
        self.best = saved.get("best") or []  # checkpoints before best-so-far sets: none kept
        if "accs_by_exp" in saved:
            self.accs_by_exp = saved["accs_by_exp"]
        else:  # checkpoints before per-experiment accuracies: equal shares per finished experiment
            done = max(len(self.data_save), 1)
            self.accs_by_exp = [{m: accs[len(accs) * e // done:len(accs) * (e + 1) // done]
                                 for m, accs in saved["accs_all_exps"].items()} for e in range(len(self.data_save))]
        if saved_iterations is not None and self.cfg.iterations > saved_iterations:
            if len(self.finished) < len(self.data_save):
                raise utils.UserError(f"--resume: {self.checkpoint_path} does not keep where its finished experiments "
                                      "ended (written by an older version), so --Iteration cannot grow; use "
                                      "another --run_dir")
            logger.info("--resume: --Iteration %d → %d, continuing every experiment", saved_iterations,
                        self.cfg.iterations)
        logger.info("resuming %s from experiment %d, iteration %d", self.checkpoint_path, saved["exp"], saved["iteration"])
        self.checkpointed = (saved["exp"], saved["iteration"])
        return saved

    # ---- evaluation ---------------------------------------------------------------------
    def evaluates_at(self, iteration: int) -> bool:
        """Whether the set is evaluated after ``iteration`` (0: the initial set): every
        ``--eval_it`` iterations and after the last one."""
        return iteration == self.iterations or (self.opts.eval_it > 0 and iteration % self.opts.eval_it == 0)

    def evaluate(self, method, syn, exp: int, iteration: int, loss_value: float, elapsed: float) -> Dict[str, evaluation.EvalResult]:
        """Picture, then ``num_eval`` networks per evaluation model; rows into ``summary.csv``.

        Raises:
            evaluation.EvaluationStopped: a stop was requested during the evaluation (its rows are not kept).
        """
        results = {}
        if self.opts.save_vis and distributed.is_main():
            path = os.path.join(self.opts.run_dir, f"vis_{self.tag}_exp{exp}_iter{iteration}.png")
            pictures.save_image_grid(self.record.denormalize(syn.images.detach()), path, nrow=self.cfg.ipc,
                                  class_names=self.record.class_names,
                                  title=f"{self.cfg.method} {self.cfg.dataset} ipc {self.cfg.ipc}, "
                                        f"experiment {exp}, iteration {iteration}")
            self.vis_paths.append(path)
        if self.opts.num_eval <= 0:
            return results
        term = method.training_term(syn)  # an add-on's training objective, or None
        rows = len(self.summary_rows)
        seed = 1_000_000 + 1000 * self.opts.seed + 100 * exp
        try:
            for key, model_eval, protocol in self.eval_keys:
                if protocol == "schedule":  # fresh networks trained by the learned step schedule (DD)
                    if self.stop.requested:
                        raise evaluation.EvaluationStopped
                    schedule = method.step_schedule(syn)
                    result = evaluation.evaluate_schedule(syn.images, syn.targets(), model_eval, self.record.num_classes,
                                                     self.test_images, self.test_labels, schedule,
                                                     num_eval=self.opts.num_eval, device=self.device, seed=seed,
                                                     tta_mode=self.opts.tta_mode,
                                                     deterministic=self.opts.deterministic, val=self.val_pair)
                    what = f"{len(schedule.lrs)} learned steps"
                else:
                    eval_cfg = eval_config_for(method, model_eval, self.opts, syn)
                    result = evaluation.evaluate_synset_sharded(syn.images, syn.targets(), model_eval,
                                                           self.record.num_classes, self.test_images,
                                                           self.test_labels, eval_cfg, num_eval=self.opts.num_eval,
                                                           device=self.device, seed=seed, term=term,
                                                           should_stop=lambda: self.stop.requested, val=self.val_pair,
                                                           **self.label_sources(method, syn, eval_cfg, seed, key))
                    what = f"{eval_cfg.epochs} epochs"
                results[key] = result
                self.summary_rows.append(dict(exp=exp, iteration=iteration, model=key, acc_mean=result.acc_mean,
                                              acc_std=result.acc_std, num_eval=self.opts.num_eval, loss=loss_value,
                                              eval_seconds=round(result.train_time_s, 2), elapsed_s=round(elapsed, 2),
                                              **({"val_acc_mean": result.val_acc_mean, "val_acc_std": result.val_acc_std}
                                                 if self.validation is not None else {})))
                self.eval_paths[key] = {"path": result.path or "sequential",
                                        **({"note": result.path_note} if result.path_note else {})}
                logger.info("exp %d iter %d: %s %s%s (%d nets %s, %s, %.1f s)%s", exp, iteration, key,
                            tables.format_acc(result.accs),
                            f", validation {tables.format_acc(result.val_accs)}" if result.val_accs else "",
                            self.opts.num_eval, result.path or "sequential", what,
                            result.train_time_s, f"; {result.path_note}" if result.path_note else "")
        except (evaluation.EvaluationStopped, progress.StopRequested):
            del self.summary_rows[rows:]
            raise
        self.write_summary()
        return results

    def label_sources(self, method, syn, eval_cfg: evaluation.EvalConfig, seed: int, key: str) -> dict:
        """What an evaluation under the protocol's label regime needs beside the set: nothing (hard),
        the method's teacher queried online (``teacher``), or a relabel store of ``syn``'s images by
        that teacher, drawn from the evaluation's ``seed`` (``soft``; ``evaluation.relabel``), whose
        size goes to ``results.json`` (``soft_labels``: MB per epoch, epochs).

        Raises:
            utils.UserError: no teacher was given (``DistillMethod.teacher``).
        """
        if eval_cfg.labels == "hard":
            return {}
        if eval_cfg.labels == "teacher":
            return {"teacher": method.teacher}
        epochs = evaluation.student_epochs(eval_cfg)
        store = evaluation.relabel(syn.images.detach(), method.teacher, epochs=epochs,
                                   batch_size=eval_cfg.batch_train, cfg=eval_cfg, seed=seed)
        self.soft_labels[key] = {"mb_per_epoch": store.mb_per_epoch, "epochs": epochs}
        return {"soft_store": store}

    def evaluate_or_stop(self, exp: int, iteration: int, method, syn, generator, loss_value: float,
                         elapsed: float) -> Dict[str, evaluation.EvalResult]:
        """:meth:`evaluate`; a stop requested during it writes a checkpoint from which the
        evaluation runs again on resume.

        Raises:
            RunInterrupted: the evaluation was stopped (the checkpoint is written).
            FloatingPointError: an evaluation's training loss became NaN or infinite (the message
                names the set's non-finite tensors: ``methods.run_checks.evaluation_failure_message``).
        """
        try:
            return self.evaluate(method, syn, exp, iteration, loss_value, elapsed)
        except (evaluation.EvaluationStopped, progress.StopRequested):  # the set itself is complete
            self.checkpoint(exp, iteration, method, syn, generator, pending_eval=True)
            raise RunInterrupted(f"stopped during the evaluation of experiment {exp}, iteration {iteration} "
                                 f"(it runs again on resume); checkpoint {self.checkpoint_path}") from None
        except FloatingPointError as error:  # name the set's non-finite tensors, if any
            raise FloatingPointError(evaluation_failure_message(error, exp, iteration, syn)) from None

    @staticmethod
    def saved_set(method, syn) -> list:
        """A set as the result files hold it: ``[images (N, C, H, W) on the CPU, labels,
        *add-on entries]`` (one ``data`` entry of the reference layout)."""
        return [syn.images.detach().cpu().clone(), syn.export_labels()] + method.saved_entries(syn)

    def write_logged(self, exp: int, name: str, syn) -> None:
        """Experiment ``exp``'s set as the trajectory-matching references log it, in
        ``logged_files/exp{exp}/``: ``images_{name}.pt`` (N, C, H, W) float32 in the dataset's
        normalised (or ZCA-whitened) space, ``labels_{name}.pt`` ((N,) int64 class indices, or
        DATM's (N, K) soft-label logits), ``lr_{name}.pt`` (the learned step size, a 0-dim
        float32 tensor), and with ZCA ``images_zca_{name}.pt``, the whitening undone (pixel space),
        for a periodic ``name`` (``sets.files.write_logged``). Rank 0 only."""
        if not distributed.is_main():
            return
        images = syn.images.detach().cpu().clone()
        zca = getattr(self.record, "zca", None)
        files.write_logged(os.path.join(self.opts.run_dir, "logged_files", f"exp{exp}"), name, images,
                           syn.export_labels(),
                           syn.syn_lr.detach().cpu().clone() if syn.syn_lr is not None else None,
                           zca.inverse(images).cpu() if zca is not None and name != "best" else None)

    def after_iteration(self, exp: int, iteration: int, method, syn, results: Dict[str, evaluation.EvalResult]) -> None:
        """The best-so-far set (:meth:`note_evaluation`) and, for a method that writes the
        trajectory-matching layout, its files (:meth:`write_logged`): ``*_best.pt`` for a new
        best; ``*_{iteration}.pt`` for a new best or every ``--save_every`` iterations (0 included)."""
        new_best = self.note_evaluation(exp, iteration, method, syn, results)
        if not self.method_class.writes_reference_layout:
            return
        if new_best:
            self.write_logged(exp, "best", syn)
        if new_best or (self.opts.save_every > 0 and iteration % self.opts.save_every == 0):
            self.write_logged(exp, str(iteration), syn)

    def keep(self, exp: int, method, syn, generator, results: Dict[str, evaluation.EvalResult]) -> None:
        """Keep experiment ``exp``'s final set (images, labels, add-on entries), its accuracies and
        where it ended (replacing an earlier end when a resumed run grew ``--Iteration``)."""
        entries = {"data_save": self.saved_set(method, syn),
                   "accs_by_exp": {m: list(result.accs) for m, result in results.items()},
                   "finished": self.position(self.iterations, method, syn, generator)}
        if syn.syn_lr is not None:
            entries["learned_lr"] = float(syn.syn_lr.detach())
        if schedule_record(method, syn) is not None:
            entries["schedules"] = schedule_record(method, syn)
        for name, value in entries.items():
            kept = getattr(self, name)
            if exp < len(kept):
                kept[exp] = value
            else:
                kept.append(value)

    # ---- the run ------------------------------------------------------------------------
    def new_method(self, exp: int, generator: torch.Generator) -> DistillMethod:
        """Experiment ``exp``'s method with its add-ons."""
        method = self.method_class(self.cfg, sampler=self.sampler, device=self.device, generator=generator,
                                   precision=self.opts.precision, **self.dims)
        method.attach_addons(addons.create(self.cfg, method, self.shared))
        note = method.amp_note() if method.precision.enabled else None
        if note and not getattr(self, "amp_noted", False) and distributed.is_main():
            logger.warning(note)  # once per run: --amp changes nothing in this method's own arithmetic
            self.amp_noted = True
        return method

    def run_experiment(self, exp: int, resumed: Optional[dict]) -> None:
        """Experiment ``exp`` from its start, or from ``resumed`` (a :meth:`position` inside it, or
        where it ended when ``--Iteration`` grew).

        Raises:
            RunInterrupted: a stop was requested (the checkpoint is written).
            FloatingPointError: the loss became NaN or infinite (the message names where the
                non-finite values are: ``methods.run_checks.divergence_message``).
            utils.UserError: ``resumed`` cannot be restored (a damaged checkpoint).
        """
        opts, iterations = self.opts, self.iterations
        utils.seed_everything(opts.seed + exp)
        generator = utils.make_generator(opts.seed + exp)
        method = self.method = self.new_method(exp, generator)
        tick = time.perf_counter()
        syn = self.syn = method.init_synthetic()
        self.distill_seconds += time.perf_counter() - tick
        done, pending = 0, True  # iterations done; whether the evaluation after them is still to run
        restored = resumed is not None and resumed["syn"] is not None
        if restored:
            restore_position(self.checkpoint_path, exp, resumed, method, syn, generator)
            done, pending = resumed["iteration"], resumed.get("pending_eval", False)
        # Where a non-finite loss would come from if the set is so already (one check per experiment).
        at_start = non_finite_parts(syn)
        run_start = time.perf_counter()
        last_acc, loss_value = "-", float("nan")
        if pending:  # the initial set, or an evaluation a stop interrupted
            results = {}
            if self.evaluates_at(done):
                results = self.evaluate_or_stop(exp, done, method, syn, generator, loss_value, 0.0)
                if done == iterations:  # a selected set (no iterations), or the end
                    self.keep(exp, method, syn, generator, results)
            self.after_iteration(exp, done, method, syn, results)
        # A bar on a terminal; in batch jobs a log line every 5 % of the iterations (and every
        # progress.PROGRESS_EVERY_S seconds) with the loss and the last accuracy.
        with progress.Progress(iterations, f"{self.tag} exp {exp}", unit="it", initial=done,
                               log_fraction=0.05) as shown:
            for iteration in range(done + 1, iterations + 1):
                self.running = (exp, iteration)
                tick = time.perf_counter()
                logs = method.step(syn, iteration)
                logs.update(method.pop_addon_logs())  # e.g. an add-on's term or its own step's loss
                loss_value = float(logs["loss"])  # the one device sync per iteration
                elapsed = time.perf_counter() - tick
                self.step_seconds += elapsed
                self.distill_seconds += elapsed
                self.steps_timed += 1
                if not math.isfinite(loss_value):
                    raise FloatingPointError(divergence_message(
                        self.cfg.method, exp, iteration, loss_value, syn, done + 1, at_start,
                        "the resumed checkpoint" if restored else "their initialisation", self.record.images_train))
                if self.on_iteration is not None:
                    self.on_iteration(exp, iteration, logs)
                is_last = iteration == iterations
                results = {}
                if self.evaluates_at(iteration):
                    results = self.evaluate_or_stop(exp, iteration, method, syn, generator, loss_value,
                                                    time.perf_counter() - run_start)
                    if results:
                        last_acc = f"{100 * next(iter(results.values())).acc_mean:.2f}%"
                    if is_last:
                        self.keep(exp, method, syn, generator, results)
                self.after_iteration(exp, iteration, method, syn, results)
                # Other scalars a method reports (CAFE: outer steps, inner epochs) go beside the loss.
                extras = "".join(f", {key}={float(value):.4g}" for key, value in logs.items() if key != "loss")
                shown.update(1, f"loss={loss_value:.4f}, acc={last_acc}{extras}")
                # Every rank asks at the same point, so a signal to any stops all at this iteration.
                stop_now = distributed.any_flag(self.stop.requested)
                if stop_now and not is_last:
                    self.checkpoint(exp, iteration, method, syn, generator)
                    raise RunInterrupted(f"stopped at experiment {exp}, iteration {iteration}; "
                                         f"checkpoint {self.checkpoint_path}")
                if opts.checkpoint_every > 0 and iteration % opts.checkpoint_every == 0 and not is_last:
                    self.checkpoint(exp, iteration, method, syn, generator)

    def abandoned(self, stop: "progress.StopRequested") -> str:
        """What a stop that abandoned the running iteration (:class:`progress.StopRequested`) kept:
        nothing of that iteration; ``last.pt`` as it was (it is written only between iterations,
        so its set, method state and RNG states are those of the iteration it names)."""
        exp, iteration = self.running
        kept = ("no checkpoint was written yet, so --resume starts from the beginning" if self.checkpointed is None
                else f"checkpoint {self.checkpoint_path} (experiment {self.checkpointed[0]}, iteration "
                     f"{self.checkpointed[1]}) is kept")
        return (f"stopped inside experiment {exp}, iteration {iteration} ({stop.waited_s:.0f} s after the stop was "
                f"seen; the unfinished iteration is dropped); {kept}")

    def finished_enough(self, exp: int) -> bool:
        """Whether experiment ``exp`` has finished all of this run's iterations."""
        return exp < len(self.finished) and self.finished[exp]["iteration"] >= self.iterations

    def run(self) -> RunOutcome:
        """Every experiment not yet finished (or finished with fewer iterations than
        ``--Iteration`` now asks for); then the result file and ``results.json``.

        Raises:
            RunInterrupted: a stop was requested (a checkpoint was written).
            utils.UserError: see the class docstring.
            FloatingPointError: the loss became NaN or infinite; the message says where, and what
                is kept on disk (``methods.run_checks.kept_message``).
            distributed.CollectiveError: under torchrun, a rank did not answer (its ``kept`` says
                what is kept on disk).
        """
        self.refuse_overwrite()
        with contextlib.ExitStack() as owned:
            if distributed.is_main():  # the owner of the run directory (distill.py has claimed it already)
                owned.enter_context(claim_run_dir(self.opts.run_dir, refuse_foreign=False))
                for path in storage.remove_stale_temporaries(self.opts.run_dir):  # ours alone: we hold its lock
                    logger.info("removed %s, left by a process stopped while writing", path)
            try:
                return self.run_owned()
            except distributed.CollectiveError as error:  # torchrun: a rank did not answer
                kept = kept_message(self.checkpoint_path, self.checkpointed, self.result_path, len(self.data_save))
                again = " with --resume to continue" if os.path.isfile(self.checkpoint_path) else ""
                error.kept = f"{kept}; re-run the same command{again}"
                raise

    def run_owned(self) -> RunOutcome:
        """:meth:`run` once the run directory is this process's (rank 0 holds its lock)."""
        self.write_config()
        resumed = self.resume()
        distributed.barrier()  # every rank has read the checkpoint before rank 0 writes the next
        todo = [exp for exp in range(self.opts.num_exp) if not self.finished_enough(exp)]
        resources.reset_peak_memory(self.device)
        for index, exp in enumerate(todo):
            if resumed is not None and resumed["exp"] == exp and resumed["syn"] is not None:
                start = resumed  # the experiment the checkpoint stopped inside
            else:  # from its start, or from where it ended when --Iteration grew
                start = self.finished[exp] if exp < len(self.finished) else None
            self.running = (exp, start["iteration"] if start is not None else 0)
            try:
                # An iteration a stop cannot wait for ends at its next progress.tick (StopRequested).
                with progress.stoppable(lambda: self.stop.requested):
                    self.run_experiment(exp, start)
            except progress.StopRequested as stop:
                raise RunInterrupted(self.abandoned(stop)) from None
            except FloatingPointError as error:  # what is on disk to continue from, checked there
                kept = kept_message(self.checkpoint_path, self.checkpointed, self.result_path, len(self.data_save))
                raise FloatingPointError(f"{error}; {kept}") from None
            # The finished experiment is in the checkpoint's lists; a resume skips it.
            self.checkpoint(exp + 1, 0)
            self.save_result_or_say_where()
            if distributed.any_flag(self.stop.requested) and index + 1 < len(todo):
                raise RunInterrupted(f"stopped after experiment {exp}; checkpoint {self.checkpoint_path}")
        if distributed.is_main() and not os.path.isfile(self.result_path):  # its last write failed after the checkpoint
            self.save_result_or_say_where()
        if self.method is None:  # every experiment was already finished in the checkpoint
            self.method = self.new_method(0, utils.make_generator(self.opts.seed))
        self.write_results_json()
        return RunOutcome(accs_all_exps=self.accs_all_exps, result_path=self.result_path, run_dir=self.opts.run_dir,
                          seconds_per_iteration=self.seconds_per_iteration, vis_paths=self.vis_paths,
                          best=self.best_records(),
                          best_path=self.best_path if os.path.isfile(self.best_path) else None)

    @property
    def seconds_per_iteration(self) -> float:
        """Mean seconds of one iteration (evaluation excluded) over the iterations this process ran."""
        return self.step_seconds / max(self.steps_timed, 1)

def run_distillation(cfg: DistillConfig, opts: RunOptions, record, device: torch.device,
                     stop: Optional[StopFlag] = None,
                     on_iteration: Optional[Callable[[int, int, dict], None]] = None) -> RunOutcome:
    """Distil ``opts.num_exp`` synthetic sets with ``cfg.method`` and evaluate them (:class:`DistillationRun`).

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
        utils.UserError: ``--resume`` found an incompatible checkpoint, or an add-on's files are
            missing or do not fit (e.g. pre-trained models an add-on loads).
        FloatingPointError: the loss became NaN or infinite; the message says where and what is
            kept on disk.
    """
    return DistillationRun(cfg, opts, record, device, stop, on_iteration).run()
