"""Patient-level DP-SGD through secure aggregation with real SuperLink/SuperNode processes:
three silos train two DP rounds, each silo's ledger holds the accountant's epsilon over the two
rounds it trained (in its audit chain), and the model card states the plan's guarantee."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.artifacts import load_model, read_events
from aggregator.control import write_flower_app
from aggregator.pki import make_tls
from fedsilo.flower_processes import FlowerCluster
from fedsilo.synthetic import generate_hospitals
from silo_client.governance.audit import AuditLog
from silo_client.governance.privacy_ledger import PrivacyLedger
from silo_client.home import init_silo_home
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


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_dp_rounds_through_secure_aggregation(tmp_path: Path) -> None:
    from fedsilo.local_consortium import pin_roster
    from silo_client.governance.approvals import approve_plan
    from silo_client.governance.policy import SitePolicy, save_policy

    generate_hospitals(
        tmp_path / "data", hospitals=3, images_per_hospital=20, seed=5, image_size=32
    )
    homes = [
        init_silo_home(
            tmp_path / "silos" / f"hospital-{k}",
            f"hospital-{k}",
            tmp_path / "data" / f"hospital-{k}",
        )
        for k in range(3)
    ]
    pin_roster(homes)
    plan = parse_plan(PLAN)
    for home in homes:
        policy = SitePolicy(
            require_signed_plans=False, min_local_examples=0, privacy_max_epsilon=20
        )
        save_policy(home.root, policy, actor="test IT")
        approve_plan(home.root, plan, actor="test IT")
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(PLAN)
    tls = make_tls(tmp_path / "tls", "dp-test", ["127.0.0.1"])
    out = tmp_path / "run"
    with FlowerCluster(tmp_path / "cluster", tls) as cluster:
        cluster.start_superlink()
        for home in homes:
            cluster.start_supernode(home.name, {"home": str(home.root)})
        app_dir = write_flower_app(
            tmp_path / "app", {"plan-path": "", "out-dir": "", "run-id": "", "stage-timeout": 0}
        )
        cluster.submit(
            app_dir,
            {
                "plan-path": str(plan_path),
                "out-dir": str(out),
                "run-id": "dp-e2e",
                "stage-timeout": 60,
            },
        )
        events_path = out / "events.jsonl"
        _wait_for(
            lambda: any(
                e["event"] in ("run-finished", "run-failed") for e in read_events(events_path)
            ),
            900,
            "the end of the run",
        )
        if "run-finished" in [e["event"] for e in read_events(events_path)]:
            # the ServerApp exports the model (and its card) just after writing run-finished
            _wait_for((out / "model" / "MODEL_CARD.md").exists, 120, "the model card")
    events = read_events(events_path)
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
