"""Federated evaluation through the real round loop and the real ClientApp (in process): the
plain path and the secure path give the same metrics from the same sums; the sums equal each
silo's own counters added up; the held-out test split is evaluated once, after the last round,
and lands in events.jsonl, the model card and the report; silos refuse other splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from aggregator.aggregation import PlainAggregation
from aggregator.artifacts import read_events
from aggregator.federated_run import FederatedRun, initial_model
from silo_client.local_round import evaluate_round
from tests.test_secure_flower import grid_for, make_silos
from training_plan import parse_plan, wire
from training_plan.metrics import metrics_from_sums, sum_counters

PLAN = (
    "title: federated metrics\nmodel: {name: resnet10}\npreprocessing: {input_size: 32}\n"
    "federation: {rounds: 2, min_silos: 3, evaluate_every: 1}\n"
    "training: {batch_size: 8, seed: 3, validation_fraction: 0.25, test_fraction: 0.25}\n"
    "evaluation: {metrics: [loss, accuracy, auc, ece], auc_bins: 50, ece_bins: 10}\n"
)
SECURE = PLAN + "secure_aggregation: {max_weight: 40}\n"
PLAIN = PLAN + "secure_aggregation: {enabled: false, max_weight: 40}\n"


def _record(plan) -> ArrayRecord:
    from flwr.app import Array

    named, layout = initial_model(plan)
    return ArrayRecord({wire.MODEL: Array(wire.pack(named, layout))})


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedsilo.synthetic import generate_hospitals

    out = tmp_path_factory.mktemp("metrics-hospitals")
    specs = generate_hospitals(out, hospitals=3, images_per_hospital=24, seed=5, image_size=32)
    return [out / s.name for s in specs]


@pytest.mark.parametrize("split", ["validation", "test"])
def test_plain_and_secure_evaluation_give_the_same_metrics(
    folders: list[Path], tmp_path: Path, split: str
) -> None:
    secure_plan, plain_plan = parse_plan(SECURE), parse_plan(PLAIN)
    secure_homes = make_silos(tmp_path / "secure", folders)
    plain_homes = make_silos(tmp_path / "plain", folders, identities=False)
    # the same (initial) model on both paths, evaluated on the same split of the same data
    secure_run = FederatedRun(secure_plan, tmp_path / "run-s", "m-1")
    plain_run = FederatedRun(plain_plan, tmp_path / "run-p", "m-1", aggregation=PlainAggregation())
    secure, s_report = secure_run._evaluate(grid_for(secure_homes), 2, _record(secure_plan), split)
    plain, p_report = plain_run._evaluate(grid_for(plain_homes), 2, _record(plain_plan), split)
    assert len(s_report.replied) == len(p_report.replied) == 3
    prefix = "eval" if split == "validation" else "test"
    names = {f"{prefix}-{m}" for m in ("loss", "accuracy", "auc", "auc-bin-error", "ece")}
    assert names <= set(plain) and names <= set(secure)
    for name in names:  # counters travel with 16 fractional bits under secure aggregation
        assert secure[name] == pytest.approx(plain[name], rel=1e-4, abs=1e-4), name
    assert set(secure) - set(plain) == {"secure-contributors"}

    # and the metrics are those of the silos' own counters, added up
    arrays = {wire.MODEL: _record(plain_plan)[wire.MODEL].numpy()}
    local = [evaluate_round(h, plain_plan, arrays, split, 2) for h in plain_homes]
    direct = metrics_from_sums(plain_plan, sum_counters(plain_plan, local))
    for name, value in direct.items():
        assert plain[f"{prefix}-{name}"] == pytest.approx(value, rel=1e-12)
    assert set(plain) == {f"{prefix}-{name}" for name in direct}


def test_validation_and_test_splits_are_disjoint_and_test_is_held_out(
    folders: list[Path], tmp_path: Path
) -> None:
    from silo_client.data.dataset_builder import build_dataset
    from silo_client.data.preprocessing import Preprocessing
    from silo_client.local_data import load_local_data

    plan = parse_plan(PLAIN)
    home = make_silos(tmp_path, folders[:1], identities=False)[0]
    full = build_dataset(
        Path(home.dataset_folder("default")), Preprocessing(input_size=32), home.cache_dir
    )
    data = load_local_data(home, plan)
    sizes = [len(data.train_labels), len(data.val_labels), len(data.test_labels)]
    assert sum(sizes) == len(full.labels) and min(sizes) >= 2
    flat = {
        name: {bytes(x.numpy().tobytes()) for x in images}
        for name, images in (
            ("train", data.train_images),
            ("val", data.val_images),
            ("test", data.test_images),
        )
    }
    assert flat["test"].isdisjoint(flat["train"] | flat["val"])
    # the test split does not move when only the validation fraction changes
    other = parse_plan(PLAIN.replace("validation_fraction: 0.25", "validation_fraction: 0.1"))
    assert np.array_equal(load_local_data(home, other).test_images, data.test_images)
    # without a test fraction, the split is the one of plans written before it existed
    old = parse_plan(PLAIN.replace(", test_fraction: 0.25", ""))
    old_data = load_local_data(home, old)
    train, val = old_data.train_images, old_data.val_images
    ref_train, ref_val = full.split(0.25, seed=3)
    assert np.array_equal(train, ref_train.images) and np.array_equal(val, ref_val.images)
    assert old_data.test_images is None


@pytest.mark.parametrize("secure", [False, True])
def test_the_test_split_is_evaluated_once_after_the_last_round(
    folders: list[Path], tmp_path: Path, secure: bool
) -> None:
    plan = parse_plan(SECURE if secure else PLAIN)
    homes = make_silos(tmp_path / "silos", folders, identities=secure)
    aggregation = None if secure else PlainAggregation()
    out = tmp_path / "run"
    result = FederatedRun(plan, out, "m-2", aggregation=aggregation).run(grid_for(homes))
    assert result.status == "done"
    events = read_events(out / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds == [
        "run-started",
        "round-finished",
        "round-finished",
        "test-evaluated",
        "run-finished",
    ]
    test = events[3]
    assert test["round"] == 2 and test["participants"] == 3
    assert {"test-loss", "test-accuracy", "test-auc", "test-ece"} <= set(test["test"])
    assert result.test_metrics == test["test"]
    for record in result.rounds:
        assert "eval-auc" in record.eval_metrics and "test-auc" not in record.eval_metrics
    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert "held-out test splits" in card and "test-auc" in card
    saved = json.loads((out / "model" / "metrics.json").read_text())
    assert saved["test"] == test["test"]
    from aggregator.report import write_report

    assert "Held-out test splits" in write_report(out).read_text()


def test_silos_refuse_an_unknown_split_and_an_early_test(
    folders: list[Path], tmp_path: Path
) -> None:
    plan = parse_plan(PLAIN)
    homes = make_silos(tmp_path / "silos", folders, identities=False)
    run = FederatedRun(plan, tmp_path / "run", "m-3", aggregation=PlainAggregation())
    grid = grid_for(homes)
    metrics, report = run._evaluate(grid, 2, _record(plan), "train")
    assert metrics == {} and len(report.refused) == 3
    assert all("only on validation or test" in r for r in report.refused.values())
    metrics, report = run._evaluate(grid, 1, _record(plan), "test")
    assert metrics == {}
    assert all("once, after the last round" in r for r in report.refused.values())
    for home in homes:
        assert not any(home.cache_dir.iterdir()), "no data may be loaded for a refused split"


def test_secure_silos_refuse_an_unknown_split(folders: list[Path], tmp_path: Path) -> None:
    plan = parse_plan(SECURE)
    homes = make_silos(tmp_path / "silos", folders)
    run = FederatedRun(plan, tmp_path / "run", "m-4")
    metrics, report = run._evaluate(grid_for(homes), 2, _record(plan), "training-set")
    assert metrics == {} and len(report.refused) == 3
    assert all("only on validation or test" in r for r in report.refused.values())
