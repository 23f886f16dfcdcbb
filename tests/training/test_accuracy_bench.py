"""bench/accuracy.py --quick in a subprocess (classification, and segmentation): one table and a
JSON with every arm, a bar chart, and the secure-aggregation run equal to the plain run within the
codec's error bound.

No accuracy target or timing is asserted (a one-round, tiny-budget run says nothing about them);
secure vs plain within the bound is a correctness property and is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "accuracy.py"
ARMS = {
    "centralized",
    "alone:hospital-0",
    "alone:hospital-1",
    "alone:hospital-2",
    "federated-secure",
    "federated-plain",
}


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow
def test_quick_bench_prints_one_table_and_writes_every_arm(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _bench("--quick", "--out", str(out), "--workdir", str(tmp_path / "work"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / "accuracy.json").read_text())
    assert result["task"] == "classification"
    assert result["config"]["quick"] is True
    arms = {arm["arm"]: arm for arm in result["arms"]}
    assert set(arms) == ARMS
    for arm in arms.values():
        assert arm["passes_per_example"] == result["config"]["rounds"] * 1
        for metric in ("auc", "accuracy"):
            value = arm["metrics"][metric]
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (arm["arm"], metric, value)
        assert arm["per_round"][-1]["round"] == result["config"]["rounds"]
    assert [t["target"] for t in result["targets"]] == [
        "federated (secure) AUC within 0.02 of centralized",
        "federated (secure) AUC above every hospital alone",
    ]

    # one table with every arm, then a verdict per target
    text = done.stdout
    assert text.count("┏") == 1, "exactly one table"
    for label in (arm["label"] for arm in arms.values()):
        assert label in text
    for target in result["targets"]:
        assert ("PASS" if target["pass"] else "FAIL") + "  " + target["target"] in text

    # secure aggregation vs the plain run, same seeds, same silos: within the codec bound
    sp = result["secure_vs_plain"]
    assert 0.0 < sp["codec_bound_per_round"] <= sp["bound_round1"]
    assert sp["max_abs_diff_round1"] <= sp["bound_round1"], sp
    assert sp["round1_within_bound"] is True
    # ... and the comparison means something: the round moved the model far beyond the bound
    assert sp["largest_round1_change"] > 10 * sp["bound_round1"], sp
    assert sp["codec"]["w_max"] == 500.0 and sp["codec"]["silos"] == 3
    assert "within the codec bound" in text

    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_segmentation_bench_runs_every_arm_and_secure_matches_plain(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _bench(
        "--task", "segmentation", "--quick", "--out", str(out), "--workdir", str(tmp_path / "w")
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / "accuracy.json").read_text())
    assert result["task"] == "segmentation" and result["metric"] == "dice"
    assert result["metrics"] == ["dice", "hd95"]
    assert result["test_unit"] == "cases" and result["test_images"] == 6
    arms = {arm["arm"]: arm for arm in result["arms"]}
    assert set(arms) == ARMS
    for arm in arms.values():
        assert arm["passes_per_example"] == 1
        assert 0.0 <= arm["metrics"]["dice"] <= 1.0, arm
        hd95 = arm["metrics"]["hd95"]  # NaN: no case with a predicted and a true lesion
        assert math.isnan(hd95) or hd95 >= 0.0, arm
    # each silo trains on its own split; the pooled arm on all of them
    own = [int(arms[f"alone:hospital-{k}"]["trained_on"].split()[0]) for k in range(3)]
    assert arms["centralized"]["trained_on"] == f"{sum(own)} pooled"
    assert [t["target"] for t in result["targets"]] == [
        "federated (secure) Dice within 0.02 of centralized",
        "federated (secure) Dice above every hospital alone",
    ]
    text = done.stdout
    assert text.count("┏") == 1, "exactly one table"
    assert "Dice" in text and "HD95 mm" in text and "(6 cases)" in text

    sp = result["secure_vs_plain"]
    assert sp["max_abs_diff_round1"] <= sp["bound_round1"], sp
    assert sp["round1_within_bound"] is True
    assert sp["largest_round1_change"] > 10 * sp["bound_round1"], sp
    # the plan's max_weight is the largest silo's training cases (keeps the codec precise)
    assert sp["codec"]["w_max"] == float(max(own)) and sp["codec"]["silos"] == 3
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "argument --rounds: expected a whole number >= 1, got 0"),
        (["--local-epochs", "two"], "argument --local-epochs: expected a whole number >= 1"),
        (["--task", "detection"], "argument --task: invalid choice: 'detection'"),
        (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got 0"),
        (["--strategy-arg", "eta"], "argument --strategy-arg: expected NAME=NUMBER"),
        (["--dp", "1,x"], "argument --dp: expected target epsilons like 1,3,8 or 'none'"),
        (["--dp", "0"], "argument --dp: each epsilon must be in (0, 100]"),
        (
            ["--task", "segmentation", "--dp", "3"],
            "--dp: the DP arms run for --task classification",
        ),
    ],
)
def test_bad_arguments_get_one_line_and_a_nonzero_exit(args: list[str], message: str) -> None:
    done = _bench(*args, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_out_pointing_at_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("{}")
    done = _bench("--quick", "--out", str(target), timeout=60)
    assert done.returncode == 2
    assert f"--out {target} is a file" in done.stderr
    assert "Traceback" not in done.stderr
    assert target.read_text() == "{}", "nothing already there is overwritten"


def test_a_strategy_argument_the_plan_refuses_is_one_line() -> None:
    done = _bench("--quick", "--strategy", "fedavgm", "--strategy-arg", "eta=3", timeout=120)
    assert done.returncode == 2
    assert "the benchmark's plan is invalid at federation" in done.stdout
    assert "'eta' is not an argument of fedavgm" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_dp_arms_default_to_epsilons_1_3_8_for_classification() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.accuracy import parse_args

    assert parse_args([])[0].dp_epsilons == (1.0, 3.0, 8.0)
    assert parse_args(["--quick"])[0].dp_epsilons == ()
    assert parse_args(["--dp", "none"])[0].dp_epsilons == ()
    assert parse_args(["--task", "segmentation"])[0].dp_epsilons == ()


@pytest.mark.slow
def test_quick_bench_with_a_dp_arm(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _bench("--quick", "--dp", "8", "--out", str(out), "--workdir", str(tmp_path / "w"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "accuracy.json").read_text())
    arms = {arm["arm"]: arm for arm in result["arms"]}
    assert set(arms) == ARMS | {"federated-dp-eps8"}
    dp = arms["federated-dp-eps8"]
    assert 0.0 <= dp["metrics"]["auc"] <= 1.0
    assert 0 < dp["metrics"]["epsilon_spent"] <= 8 * 1.0001
    assert "DP eps 8" in dp["label"]
