"""Ingest from a real Orthanc over DICOMweb (QIDO-RS + WADO-RS) and DIMSE (C-FIND + C-GET);
wrong password, unreachable PACS and an empty query give one clear line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from silo_client.cli import app, main
from silo_client.data.dicom_dataset import Preprocessing, build_dataset
from silo_client.home import SiloHome, init_silo_home
from tests.pacs.conftest import AET, OUR_AET, PASSWORD, USER, Orthanc, free_port

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> SiloHome:
    return init_silo_home(tmp_path / "home", "site-a")


def _add(home: SiloHome, *args: str) -> dict:
    result = runner.invoke(app, ["data", "add", *args, "--home", str(home.root), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def _error(capsys, monkeypatch, home: SiloHome, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["silo", "data", "add", "x", *args, "--home", str(home.root)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err
    return " ".join(err.split())


def _web(orthanc: Orthanc) -> list[str]:
    return ["--dicomweb", orthanc.dicomweb, "--user", USER, "--password", PASSWORD]


def test_dicomweb_pull_ingest_and_rerun(
    orthanc: Orthanc, pacs_hospital: Path, home: SiloHome
) -> None:
    labels = str(pacs_hospital / "labels.csv")
    out = _add(home, "web", *_web(orthanc), "--labels", labels)
    n = len(list((pacs_hospital / "dicom").iterdir()))
    assert out["pulled"] == n + 1  # the images and the SR
    cat = out["catalogue"]
    assert cat["ok"] == n and cat["skipped"] == 1 and cat["source_kind"] == "dicomweb"
    assert "unlabelled" not in cat["labels"]
    assert any("structured report" in r for r in cat["skip_reasons"])
    assert PASSWORD not in json.dumps(out)
    again = _add(home, "web", *_web(orthanc), "--labels", labels)
    assert again["pulled"] == 0 and again["unchanged"] == n + 1
    data = build_dataset(SiloHome.open(home.root).dataset_folder("web"), Preprocessing(16))
    assert len(data) == n


def test_dicomweb_query_filters(orthanc: Orthanc, pacs_hospital: Path, home: SiloHome) -> None:
    out = _add(home, "ct", *_web(orthanc), "--query", "Modality=CT")
    n = len(list((pacs_hospital / "dicom").iterdir()))
    assert out["pulled"] == n and out["catalogue"]["skipped"] == 0


def test_dicomweb_errors(orthanc: Orthanc, pacs_hospital: Path, home: SiloHome, capsys,
                         monkeypatch) -> None:  # fmt: skip
    err = _error(capsys, monkeypatch, home, "--dicomweb", orthanc.dicomweb, "--user", USER,
                 "--password", "wrong")  # fmt: skip
    assert "refused the credentials (HTTP 401)" in err and "wrong" not in err
    err = _error(capsys, monkeypatch, home, *_web(orthanc), "--query", "PatientID=NOBODY")
    assert "matched no instances" in err and "widen --query" in err
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    err = _error(capsys, monkeypatch, home, "--dicomweb", dead, "--user", USER,
                 "--password", PASSWORD)  # fmt: skip
    assert f"cannot reach the PACS at {dead}" in err
    assert SiloHome.open(home.root).datasets == {}


def test_dimse_pull(orthanc: Orthanc, pacs_hospital: Path, home: SiloHome) -> None:
    dimse = ["--dimse", orthanc.dimse, "--aet", OUR_AET, "--called-aet", AET]
    out = _add(home, "dimse", *dimse, "--query", "Modality=CT",
               "--labels", str(pacs_hospital / "labels.csv"))  # fmt: skip
    n = len(list((pacs_hospital / "dicom").iterdir()))
    assert out["pulled"] == n and out["catalogue"]["ok"] == n
    assert out["catalogue"]["source_kind"] == "dimse"
    again = _add(home, "dimse", *dimse, "--query", "Modality=CT")
    assert again["pulled"] == 0


def test_dimse_errors(orthanc: Orthanc, pacs_hospital: Path, home: SiloHome, capsys,
                      monkeypatch) -> None:  # fmt: skip
    err = _error(capsys, monkeypatch, home, "--dimse", f"127.0.0.1:{free_port()}")
    assert "cannot reach the PACS at 127.0.0.1:" in err
    err = _error(capsys, monkeypatch, home, "--dimse", orthanc.dimse, "--aet", OUR_AET,
                 "--called-aet", AET, "--query", "PatientID=NOBODY")  # fmt: skip
    assert "matched no series" in err
