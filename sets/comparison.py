"""Fair comparison tables: synthetic sets next to ipc random real images per class (same protocol,
same label regime, same augmentation) and the whole-dataset accuracy, with the improvement over
random of each set and DD-Ranking's HLR, LRS and ARS (``sets.ranking``).

Used by ``evaluate.py`` (cross-architecture tables), ``scripts/continual.py`` and ``scripts/make_table.py``.

Improvement over random (IOR, DD-Ranking: Li et al., arXiv 2505.13300; NUS-HPC-AI-Lab/DD-Ranking)::

    IOR(set, model) = Acc(set, model) - Acc(random real subset of the same ipc, model)

both trained and tested with the same evaluation recipe (epochs, lr, augmentation, label type),
reported here in percentage points as the difference of the mean accuracies. The whole-dataset
row is the mean test accuracy of ``train_original.py``'s original models (``summary.json``); its
own protocol (full training set, 150 epochs, no augmentation by default) is recorded with it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

import distributed
import evaluation
import storage
import tables
import utils
from precision import FP32, Precision
from pretrained import original_files
from sets import label_regimes, ranking


@dataclass
class Row:
    """One row of a comparison table.

    Attributes:
        name: what the row shows (a method and file, ``random``, ``whole dataset``).
        kind: ``synthetic``, ``random``, ``whole``, or ``schedule`` (a set trained by its learned step
            schedule, DD's protocol: no IOR, as the random row is trained by the shared protocol).
        ipc: images per class (``None`` for the whole dataset).
        method: the method that made the set (``random`` / ``whole`` for the reference rows).
        dataset: the dataset.
        results: ``{model: {"mean", "std", "accs", "protocol"}}``, accuracies in [0, 1].
        path: the file the set came from, if any.
        labels: the label regime the row was trained under (``hard``, ``soft``, ``teacher``:
            ``evaluation.EvalProtocol.labels``); rows of one set or ipc differ by it.
        augmented: ``False`` for a row trained without any training augmentation (ARS).
    """

    name: str
    kind: str
    ipc: Optional[int]
    method: str
    dataset: str
    results: Dict[str, dict] = field(default_factory=dict)
    path: Optional[str] = None
    labels: str = "hard"
    augmented: bool = True


REGIME_NAMES = {"hard": "", "soft": " + soft labels", "teacher": " + teacher labels"}


def row_suffix(labels: str = "hard", augmented: bool = True) -> str:
    """What a row's name adds for its label regime and augmentation: ``''`` for hard labels with
    the protocol's augmentation, `` + teacher labels``, `` + soft labels``, `` (no aug)``."""
    return REGIME_NAMES.get(labels, f" + {labels} labels") + ("" if augmented else " (no aug)")


def without_augmentation(cfg: "evaluation.EvalConfig") -> "evaluation.EvalConfig":
    """``cfg`` with every training augmentation switched off (DSA / DC augmentation and, where the
    protocol has them, the student views and batch mixing) and everything else, epochs included,
    kept: the "without augmentation" run of DD-Ranking's ARS (``aug_robust.py``, ``use_aug=False``)."""
    off = {"dsa_strategy": "", "dc_aug": None, "mix_type": "none"}
    if cfg.student_aug == "rrc":  # "dc" with no DSA strategy and no DC setting is already no augmentation
        off["student_aug"] = "none"
    return dataclasses.replace(cfg, **off)


def improvement_over_random(accs: Sequence[float], random_accs: Sequence[float]) -> float:
    """DD-Ranking's IOR in percentage points: ``100 * (mean(accs) - mean(random_accs))``.

    Args:
        accs: accuracies in [0, 1] of networks trained on the set.
        random_accs: accuracies in [0, 1] of networks trained on random real subsets of the same
            ipc under the same protocol.

    Returns:
        The difference of means in points (NaN if either list is empty).
    """
    if len(accs) == 0 or len(random_accs) == 0:
        return float("nan")
    return float(100 * (np.mean(accs) - np.mean(random_accs)))


def whole_dataset_accuracy(original_path: str, dataset: str, model: str, subset: Optional[str] = None) -> Optional[dict]:
    """The whole-dataset accuracy of ``model`` from ``train_original.py``'s ``summary.json``.

    Args:
        original_path: ``train_original.py --save_path`` (default ``pretrained_model``).
        dataset, model, subset: which models.

    Returns:
        ``{"mean", "std", "accs", "protocol"}`` over the finished original models, or ``None``
        when there is no summary or no finished model.
    """
    path = os.path.join(original_files.original_dir(original_path, dataset, model, subset), original_files.SUMMARY_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        summary = json.load(handle)
    accs = [row["test_acc"] for row in summary.get("models", []) if row.get("finished") and row.get("test_acc") is not None]
    if not accs:
        return None
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs,
            "protocol": {"source": path, **(summary.get("config") or {})}}


@dataclass
class SetToEvaluate:
    """One experiment of a saved set, ready for the protocol.

    Attributes:
        images: (N, C, H, W) float32 in the dataset's normalised (or ZCA) space.
        labels: (N,) int64 class labels, or (N, K) probabilities (soft labels).
        learned_lr: the step size learned with the set (trajectory matching), or ``None``.
        term: the set's ``evaluation.TrainingTerm`` (an add-on's, e.g. feature labels), or ``None``.
        schedule: the step schedule learned with the set (``evaluation.StepSchedule``, DD), or ``None``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    learned_lr: Optional[float] = None
    term: Optional[object] = None
    schedule: Optional[object] = None


ReportFn = Callable[[str, List[float], "evaluation.EvalConfig", str, float], None]


def _result(model_eval: str, accs: List[float], seconds: float, cfg: "evaluation.EvalConfig", labels: str,
            learned_lr: Sequence[float] = (), results: Sequence["evaluation.EvalResult"] = (),
            store_mb: Sequence[float] = ()) -> dict:
    """A row's ``results[model_eval]``: mean, std, accuracies, seconds, the protocol record
    (with ``learned_lr``, the step size each experiment learned, when the set learned one, and
    ``soft_labels_mb_per_epoch``, the storage of one epoch of its relabel stores, when it had some)
    and how the networks were trained (``eval_path``, ``eval_path_note``, from ``results``)."""
    protocol = {**cfg.describe(), "labels": labels}
    if learned_lr:
        protocol["learned_lr"] = [float(lr) for lr in learned_lr]
    if store_mb:
        protocol["soft_labels_mb_per_epoch"] = float(np.mean(store_mb))
    path = " + ".join(dict.fromkeys(r.path for r in results if r.path))
    note = "; ".join(dict.fromkeys(r.path_note for r in results if r.path_note))
    return {**evaluation.EvalResult(model_eval, accs, seconds, path, note).as_dict(), "protocol": protocol}


def evaluate_set_row(row: Row, experiments: Sequence[SetToEvaluate], models: Sequence[str],
                     protocol: "evaluation.EvalProtocol", distilled_with: str, test_images: torch.Tensor,
                     test_labels: torch.Tensor, num_classes: int, *, num_eval: int, device: torch.device,
                     seed: int, report: Optional[ReportFn] = None, precision: Precision = FP32,
                     teacher: Optional[Callable] = None) -> Row:
    """Train ``num_eval`` networks of every model in ``models`` on every experiment of a set and
    fill ``row.results`` (experiment ``e`` uses seeds ``seed + 1000 * e + k``). Each result's
    ``protocol`` is ``EvalConfig.describe()`` (with its ``label_loss``) plus ``labels`` (``hard`` /
    ``soft`` / ``learned real-valued``: (N, K) labels fitted by the ``mse`` label loss) and, when the
    experiments learned a step size, ``learned_lr`` (one per experiment; ``lr`` is the last one).

    Args:
        row: the row to fill (its ``ipc`` and ``dataset`` are used).
        experiments: the set's experiments.
        models: evaluation networks.
        protocol: the set's evaluation protocol (``evaluation.EvalProtocol``).
        distilled_with: the network the set was distilled with (DC's augmentation choice).
        test_images, test_labels: the real test set on ``device``.
        report: called as ``report(model, accs, cfg, what, seconds)`` after each model.
        precision: ``--amp`` of the training and testing (``evaluation.EvalConfig.precision``).
            ``row.augmented`` off trains without augmentation (:func:`without_augmentation`).
        teacher: ``teacher(x) -> (B, K)`` logits for the ``soft`` and ``teacher`` regimes
            (``row.labels``, which replaces ``protocol.labels``; ``sets.label_regimes``).

    Raises:
        ValueError: an experiment's training term does not fit an evaluation network; a regime
            that needs a teacher without one.
        FloatingPointError: a training loss became NaN or infinite.
    """
    protocol = dataclasses.replace(protocol, labels=row.labels)
    labels_kind = ("hard" if experiments[0].labels.dim() == 1 else
                   "learned real-valued" if protocol.label_loss in evaluation.SQUARE_LOSSES else "soft")
    learned_lr = [experiment.learned_lr for experiment in experiments if experiment.learned_lr is not None]
    for model_eval in models:
        accs, seconds, cfg, results, store_mb = [], 0.0, None, [], []
        for index, experiment in enumerate(experiments):
            cfg = protocol.resolve(row.dataset, distilled_with, model_eval, row.ipc, experiment.learned_lr,
                                   precision=precision)
            cfg = cfg if row.augmented else without_augmentation(cfg)
            inputs = label_regimes.label_inputs(cfg, experiment.images.to(device), experiment.labels.to(device),
                                                teacher, seed=seed + 1000 * index)
            result = evaluation.evaluate_synset_sharded(experiment.images.to(device), inputs.labels.to(device),
                                                   model_eval, num_classes, test_images, test_labels, cfg,
                                                   num_eval=num_eval, device=device, seed=seed + 1000 * index,
                                                   term=experiment.term, **inputs.extra)
            accs += result.accs
            seconds += result.train_time_s
            results.append(result)
            store_mb += [inputs.mb_per_epoch] if inputs.mb_per_epoch is not None else []
        row.results[model_eval] = _result(model_eval, accs, seconds, cfg, inputs.kind or labels_kind, learned_lr,
                                          results, store_mb)
        if report is not None:
            report(model_eval, accs, cfg, row.name, seconds)
    return row


def evaluate_schedule_row(row: Row, experiments: Sequence[SetToEvaluate], models: Sequence[str],
                          test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int, *, num_eval: int,
                          device: torch.device, seed: int, report: Optional[Callable[[str, List[float], dict, str, float], None]] = None) -> Row:
    """Like :func:`evaluate_set_row`, but every network is trained by the experiment's learned step
    schedule (``evaluation.evaluate_schedule``: DD's own protocol); each result's ``protocol`` is the
    schedule's ``describe()`` plus ``labels``.

    Raises:
        ValueError: an experiment has no schedule, or its schedule does not fit its images.
        FloatingPointError: a training loss became NaN or infinite.
    """
    labels_kind = "soft" if experiments[0].labels.dim() == 2 else "hard"
    for model_eval in models:
        accs, seconds, described = [], 0.0, {}
        for index, experiment in enumerate(experiments):
            if experiment.schedule is None:
                raise ValueError(f"experiment {index} holds no learned step schedule")
            result = evaluation.evaluate_schedule(experiment.images.to(device), experiment.labels.to(device), model_eval,
                                             num_classes, test_images, test_labels, experiment.schedule,
                                             num_eval=num_eval, device=device, seed=seed + 1000 * index)
            accs += result.accs
            seconds += result.train_time_s
            described = experiment.schedule.describe()
        row.results[model_eval] = {**evaluation.EvalResult(model_eval, accs, seconds).as_dict(),
                                   "protocol": {**described, "labels": labels_kind}}
        if report is not None:
            report(model_eval, accs, described, row.name, seconds)
    return row


def random_stored_images(record, ipc: int, factor: int, generator: torch.Generator):
    """``ipc`` random real images per class (``data.sample_random_real``), or with ``factor`` > 1 ``ipc``
    stored images per class each holding a ``factor x factor`` grid of ``ipc factor²`` random real images
    of the class (``evaluation.mix_grid``; NCFM's ``mix`` initialisation), decoded when trained on.

    Returns:
        ``(images (K ipc, C, H, W), labels (K ipc,))``, class-major.
    """
    from data import sample_random_real

    if factor <= 1:
        return sample_random_real(record, ipc, generator)
    cells, _ = sample_random_real(record, ipc * factor * factor, generator)
    per_class = ipc * factor * factor
    images = torch.cat([evaluation.mix_grid(cells[c * per_class:(c + 1) * per_class], factor, ipc)
                        for c in range(record.num_classes)])
    return images, torch.arange(record.num_classes, device=cells.device).repeat_interleave(ipc)


def random_real_row(record, ipc: int, models: Sequence[str], protocol: "evaluation.EvalProtocol", distilled_with: str,
                    test_images: torch.Tensor, test_labels: torch.Tensor, *, num_eval: int, device: torch.device,
                    seed: int, report: Optional[ReportFn] = None, precision: Precision = FP32,
                    augmented: bool = True, labels: str = "hard", teacher: Optional[Callable] = None) -> Row:
    """The random-real row: for each of ``num_eval`` networks a fresh draw of ``ipc`` real training
    images per class (generator ``seed + k``), the same protocol (and ``precision``, ``--amp``) as
    the sets, under the label regime ``labels`` (hard class labels; ``soft``: the teacher's labels
    of the drawn images made as for the sets, ``teacher``: the teacher online;
    ``sets.label_regimes``); without any training augmentation when ``augmented`` is off (ARS).
    Under a multi-formation protocol (``decode_factor`` f > 1) each stored image is a grid of f²
    random real images (:func:`random_stored_images`), the same storage as the sets.

    Raises:
        ValueError: ``soft`` / ``teacher`` labels without a teacher.
        FloatingPointError: a training loss became NaN or infinite.
    """
    from data import sample_random_real

    row = Row(name=f"random real ipc {ipc}{row_suffix(labels, augmented)}", kind="random", ipc=ipc, method="random",
              dataset=record.name, augmented=augmented, labels=labels)
    protocol = dataclasses.replace(protocol, labels=labels)
    for model_eval in models:
        cfg = protocol.resolve(record.name, distilled_with, model_eval, ipc, precision=precision)
        cfg = cfg if augmented else without_augmentation(cfg)
        mine, seconds, results, kind, store_mb = {}, 0.0, [], None, []
        for run in distributed.shard(num_eval):  # all of them for one process; a share under torchrun
            images, hard = random_stored_images(record, ipc, cfg.decode_factor, utils.make_generator(seed + run))
            inputs = label_regimes.label_inputs(cfg, images.to(device), hard.to(device), teacher, seed=seed + run)
            result = evaluation.evaluate_synset(images.to(device), inputs.labels.to(device), model_eval,
                                           record.num_classes, test_images, test_labels, cfg, num_eval=1,
                                           device=device, seed=seed + run, **inputs.extra)
            mine[run] = result.accs[0]
            seconds += result.train_time_s
            results.append(result)
            kind = inputs.kind
            store_mb += [inputs.mb_per_epoch] if inputs.mb_per_epoch is not None else []
        accs = list(distributed.gather_units(mine).values())
        row.results[model_eval] = _result(model_eval, accs, seconds, cfg, kind or "hard", results=results,
                                          store_mb=store_mb)
        if report is not None:
            report(model_eval, accs, cfg, row.name, seconds)
    return row


def whole_dataset_row(original_path: str, dataset: str, models: Sequence[str], subset: Optional[str] = None) -> Optional[Row]:
    """The whole-dataset row from ``train_original.py``'s summaries (``None`` when none exists)."""
    row = Row(name="whole dataset", kind="whole", ipc=None, method="whole", dataset=dataset)
    for model_eval in models:
        found = whole_dataset_accuracy(original_path, dataset, model_eval, subset)
        if found is not None:
            row.results[model_eval] = found
    return row if row.results else None


def random_row_for(rows: Sequence[Row], ipc: Optional[int], labels: str = "hard",
                   augmented: bool = True) -> Optional[Row]:
    """The random-real row of the given ipc, label regime and augmentation among ``rows`` (``None``
    if absent)."""
    return next((row for row in rows if row.kind == "random" and row.ipc == ipc and row.labels == labels
                 and row.augmented == augmented), None)


def training_lr(protocol: dict) -> Tuple[Optional[float], str]:
    """The SGD learning rate a result was trained with and where it came from.

    Args:
        protocol: a result's ``protocol`` record (:func:`evaluate_set_row`, :func:`random_real_row`,
            :func:`whole_dataset_accuracy`).

    Returns:
        ``(lr, source)``: the mean of ``learned_lr`` and ``"learned"`` when the set learned its
        step size (trajectory matching), else ``protocol["lr"]`` (``None`` if absent) and ``"fixed"``.
    """
    learned = protocol.get("learned_lr")
    if learned:
        return float(np.mean(learned)), "learned"
    return protocol.get("lr"), "fixed"


def lr_text(protocol: dict) -> str:
    """A result's training lr for a table: ``0.01``; ``learned 0.0123`` when the set learned it
    (``learned 0.0118-0.0131``: the range over experiments that learned different values);
    ``-`` when the record has none."""
    lr, source = training_lr(protocol)
    if lr is None:
        return "-"
    if source == "fixed":
        return f"{float(lr):.4g}"
    low, high = (f"{value:.3g}" for value in (min(protocol["learned_lr"]), max(protocol["learned_lr"])))
    return f"learned {low}" if low == high else f"learned {low}-{high}"


def labels_text(protocol: dict) -> str:
    """A result's label type for a table: ``hard`` (the default when unrecorded), ``soft`` or ``real-valued``,
    with `` + feature labels (lbd x)`` when it trained with DRUPI feature labels
    (``feature_labels_lbd``, written by ``evaluate.py``)."""
    text = str(protocol.get("labels") or "hard")
    lbd = protocol.get("feature_labels_lbd")
    return text if lbd is None else f"{text} + feature labels (lbd {float(lbd):g})"


SCORE_COLUMNS = ("hlr", "lrs", "lrs_std", "ars", "ars_std")  # DD-Ranking's scores beside IOR (sets.ranking)
LONG_COLUMNS = ["name", "kind", "method", "dataset", "ipc", "model", "mean", "std", "n", "ior", *SCORE_COLUMNS,
                "regime", "augmented", "epochs", "lr", "lr_source", "augmentation", "labels", "path"]


def long_table(rows: Sequence[Row], models: Sequence[str],
               scores: ranking.ScoreSettings = ranking.ScoreSettings()) -> pd.DataFrame:
    """One record per (row, model): name, kind, method, dataset, ipc, model, mean and std in
    percent, n networks, IOR in points (synthetic rows with a random row of their ipc, label regime
    and augmentation), DD-Ranking's HLR (points), LRS and ARS with their standard deviations over
    runs (``sets.ranking.row_scores`` under ``scores``; NaN where the rows they need are absent),
    the row's label ``regime`` and ``augmented``, and the protocol fields epochs, lr (the mean
    learned step size when the set learned one, :func:`training_lr`), lr_source (``learned`` /
    ``fixed``), augmentation and labels (:func:`labels_text`)."""
    records = []
    for row in rows:
        for model in models:
            result = row.results.get(model)
            if result is None:
                continue
            protocol = result.get("protocol") or {}
            found = ranking.row_scores(rows, row, model, scores)
            lr, lr_source = training_lr(protocol)
            records.append({"name": row.name, "kind": row.kind, "method": row.method, "dataset": row.dataset,
                            "ipc": row.ipc, "model": model, "mean": 100 * result["mean"], "std": 100 * result["std"],
                            "n": len(result.get("accs", [])), "ior": found["ior"],
                            **{column: found[column] for column in SCORE_COLUMNS},
                            "regime": row.labels, "augmented": row.augmented, "epochs": protocol.get("epochs"),
                            "lr": lr, "lr_source": lr_source, "augmentation": protocol.get("augmentation"),
                            "labels": labels_text(protocol), "path": row.path})
    return pd.DataFrame.from_records(records, columns=LONG_COLUMNS)


def cell(mean: float, std: float, ior: float = float("nan")) -> str:
    """``'mean ± std'`` (percent, 2 decimals), with ``' (+IOR)'`` in points when IOR is known."""
    text = f"{mean:.2f} ± {std:.2f}"
    return text if np.isnan(ior) else f"{text} ({ior:+.2f})"


PROTOCOL_COLUMNS = {"lr": lr_text, "labels": labels_text}  # shown in a wide table when rows differ


def protocol_columns(rows: Sequence[Row], models: Sequence[str]) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    """Which of the training lr and the label type (:data:`PROTOCOL_COLUMNS`) differ between rows.

    A row's value is :func:`lr_text` / :func:`labels_text` of its results for ``models`` (distinct
    values joined with `` / ``; ``-`` without results). The whole-dataset row is trained by
    ``train_original.py`` under its own protocol, so it is shown but does not count as differing.

    Returns:
        ``(differing, agreed)``: ``{column: one value per row}`` for the columns whose values
        differ between the set and random rows, and ``{column: the common value}`` for the others
        (left out when there is no such row).
    """
    differing, agreed = {}, {}
    for column, text in PROTOCOL_COLUMNS.items():
        values = []
        for row in rows:
            found = [text(row.results[m].get("protocol") or {}) for m in models if m in row.results]
            values.append(" / ".join(dict.fromkeys(found)) or "-")
        compared = {value for row, value in zip(rows, values) if row.kind != "whole" and row.results}
        if len(compared) > 1:
            differing[column] = values
        elif compared:
            agreed[column] = compared.pop()
    return differing, agreed


def wide_table(rows: Sequence[Row], models: Sequence[str]) -> pd.DataFrame:
    """Rows x architectures of ``'mean ± std (+IOR)'`` cells (``-`` where not evaluated), in the
    order of ``rows`` and ``models``; preceded by an ``lr`` and/or ``labels`` column when the
    rows were trained with different lrs or label types (:func:`protocol_columns`)."""
    frame = long_table(rows, models)
    table = pd.DataFrame(index=[row.name for row in rows], columns=list(models), dtype=object).fillna("-")
    differing, _ = protocol_columns(rows, models)
    for position, (column, values) in enumerate(differing.items()):
        table.insert(position, column, values)
    for record in frame.itertuples():
        table.loc[record.name, record.model] = cell(record.mean, record.std, record.ior)
    table.index.name = "set"
    return table


def format_table(rows: Sequence[Row], models: Sequence[str]) -> str:
    """The Markdown table of :func:`wide_table` with a legend line, and a line naming the lr and
    label type every set and random row shares (those columns are then left out)."""
    legend = ("accuracy % mean ± std over networks; (+x): improvement over random real images of the same ipc "
              "under the same protocol and labels (DD-Ranking IOR, points); whole dataset: train_original.py models")
    _, agreed = protocol_columns(rows, models)
    if agreed:
        legend += "\nevery set and random row: " + ", ".join(
            f"{column} {value}" for column, value in agreed.items())
    table = wide_table(rows, models)
    body = [[name, *values] for name, values in zip(table.index, table.values.tolist())]
    return tables.format_table([table.index.name or "", *table.columns], body, markdown=True) + "\n" + legend


CSV_DECIMALS = 4  # decimals of percentages and points in a CSV (0.0001 % = 1e-6 as a fraction)


SCORE_DECIMALS = 6  # decimals of LRS and ARS in a CSV (unitless, about -0.16 to 1)


def rounded_for_csv(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` fit for a CSV: the percentage and point columns present (``mean``,
    ``std``, ``ior``, ``hlr``) rounded to ``CSV_DECIMALS`` decimals, LRS and ARS (and their stds)
    to ``SCORE_DECIMALS``, ``lr`` to 6 significant digits (``tables.round_significant``), so
    ``23.200000000000003`` is written ``23.2``. Other columns are unchanged; used by
    :func:`write_table` and ``scripts/make_table.py``."""
    frame = frame.round({column: CSV_DECIMALS for column in ("mean", "std", "ior", "hlr") if column in frame})
    frame = frame.round({column: SCORE_DECIMALS for column in SCORE_COLUMNS[1:] if column in frame})
    if "lr" in frame:
        frame["lr"] = [tables.round_significant(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                       for v in frame["lr"]]
    return frame


def write_table(path: str, rows: Sequence[Row], models: Sequence[str], protocol: dict, extra: Optional[dict] = None,
                scores: ranking.ScoreSettings = ranking.ScoreSettings()) -> tuple:
    """Write the comparison as JSON (``path``) and the long table as CSV (``path`` with ``.csv``;
    mean and std in percent, IOR and HLR in points, LRS and ARS under ``scores``
    (:func:`long_table`), rounded by :func:`rounded_for_csv`).

    The JSON holds ``{"comparison": {"models", "protocol", "rows": [Row...], "table": [records]}}``
    plus ``extra`` at the top level (``evaluate.py`` keeps its per-model keys there).

    Returns:
        ``(json_path, csv_path)``.
    """
    frame = rounded_for_csv(long_table(rows, models, scores))
    csv_path = os.path.splitext(path)[0] + ".csv"
    storage.write_text(csv_path, frame.to_csv(index=False))
    records = json.loads(frame.to_json(orient="records"))
    blob = {**(extra or {}), "comparison": {"models": list(models), "protocol": protocol,
                                            "rows": [asdict(row) for row in rows], "table": records}}
    storage.write_json(path, blob)
    return path, csv_path


def common_protocol(protocols: Sequence["evaluation.EvalProtocol"]) -> Optional["evaluation.EvalProtocol"]:
    """The one evaluation protocol of a comparison's sets (their random-real rows are trained by
    it, so IOR compares like with like); ``None`` for no sets.

    Raises:
        ValueError: the sets were evaluated with different protocols (each named).
    """
    distinct = list(dict.fromkeys(protocols))
    if len(distinct) > 1:
        fields = [f.name for f in dataclasses.fields(distinct[0])
                  if len({repr(getattr(p, f.name)) for p in distinct}) > 1]
        differ = "; ".join(f"{name}: {' vs '.join(dict.fromkeys(repr(getattr(p, name)) for p in distinct))}"
                           for name in fields)
        raise ValueError(f"the sets were evaluated with different protocols ({differ})")
    return distinct[0] if distinct else None


def evaluation_record(rows: Sequence[Row], protocol: "evaluation.EvalProtocol", *, num_eval: int, seed: int, dataset: str,
                      amp: str, scores: ranking.ScoreSettings = ranking.ScoreSettings()) -> Tuple[dict, dict]:
    """What ``evaluate.py --out`` writes beside the table (:func:`write_table`): the comparison's
    ``protocol`` record (``num_eval``, ``seed``, ``dataset``, ``amp``, the first row's per-model
    protocols as ``evaluation``, the common ``protocol`` and the score settings ``scores``,
    ``sets.ranking.ScoreSettings.as_dict``) and, as the top-level ``extra`` keys,
    the first row's ``{model: {"mean", "std", "accs", "protocol", ...}}`` (accuracies in [0, 1];
    scripts read them).

    Returns:
        ``(protocol record, extra)``.
    """
    first = {model: result for model, result in rows[0].results.items()}
    record = {"num_eval": num_eval, "seed": seed, "dataset": dataset, "amp": amp,
              "evaluation": {model: rows[0].results[model]["protocol"] for model in rows[0].results},
              "protocol": protocol.as_dict(), "scores": scores.as_dict()}
    return record, first


def format_scores(rows: Sequence[Row], models: Sequence[str], scores: ranking.ScoreSettings = ranking.ScoreSettings()) -> str:
    """DD-Ranking's scores of the synthetic rows as a Markdown table (``sets.ranking.format_scores``
    of :func:`long_table`); ``''`` when no HLR, LRS or ARS could be computed."""
    return ranking.format_scores(long_table(rows, models, scores), scores)


def rows_from_json(blob: dict) -> List[Row]:
    """The rows saved by :func:`write_table` (``[]`` if the blob has no comparison)."""
    return [Row(**row) for row in (blob.get("comparison") or {}).get("rows", [])]
