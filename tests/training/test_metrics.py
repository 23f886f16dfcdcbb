"""Evaluation as sums (training_plan.metrics): metrics computed from counters summed over silos
equal the metrics computed directly on the pooled predictions (sklearn, MONAI), within the
documented bin bound for AUC; plan and policy checks of the metric choice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from training_plan import parse_plan
from training_plan.errors import PlanValidationError
from training_plan.metrics import (
    classification_counters,
    counter_names,
    histogram_auc,
    metrics_from_sums,
    segmentation_counters,
    sum_counters,
)

CLS = (
    "title: m\nmodel: {name: resnet10}\npreprocessing: {input_size: 32}\n"
    "federation: {rounds: 2, min_silos: 3}\n"
)
SEG = (
    "title: s\ntask: segmentation\nmodel: {name: unet}\npreprocessing: {input_size: 16}\n"
    "federation: {rounds: 2, min_silos: 3}\n"
)


def _plan(base: str, evaluation: str = "", training: str = ""):
    text = base + (f"evaluation: {evaluation}\n" if evaluation else "")
    return parse_plan(text + (f"training: {training}\n" if training else ""))


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores that separate the classes imperfectly, with some exact 0, 0.5 and 1 values."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.35
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.3 * truth)))
    scores[:3] = [0.0, 0.5, 1.0]
    return scores, truth


def _silo_sums(plan, scores, truth, cuts=(0.2, 0.55)):
    """Counters of three silos holding unequal parts of the data, summed."""
    bounds = [0, int(cuts[0] * len(scores)), int(cuts[1] * len(scores)), len(scores)]
    silos = [
        classification_counters(plan, scores[a:b], truth[a:b])
        for a, b in itertools.pairwise(bounds)
    ]
    return sum_counters(plan, silos)


@pytest.mark.parametrize("bins", [10, 100, 1000])
def test_auc_from_histograms_is_sklearn_auc_within_the_bin_bound(bins: int) -> None:
    from sklearn.metrics import roc_auc_score

    plan = _plan(CLS, f"{{metrics: [loss, auc], auc_bins: {bins}}}")
    scores, truth = _scores(600, seed=bins)
    metrics = metrics_from_sums(plan, _silo_sums(plan, scores, truth))
    exact = roc_auc_score(truth, scores)
    assert abs(metrics["auc"] - exact) <= metrics["auc-bin-error"] + 1e-12
    assert metrics["auc-bin-error"] <= 0.5 / bins * 10  # finer bins, tighter bound
    assert 0.6 < exact < 0.95  # the data are neither trivial nor random


def test_auc_is_exact_when_no_positive_and_negative_share_a_bin() -> None:
    from sklearn.metrics import roc_auc_score

    plan = _plan(CLS, "{metrics: [auc], auc_bins: 10}")
    scores = np.array([0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
    truth = np.array([0, 1, 0, 0, 1, 0, 1, 1, 0, 1], bool)
    metrics = metrics_from_sums(plan, _silo_sums(plan, scores, truth))
    assert metrics["auc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert metrics["auc-bin-error"] == 0.0


def test_histogram_auc_without_one_class_is_undefined_and_left_out() -> None:
    assert all(np.isnan(histogram_auc(np.array([3.0, 1.0]), np.zeros(2))))
    plan = _plan(CLS, "{metrics: [loss, auc, ece]}")
    scores = np.array([0.2, 0.7, 0.9])
    metrics = metrics_from_sums(plan, classification_counters(plan, scores, np.ones(3, bool)))
    assert "auc" not in metrics and "specificity" not in metrics
    assert metrics["sensitivity"] == pytest.approx(2 / 3)


def test_confusion_metrics_and_loss_from_sums_equal_sklearn() -> None:
    from sklearn.metrics import accuracy_score, log_loss, recall_score

    plan = _plan(CLS)
    scores, truth = _scores(300, seed=5)
    scores = np.clip(scores, 1e-3, 1 - 1e-3)
    metrics = metrics_from_sums(plan, _silo_sums(plan, scores, truth))
    decided = scores >= 0.5
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, decided))
    assert metrics["sensitivity"] == pytest.approx(recall_score(truth, decided))
    assert metrics["specificity"] == pytest.approx(recall_score(~truth, ~decided))
    assert metrics["loss"] == pytest.approx(log_loss(truth, scores), rel=1e-9)


@pytest.mark.parametrize("bins", [5, 15])
def test_ece_from_sums_equals_the_pooled_calibration_error(bins: int) -> None:
    plan = _plan(CLS, f"{{metrics: [ece], ece_bins: {bins}}}")
    scores, truth = _scores(500, seed=11)
    metrics = metrics_from_sums(plan, _silo_sums(plan, scores, truth, cuts=(0.1, 0.7)))
    # direct: reliability of the positive-class probability, bin by bin on the pooled data
    edges = np.linspace(0, 1, bins + 1)
    expected = 0.0
    for b in range(bins):
        inside = (scores >= edges[b]) & (scores < edges[b + 1])
        if b == bins - 1:
            inside |= scores == 1.0
        if inside.any():
            expected += inside.mean() * abs(scores[inside].mean() - truth[inside].mean())
    assert metrics["ece"] == pytest.approx(expected, abs=1e-12)
    # a calibrated model (labels drawn with the scores' probability) has a small ECE
    rng = np.random.default_rng(0)
    calibrated = rng.random(20_000)
    labels = rng.random(20_000) < calibrated
    ece = metrics_from_sums(plan, classification_counters(plan, calibrated, labels))["ece"]
    assert ece < 0.03 < metrics["ece"]


def test_counter_names_follow_the_plan() -> None:
    basic = counter_names(_plan(CLS))
    assert basic == (
        "examples",
        "loss_sum",
        "true_pos",
        "false_pos",
        "true_neg",
        "false_neg",
    )
    full = counter_names(_plan(CLS, "{metrics: [auc, ece], auc_bins: 20, ece_bins: 10}"))
    assert len(full) == 6 + 2 * 20 + 3 * 10
    assert "auc_pos_019" in full and "auc_neg_000" in full and "ece_conf_09" in full
    assert counter_names(_plan(SEG)) == (
        "examples",
        "loss_sum",
        "dice_num",
        "dice_den",
        "dice_case_sum",
    )
    assert counter_names(_plan(SEG, "{metrics: [dice, hd95]}"))[-2:] == ("hd95_sum", "hd95_cases")


def test_sums_missing_a_counter_are_rejected() -> None:
    plan = _plan(CLS, "{metrics: [auc]}")
    counters = classification_counters(plan, np.array([0.1, 0.9]), np.array([0, 1]))
    del counters["auc_pos_042"]
    with pytest.raises(ValueError, match="auc_pos_042"):
        metrics_from_sums(plan, counters)
    with pytest.raises(ValueError, match="auc_pos_042"):
        sum_counters(plan, [counters])


# ------------------------------------------------------------------ segmentation
def _ball(shape: int, center: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices((shape,) * 3).astype(np.float64)
    dist = sum((grid[i] - center[i]) ** 2 for i in range(3))
    return dist <= radius**2


def _cases() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions and masks of 6 cases: overlapping balls, an empty prediction, a case with
    an empty mask and an empty prediction, anisotropic spacing."""
    preds, masks = [], []
    for i in range(6):
        masks.append(_ball(20, (10, 10, 10), 4 + i % 3))
        preds.append(_ball(20, (10 + i % 2, 10, 9 + i % 3), 3 + i % 4))
    preds[3][:] = False  # HD95 undefined, Dice 0
    masks[5][:] = False
    preds[5][:] = False  # both empty: Dice 1, HD95 undefined
    spacing = np.array([[1.0, 1.0, 1.0], [0.8, 0.8, 2.5], [1.5, 1.0, 1.0]] * 2)
    return np.stack(preds), np.stack(masks), spacing


def test_dice_and_hd95_from_sums_equal_monai_over_three_silos() -> None:
    from monai.metrics import compute_dice, compute_hausdorff_distance

    from silo_client.training import hd95_mm

    plan = _plan(SEG, "{metrics: [loss, dice, hd95]}")
    preds, masks, spacing = _cases()
    hd = [hd95_mm(p, m, s) for p, m, s in zip(preds, masks, spacing, strict=True)]
    per_case = {
        "loss": [0.5] * 6,
        "intersection": [(p & m).sum() for p, m in zip(preds, masks, strict=True)],
        "predicted": [p.sum() for p in preds],
        "target": [m.sum() for m in masks],
        "hd95_mm": hd,
    }
    silos = [
        segmentation_counters(plan, **{k: v[a:b] for k, v in per_case.items()})
        for a, b in ((0, 1), (1, 4), (4, 6))
    ]
    metrics = metrics_from_sums(plan, sum_counters(plan, silos))

    # global Dice: all voxels of all cases pooled
    pooled = 2 * (preds & masks).sum() / (preds.sum() + masks.sum())
    assert metrics["dice"] == pytest.approx(pooled, rel=1e-12)
    # mean per-case Dice: MONAI's, with the empty/empty case counted as 1 (MONAI says NaN)
    monai_dice = compute_dice(
        torch.as_tensor(preds[:, None]), torch.as_tensor(masks[:, None]), include_background=True
    ).reshape(-1)
    monai_dice = torch.where(torch.isnan(monai_dice), torch.tensor(1.0), monai_dice)
    assert metrics["dice-case"] == pytest.approx(float(monai_dice.mean()), rel=1e-6)
    # HD95: mean over the 4 cases where both masks are non-empty, MONAI per case with spacing
    expected = [
        float(
            compute_hausdorff_distance(
                torch.as_tensor(preds[i][None, None]),
                torch.as_tensor(masks[i][None, None]),
                include_background=True,
                percentile=95,
                spacing=list(spacing[i]),
            ).reshape(-1)[0]
        )
        for i in (0, 1, 2, 4)
    ]
    assert metrics["hd95"] == pytest.approx(np.mean(expected), rel=1e-9)
    assert metrics["hd95-defined"] == pytest.approx(4 / 6)
    assert metrics["loss"] == pytest.approx(0.5)


def test_hd95_is_in_millimetres() -> None:
    from silo_client.training import hd95_mm

    inner, outer = _ball(32, (16, 16, 16), 5), _ball(32, (16, 16, 16), 9)
    iso = hd95_mm(inner, outer, np.array([1.0, 1.0, 1.0]))
    assert 3.0 <= iso <= 4.5  # radii differ by 4 voxels
    assert hd95_mm(inner, outer, np.array([2.0, 2.0, 2.0])) == pytest.approx(2 * iso)
    assert np.isnan(hd95_mm(inner, np.zeros_like(inner), np.ones(3)))


# ------------------------------------------------------------------ the plan's choice
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CLS + "evaluation: {metrics: [loss, f1]}\n", "evaluation.metrics"),
        (CLS + "evaluation: {metrics: [loss, dice]}\n", "'dice' is not a classification metric"),
        (SEG + "evaluation: {metrics: [dice, auc]}\n", "'auc' is not a segmentation metric"),
        (SEG + "evaluation: {metrics: [accuracy]}\n", "'accuracy' is not a segmentation"),
        (CLS.replace("resnet10", "unet"), "unet is a segmentation network"),
        (SEG.replace("unet", "resnet10"), "resnet10 is a classification network"),
        (SEG.replace("input_size: 16", "input_size: 20"), "must be a multiple of 8"),
        (SEG.replace("unet", "basicunet"), "too small for basicunet"),
        (SEG.replace("input_size: 16", "input_size: 512"), "at most 256"),
        (CLS + "training: {validation_fraction: 0.5, test_fraction: 0.4}\n", "under 20%"),
        (CLS + "training: {loss: dice}\n", "does not fit a classification plan"),
        (SEG + "training: {loss: bce}\n", "does not fit a segmentation plan"),
        (CLS + "evaluation: {metrics: [auc], auc_bins: 5}\n", "auc_bins"),
    ],
)
def test_plans_that_ask_for_the_wrong_metric_model_or_split_are_refused(
    text: str, message: str
) -> None:
    with pytest.raises(PlanValidationError, match=message):
        parse_plan(text)


def test_task_defaults() -> None:
    seg = _plan(SEG)
    assert seg.evaluation.metrics == ["loss", "dice"] and seg.loss_name == "dice"
    cls = _plan(CLS)
    assert cls.evaluation.metrics == ["loss", "accuracy"] and cls.loss_name == "bce"
    assert cls.training.test_fraction == 0.0
    assert _plan(SEG, training="{loss: dice-ce}").loss_name == "dice-ce"


def test_site_policy_can_forbid_score_histograms() -> None:
    from silo_client.governance.policy import SitePolicy

    auc = _plan(CLS, "{metrics: [loss, auc]}")
    strict = SitePolicy(require_signed_plans=False, allow_score_histograms=False)
    problems = strict.violations(auc, None)
    assert any("asks for auc" in p and "allow_score_histograms" in p for p in problems)
    assert strict.violations(_plan(CLS, "{metrics: [loss, ece]}"), None) == []
    assert SitePolicy(require_signed_plans=False).violations(auc, None) == []


def test_silos_evaluate_only_validation_or_the_final_test_split() -> None:
    from silo_client.errors import PlanRefused
    from silo_client.local_round import check_split

    with_test = _plan(CLS, training="{test_fraction: 0.2}")
    check_split(with_test, "validation", 1)
    check_split(with_test, "test", 2)
    with pytest.raises(PlanRefused, match="only on validation or test"):
        check_split(with_test, "train", 2)
    with pytest.raises(PlanRefused, match="once, after the last round"):
        check_split(with_test, "test", 1)
    with pytest.raises(PlanRefused, match="holds none out"):
        check_split(_plan(CLS), "test", 2)


def test_split_groups_stay_on_one_side_and_test_does_not_move_with_validation() -> None:
    from silo_client.local_data import group_split

    groups = [f"p{i // 3}" for i in range(60)]  # 20 patients, 3 volumes each
    kept, held = group_split(groups, 0.25, seed=4)
    assert sorted(kept + held) == list(range(60))
    assert {groups[i] for i in kept}.isdisjoint({groups[i] for i in held})
    assert len({groups[i] for i in held}) == 5
    assert group_split(groups, 0.25, seed=4) == (kept, held)
    assert group_split(groups, 0.0, seed=4) == (list(range(60)), [])
    assert len(group_split(["a", "b"], 0.01, seed=0)[1]) == 1
