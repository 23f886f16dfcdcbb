"""Secure aggregation with real SuperLink/SuperNode processes: a silo dies between masking and
unmasking, and the round still completes from the three survivors (t = 3 of n = 4)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from aggregator.artifacts import load_model
from tests.e2e.cluster import govern, grey_silos, running_plan, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLAN = (
    "title: dropout\n"
    "model: {name: resnet10}\n"
    "preprocessing: {input_size: 32}\n"
    "training: {batch_size: 8, local_epochs: 1}\n"
    "federation: {rounds: 1, min_silos: 3, evaluate_every: 0}\n"
    "secure_aggregation: {max_weight: 40}\n"
)


def test_silo_killed_between_mask_and_unmask(tmp_path: Path) -> None:
    homes = grey_silos(tmp_path, 4)
    govern(homes, PLAN)
    with running_plan(tmp_path, homes, PLAN, "dropout", stage_timeout=25) as run:
        victim = homes[3]
        log = victim.logs_dir / "clientapp.log"
        wait_for(
            lambda: log.exists() and "answered train.sa_mask" in log.read_text(),
            400,
            "the victim's masked vector",
        )
        os.killpg(run.nodes[victim.name].popen.pid, signal.SIGKILL)  # the hospital's server dies
        events = run.wait_for_end(400)
        out = run.out
    kinds = [e["event"] for e in events]
    assert "run-finished" in kinds, events[-1]
    round_event = next(e for e in events if e["event"] == "round-finished")
    assert round_event["participants"] == 3
    assert round_event["train"]["secure-dropped"] == 1.0
    assert len(round_event["refused"]) == 1, round_event["refused"]
    first = load_model(out / "rounds" / "round-000.safetensors")
    final = load_model(out / "final_model.safetensors")
    assert any(not np.allclose(first[k], final[k]) for k in first), "the model must have advanced"
