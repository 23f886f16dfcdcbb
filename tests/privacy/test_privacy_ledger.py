"""The privacy ledger: rounds past the plan's budget or the site's per-dataset maximum are
refused before any data is read, nothing stored is lost, every spend is in the audit chain, and
`silo privacy show` / `silo plan review` say what was spent and what remains."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from silo_client.governance.audit import AuditLog
from silo_client.governance.policy import SitePolicy, save_policy
from silo_client.governance.privacy_ledger import (
    PrivacyBudgetExceeded,
    PrivacyLedger,
    PrivacyLedgerError,
)
from training_plan import parse_plan, plan_hash
from training_plan.privacy import plan_budget

PLAN = (
    "title: dp\nmodel: {name: resnet10}\npreprocessing: {input_size: 32}\n"
    "training: {batch_size: 8, local_epochs: 1, seed: 3}\n"
    "federation: {rounds: 2, min_silos: 3}\n"
    "privacy: {target_epsilon: 4, sampling_rate: 0.5}\n"
)


def _charge(root: Path, plan, run_id: str, server_round: int, max_epsilon=None):
    return PrivacyLedger(root).charge_round(
        dataset="default",
        run_id=run_id,
        plan_hash=plan_hash(plan),
        budget=plan_budget(plan),
        server_round=server_round,
        max_epsilon=max_epsilon,
    )


def _rows(root: Path) -> list[tuple]:
    with sqlite3.connect(root / "governance" / "privacy.sqlite") as db:
        return db.execute("SELECT * FROM spends ORDER BY run_id").fetchall()


def test_round_past_the_plans_budget_is_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    plan = parse_plan(PLAN)
    budget = plan_budget(plan)
    first = _charge(tmp_path, plan, "run-1", 1)
    second = _charge(tmp_path, plan, "run-1", 2)
    assert (first.rounds_trained, second.rounds_trained) == (1, 2)
    assert second.epsilon == pytest.approx(budget.epsilon_after(2))
    assert second.first_at == first.first_at
    before = _rows(tmp_path)
    with pytest.raises(PrivacyBudgetExceeded, match="exceed the plan's target epsilon") as info:
        _charge(tmp_path, plan, "run-1", 3)  # a third round: past the plan's 2
    assert "4" not in str(info.value).split("epsilon")[-1]  # the server learns no ledger figure
    assert _rows(tmp_path) == before
    events = [e for e in AuditLog.of_home(tmp_path).entries() if e["event"].startswith("privacy")]
    assert [e["event"] for e in events] == ["privacy-spent", "privacy-spent", "privacy-refused"]
    assert "above the plan's target 4" in events[-1]["reason"]
    assert AuditLog.of_home(tmp_path).verify().ok


def test_site_maximum_counts_every_run_on_the_dataset(tmp_path: Path) -> None:
    plan = parse_plan(PLAN)
    budget = plan_budget(plan)
    maximum = budget.planned_epsilon + budget.epsilon_after(1) * 0.5  # one run and a bit
    _charge(tmp_path, plan, "run-1", 1, maximum)
    _charge(tmp_path, plan, "run-1", 2, maximum)
    before = _rows(tmp_path)
    with pytest.raises(PrivacyBudgetExceeded, match="this site's privacy budget"):
        _charge(tmp_path, plan, "run-2", 1, maximum)
    assert _rows(tmp_path) == before
    total = PrivacyLedger(tmp_path).total("default", maximum)
    assert total.runs == 1 and total.epsilon == pytest.approx(budget.planned_epsilon)
    assert total.remaining == pytest.approx(maximum - budget.planned_epsilon)


def test_a_damaged_ledger_is_one_clear_error_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "governance" / "privacy.sqlite"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database" * 100)
    before = path.read_bytes()
    with pytest.raises(PrivacyLedgerError, match=r"cannot be used.*restore it from backup"):
        _charge(tmp_path, parse_plan(PLAN), "run-1", 1)
    with pytest.raises(PrivacyLedgerError):
        PrivacyLedger(tmp_path).spends()
    assert path.read_bytes() == before


def test_policy_limits_plans_before_approval() -> None:
    plan = parse_plan(PLAN)
    assert (
        SitePolicy(privacy_max_epsilon=8, require_signed_plans=False).violations(plan, None) == []
    )
    problems = SitePolicy(
        privacy_max_epsilon=8,
        privacy_max_epsilon_by_dataset={"default": 2},
        require_signed_plans=False,
    ).violations(plan, None)
    assert problems == [
        "the plan's privacy target epsilon 4 exceeds this site's per-dataset maximum 2"
    ]
    plain = parse_plan(PLAN.replace("privacy: {target_epsilon: 4, sampling_rate: 0.5}\n", ""))
    required = SitePolicy(privacy_required=True, require_signed_plans=False)
    assert "requires patient-level differential privacy" in required.violations(plain, None)[0]
    tight_delta = SitePolicy(privacy_max_delta=1e-6, require_signed_plans=False)
    assert "delta 1e-05 exceeds" in tight_delta.violations(plan, None)[0]


def test_train_round_refuses_before_reading_data(silo_homes, monkeypatch) -> None:
    """The budget check runs before load_local_data: a refused round reads nothing."""
    import numpy as np

    from silo_client import local_round
    from silo_client.errors import PlanRefused
    from silo_client.training import float_state
    from training_plan.models import build_plan_model

    home = silo_homes[0]
    plan = parse_plan(PLAN.replace("rounds: 2", "rounds: 1"))
    arrays = float_state(build_plan_model(plan.model))
    update, result = local_round.train_round(home, plan, arrays, 1, run_id="r")
    assert result.steps == plan_budget(plan).steps_per_round
    assert any(np.abs(v).max() > 0 for v in update.values())

    def no_data(*args, **kwargs):
        raise AssertionError("data was read for a refused round")

    monkeypatch.setattr(local_round, "load_local_data", no_data)
    with pytest.raises(PlanRefused, match="privacy budget"):
        local_round.train_round(home, plan, arrays, 2, run_id="r")
    (spend,) = PrivacyLedger(home.root).spends()
    assert spend.rounds_trained == 1


def _silo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "silo"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "250"},
    )


def test_privacy_show_and_plan_review(tmp_path: Path) -> None:
    assert _silo("init", "--name", "h", "--home", "h", cwd=tmp_path).returncode == 0
    root = tmp_path / "h"
    save_policy(
        root, SitePolicy(require_signed_plans=False, privacy_max_epsilon=10), actor="test IT"
    )
    plan = parse_plan(PLAN)
    (tmp_path / "p.yaml").write_text(PLAN)
    spend = _charge(root, plan, "run-1", 1, 10)

    shown = _silo("privacy", "show", "--home", "h", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    (dataset,) = data["datasets"]
    assert dataset["dataset"] == "default" and dataset["runs"] == 1
    assert dataset["epsilon_spent"] == pytest.approx(spend.epsilon)
    assert dataset["epsilon_remaining"] == pytest.approx(10 - spend.epsilon)
    assert data["runs"][0]["rounds_trained"] == 1 and data["runs"][0]["run_id"] == "run-1"

    text = _silo("privacy", "show", "--home", "h", cwd=tmp_path)
    assert text.returncode == 0 and f"epsilon {spend.epsilon:.3f}" in text.stdout
    assert "of this site's maximum 10" in text.stdout

    review = _silo("plan", "review", "p.yaml", "--home", "h", cwd=tmp_path)
    assert review.returncode == 0, review.stderr
    planned = plan_budget(plan).planned_epsilon
    assert f"would spend epsilon {planned:.3f}" in review.stdout
    assert f"{10 - spend.epsilon - planned:.3f} would remain" in review.stdout
    assert "patient-level DP-SGD, target epsilon 4" in review.stdout


def test_bad_privacy_policy_is_one_line_naming_the_key() -> None:
    from silo_client.governance.policy import PolicyError, parse_policy

    text = "require_signed_plans: false\nprivacy_max_epsilon_by_dataset: {default: -1}\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    message = str(info.value)
    assert message.startswith("policy.yaml:2")
    assert "dataset 'default': the maximum epsilon must be above 0" in message
    assert "\n" not in message
