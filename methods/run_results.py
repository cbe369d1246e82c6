"""The files a distillation run writes about itself (``methods/runner.py``'s ``DistillationRun``
inherits them): ``config.yaml``, ``summary.csv``, the result file with its ``meta`` record and the
best-so-far file, and ``results.json`` with the run's cost. Every writer runs on rank 0 only."""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Optional

import torch
import yaml

import distributed
import evaluation
import storage
import tables
from methods import addons
from methods.base import DistillConfig, DistillMethod
from methods.run_config import eval_config_for
from sets import files, resources


class RunFiles:
    """The writers of a run's files; a mix-in of ``methods.runner.DistillationRun``, whose state
    (``cfg``, ``opts``, ``record``, ``protocol``, ``summary_rows``, ``data_save``, ``best``, ``validation``,
    ...) they read, and of ``methods.run_selection.BestSoFar`` (``best_records``, ``selection_record``)."""

    SUMMARY_FIELDS = ["exp", "iteration", "model", "acc_mean", "acc_std", "num_eval", "loss", "eval_seconds",
                      "elapsed_s"]

    def write_config(self) -> None:
        """``config.yaml``: the resolved configuration, before the first iteration (rank 0)."""
        if not distributed.is_main():
            return
        record = {"distill": addons.config_record(self.cfg),
                  "run": {**dataclasses.asdict(self.opts), "eval_models": list(self.opts.eval_models)},
                  "protocol": self.protocol.as_dict(), "device": str(self.device), "torch": str(torch.__version__)}
        storage.write_text(os.path.join(self.opts.run_dir, "config.yaml"), yaml.safe_dump(record, sort_keys=False))

    def write_summary(self) -> None:
        """``summary.csv``: one row per (evaluation, model); accuracies in [0, 1] with 6 decimals, the
        loss with 6 significant digits; with a validation split (``--select_on val``) also
        ``val_acc_mean`` and ``val_acc_std`` (rank 0)."""
        if not distributed.is_main():
            return
        buffer = io.StringIO()
        val = ["val_acc_mean", "val_acc_std"] if self.validation is not None else []
        writer = csv.DictWriter(buffer, fieldnames=self.SUMMARY_FIELDS + val)
        writer.writeheader()
        writer.writerows({**row, "acc_mean": round(row["acc_mean"], 6), "acc_std": round(row["acc_std"], 6),
                          **{key: round(row[key], 6) for key in val if key in row},
                          "loss": tables.round_significant(row["loss"])} for row in self.summary_rows)
        storage.write_text(os.path.join(self.opts.run_dir, "summary.csv"), buffer.getvalue())

    def save_result_or_say_where(self) -> None:
        """:meth:`save_result`; when the write fails, the message says that the finished sets are
        safe in the checkpoint and how to write the file from it.

        Raises:
            OSError: one line (``cannot write ...``).
        """
        try:
            self.save_result()
        except OSError as error:
            raise OSError(f"{error}; the finished sets are kept in {self.checkpoint_path}: make room and re-run "
                          "the same command with --resume to write it") from None

    def save_result(self) -> None:
        """The reference-layout result file with a ``meta`` record beside it: ``syn_lr`` (the learned
        step size of each experiment) and ``protocol`` (``evaluation.EvalProtocol``), which
        ``evaluate.py`` replays. Beside it, when every finished experiment was evaluated, the
        best-so-far file ``best_{tag}.pt`` in the same layout: ``data`` and ``accs_all_exps`` of
        each experiment's best evaluation, ``meta['best']`` one record per experiment
        (``methods.run_selection.BestSoFar.best_records``: iteration, models, test accuracy in
        [0, 1], what it was selected on) and ``meta['selection']`` (``selection_record``)."""
        if not distributed.is_main():
            return
        meta = self.result_meta()
        meta["syn_lr"] = list(self.learned_lr) or None
        meta["step_schedule"] = list(self.schedules) or None
        files.save_results(self.result_path, self.data_save, self.accs_all_exps, meta=meta)
        best = self.best[:len(self.data_save)]
        if best and all(entry is not None for entry in best):
            meta["syn_lr"] = [entry["syn_lr"] for entry in best] if self.learned_lr else None
            meta["step_schedule"] = [entry.get("schedule") for entry in best] if self.schedules else None
            meta["best"] = self.best_records()
            meta["selection"] = self.selection_record()
            accs = {k: [acc for entry in best for acc in entry["accs"].get(k, [])] for k, _, _ in self.eval_keys}
            files.save_results(self.best_path, [entry["data"] for entry in best], accs, meta=meta)

    def result_meta(self) -> dict:
        """The ``meta`` record of the result files (without ``syn_lr``); under ``--select_on val``
        with ``validation``, the split held out of distillation (``data.ValidationSplit.record``)."""
        cfg, record = self.cfg, self.record
        meta = {"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model, "ipc": cfg.ipc,
                "channel": record.channel, "im_size": list(record.im_size), "num_classes": record.num_classes,
                "mean": list(record.mean), "std": list(record.std),
                "zca": record.zca.state_dict() if getattr(record, "zca", None) is not None else None,
                "normalize_like": cfg.normalize_like,
                "dsa_strategy": self.protocol.dsa_strategy, "iterations": cfg.iterations, "seed": self.opts.seed,
                "config": addons.config_record(cfg), "protocol": self.protocol.as_dict(),
                "eval_protocols": list(self.method_class.eval_protocols(cfg))}
        teacher = self.method.teacher_record() if self.method is not None else None
        if teacher is not None:  # the decoupled family: which teacher made the set (evaluate.py replays it)
            meta["teacher"] = teacher
        if self.validation is not None:  # --select_on val: the images held out of distillation
            meta["validation"] = self.validation.record()
        entries = addons.saved_entry_names(cfg)  # the add-on of each tensor after the labels (sets.saved)
        if entries:
            meta["addon_entries"] = entries
        return meta

    def schedule_description(self) -> dict:
        """``StepSchedule.describe()`` of the last finished experiment's learned schedule ({} if none)."""
        return evaluation.StepSchedule.from_dict(self.schedules[-1]).describe() if self.schedules else {}

    def write_results_json(self) -> None:
        """``results.json``: the command line, seed and full resolved configuration (method and run
        options), final accuracies (``accuracy``, the headline), the best-so-far evaluation of each
        experiment apart (``best``, ``methods.run_selection.BestSoFar.best_records``) and what it
        was chosen on (``selection``: test accuracy or a validation split, its size and digest),
        the protocol of every evaluation model, cost (rank 0; ``world_size``: the processes that ran it)."""
        if not distributed.is_main():
            return
        cfg, opts, syn = self.cfg, self.opts, self.syn
        labels = syn.label_kind() if syn is not None else "hard"
        record = {"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model, "ipc": cfg.ipc,
                  "iterations": self.iterations, "num_exp": opts.num_exp, "seed": opts.seed,
                  "world_size": distributed.world_size(),
                  "command": opts.command, "data_source": getattr(self.record, "source", ""),
                  "config": addons.config_record(cfg),
                  "run": {**dataclasses.asdict(opts), "eval_models": list(opts.eval_models)},
                  "seconds_per_iteration": self.seconds_per_iteration,
                  "cost": run_cost(cfg, self.record, self.device, self.distill_seconds, self.seconds_per_iteration,
                                   syn, opts.num_exp),
                  "protocol": {key: {**(self.schedule_description() if protocol == "schedule"
                                        else eval_config_for(self.method, m, opts, syn).describe()), "labels": labels}
                               for key, m, protocol in self.eval_keys},
                  "eval_protocols": list(self.method_class.eval_protocols(cfg)),
                  "accuracy": {m: {"mean": evaluation.EvalResult(m, a).acc_mean, "std": evaluation.EvalResult(m, a).acc_std,
                                   "accs": a} for m, a in self.accs_all_exps.items()},
                  "eval_path": dict(self.eval_paths),
                  "best": self.best_records(),
                  "selection": self.selection_record(),
                  "best_file": self.best_path if os.path.isfile(self.best_path) else None,
                  "result_file": self.result_path, **addons.results_records(cfg)}
        teacher = self.method.teacher_record() if self.method is not None else None
        if teacher is not None:  # the decoupled family: the teacher, and e.g. SRe2L's BatchNorm-loss report
            record["teacher"] = teacher
        record.update(self.method.run_records() if self.method is not None else {})
        if self.soft_labels:  # --labels soft: the relabelled soft labels' storage beside the images'
            record["soft_labels"] = dict(self.soft_labels)
        storage.write_json(os.path.join(opts.run_dir, "results.json"), record)


def schedule_key(model: str) -> str:
    """The result key of ``model`` trained by a set's learned step schedule: ``{model}:schedule``."""
    return f"{model}:schedule"


def schedule_record(method: DistillMethod, syn) -> Optional[dict]:
    """``method.step_schedule(syn).as_dict()``, or ``None`` when the method learns no schedule."""
    schedule = method.step_schedule(syn) if syn is not None else None
    return schedule.as_dict() if schedule is not None else None


def run_cost(cfg: DistillConfig, record, device: torch.device, distill_seconds: float, seconds_per_iteration: float,
             syn, num_exp: int) -> dict:
    """The ``cost`` record of ``results.json``: distillation wall time (selection / set-up plus
    iterations, summed over the experiments run by this process; evaluation excluded), seconds per
    iteration, peak memory (``sets.resources.peak_memory``), the storage of one synthetic set
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
