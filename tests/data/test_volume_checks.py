"""`silo data check` on 3-D data: slice-thickness and slice-spacing spread across series, and
series that cannot be volumes (gaps, duplicates), found from the catalogue and file headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from silo_client.cli import app
from silo_client.data.catalogue import Catalogue
from silo_client.data.checks import check_series
from silo_client.home import SiloHome, init_silo_home
from tests.data import series_factory as sf

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> SiloHome:
    return init_silo_home(tmp_path / "home", "site-a")


def _add_and_check(home: SiloHome, folder: Path) -> dict[str, str]:
    added = runner.invoke(
        app, ["data", "add", "ct", "--dicom-dir", str(folder), "--home", str(home.root), "--json"]
    )
    assert added.exit_code == 0, added.output
    result = runner.invoke(
        app, ["data", "check", "ct", "--home", str(home.root), "--json", "--min-images", "1"]
    )
    assert result.exit_code == 0, result.output
    return {w["code"]: w["message"] for w in json.loads(result.output)["warnings"]}


def test_thickness_and_spacing_spread(home: SiloHome, tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    sf.write(folder / "thin", sf.series(n=5, dz=1.0))
    sf.write(folder / "thick", sf.series(n=5, dz=5.0))
    codes = _add_and_check(home, folder)
    assert "SliceThickness ranges from 1 to 5 mm across 2 series" in codes["slice-thickness-spread"]
    assert "slice spacing ranges from 1 to 5 mm" in codes["slice-spacing-spread"]
    assert "series-geometry" not in codes


def test_even_series_give_no_series_warning(home: SiloHome, tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    sf.write(folder / "a", sf.series(n=5, dz=2.0))
    sf.write(folder / "b", sf.series(n=4, dz=2.5))
    codes = _add_and_check(home, folder)
    assert not {"slice-thickness-spread", "slice-spacing-spread", "series-geometry",
                "uneven-slices"} & set(codes)  # fmt: skip


def test_gap_and_duplicate_are_reported(home: SiloHome, tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    gap = sf.series(n=6, dz=2.0)
    del gap[3]
    sf.write(folder / "gap", gap)
    sf.write(folder / "ok", sf.series(n=5, dz=2.0))
    codes = _add_and_check(home, folder)
    msg = codes["series-geometry"]
    assert msg.startswith("1 of 2 series cannot be used as volumes") and "missing slice(s)" in msg
    assert "gap/" in msg  # names the file next to the gap


def test_uneven_spacing_is_reported(home: SiloHome, tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    sf.write(folder / "a", sf.series(steps=[2.0, 2.0, 2.05, 2.0]))
    codes = _add_and_check(home, folder)
    assert "slice spacing varies" in codes["uneven-slices"]


def test_single_images_cost_nothing(home: SiloHome, hospital: Path, monkeypatch) -> None:
    """2-D data (one image per series) reads no header in check_series."""
    import pydicom

    runner.invoke(app, ["data", "add", "xr", "--dicom-dir", str(hospital), "--home",
                        str(home.root)])  # fmt: skip
    calls: list[str] = []
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(a[0]))
    with Catalogue.of_home(home.root) as catalogue:
        assert check_series(catalogue, "xr") == []
    assert calls == []
