"""The consortium states each silo's guarantee only as the plan states it: the model card and
the run report compute it from the plan for the rounds the run finished."""

from __future__ import annotations

from pathlib import Path

from aggregator.model_registry import model_card
from aggregator.report import _privacy
from training_plan import parse_plan
from training_plan.privacy import plan_budget

PLAN = (
    "title: dp\nmodel: {name: resnet10}\npreprocessing: {input_size: 32}\n"
    "federation: {rounds: 3, min_silos: 3}\n"
)
DP = PLAN + "privacy: {target_epsilon: 3, sampling_rate: 0.25}\n"


def test_model_card_states_the_guarantee_for_the_rounds_trained() -> None:
    plan = parse_plan(DP)
    card = model_card(plan, "run-x", [{"participants": 3}, {"participants": 3}])
    after_two = plan_budget(plan).epsilon_after(2)
    assert "## Differential privacy (as the plan states it)" in card
    assert f"patient-level ({after_two:.2f}, 1e-05)-differential privacy" in card
    assert "after 2 round(s)" in card and "target was epsilon 3 over 3 round(s)" in card
    assert "counters (examples, loss, evaluation metrics) carry no DP noise" in card
    plain = model_card(parse_plan(PLAN), "run-y", [{"participants": 3}])
    assert "no differential-privacy guarantee" in plain


def test_report_reads_the_runs_plan(tmp_path: Path) -> None:
    assert _privacy(tmp_path, 1) == "unknown (the run folder holds no plan.yaml)"
    (tmp_path / "plan.yaml").write_text(DP)
    assert _privacy(tmp_path, 3).startswith(
        f"patient-level ({plan_budget(parse_plan(DP)).planned_epsilon:.2f}, 1e-05)"
    )
