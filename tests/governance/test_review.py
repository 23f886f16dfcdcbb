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


def test_review_states_the_collusion_bound_and_the_sites_threshold() -> None:
    from silo_client.governance.policy import SitePolicy

    plan = parse_plan(BASE.replace("min_silos: 3", "min_silos: 4"))
    line = next(
        x for x in review_text(plan, None, [], SitePolicy()).splitlines() if x.startswith("Coll")
    )
    assert "n=4 silos with threshold t=3" in line and "2t-n=2 colluding" in line
    assert "tolerates 1, so it requires t >= 3 at n=4" in line and "TOO LOW" not in line
    strict = review_text(plan, None, [], SitePolicy(tolerated_colluders=2))
    assert "tolerates 2, so it requires t >= 4 at n=4" in strict
    assert "THIS PLAN'S THRESHOLD IS TOO LOW" in strict
    fixed = parse_plan(
        BASE.replace("min_silos: 3", "min_silos: 4") + "secure_aggregation: {threshold: 4}\n"
    )
    assert "TOO LOW" not in review_text(fixed, None, [], SitePolicy(tolerated_colluders=2))
    plain = parse_plan(BASE + "secure_aggregation: {enabled: false}\n")
    assert "Collusion" not in review_text(plain, None, [])
