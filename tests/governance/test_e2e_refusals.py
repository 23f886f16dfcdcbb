"""Refusals end to end with real processes: a TLS SuperLink, three SuperNodes in ``process``
isolation, each with fedsilo's silo runner (``python -m silo_client.app_runner superexec``).

One cluster serves the module; each test submits one short run (1 round, 20 tiny images per
hospital, resnet10 at 32 px) and reads the server's event log and the silos' audit logs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from aggregator.artifacts import read_events
from aggregator.control import write_flower_app
from aggregator.pki import make_tls
from fedsilo.flower_processes import FlowerCluster
from silo_client.governance.approvals import ApprovalStore, approve_plan
from silo_client.governance.audit import AuditLog
from silo_client.governance.policy import AllowedResearcher, SitePolicy, save_policy
from silo_client.home import SiloHome, init_silo_home
from training_plan import TrainingPlan, parse_plan, plan_hash
from training_plan.signing import generate_keypair, load_private_key, sign_plan

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
PLAN = """\
title: governance e2e
purpose: check that silos refuse what they should
researcher: {name: E2E Researcher}
model: {name: resnet10}
preprocessing: {input_size: 32}
training: {batch_size: 8, local_epochs: 1, seed: 1}
federation: {rounds: 1, min_silos: 3, evaluate_every: 0, on_refusal: stop}
secure_aggregation: {max_weight: 40}
"""
APP_DEFAULTS = {"plan-path": "", "out-dir": "", "run-id": "", "node-wait": 120}


@dataclass
class Consortium:
    cluster: FlowerCluster
    homes: list[SiloHome]
    work: Path
    key: object
    researcher: AllowedResearcher
    app_dir: Path

    def plan(self, text: str, name: str) -> tuple[TrainingPlan, Path]:
        path = self.work / f"{name}.yaml"
        path.write_text(text)
        return parse_plan(text), path

    def approve(self, plan: TrainingPlan, homes: list[SiloHome] | None = None) -> None:
        signature = sign_plan(plan, self.key)
        for home in homes if homes is not None else self.homes:
            approve_plan(home.root, plan, signature, actor="e2e IT")

    def run(
        self, plan_path: Path, name: str, app_dir: Path | None = None, **extra: str
    ) -> list[dict]:
        out = self.work / "runs" / name
        self.cluster.submit(
            app_dir or self.app_dir,
            {"plan-path": str(plan_path), "out-dir": str(out), "run-id": name, **extra},
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            events = read_events(out / "events.jsonl")
            if any(e["event"] in ("run-finished", "run-failed") for e in events):
                return events
            self.cluster.check_alive()
            time.sleep(0.5)
        raise AssertionError(f"run {name} did not end; logs in {self.work / 'logs'}")


def _refusals(events: list[dict]) -> list[str]:
    return [r for e in events if e["event"] == "silos-refused" for r in e["refused"].values()]


def _audit_events(home: SiloHome) -> list[dict]:
    return list(AuditLog.of_home(home.root).entries())


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    from fedsilo.synthetic import generate_hospitals

    work = tmp_path_factory.mktemp("gov-e2e")
    specs = generate_hospitals(
        work / "hospitals", hospitals=3, images_per_hospital=20, image_size=32
    )
    homes = [
        init_silo_home(work / "silos" / s.name, s.name, work / "hospitals" / s.name) for s in specs
    ]
    from fedsilo.local_consortium import pin_roster

    pin_roster(homes)
    key_path, pub_path = generate_keypair(work / "researcher")
    researcher = AllowedResearcher(name="E2E Researcher", public_key=pub_path.read_text().strip())
    for home in homes:
        policy = SitePolicy(allowed_researchers=[researcher], min_local_examples=2, max_rounds=1)
        save_policy(home.root, policy, actor="e2e IT")
    tls = make_tls(work / "tls", "gov-e2e", ["127.0.0.1", "localhost"])
    old_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["FEDSILO_E2E_MARKER"] = str(work / "pwned-foreign-clientapp")
    # the tampering ServerApp lives in tests/; silos never import anything from there
    os.environ["PYTHONPATH"] = str(REPO)
    cluster = FlowerCluster(work, tls)
    try:
        cluster.start_superlink()
        for home in homes:
            # --isolation process with fedsilo's silo runner beside it (the default)
            cluster.start_supernode(home.name, {"home": str(home.root)})
        app_dir = write_flower_app(work / "app", APP_DEFAULTS)
        yield Consortium(cluster, homes, work, load_private_key(key_path), researcher, app_dir)
    finally:
        cluster.stop()
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath


def test_an_approved_plan_runs_through_the_silo_runner(consortium: Consortium) -> None:
    plan, path = consortium.plan(PLAN, "approved")
    consortium.approve(plan)
    events = consortium.run(path, "approved")
    assert [e["event"] for e in events][-1] == "run-finished", events
    for home in consortium.homes:
        kinds = [(e["event"], e.get("kind")) for e in _audit_events(home)]
        assert ("run-started", None) in kinds
        assert ("sent", "masked-update") in kinds
        assert AuditLog.of_home(home.root).verify().ok


def test_unapproved_plan_is_refused(consortium: Consortium) -> None:
    plan, path = consortium.plan(PLAN.replace("governance e2e", "not approved by one"), "unapp")
    consortium.approve(plan, consortium.homes[1:])
    cache = consortium.homes[0].cache_dir
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}  # earlier tests' runs
    log = consortium.homes[0].logs_dir / "clientapp.log"
    offset = log.stat().st_size if log.exists() else 0
    events = consortium.run(path, "unapproved")
    assert events[-1]["event"] == "run-failed"
    reasons = _refusals(events)
    # the refusing silo says why; secure aggregation then aborts the others' round (2 < 3)
    mine = [r for r in reasons if f"plan {plan_hash(plan)[:12]} is not approved" in r]
    assert len(mine) == 1, reasons
    refused = [e for e in _audit_events(consortium.homes[0]) if e["event"] == "plan-refused"]
    assert refused and "not approved" in refused[-1]["reason"]
    after = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert after == before, "no data may be loaded (or cached) for a refused plan"
    with log.open() as handle:
        handle.seek(offset)
        this_run = handle.read()
    assert "refused" in this_run and "trained" not in this_run and "round state" not in this_run


def test_altered_plan_is_refused(consortium: Consortium) -> None:
    approved, _ = consortium.plan(PLAN.replace("governance e2e", "approved original"), "orig")
    consortium.approve(approved)
    _altered, altered_path = consortium.plan(
        PLAN.replace("governance e2e", "approved original").replace("seed: 1", "seed: 2"), "alt"
    )
    app_dir = write_flower_app(
        consortium.work / "tampering-app", {**APP_DEFAULTS, "claimed-hash": ""}
    )
    pyproject = app_dir / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            "aggregator.server_app:app", "tests.governance.tampering_server:app"
        )
    )
    events = consortium.run(
        altered_path, "altered", app_dir=app_dir, **{"claimed-hash": plan_hash(approved)}
    )
    assert events[-1]["event"] == "run-failed"
    reasons = _refusals(events)
    assert len(reasons) == 3 and all("plan altered" in r for r in reasons), reasons


def test_out_of_policy_plan_is_refused(consortium: Consortium) -> None:
    text = PLAN.replace("governance e2e", "policy tightened")
    plan, path = consortium.plan(text, "policy")
    consortium.approve(plan)
    tight = SitePolicy(
        allowed_researchers=[consortium.researcher],
        min_local_examples=2,
        allowed_models=["resnet18"],
    )
    save_policy(consortium.homes[2].root, tight, actor="e2e IT")
    try:
        events = consortium.run(path, "out-of-policy")
    finally:
        loose = SitePolicy(
            allowed_researchers=[consortium.researcher], min_local_examples=2, max_rounds=1
        )
        save_policy(consortium.homes[2].root, loose, actor="e2e IT")
    assert events[-1]["event"] == "run-failed"
    reasons = _refusals(events)
    mine = [r for r in reasons if "model 'resnet10' is not allowed" in r]
    assert len(mine) == 1, reasons
    assert "/" not in mine[0]


@pytest.mark.parametrize("tamper", ["extra-module", "foreign-clientapp"])
def test_tampered_app_bundle_is_refused_before_its_code_runs(
    consortium: Consortium, tamper: str
) -> None:
    plan, path = consortium.plan(PLAN.replace("governance e2e", f"bundle {tamper}"), tamper)
    consortium.approve(plan)
    marker = consortium.work / f"pwned-{tamper}"
    app_dir = write_flower_app(consortium.work / f"app-{tamper}", APP_DEFAULTS)
    (app_dir / "evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from silo_client.client_app import app\n"
    )
    if tamper == "foreign-clientapp":
        pyproject = app_dir / "pyproject.toml"
        pyproject.write_text(
            pyproject.read_text().replace(
                "silo_client.client_app:app", "tests.governance.tampering_client:app"
            )
        )
    events = consortium.run(path, f"bundle-{tamper}", app_dir=app_dir)
    assert events[-1]["event"] == "run-failed"
    reasons = _refusals(events)
    assert len(reasons) == 3 and all("app bundle refused" in r for r in reasons), reasons
    assert not marker.exists(), "the bundle's code ran at a silo"
    for home in consortium.homes:
        audit = [e for e in _audit_events(home) if e["event"] == "bundle-refused"]
        assert audit, json.dumps(_audit_events(home)[-3:])
    assert all(ApprovalStore(h.root).get(plan_hash(plan)) for h in consortium.homes)
