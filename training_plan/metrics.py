"""Federated evaluation as sums: which counters a silo computes, and the metrics they give.

Every metric the consortium learns is a function of SUMS over silos, so that secure aggregation
can hand the server the sums and nothing else (the plain path adds the same counters itself).
This module is the one place that says, for a plan, which counters exist
(:func:`counter_names`), how a silo fills them from its predictions
(:func:`classification_counters`, :func:`segmentation_counters`) and how summed counters turn
into metrics (:func:`metrics_from_sums`). Both the silo and the server import it: the names are
part of the contract, like training_plan.wire.

Classification (one score s in [0, 1] per image, decision s >= 0.5):

- ``examples``, ``loss_sum`` (binary cross-entropy), ``true_pos``, ``false_pos``, ``true_neg``,
  ``false_neg``: always counted (loss, accuracy, sensitivity, specificity).
- ``auc``: ``auc_pos_###`` / ``auc_neg_###``, how many positive / negative images scored in
  each of ``evaluation.auc_bins`` equal-width bins. AUC is not a sum of per-silo AUCs; from the
  pooled histograms it is exact up to pairs of a positive and a negative in the SAME bin,
  counted as half: ``|auc_hist - auc| <= 1/2 sum_b pos_b neg_b / (P N)``, reported as
  ``auc-bin-error``. What it reveals: the pooled score histogram of each class over all
  silos (under secure aggregation never one silo's), which is more than a single AUC number.
- ``ece``: ``ece_n_##``, ``ece_conf_##``, ``ece_pos_##``: per confidence bin, the count, the sum
  of scores and the number of positives; ECE = sum_b |conf_b - pos_b| / N (calibration of the
  positive-class probability).

Segmentation (one probability per voxel, mask = p >= 0.5; per case = one volume):

- ``examples`` (cases), ``loss_sum`` (per-case training loss).
- ``dice``: ``dice_num`` = sum 2|P∩T| and ``dice_den`` = sum |P|+|T| over all voxels of all
  cases (global Dice), and ``dice_case_sum`` (sum of per-case Dice; a case with an empty mask
  and an empty prediction scores 1) -> ``dice`` and ``dice-case`` (mean per case).
- ``hd95``: ``hd95_sum`` (per-case 95th-percentile Hausdorff distance in mm) and
  ``hd95_cases`` (cases where it is defined: prediction and mask both non-empty) -> ``hd95``
  (mean over those cases) and ``hd95-defined`` (their fraction of all cases).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from training_plan.schema import TrainingPlan

BASE_COUNTERS = ("examples", "loss_sum")
CONFUSION_COUNTERS = ("true_pos", "false_pos", "true_neg", "false_neg")
DICE_COUNTERS = ("dice_num", "dice_den", "dice_case_sum")
HD95_COUNTERS = ("hd95_sum", "hd95_cases")
SPLITS = ("validation", "test")
"""The splits a silo evaluates on: validation each round, test once after the last round."""
_PREFIX = {"validation": "eval", "test": "test"}


def metric_prefix(split: str) -> str:
    """Key prefix of a split's metrics in records and events: ``eval-`` or ``test-``."""
    return _PREFIX[split]


def auc_counter_names(bins: int) -> tuple[str, ...]:
    """Names of the per-class score histogram counters (positives first)."""
    return tuple(f"auc_pos_{i:03d}" for i in range(bins)) + tuple(
        f"auc_neg_{i:03d}" for i in range(bins)
    )


def ece_counter_names(bins: int) -> tuple[str, ...]:
    """Names of the calibration counters: per bin count, score sum, positives."""
    return tuple(f"ece_{kind}_{i:02d}" for kind in ("n", "conf", "pos") for i in range(bins))


def counter_names(plan: TrainingPlan) -> tuple[str, ...]:
    """Every counter a silo sums for the plan's evaluation, in a fixed order."""
    metrics = set(plan.evaluation.metrics)
    if plan.task == "segmentation":
        names = BASE_COUNTERS + DICE_COUNTERS
        return names + (HD95_COUNTERS if "hd95" in metrics else ())
    names = BASE_COUNTERS + CONFUSION_COUNTERS
    if "auc" in metrics:
        names += auc_counter_names(plan.evaluation.auc_bins)
    if "ece" in metrics:
        names += ece_counter_names(plan.evaluation.ece_bins)
    return names


def _bin_index(scores: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1]; a score of exactly 1 falls in the last bin."""
    return np.clip(np.floor(scores * bins).astype(np.int64), 0, bins - 1)


def classification_counters(
    plan: TrainingPlan, scores: np.ndarray, truth: np.ndarray
) -> dict[str, float]:
    """A silo's counters from its positive-class probabilities and 0/1 labels."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(truth).astype(bool).ravel()
    eps = 1e-7
    clipped = np.clip(scores, eps, 1 - eps)
    decided = scores >= 0.5
    out = {
        "examples": float(len(truth)),
        "loss_sum": float(-(truth * np.log(clipped) + (~truth) * np.log(1 - clipped)).sum()),
        "true_pos": float((decided & truth).sum()),
        "false_pos": float((decided & ~truth).sum()),
        "true_neg": float((~decided & ~truth).sum()),
        "false_neg": float((~decided & truth).sum()),
    }
    metrics = set(plan.evaluation.metrics)
    if "auc" in metrics:
        bins = plan.evaluation.auc_bins
        index = _bin_index(scores, bins)
        pos = np.bincount(index[truth], minlength=bins)
        neg = np.bincount(index[~truth], minlength=bins)
        values = np.concatenate([pos, neg])
        out.update(zip(auc_counter_names(bins), map(float, values), strict=True))
    if "ece" in metrics:
        bins = plan.evaluation.ece_bins
        index = _bin_index(scores, bins)
        n = np.bincount(index, minlength=bins)
        conf = np.bincount(index, weights=scores, minlength=bins)
        pos = np.bincount(index, weights=truth.astype(np.float64), minlength=bins)
        values = np.concatenate([n, conf, pos])
        out.update(zip(ece_counter_names(bins), map(float, values), strict=True))
    return out


def segmentation_counters(
    plan: TrainingPlan,
    *,
    loss: Iterable[float],
    intersection: Iterable[float],
    predicted: Iterable[float],
    target: Iterable[float],
    hd95_mm: Iterable[float],
) -> dict[str, float]:
    """A silo's counters from per-case values (voxel counts, loss, HD95 in mm or NaN)."""
    inter = np.asarray(list(intersection), dtype=np.float64)
    pred = np.asarray(list(predicted), dtype=np.float64)
    targ = np.asarray(list(target), dtype=np.float64)
    den = pred + targ
    case_dice = np.where(den > 0, 2 * inter / np.maximum(den, 1), 1.0)
    out = {
        "examples": float(len(inter)),
        "loss_sum": float(np.sum(list(loss), dtype=np.float64)),
        "dice_num": float(2 * inter.sum()),
        "dice_den": float(den.sum()),
        "dice_case_sum": float(case_dice.sum()),
    }
    if "hd95" in plan.evaluation.metrics:
        hd = np.asarray(list(hd95_mm), dtype=np.float64)
        defined = np.isfinite(hd)
        out["hd95_sum"] = float(hd[defined].sum())
        out["hd95_cases"] = float(defined.sum())
    return out


def sum_counters(plan: TrainingPlan, silos: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Add the counters of several silos (what secure aggregation does inside the mask)."""
    names = counter_names(plan)
    total = dict.fromkeys(names, 0.0)
    for counters in silos:
        missing = [n for n in names if n not in counters]
        if missing:
            raise ValueError(f"evaluation counters lack {missing[:3]} (the plan asks for them)")
        for name in names:
            total[name] += float(counters[name])
    return total


def histogram_auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUC from per-bin counts of positives and negatives (ties in a bin count half), and the
    bound on its difference to the exact AUC; (NaN, NaN) when a class is absent."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return float("nan"), float("nan")
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    auc = float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))
    error = float(0.5 * (pos * neg).sum() / (n_pos * n_neg))
    return auc, error


def metrics_from_sums(plan: TrainingPlan, sums: Mapping[str, float]) -> dict[str, float]:
    """Metrics (unprefixed names) from counters summed over silos.

    Classification always gives loss, accuracy, sensitivity, specificity (the confusion cells
    are always counted), plus auc and auc-bin-error, ece when the plan asks. Segmentation gives
    loss, dice, dice-case, plus hd95 and hd95-defined when the plan asks. A metric whose
    denominator is zero (e.g. AUC without positives) is left out, never reported as 0.
    """
    names = counter_names(plan)
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"evaluation sums lack {missing[:3]} (the plan asks for them)")
    s = {n: float(sums[n]) for n in names}
    examples = s["examples"]
    out = {"loss": s["loss_sum"] / examples if examples > 0 else float("nan")}
    metrics = set(plan.evaluation.metrics)
    if plan.task == "segmentation":
        out["dice"] = s["dice_num"] / s["dice_den"] if s["dice_den"] > 0 else 1.0
        out["dice-case"] = s["dice_case_sum"] / examples if examples > 0 else float("nan")
        if "hd95" in metrics:
            cases = s["hd95_cases"]
            out["hd95"] = s["hd95_sum"] / cases if cases > 0 else float("nan")
            out["hd95-defined"] = cases / examples if examples > 0 else float("nan")
        return _defined(out)
    tp, fp, tn, fn = (s[n] for n in CONFUSION_COUNTERS)
    out["accuracy"] = (tp + tn) / examples if examples > 0 else float("nan")
    out["sensitivity"] = tp / (tp + fn) if tp + fn > 0 else float("nan")
    out["specificity"] = tn / (tn + fp) if tn + fp > 0 else float("nan")
    if "auc" in metrics:
        bins = plan.evaluation.auc_bins
        values = np.array([s[n] for n in auc_counter_names(bins)])
        out["auc"], out["auc-bin-error"] = histogram_auc(values[:bins], values[bins:])
    if "ece" in metrics:
        bins = plan.evaluation.ece_bins
        values = np.array([s[n] for n in ece_counter_names(bins)]).reshape(3, bins)
        n, conf, pos = values
        out["ece"] = float(np.abs(conf - pos).sum() / n.sum()) if n.sum() > 0 else float("nan")
    return _defined(out)


def _defined(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if math.isfinite(v)}
