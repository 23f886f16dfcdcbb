"""The real ServerApp round loop against the real ClientApp code, in process (no processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.aggregation import PlainAggregation
from aggregator.artifacts import load_model, read_events
from aggregator.errors import NotEnoughSilos, RoundFailed
from aggregator.federated_run import FederatedRun
from silo_client.client_app import app as client_app
from tests.conftest import TINY_PLAN
from tests.harness import InProcessGrid
from training_plan import parse_plan, wire

PLAIN = TINY_PLAN + "secure_aggregation: {enabled: false}\n"


def _grid(homes: list, **kwargs) -> InProcessGrid:
    return InProcessGrid(
        {i + 1: (client_app, {"home": str(h.root)}) for i, h in enumerate(homes)}, **kwargs
    )


def test_plain_run_trains_evaluates_and_checkpoints(silo_homes: list, tmp_path: Path) -> None:
    plan = parse_plan(PLAIN.replace("rounds: 1", "rounds: 2"))
    grid = _grid(silo_homes)
    result = FederatedRun(plan, tmp_path / "run", "t1", aggregation=PlainAggregation()).run(grid)
    assert result.status == "done"
    assert [r.round for r in result.rounds] == [1, 2]
    for record in result.rounds:
        assert record.participants == 3
        assert 0.0 <= record.eval_metrics["eval-accuracy"] <= 1.0
        assert record.eval_metrics["eval-loss"] > 0
    first = load_model(tmp_path / "run" / "rounds" / "round-000.safetensors")
    final = load_model(tmp_path / "run" / "final_model.safetensors")
    assert set(first) == set(final)
    assert any(not np.allclose(first[k], final[k]) for k in first)
    events = [e["event"] for e in read_events(tmp_path / "run" / "events.jsonl")]
    assert events == ["run-started", "round-finished", "round-finished", "run-finished"]


def test_silo_refuses_plain_update_when_plan_wants_secure_aggregation(
    silo_homes: list, tmp_path: Path
) -> None:
    plan = parse_plan(TINY_PLAN)  # secure aggregation on by default
    grid = _grid(silo_homes)
    run = FederatedRun(plan, tmp_path / "run", "t2", aggregation=PlainAggregation())
    with pytest.raises(RoundFailed, match="requires secure aggregation"):
        run.run(grid)
    # the global model was not advanced: only the initial checkpoint exists
    assert sorted(p.name for p in (tmp_path / "run" / "rounds").iterdir()) == [
        "round-000.safetensors"
    ]


def test_altered_plan_is_refused_before_any_data_is_read(silo_homes: list, tmp_path: Path) -> None:
    def tamper(request, reply):
        return reply

    plan = parse_plan(PLAIN)
    grid = _grid(silo_homes, tap=tamper)
    run = FederatedRun(plan, tmp_path / "run", "t3", aggregation=PlainAggregation())
    run.hash = "0" * 64  # the server claims another hash than the plan it sends
    with pytest.raises(RoundFailed, match="plan altered"):
        run.run(grid)
    for home in silo_homes:
        assert not any(home.cache_dir.iterdir()), "no data may be loaded for a refused plan"


def test_supernode_pointed_at_an_empty_folder(silo_homes: list, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "dicom").mkdir(parents=True)
    silo_homes[0].datasets["default"] = str(empty)
    silo_homes[0].save()
    plan = parse_plan(PLAIN)
    grid = _grid(silo_homes)
    with pytest.raises(RoundFailed) as info:
        FederatedRun(plan, tmp_path / "run", "t4", aggregation=PlainAggregation()).run(grid)
    assert "2 of 3 silos contributed" in str(info.value)
    assert "labels file <local path> does not exist" in str(info.value)
    assert str(tmp_path) not in str(info.value), "a silo must not reveal its paths to the server"


def test_supernode_without_home_gets_a_clear_error(silo_homes: list, tmp_path: Path) -> None:
    grid = InProcessGrid(
        {
            1: (client_app, {}),
            2: (client_app, {"home": str(silo_homes[1].root)}),
            3: (client_app, {"home": str(silo_homes[2].root)}),
        }
    )
    with pytest.raises(RoundFailed, match="started without a silo home"):
        FederatedRun(parse_plan(PLAIN), tmp_path / "run", "t5", aggregation=PlainAggregation()).run(
            grid
        )


def test_not_enough_silos_is_a_clear_error(silo_homes: list, tmp_path: Path) -> None:
    grid = _grid(silo_homes[:2])
    run = FederatedRun(
        parse_plan(PLAIN),
        tmp_path / "run",
        "t6",
        aggregation=PlainAggregation(),
        node_wait_seconds=1,
    )
    with pytest.raises(NotEnoughSilos, match="only 2 silo"):
        run.run(grid)
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert events[-1]["event"] == "run-failed"


def test_packed_update_round_trip_matches_named_arrays(silo_homes: list) -> None:
    from aggregator.federated_run import initial_model
    from silo_client.local_round import train_round

    plan = parse_plan(PLAIN)
    named, layout = initial_model(plan)
    packed = {wire.MODEL: wire.pack(named, layout)}
    update_packed, _ = train_round(silo_homes[0], plan, packed, 1)
    update_named, _ = train_round(silo_homes[0], plan, named, 1)
    np.testing.assert_allclose(
        update_packed[wire.MODEL], wire.pack(update_named, layout), atol=1e-6
    )
