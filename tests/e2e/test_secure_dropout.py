"""Secure aggregation with real SuperLink/SuperNode processes: a silo dies between masking and
unmasking, and the round still completes from the three survivors (t = 3 of n = 4)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.artifacts import load_model, read_events
from aggregator.control import write_flower_app
from aggregator.pki import make_tls
from fedsilo.flower_processes import FlowerCluster
from fedsilo.synthetic import generate_hospitals
from silo_client.home import init_silo_home
from training_plan import parse_plan

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLAN = (
    "title: dropout\n"
    "model: {name: resnet10}\n"
    "preprocessing: {input_size: 32}\n"
    "training: {batch_size: 8, local_epochs: 1}\n"
    "federation: {rounds: 1, min_silos: 3, evaluate_every: 0}\n"
    "secure_aggregation: {max_weight: 40}\n"
)


def _prepare_silos(tmp_path: Path, plan_text: str) -> list:
    from fedsilo.local_consortium import pin_roster
    from silo_client.governance.approvals import approve_plan
    from silo_client.governance.policy import SitePolicy, save_policy

    generate_hospitals(
        tmp_path / "data", hospitals=4, images_per_hospital=20, seed=5, image_size=32
    )
    homes = [
        init_silo_home(
            tmp_path / "silos" / f"hospital-{k}",
            f"hospital-{k}",
            tmp_path / "data" / f"hospital-{k}",
        )
        for k in range(4)
    ]
    pin_roster(homes)
    plan = parse_plan(plan_text)
    for home in homes:
        save_policy(
            home.root, SitePolicy(require_signed_plans=False, min_local_examples=0), actor="test IT"
        )
        approve_plan(home.root, plan, actor="test IT")
    return homes


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_silo_killed_between_mask_and_unmask(tmp_path: Path) -> None:
    homes = _prepare_silos(tmp_path, PLAN)
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(PLAN)
    tls = make_tls(tmp_path / "tls", "dropout-test", ["127.0.0.1"])
    out = tmp_path / "run"
    with FlowerCluster(tmp_path / "cluster", tls) as cluster:
        cluster.start_superlink()
        nodes = {
            home.name: cluster.start_supernode(home.name, {"home": str(home.root)})
            for home in homes
        }
        app_dir = write_flower_app(
            tmp_path / "app", {"plan-path": "", "out-dir": "", "run-id": "", "stage-timeout": 0}
        )
        cluster.submit(
            app_dir,
            {
                "plan-path": str(plan_path),
                "out-dir": str(out),
                "run-id": "dropout",
                "stage-timeout": 25,
            },
        )

        victim = homes[3]
        log = victim.logs_dir / "clientapp.log"
        _wait_for(
            lambda: log.exists() and "answered train.sa_mask" in log.read_text(),
            400,
            "the victim's masked vector",
        )
        os.killpg(nodes[victim.name].popen.pid, signal.SIGKILL)  # the hospital's server dies

        events_path = out / "events.jsonl"
        _wait_for(
            lambda: any(
                e["event"] in ("run-finished", "run-failed") for e in read_events(events_path)
            ),
            400,
            "the end of the run",
        )
    events = read_events(events_path)
    kinds = [e["event"] for e in events]
    assert "run-finished" in kinds, events[-1]
    round_event = next(e for e in events if e["event"] == "round-finished")
    assert round_event["participants"] == 3
    assert round_event["train"]["secure-dropped"] == 1.0
    assert len(round_event["refused"]) == 1, round_event["refused"]
    first = load_model(out / "rounds" / "round-000.safetensors")
    final = load_model(out / "final_model.safetensors")
    assert any(not np.allclose(first[k], final[k]) for k in first), "the model must have advanced"
