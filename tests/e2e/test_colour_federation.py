"""A colour plan (preprocessing.channels: 3) trained end to end through secure aggregation with
real SuperLink/SuperNode processes: three hospitals of colour photographs (JPEG YBR_FULL_422,
RLE RGB, YBR_FULL ...) registered with `silo data add`, plus a grayscale CT hospital whose images
do not fit the plan and which refuses it at the gate, with the reason, before loading any data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.artifacts import load_model
from fedsilo.synthetic import generate_colour_hospitals, generate_hospitals
from silo_client.data.ingest import register_dataset
from silo_client.home import SiloHome, init_silo_home
from tests.e2e.cluster import govern, running_plan

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]

PLAN = (
    "title: colour\n"
    "model: {name: resnet10}\n"
    "preprocessing: {input_size: 32, channels: 3}\n"
    "training: {batch_size: 8, local_epochs: 1}\n"
    "federation: {rounds: 1, min_silos: 3, evaluate_every: 1}\n"
    "secure_aggregation: {max_weight: 40}\n"
)


def _prepare_silos(tmp_path: Path) -> list[SiloHome]:
    generate_colour_hospitals(
        tmp_path / "colour", hospitals=3, images_per_hospital=16, seed=2, image_size=32
    )
    generate_hospitals(tmp_path / "gray", hospitals=1, images_per_hospital=12, seed=2,
                       image_size=32)  # fmt: skip
    sources = [tmp_path / "colour" / f"hospital-{k}" for k in range(3)]
    sources.append(tmp_path / "gray" / "hospital-0")
    homes = []
    for k, source in enumerate(sources):
        home = init_silo_home(tmp_path / "silos" / f"site-{k}", f"site-{k}")
        register_dataset(
            home, "default", source_kind="dicom-dir", source=str(source / "dicom"),
            files_root=source / "dicom", labels_csv=source / "labels.csv",
        )  # fmt: skip
        homes.append(SiloHome.open(home.root))
    govern(homes, PLAN)
    return homes


def test_colour_plan_trains_through_secure_aggregation(tmp_path: Path) -> None:
    homes = _prepare_silos(tmp_path)
    with running_plan(tmp_path, homes, PLAN, "colour") as run:
        events = run.wait_for_end(900)
        out = run.out
    kinds = [e["event"] for e in events]
    assert "run-finished" in kinds, events[-1]
    rounds = [e for e in events if e["event"] == "round-finished"]
    assert len(rounds) == 1
    for event in rounds:
        assert event["participants"] == 3
        assert len(event["refused"]) == 1, event["refused"]
        (reason,) = event["refused"].values()
        assert "none of this site's images fit the plan: they are grayscale (MONOCHROME2)" in reason
        assert event["evaluate"]["secure-contributors"] == 3.0
        assert "takes colour images (preprocessing.channels: 3)" in reason
    first = load_model(out / "rounds" / "round-000.safetensors")
    final = load_model(out / "final_model.safetensors")
    stem = next(k for k in final if final[k].ndim == 4)  # the first convolution
    assert final[stem].shape[1] == 3  # the network sees RGB
    assert any(not np.allclose(first[k], final[k]) for k in first), "the model must have advanced"
    gray_audit = (homes[3].root / "audit.jsonl").read_text()
    assert "plan-refused" in gray_audit and "images fit the plan" in gray_audit
