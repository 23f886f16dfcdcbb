"""`silo plan review`: what hospital IT reads before approving, including what metrics reveal."""

from __future__ import annotations

from silo_client.cli_governance import review_text
from training_plan import parse_plan

BASE = "title: t\nmodel: {name: resnet10}\nfederation: {min_silos: 3}\n"


def test_review_says_what_leaves_and_what_auc_reveals() -> None:
    plan = parse_plan(BASE + "evaluation: {metrics: [loss, auc, ece], auc_bins: 50}\n")
    text = review_text(plan, None, [])
    assert "MASKED (secure aggregation)" in text
    assert "NOT SIGNED" in text
    evaluation = next(line for line in text.splitlines() if line.startswith("Evaluation"))
    assert "50-bin histogram of the model's scores per class" in evaluation
    assert "15 confidence bins" in evaluation
    assert text.splitlines()[-1] == "Site policy   within this site's policy"


def test_review_of_counts_only_metrics_reveals_no_histogram() -> None:
    plan = parse_plan(BASE + "evaluation: {metrics: [loss, accuracy]}\n")
    text = review_text(plan, None, ["this site requires secure aggregation"])
    assert "histogram" not in text
    assert "OUT OF POLICY: this site requires secure aggregation" in text


def test_review_of_plain_plan_says_updates_leave_in_the_clear() -> None:
    plan = parse_plan(BASE + "secure_aggregation: {enabled: false}\n")
    assert "IN THE CLEAR" in review_text(plan, None, [])
