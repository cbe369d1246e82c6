"""DD-Ranking's scores of a distilled set: hard-label recovery (HLR), improvement over random
(IOR), the label-robust score (LRS) and the augmentation-robust score (ARS).

Source: Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation" (arXiv
2505.13300) and its code, NUS-HPC-AI-Lab/DD-Ranking at ``b8b0966``:
``ddranking/metrics/soft_label.py`` (``LabelRobustScoreSoft.compute_metrics``) and
``ddranking/metrics/aug_robust.py`` (``AugmentationRobustScore.compute_metrics``). With
accuracies in percentage points (the reference's ``validate`` returns top-1 in percent)::

    HLR   = Acc(whole real training set, hard labels) - Acc(set, hard labels)
    IOR   = Acc(set, its labels) - Acc(random real images of the same ipc, the same labels)
    alpha = lam * IOR - (1 - lam) * HLR                        (lam: lrs_lambda, 0.5)
    LRS   = (exp(alpha) - exp(-1)) / (exp(1) - exp(-1))

    beta  = lam * (Acc(set, aug) - Acc(random, aug))
            + (1 - lam) * (Acc(set, no aug) - Acc(random, no aug))   (lam: ars_lambda, 0.5)
    ARS   = (exp(beta) - exp(-1)) / (exp(1) - exp(-1))

The reference computes the scores once per evaluation run (run ``i`` of the set against run ``i``
of random images, the whole-dataset accuracy a constant) and reports their mean and standard
deviation over runs; :func:`label_robust_scores` and :func:`augmentation_robust_scores` do the
same when the run counts agree, and score the mean accuracies otherwise (recorded as ``pairing``).
DD-Ranking's documentation writes LRS "normalised to [0, 1]" (× 100 %), which holds for alpha in
[-1, 1], i.e. accuracies as fractions; its code feeds percentage points, where LRS saturates at
``-exp(-1) / (e - exp(-1)) = -0.1565`` once alpha < -5. ``units='fraction'`` gives the documented
reading; ``'points'`` (the default) is the code's.

Nothing here trains: the functions take accuracies, and :func:`row_scores` finds the rows of a
comparison table (``sets.comparison.Row``) each score needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import tables

LRS_LAMBDA = 0.5  # DD-Ranking compute_metrics(lrs_lambda=0.5)
ARS_LAMBDA = 0.5  # DD-Ranking compute_metrics(ars_lambda=0.5)
SCORE_UNITS = {"points": 100.0, "fraction": 1.0}  # accuracies in [0, 1] times this enter the scores
_LOW, _HIGH = math.exp(-1.0), math.exp(1.0)


@dataclass(frozen=True)
class ScoreSettings:
    """How the scores are computed (``evaluate.py --lrs_lambda --ars_lambda --score_units``).

    Attributes:
        lrs_lambda: weight of IOR against HLR in alpha, in [0, 1].
        ars_lambda: weight of the augmented gain against the plain gain in beta, in [0, 1].
        units: ``points`` (accuracies in percentage points: DD-Ranking's code) or ``fraction``
            (accuracies in [0, 1]: the [-1, 1] range its documentation assumes).
    """

    lrs_lambda: float = LRS_LAMBDA
    ars_lambda: float = ARS_LAMBDA
    units: str = "points"

    def __post_init__(self):
        for name in ("lrs_lambda", "ars_lambda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name} must lie in [0, 1], got {value}")
        if self.units not in SCORE_UNITS:
            raise ValueError(f"--score_units must be one of {', '.join(SCORE_UNITS)}, got {self.units!r}")

    @property
    def scale(self) -> float:
        """Factor from accuracies in [0, 1] to the units the scores use (100 or 1)."""
        return SCORE_UNITS[self.units]

    def as_dict(self) -> dict:
        """JSON record (``comparison.protocol.scores`` of ``evaluate.py --out``)."""
        return {"lrs_lambda": self.lrs_lambda, "ars_lambda": self.ars_lambda, "units": self.units}


def normalised_exp(x: float) -> float:
    """DD-Ranking's normalisation ``(exp(x) - exp(-1)) / (exp(1) - exp(-1))``: 0 at x = -1, 1 at
    x = 1, increasing; ``-exp(-1) / (e - exp(-1))`` as x -> -inf, unbounded above (``inf`` on overflow).

    Source: ``ddranking/metrics/soft_label.py`` (LRS) and ``aug_robust.py`` (ARS).
    """
    try:
        grown = math.exp(x)
    except OverflowError:
        return math.inf
    return (grown - _LOW) / (_HIGH - _LOW)


def hard_label_recovery(whole_acc: float, set_hard_acc: float, scale: float = 100.0) -> float:
    """HLR = ``scale * (whole_acc - set_hard_acc)``: how far the set trained with hard labels
    stays below the whole real training set (lower is better).

    Args:
        whole_acc: accuracy in [0, 1] of networks trained on the whole training set.
        set_hard_acc: accuracy in [0, 1] of networks trained on the set with hard labels.
        scale: 100 for percentage points (DD-Ranking's code), 1 for fractions.
    """
    return scale * (float(whole_acc) - float(set_hard_acc))


def improvement_over_random(set_acc: float, random_acc: float, scale: float = 100.0) -> float:
    """IOR = ``scale * (set_acc - random_acc)``: the set's gain over random real images of the same
    ipc trained with the same labels and protocol (higher is better); accuracies in [0, 1]."""
    return scale * (float(set_acc) - float(random_acc))


def label_robust_score(hlr: float, ior: float, lam: float = LRS_LAMBDA) -> Tuple[float, float]:
    """``(alpha, LRS)`` with ``alpha = lam * IOR - (1 - lam) * HLR`` and ``LRS = normalised_exp(alpha)``.

    Source: ``ddranking/metrics/soft_label.py``, ``LabelRobustScoreSoft.compute_metrics``.
    """
    alpha = lam * ior - (1.0 - lam) * hlr
    return alpha, normalised_exp(alpha)


def augmentation_robust_score(gain_aug: float, gain_plain: float, lam: float = ARS_LAMBDA) -> Tuple[float, float]:
    """``(beta, ARS)`` with ``beta = lam * gain_aug + (1 - lam) * gain_plain`` (each gain the set's
    accuracy minus random images' under the same protocol, with and without training
    augmentation) and ``ARS = normalised_exp(beta)``.

    Source: ``ddranking/metrics/aug_robust.py``, ``AugmentationRobustScore.compute_metrics``.
    """
    beta = lam * gain_aug + (1.0 - lam) * gain_plain
    return beta, normalised_exp(beta)


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population standard deviation (``np.std``, as the reference reports)."""
    return float(np.mean(values)), float(np.std(values))


def _runs(*lists: Sequence[float]) -> Tuple[List[Tuple[float, ...]], str]:
    """Per-run tuples of the lists when their lengths agree (``'per run'``), else one tuple of
    their means (``'means'``)."""
    if len({len(values) for values in lists}) == 1:
        return list(zip(*[[float(v) for v in values] for values in lists])), "per run"
    return [tuple(float(np.mean(values)) for values in lists)], "means"


def label_robust_scores(whole_acc: float, set_hard_accs: Sequence[float], set_accs: Sequence[float],
                        random_accs: Sequence[float], settings: ScoreSettings = ScoreSettings()) -> dict:
    """HLR, IOR, alpha and LRS of one set under one label regime, as DD-Ranking reports them:
    computed per run ``i`` (set hard-label run ``i``, set run ``i``, random run ``i``; the whole
    dataset's mean accuracy a constant) and averaged, or from the mean accuracies when the run
    counts differ.

    Args:
        whole_acc: mean accuracy in [0, 1] of the whole-dataset networks (NaN when unknown).
        set_hard_accs: accuracies in [0, 1] of the set trained with hard labels (empty when unknown).
        set_accs: accuracies of the set under the regime scored (the same list under ``hard``).
        random_accs: accuracies of random real images of the same ipc under the same regime.
        settings: lambda and units.

    Returns:
        ``{"hlr", "ior", "alpha", "lrs", "lrs_std", "pairing", "runs"}``: HLR and IOR in percentage
        points whatever ``settings.units`` (what tables show), alpha and LRS computed in
        ``settings.units``; NaN where an input is missing: IOR needs ``set_accs`` and ``random_accs``,
        HLR needs ``whole_acc`` and ``set_hard_accs``, alpha and LRS need both).
    """
    nan = float("nan")
    out = {"hlr": nan, "ior": nan, "alpha": nan, "lrs": nan, "lrs_std": nan, "pairing": None, "runs": 0}
    scale = settings.scale
    have_ior = len(set_accs) > 0 and len(random_accs) > 0
    have_hlr = len(set_hard_accs) > 0 and whole_acc is not None and math.isfinite(float(whole_acc))
    if have_ior:  # the difference of means, which is the mean of the per-run differences when runs pair
        out["ior"] = improvement_over_random(float(np.mean(set_accs)), float(np.mean(random_accs)))
    if have_hlr:
        out["hlr"] = hard_label_recovery(whole_acc, float(np.mean(set_hard_accs)))
    if have_ior and have_hlr:
        runs, pairing = _runs(set_hard_accs, set_accs, random_accs)
        scored = [label_robust_score(hard_label_recovery(whole_acc, hard, scale),
                                     improvement_over_random(own, rdm, scale), settings.lrs_lambda)
                  for hard, own, rdm in runs]
        out["alpha"] = _mean_std([alpha for alpha, _ in scored])[0]
        out["lrs"], out["lrs_std"] = _mean_std([lrs for _, lrs in scored])
        out["pairing"], out["runs"] = pairing, len(runs)
    return out


def augmentation_robust_scores(set_aug: Sequence[float], random_aug: Sequence[float], set_plain: Sequence[float],
                               random_plain: Sequence[float], settings: ScoreSettings = ScoreSettings()) -> dict:
    """beta and ARS of one set under one label regime (per run when the four run counts agree, else
    from the means), as DD-Ranking reports them.

    Args:
        set_aug, random_aug: accuracies in [0, 1] with the protocol's training augmentation.
        set_plain, random_plain: the same without any training augmentation.

    Returns:
        ``{"gain_aug", "gain_plain", "beta", "ars", "ars_std", "pairing", "runs"}``: the gains in
        percentage points, beta and ARS computed in ``settings.units`` (NaN and ``None`` when a
        list is empty).
    """
    nan = float("nan")
    if not all(len(values) for values in (set_aug, random_aug, set_plain, random_plain)):
        return {"gain_aug": nan, "gain_plain": nan, "beta": nan, "ars": nan, "ars_std": nan, "pairing": None, "runs": 0}
    runs, pairing = _runs(set_aug, random_aug, set_plain, random_plain)
    scale = settings.scale
    gains = [(improvement_over_random(sa, ra, scale), improvement_over_random(sp, rp, scale))
             for sa, ra, sp, rp in runs]
    scored = [augmentation_robust_score(aug, plain, settings.ars_lambda) for aug, plain in gains]
    ars, ars_std = _mean_std([value for _, value in scored])
    points = 100.0 / scale
    return {"gain_aug": points * _mean_std([g for g, _ in gains])[0],
            "gain_plain": points * _mean_std([p for _, p in gains])[0],
            "beta": _mean_std([beta for beta, _ in scored])[0], "ars": ars, "ars_std": ars_std,
            "pairing": pairing, "runs": len(runs)}


# -- finding the rows each score needs in a comparison table ----------------------------------------

SCORED_KINDS = ("synthetic",)  # rows that get scores; random / whole / schedule rows are references


def _regime(row) -> str:
    return getattr(row, "labels", None) or "hard"


def _augmented(row) -> bool:
    return getattr(row, "augmented", True) is not False


def _same_set(row, other) -> bool:
    """Whether two rows are one saved set under different label regimes or augmentation."""
    return (other.kind == row.kind and other.path == row.path and other.ipc == row.ipc
            and other.method == row.method)


def _find(rows, predicate) -> Optional[object]:
    return next((candidate for candidate in rows if predicate(candidate)), None)


def _accs(row, model: str) -> List[float]:
    if row is None or model not in row.results:
        return []
    return list(row.results[model].get("accs") or [])


def row_scores(rows: Sequence, row, model: str, settings: ScoreSettings = ScoreSettings()) -> Dict[str, object]:
    """The scores of one (row, model) of a comparison table, found among ``rows``
    (``sets.comparison.Row``: ``kind``, ``ipc``, ``path``, ``method``, ``labels``, ``augmented``,
    ``results[model]['accs']``):

    * IOR against the random row of the same ipc, label regime and augmentation;
    * HLR from the whole-dataset row and the same set's augmented ``hard``-regime row;
    * LRS from both (:func:`label_robust_scores`);
    * ARS (augmented rows only) from the same set's and the random row's rows without augmentation
      under the same regime (:func:`augmentation_robust_scores`).

    Returns:
        ``{"ior", "hlr", "alpha", "lrs", "lrs_std", "ars", "ars_std", "beta"}`` (NaN where not
        available; all NaN for rows that are not synthetic sets).
    """
    nan = float("nan")
    empty = {"ior": nan, "hlr": nan, "alpha": nan, "lrs": nan, "lrs_std": nan, "ars": nan, "ars_std": nan,
             "beta": nan}
    if row.kind not in SCORED_KINDS or model not in row.results:
        return empty
    regime, augmented = _regime(row), _augmented(row)

    def random_of(aug: bool):
        return _find(rows, lambda r: r.kind == "random" and r.ipc == row.ipc and _regime(r) == regime
                     and _augmented(r) == aug)

    hard = _find(rows, lambda r: _same_set(row, r) and _regime(r) == "hard" and _augmented(r) == augmented)
    whole = _find(rows, lambda r: r.kind == "whole")
    whole_acc = whole.results[model]["mean"] if whole is not None and model in whole.results else nan
    scores = {**empty, **{key: value for key, value in label_robust_scores(
        whole_acc, _accs(hard, model), _accs(row, model), _accs(random_of(augmented), model), settings).items()
        if key in empty}}
    if augmented:
        plain = _find(rows, lambda r: _same_set(row, r) and _regime(r) == regime and not _augmented(r))
        ars = augmentation_robust_scores(_accs(row, model), _accs(random_of(True), model), _accs(plain, model),
                                         _accs(random_of(False), model), settings)
        scores.update({key: ars[key] for key in ("ars", "ars_std", "beta")})
    return scores


def _number(value, digits: int, signed: bool = False) -> str:
    """``value`` with ``digits`` decimals (a sign when ``signed``); ``-`` for None or NaN."""
    if value is None or math.isnan(float(value)):
        return "-"
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def format_scores(frame, settings: ScoreSettings = ScoreSettings()) -> str:
    """The scores of a comparison's synthetic rows as a Markdown table (``tables.format_table``):
    one line per (set row, model) with HLR and IOR in points and LRS (and ARS when computed) as
    ``mean ± std`` over runs, then a legend naming lambda and the units; ``''`` when no HLR,
    LRS or ARS is known (IOR alone is in the accuracy table already).

    Args:
        frame: ``sets.comparison.long_table`` (columns name, kind, model, hlr, ior, lrs, lrs_std,
            ars, ars_std).
        settings: the settings the scores were computed with (for the legend).
    """
    scored = frame[frame["kind"].isin(SCORED_KINDS)] if len(frame) else frame
    known = [column for column in ("hlr", "lrs", "ars") if len(scored) and scored[column].notna().any()]
    if not known:
        return ""
    with_ars = "ars" in known
    header = ["set", "model", "HLR", "IOR", "LRS", *(["ARS"] if with_ars else [])]
    body = []
    for record in scored.itertuples():
        line = [record.name, record.model, _number(record.hlr, 2), _number(record.ior, 2, signed=True),
                "-" if math.isnan(record.lrs) else f"{_number(record.lrs, 4)} ± {_number(record.lrs_std, 4)}"]
        if with_ars:
            line.append("-" if math.isnan(record.ars) else f"{_number(record.ars, 4)} ± {_number(record.ars_std, 4)}")
        body.append(line)
    legend = (f"DD-Ranking scores: HLR = whole dataset - set with hard labels, IOR = set - random real (same labels), "
              f"points; LRS = (e^a - e^-1)/(e - e^-1), a = {settings.lrs_lambda:g}·IOR - {1 - settings.lrs_lambda:g}·HLR"
              + (f"; ARS the same of b = {settings.ars_lambda:g}·IOR(aug) + {1 - settings.ars_lambda:g}·IOR(no aug)"
                 if with_ars else "")
              + f"; accuracies in {settings.units} (mean ± std over runs)")
    return tables.format_table(header, body, markdown=True) + "\n" + legend
