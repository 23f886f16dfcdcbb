"""Checkpoints and resume: a run stopped after round 1 and resumed ends with the same model as
an uninterrupted run (fixed seeds, FedAdam so that server-optimizer state matters)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from aggregator.aggregation import PlainAggregation
from aggregator.artifacts import read_events
from aggregator.checkpoint import CheckpointError, load_checkpoint
from aggregator.cli_runs import ensure_resume_key, resume_run_config
from aggregator.federated_run import FederatedRun
from tests.test_secure_flower import PLAIN, grid_for, make_silos
from training_plan import parse_plan, wire

PLAN = PLAIN.replace(
    "federation: {rounds: 1, min_silos: 3}",
    "federation: {rounds: 2, min_silos: 3, strategy: fedadam, "
    "strategy_args: {eta: 0.01, beta_1: 0.9, beta_2: 0.99, tau: 0.001}}",
)


class Killed(Exception):
    """Stands in for kill -9 of the ServerApp right after a round's checkpoint."""


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedsilo.synthetic import generate_hospitals

    out = tmp_path_factory.mktemp("resume-hospitals")
    specs = generate_hospitals(out, hospitals=3, images_per_hospital=20, seed=9, image_size=32)
    return [out / s.name for s in specs]


def _run(plan, out: Path, homes, **kwargs):
    return FederatedRun(plan, out, "r1", aggregation=PlainAggregation(), **kwargs)


def test_resumed_run_ends_with_the_same_model(hospitals: list[Path], tmp_path: Path) -> None:
    plan = parse_plan(PLAN)
    whole = _run(plan, tmp_path / "whole", None).run(
        grid_for(make_silos(tmp_path / "a", hospitals, identities=False))
    )

    def kill_after_round_1(record) -> None:
        if record.round == 1:
            raise Killed

    homes = make_silos(tmp_path / "b", hospitals, identities=False)
    out = tmp_path / "stopped"
    with pytest.raises(Killed):
        _run(plan, out, homes, on_round=kill_after_round_1).run(grid_for(homes))
    checkpoint = load_checkpoint(out)
    assert checkpoint.round == 1 and checkpoint.run_id == "r1"
    assert checkpoint.strategy_state["m_t"] is not None, "FedAdam's moments are checkpointed"
    assert set(checkpoint.rng) == {"python", "numpy", "torch"}

    # a fresh process would build everything again: fresh strategy, fresh grid
    resumed = _run(plan, out, homes, resume=checkpoint).run(grid_for(homes))
    assert resumed.status == "done"
    assert [r.round for r in resumed.rounds] == [1, 2]
    for key, value in whole.final_arrays.items():
        np.testing.assert_array_equal(resumed.final_arrays[key], value, err_msg=key)
    events = [e["event"] for e in read_events(out / "events.jsonl")]
    assert events[-3:] == ["run-resumed", "round-finished", "run-finished"]
    assert load_checkpoint(out).round == 2


def test_checkpoint_refuses_another_plan(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)


def test_resume_run_config_and_cli_errors(hospitals: list[Path], tmp_path: Path) -> None:
    plan = parse_plan(PLAN)
    homes = make_silos(tmp_path / "s", hospitals, identities=False)
    out = tmp_path / "run"

    def stop(record) -> None:
        raise Killed

    with pytest.raises(Killed):
        _run(plan, out, homes, on_round=stop).run(grid_for(homes))
    (out / "plan.yaml").write_text(yaml.safe_dump(plan.model_dump(mode="json")))
    config = resume_run_config(out)
    assert config["resume"] == "yes" and config["run-id"] == "r1"
    assert config["out-dir"] == str(out.resolve())

    app = out / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[tool.flwr.app.config]\nplan-path = ""\n')
    ensure_resume_key(app)
    ensure_resume_key(app)
    assert (app / "pyproject.toml").read_text().count('resume = ""') == 1

    other = plan.model_dump(mode="json")
    other["title"] = "another"
    (out / "plan.yaml").write_text(yaml.safe_dump(other))
    cli = Path(sys.executable).parent / "aggregator"
    done = subprocess.run(
        [str(cli), "resume", str(out)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "checkpoint belongs to plan" in done.stderr and "Traceback" not in done.stderr
    empty = subprocess.run(
        [str(cli), "resume", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert empty.returncode == 2 and "holds no run" in empty.stderr
    assert wire.MODEL in load_checkpoint(out).arrays
