"""`fedsilo demo --rounds 2` end to end: real SuperLink and SuperNodes (TLS on 127.0.0.1)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_runs_a_real_federation(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    fedsilo = Path(sys.executable).parent / "fedsilo"
    completed = subprocess.run(
        [
            str(fedsilo),
            "demo",
            "--rounds",
            "2",
            "--images-per-hospital",
            "60",
            "--out",
            str(out),
            "--timeout",
            "600",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert set(summary["local_only_auc"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert {"federated_auc", "local_only_auc", "wall_seconds"} <= set(summary)
    assert isinstance(summary["federated_beats_mean_local"], bool)
    assert (out / "metrics.png").stat().st_size > 10_000
    assert (out / "final_model.safetensors").stat().st_size > 100_000
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    # the model improved: the round-0 model is a random network
    assert float(rows[-1]["federated_loss"]) < float(rows[0]["federated_loss"])
    assert float(rows[-1]["federated_auc"]) > float(rows[0]["federated_auc"])
    # every process the demo started is gone
    leftover = subprocess.run(
        ["pgrep", "-f", str(out)], capture_output=True, text=True, check=False
    )
    assert leftover.stdout.strip() == ""


def test_demo_reports_a_bad_plan_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: x\nmodel: {name: resnet10}\ntraining: {lerning_rate: 1}\n")
    fedsilo = Path(sys.executable).parent / "fedsilo"
    completed = subprocess.run(
        [str(fedsilo), "demo", "--plan", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert "training.lerning_rate: unknown key" in completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout


def test_segmentation_demo_runs_a_real_federation(tmp_path: Path) -> None:
    """3-D CT series (DICOM SEG and NIfTI masks) -> UNet through real SuperLink/SuperNodes with
    secure aggregation; the silos' test splits are evaluated once, through secure sums."""
    out = tmp_path / "seg-demo"
    fedsilo = Path(sys.executable).parent / "fedsilo"
    completed = subprocess.run(
        [str(fedsilo), "demo", "--task", "segmentation", "--rounds", "1", "--out", str(out),
         "--timeout", "600"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["rounds"] == 1
    assert summary["secure_aggregation"] is True and summary["model"] == "unet"
    assert set(summary["local_only_dice"]) == {"hospital-0", "hospital-1", "hospital-2"}
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1]
    # one round of training beats the random network on the pooled held-out cases
    assert float(rows[1]["federated_dice"]) > float(rows[0]["federated_dice"])
    silo_test = summary["silo_test_splits"]
    assert 0.0 <= silo_test["dice"] <= 1.0  # the secure sums of the silos' own test splits
    events = [json.loads(line) for line in (out / "run" / "events.jsonl").open()]
    tested = [e for e in events if e["event"] == "test-evaluated"]
    assert len(tested) == 1 and tested[0]["participants"] == 3
    assert (out / "metrics.png").stat().st_size > 10_000
    leftover = subprocess.run(
        ["pgrep", "-f", str(out)], capture_output=True, text=True, check=False
    )
    assert leftover.stdout.strip() == ""


def test_demo_refuses_an_unknown_task_in_one_line(tmp_path: Path) -> None:
    fedsilo = Path(sys.executable).parent / "fedsilo"
    completed = subprocess.run(
        [str(fedsilo), "demo", "--task", "detection", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert "'detection' is not a demo task" in completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
