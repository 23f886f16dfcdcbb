"""Reports and the model registry of a finished run: report.html with PNGs (rendered in headless
Chromium when installed), the exported model, plan, metrics and model card, `aggregator models`
and `aggregator export`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.aggregation import PlainAggregation
from aggregator.artifacts import load_model
from aggregator.federated_run import FederatedRun
from aggregator.model_registry import FILES
from aggregator.report import write_report
from silo_client.client_app import app as client_app
from tests.conftest import TINY_PLAN
from tests.harness import InProcessGrid
from tests.required_tools import tool_missing
from training_plan import parse_plan

PLAN = TINY_PLAN.replace("rounds: 1", "rounds: 2") + "secure_aggregation: {enabled: false}\n"
CHROMIUM = Path("/usr/bin/chromium")
CLI = Path(sys.executable).parent / "aggregator"


@pytest.fixture
def finished_run(silo_homes: list, tmp_path: Path) -> Path:
    grid = InProcessGrid(
        {i + 1: (client_app, {"home": str(h.root)}) for i, h in enumerate(silo_homes)}
    )
    out = tmp_path / "runs" / "run-a"
    result = FederatedRun(parse_plan(PLAN), out, "run-a", aggregation=PlainAggregation()).run(grid)
    assert result.status == "done"
    return out


def test_report_model_registry_and_export(finished_run: Path, tmp_path: Path) -> None:
    # report: HTML referencing PNGs that exist and are real images
    page = write_report(finished_run)
    text = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == 3
    for name in images:
        png = finished_run / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5_000
    assert "run-a" in text and "<table>" in text

    # registry: the finished run exported its model, plan, metrics and card
    folder = finished_run / "model"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    final = load_model(finished_run / "final_model.safetensors")
    exported = load_model(folder / "model.safetensors")
    assert set(final) == set(exported)
    card = (folder / "MODEL_CARD.md").read_text()
    for heading in ("## Task", "## Data provenance", "## Metrics", "## Privacy settings"):
        assert heading in card
    assert "silos contributing per round: min 3, max 3" in card
    assert "secure aggregation OFF" in card
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]

    listed = subprocess.run(
        [str(CLI), "models", "--runs", str(finished_run.parent), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    models = json.loads(listed.stdout)
    assert [m["run_id"] for m in models] == ["run-a"] and models[0]["rounds"] == 2

    target = tmp_path / "exported"
    subprocess.run(
        [str(CLI), "export", str(finished_run), "--to", str(target)], check=True, text=True
    )
    assert sorted(p.name for p in target.iterdir()) == sorted(FILES)
    again = subprocess.run(
        [str(CLI), "export", str(finished_run), "--to", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 2 and "already holds" in again.stderr
    assert "Traceback" not in again.stderr

    # the CLI writes the same report
    (finished_run / "report.html").unlink()
    subprocess.run([str(CLI), "report", str(finished_run)], check=True, capture_output=True)
    assert (finished_run / "report.html").exists()


def test_report_of_a_folder_without_a_run_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(CLI), "report", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and "holds no run" in done.stderr
    assert "Traceback" not in done.stderr


def test_report_renders_in_headless_chromium(finished_run: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        tool_missing("Debian 'chromium' not installed (apt-get install chromium; .ci/run does)")
    import numpy as np
    from PIL import Image

    page = write_report(finished_run)
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    # non-trivial: the page is not blank, and plot colours (not only black text on white) show
    assert pixels.std() > 10
    coloured = (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).mean()
    assert coloured > 0.001, "no plot colours on the screenshot: the PNGs did not render"
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
