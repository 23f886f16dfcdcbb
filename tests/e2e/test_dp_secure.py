"""Patient-level DP-SGD through secure aggregation with real SuperLink/SuperNode processes:
three silos train two DP rounds, each silo's ledger holds the accountant's epsilon over the two
rounds it trained (in its audit chain), and the model card states the plan's guarantee."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.artifacts import load_model
from silo_client.governance.audit import AuditLog
from silo_client.governance.privacy_ledger import PrivacyLedger
from tests.e2e.cluster import govern, grey_silos, running_plan, wait_for
from training_plan import parse_plan, plan_hash
from training_plan.privacy import plan_budget

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLAN = (
    "title: dp end to end\n"
    "model: {name: resnet10, args: {widen_factor: 0.25}}\n"
    "preprocessing: {input_size: 32}\n"
    "training: {batch_size: 8, local_epochs: 1}\n"
    "federation: {rounds: 2, min_silos: 3, evaluate_every: 0, final_evaluation: false}\n"
    "secure_aggregation: {max_weight: 40}\n"
    "privacy: {target_epsilon: 8, sampling_rate: 0.5}\n"
)


def test_dp_rounds_through_secure_aggregation(tmp_path: Path) -> None:
    homes = grey_silos(tmp_path, 3)
    govern(homes, PLAN, privacy_max_epsilon=20)
    plan = parse_plan(PLAN)
    with running_plan(tmp_path, homes, PLAN, "dp-e2e") as run:
        events = run.wait_for_end(900)
        out = run.out
        if "run-finished" in [e["event"] for e in events]:
            # the ServerApp exports the model (and its card) just after writing run-finished
            wait_for((out / "model" / "MODEL_CARD.md").exists, 120, "the model card")
    assert "run-finished" in [e["event"] for e in events], events[-1]
    rounds = [e for e in events if e["event"] == "round-finished"]
    assert [r["participants"] for r in rounds] == [3, 3]
    first = load_model(out / "rounds" / "round-000.safetensors")
    final = load_model(out / "final_model.safetensors")
    assert any(not np.allclose(first[k], final[k]) for k in first), "the model must have advanced"

    budget = plan_budget(plan)
    for home in homes:
        (spend,) = PrivacyLedger(home.root).spends()
        assert spend.run_id == "dp-e2e" and spend.plan_hash == plan_hash(plan)
        assert spend.rounds_trained == 2
        assert spend.epsilon == pytest.approx(budget.epsilon_after(2))
        assert spend.epsilon <= 8 * 1.0001
        audit = AuditLog.of_home(home.root)
        assert audit.verify().ok
        spent = [e for e in audit.entries() if e["event"] == "privacy-spent"]
        assert [e["rounds_trained"] for e in spent] == [1, 2]

    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert "## Differential privacy (as the plan states it)" in card
    assert f"patient-level ({budget.epsilon_after(2):.2f}, 1e-05)-differential privacy" in card
