"""The best-so-far set of a distillation run (``methods/runner.py``'s ``DistillationRun`` inherits
it): which evaluated set of each experiment is kept as ``best_{tag}.pt`` and how the choice is
recorded.

The references keep the set of highest **test** accuracy of each evaluation model
(GeorgeCazenavette/mtt-distillation and NUS-HPC-AI-Lab/DATM ``distill.py``: ``acc_test_mean >
best_acc[model_eval]``) and report it as Max_Accuracy; this toolkit used the first evaluation
model's. Here the choice is one number per evaluation: the mean over every evaluation model (and
DD's learned-schedule rows) of the mean accuracy of its networks, on

* ``test`` (``--select_on test``, the default): the test set, as the references;
* ``val`` (``--select_on val``): a class-balanced validation split held out of the training set
  (``data.split_validation``, ``--val_per_class`` images per class, drawn from ``--seed``), which
  the method never distils from; the chosen set's test accuracy is reported beside it.

Ties keep the earlier set (the references' strict ``>``).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np

import evaluation
import utils
from data import ValidationSplit, split_validation
from methods.run_results import schedule_record

logger = logging.getLogger("methods.runner")

# ``--select_on``: what the best-so-far set is chosen on.
SELECT_ON = ("test", "val")
SELECTED_ON = {"test": "test accuracy", "val": "validation accuracy"}


def hold_out_validation(record, select_on: str, per_class: int, seed: int, ipc: int):
    """``(record for distillation, ValidationSplit or None)``: under ``select_on='val'`` the record
    without a class-balanced validation split of ``per_class`` images per class (``data.split_validation``,
    drawn from ``seed``), else the record as it is and ``None``.

    Raises:
        utils.UserError: an unknown ``select_on``; ``per_class`` out of range; fewer than ``ipc``
            training images left in some class (one line naming the flags).
    """
    if select_on not in SELECT_ON:
        raise utils.UserError(f"--select_on {select_on!r}: expected one of {', '.join(SELECT_ON)}")
    if select_on == "test":
        return record, None
    try:
        remaining, split = split_validation(record, per_class, seed)
    except ValueError as error:
        raise utils.UserError(str(error)) from None
    left = int(remaining.labels_train.bincount(minlength=remaining.num_classes).min())
    if ipc > left:
        raise utils.UserError(f"--ipc {ipc} with --select_on val --val_per_class {per_class}: the smallest class of "
                              f"{record.name} keeps {left} training images; lower --val_per_class")
    logger.info("--select_on val: %d training images per class (%d in all) held out of distillation; the best-so-far "
                "set is chosen on their accuracy", per_class, len(split.labels))
    return remaining, split


class BestSoFar:
    """Choosing and recording each experiment's best-so-far set; a mix-in of
    ``methods.runner.DistillationRun``, whose ``opts``, ``eval_keys``, ``best``, ``data_save`` and
    ``validation`` (a ``data.ValidationSplit`` or ``None``) it reads."""

    validation: Optional[ValidationSplit] = None

    def selection_settings(self) -> dict:
        """The flags that decide the choice (checked on ``--resume``): ``{select_on}``, with
        ``val_per_class`` under ``val``."""
        if self.opts.select_on == "val":
            return {"select_on": "val", "val_per_class": self.opts.val_per_class}
        return {"select_on": "test"}

    def selection_record(self) -> dict:
        """``results.json`` / ``meta['selection']``: what the best-so-far sets were chosen on
        (``select_on``, ``selected_on``), over which evaluation keys, and the validation split
        (``data.ValidationSplit.record``; ``None`` under ``test``)."""
        return {"select_on": self.opts.select_on, "selected_on": SELECTED_ON[self.opts.select_on],
                "criterion": "mean over the evaluation models of their networks' mean accuracy; ties keep the "
                             "earlier set",
                "models": [key for key, _, _ in self.eval_keys],
                "validation": self.validation.record() if self.validation is not None else None}

    def selection_score(self, results: Dict[str, evaluation.EvalResult]) -> Optional[float]:
        """The number the choice maximises: the mean over every evaluation key of the mean
        accuracy in [0, 1] of its networks, on the validation split under ``val`` and on the test
        set under ``test``; ``None`` when the evaluation did not cover every key."""
        keys = [key for key, _, _ in self.eval_keys]
        if not keys or any(key not in results for key in keys):
            return None
        on_val = self.validation is not None
        return float(np.mean([results[k].val_acc_mean if on_val else results[k].acc_mean for k in keys]))

    def note_evaluation(self, exp: int, iteration: int, method, syn, results: Dict[str, evaluation.EvalResult]) -> bool:
        """Keep experiment ``exp``'s set as its best so far when its :meth:`selection_score`
        beats every earlier evaluation of the experiment (ties keep the earlier set). Under
        ``test`` this is what the references report as Max_Accuracy (optimistic, being chosen on
        the test set); the final set stays the result either way.

        Returns:
            Whether the set became the best (False without an evaluation).
        """
        score = self.selection_score(results)
        if score is None:
            return False
        while len(self.best) <= exp:
            self.best.append(None)
        kept = self.best[exp]
        if kept is not None and score <= kept.get("score", kept["accuracy"]):  # older checkpoints: no score
            return False
        keys = [key for key, _, _ in self.eval_keys]
        entry = {"iteration": iteration, "models": keys, "score": score,
                 "accuracy": float(np.mean([results[k].acc_mean for k in keys])),
                 "accs": {m: list(result.accs) for m, result in results.items()},
                 "data": self.saved_set(method, syn),
                 "syn_lr": float(syn.syn_lr.detach()) if syn.syn_lr is not None else None,
                 "schedule": schedule_record(method, syn)}
        if self.validation is not None:
            entry["val_accs"] = {m: list(result.val_accs) for m, result in results.items()}
        self.best[exp] = entry
        return True

    def best_records(self) -> List[Optional[dict]]:
        """Per finished experiment, where its best set was evaluated (``results.json`` ``best``):
        ``{exp, iteration, models, accuracy, accs, selected_on}`` (``accuracy``: the mean over
        ``models`` of the test accuracy in [0, 1]; ``accs``: per model the networks' test
        accuracies) and under ``val`` ``val_accuracy`` (the score it was chosen on) and
        ``val_accs``; ``None`` when it was never evaluated."""
        best = self.best + [None] * (len(self.data_save) - len(self.best))
        records = []
        for exp, entry in enumerate(best[:len(self.data_save)]):
            if entry is None:
                records.append(None)
                continue
            record = {"exp": exp, "iteration": entry["iteration"],
                      "models": entry.get("models") or [entry.get("model")], "accuracy": entry["accuracy"],
                      "accs": entry["accs"], "selected_on": SELECTED_ON[self.opts.select_on]}
            if "val_accs" in entry:
                record.update(val_accuracy=entry["score"], val_accs=entry["val_accs"])
            records.append(record)
        return records
