"""Experiment tracking (MLflow file store, TensorBoard): chosen in the aggregator's run config,
off by default, read back with each tool's own reader.

The real ServerApp ``main`` runs in process against the real ClientApp: a run tracked to both
stops at round 2 (every silo silent), is resumed with the configuration `aggregator resume`
computes, and finishes. MLflow's MlflowClient and TensorBoard's EventAccumulator then read what
was logged: one tracked run across the resume, params, per-round metrics, bytes, timings and
the final model's path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from aggregator import server_app
from aggregator.artifacts import read_events
from aggregator.cli_runs import ensure_resume_key, resume_run_config
from aggregator.tracking import (
    RUN_TAG,
    TrackingError,
    check_available,
    open_tracking,
    parse_targets,
    targets_from_config,
    targets_to_config,
)
from tests.test_secure_flower import PLAIN, grid_for, make_silos
from training_plan import parse_plan, plan_hash, wire

RUN = "tracked-run"


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedsilo.synthetic import generate_hospitals

    out = tmp_path_factory.mktemp("tracking-hospitals")
    specs = generate_hospitals(out, hospitals=3, images_per_hospital=16, seed=4, image_size=32)
    return [out / s.name for s in specs]


def _main(grid, run_config: dict[str, str]) -> None:
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    server_app.main(grid, context)


def test_tracked_run_with_resume_reads_back(hospitals: list[Path], tmp_path: Path) -> None:
    plan_text = PLAIN.replace("rounds: 1", "rounds: 2")
    plan = parse_plan(plan_text)
    out = tmp_path / "run"
    out.mkdir()
    (out / "plan.yaml").write_text(plan_text)
    mlruns, tboard = tmp_path / "mlruns", tmp_path / "tb"
    track = targets_to_config(parse_targets([f"mlflow:{mlruns}", f"tensorboard:{tboard}"]))
    homes = make_silos(tmp_path / "silos", hospitals, identities=False)
    silent = {"round": 2}

    def silent_in_round_2(node: int, message) -> bool:
        if message.metadata.message_type != "train":
            return False
        return int(message.content[wire.CONFIG][wire.ROUND]) == silent.get("round")

    first = {"plan-path": str(out / "plan.yaml"), "out-dir": str(out), "run-id": RUN}
    with pytest.raises(SystemExit):
        _main(grid_for(homes, drop=silent_in_round_2), {**first, "track": track})
    silent.clear()
    config = resume_run_config(out)
    assert config["track"] == track, "resume keeps the run's tracking targets"
    _main(grid_for(homes), config)
    events = read_events(out / "events.jsonl")
    assert [e["event"] for e in events][-2:] == ["round-finished", "run-finished"]
    finished = [e for e in events if e["event"] == "round-finished"]

    # ---- MLflow: one run across the resume, read with MLflow's own client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlruns.resolve().as_uri())
    experiment = client.get_experiment_by_name("fedsilo")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags[RUN_TAG] == RUN and run.info.status == "FINISHED"
    params = run.data.params
    assert params["plan_hash"] == plan_hash(plan)
    assert params["strategy"] == "fedavg" and params["rounds"] == "2"
    assert params["secure_aggregation"] == "off"
    final_model = Path(run.data.tags["fedsilo.final_model"])
    assert final_model == (out / "final_model.safetensors").resolve() and final_model.exists()

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    expected_loss = [e["train"]["train-loss"] for e in finished]
    assert [s for s, _ in history("train/train-loss")] == [1, 2]
    assert [v for _, v in history("train/train-loss")] == pytest.approx(expected_loss)
    assert [s for s, _ in history("eval/eval-loss")] == [1, 2]
    assert [v for _, v in history("round/bytes_received")] == [
        float(e["bytes_received"]) for e in finished
    ]
    assert all(v > 0 for _, v in history("round/bytes_received"))
    assert [v for _, v in history("round/participants")] == [3.0, 3.0]
    assert len(history("seconds/train-exchange")) == 2

    # ---- TensorBoard: the event files of the run (two writers: before and after resume)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tboard / RUN), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/train-loss")] == [1, 2]
    assert [s.value for s in acc.Scalars("train/train-loss")] == pytest.approx(expected_loss)
    assert [s.step for s in acc.Scalars("round/bytes_received")] == [1, 2]
    texts = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"]}
    params_text = texts["params/text_summary"][0].tensor_proto.string_val[0].decode()
    assert plan_hash(plan) in params_text and "secure_aggregation | off" in params_text
    status = [t.tensor_proto.string_val[0].decode() for t in texts["status/text_summary"]]
    assert status == ["failed", "done"]


def test_no_tracking_by_default(hospitals: list[Path], tmp_path: Path) -> None:
    plan = parse_plan(PLAIN)
    assert open_tracking([], plan, RUN, tmp_path) is None
    assert targets_from_config("") == []


def test_targets_parse_and_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    targets = parse_targets(["mlflow:mlruns", "tensorboard:/srv/tb"])
    assert targets[0].directory == tmp_path / "mlruns"  # absolute: the ServerApp runs elsewhere
    assert targets_from_config(targets_to_config(targets)) == targets
    for bad in ("wandb:/x", "mlflow", "tensorboard:", "mlflow:/a;b"):
        with pytest.raises(TrackingError, match="--track"):
            parse_targets([bad])


def test_missing_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow-skinny were not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(
        TrackingError, match=r"needs the 'mlflow-skinny' package.*fedsilo\[tracking\]"
    ):
        check_available(parse_targets(["mlflow:/tmp/x"]))
    check_available(parse_targets(["tensorboard:/tmp/x"]))


def test_cli_refuses_bad_targets_in_one_line(tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "aggregator"
    done = subprocess.run(
        [str(cli), "run", "deadbeef", "--home", str(tmp_path), "--track", "wandb:/x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "is not KIND:DIR" in done.stderr and "Traceback" not in done.stderr
    hidden = (
        "import sys; sys.modules['mlflow'] = None; sys.modules['mlflow.tracking'] = None; "
        f"sys.argv = ['aggregator', 'run', 'deadbeef', '--home', {str(tmp_path)!r}, "
        "'--track', 'mlflow:/tmp/x']; from aggregator.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", hidden], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlflow-skinny" in lines[0], done.stderr


def test_resume_declares_the_track_key(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[tool.flwr.app.config]\nplan-path = ""\n')
    ensure_resume_key(app)
    ensure_resume_key(app)
    text = (app / "pyproject.toml").read_text()
    assert text.count('resume = ""') == 1 and text.count('track = ""') == 1
