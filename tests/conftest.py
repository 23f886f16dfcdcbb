"""Shared fixtures: tiny synthetic hospitals and silo homes, Flower environment hygiene."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FEDSILO_TORCH_THREADS", "1")

TINY_PLAN = (
    "title: tiny\n"
    "model: {name: resnet10}\n"
    "preprocessing: {input_size: 32}\n"
    "training: {batch_size: 8, local_epochs: 1, seed: 3}\n"
    "federation: {rounds: 1, min_silos: 3}\n"
)


@pytest.fixture(autouse=True)
def _flower_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True)
def _stop_round_reapers() -> Iterator[None]:
    """Stop the abandoned-round reapers the in-process ClientApps of a test started (by pid;
    they end by themselves once no round files are left, but a test's abandoned rounds keep
    them up to the site's deadline)."""
    yield
    from silo_client.abandoned_rounds import SPAWNED

    while SPAWNED:
        process = SPAWNED.pop()
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny synthetic hospitals (real DICOM) shared by the session; do not modify."""
    from fedsilo.synthetic import generate_hospitals

    out = tmp_path_factory.mktemp("hospitals")
    generate_hospitals(out, hospitals=3, images_per_hospital=24, seed=7, image_size=32)
    return out


@pytest.fixture
def silo_homes(hospitals: Path, tmp_path: Path) -> list:
    """Fresh silo homes for the three hospitals."""
    from silo_client.home import init_silo_home

    return [
        init_silo_home(tmp_path / "silos" / folder.name, folder.name, folder)
        for folder in sorted(hospitals.iterdir())
        if folder.is_dir()
    ]


@pytest.fixture(autouse=True, scope="session")
def _silos_approve_what_they_are_sent() -> Iterator[None]:
    """Silos approve each plan the first time they see it, as their IT would, under a permissive
    site policy: the tests outside tests/governance are about other things. tests/governance
    restores the real gate (``check_plan.__wrapped__``); real processes never see this patch."""
    from silo_client.governance import enforcement
    from silo_client.governance.approvals import ApprovalStore, approve_plan
    from silo_client.governance.policy import SitePolicy, policy_path, save_policy

    real = enforcement.check_plan

    def approving(home, plan, digest, **kwargs):
        if not policy_path(home.root).exists():
            lenient = SitePolicy(
                require_signed_plans=False, secure_aggregation_required=False, min_local_examples=0
            )
            save_policy(home.root, lenient, actor="tests")
        if ApprovalStore(home.root).get(digest) is None:
            approve_plan(home.root, plan, actor="tests")
        return real(home, plan, digest, **kwargs)

    approving.__wrapped__ = real
    patch = pytest.MonkeyPatch()
    patch.setattr(enforcement, "check_plan", approving)
    yield
    patch.undo()
