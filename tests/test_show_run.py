"""`aggregator show-run`: a run's rounds, and where a secure round's time went."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from aggregator.artifacts import EventLog
from aggregator.cli import app


def _round(events: EventLog, number: int, timings: dict[str, float], **evaluate: float) -> None:
    events.write(
        "round-finished",
        round=number,
        train={},
        evaluate=evaluate,
        participants=3,
        refused={},
        bytes_received=1234,
        seconds=13.4,
        timings=timings,
        notes=[],
    )


def test_show_run_splits_the_mask_stage_from_the_other_exchanges(tmp_path: Path) -> None:
    events = EventLog(tmp_path / "events.jsonl")
    secure = {"train-exchange": 13.4, "aggregate": 0.01, "train.hello": 1.4, "train.mask": 9.1}
    secure |= {"train.advertise": 0.8, "train.share": 0.7, "train.consistency": 0.6}
    secure |= {"train.unmask": 0.8, "evaluate.mask": 2.0, "evaluate.hello": 0.5}
    _round(events, 1, secure)
    _round(events, 2, {"train-exchange": 5.0}, **{"eval-loss": 0.25, "eval-accuracy": 0.9})
    result = CliRunner().invoke(app, ["show-run", str(tmp_path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    first, second = (line for line in result.output.splitlines() if line.startswith("│ "))
    cells = [c.strip() for c in first.strip("│ ").split("│")]
    assert cells == ["1", "3", "-", "-", "1,234", "13.4", "11.1", "4.8", "-"]
    cells = [c.strip() for c in second.strip("│ ").split("│")]
    assert cells == ["2", "3", "0.2500", "0.900", "1,234", "13.4", "-", "-", "-"]


def test_show_run_of_a_folder_without_a_run_is_one_line(tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "aggregator"
    done = subprocess.run(
        [str(cli), "show-run", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds no run (no events.jsonl); pass a run's out-dir"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written
