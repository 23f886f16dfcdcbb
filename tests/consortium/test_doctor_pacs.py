"""`silo doctor` echoes the silo's PACS sources: C-ECHO (DIMSE), QIDO-RS ping (DICOMweb).

Against the real Orthanc of tests/pacs (a plain process on 127.0.0.1) and a closed port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from silo_client.data.pacs import PacsAuth
from silo_client.pacs_check import dicomweb_ping, dimse_echo, pacs_sources
from tests.pacs.conftest import PASSWORD, USER, Orthanc, free_port, orthanc_missing, running_orthanc
from tests.required_tools import tool_missing

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A real Orthanc for this module (the same launcher as tests/pacs)."""
    if orthanc_missing():
        tool_missing("Orthanc PACS not installed (apt-get install orthanc orthanc-dicomweb)")
    with running_orthanc(tmp_path_factory.mktemp("orthanc-doctor")) as server:
        yield server


def test_dimse_echo(pacs: Orthanc) -> None:
    ok, line = dimse_echo(pacs.dimse)
    assert ok and "answers C-ECHO" in line
    ok, line = dimse_echo(f"127.0.0.1:{free_port()}")
    assert not ok and "unreachable" in line and "accepts DICOM connections" in line
    ok, line = dimse_echo("pacs-without-port")
    assert not ok and "not HOST:PORT" in line


def test_dicomweb_ping(pacs: Orthanc) -> None:
    ok, line = dicomweb_ping(pacs.dicomweb, PacsAuth(user=USER, password=PASSWORD))
    assert ok and "answers QIDO-RS" in line
    ok, line = dicomweb_ping(pacs.dicomweb, PacsAuth())
    assert not ok and "needs credentials" in line and "FEDSILO_PACS_PASSWORD" in line
    ok, line = dicomweb_ping(pacs.dicomweb, PacsAuth(user=USER, password="wrong"))
    assert not ok and "were refused" in line
    ok, line = dicomweb_ping(f"http://127.0.0.1:{free_port()}/dicom-web", PacsAuth())
    assert not ok and "unreachable" in line
    ok, line = dicomweb_ping(pacs.dicomweb, PacsAuth(user=USER))
    assert not ok and "--password" in line  # incomplete credentials in the environment


def _register(home: Path, name: str, kind: str, source: str) -> None:
    """The record `silo data add --dimse/--dicomweb` leaves in the catalogue."""
    from silo_client.data.catalogue import Catalogue, DatasetRecord

    now = time.time()
    record = DatasetRecord(
        name=name, source_kind=kind, source=source, files_root=str(home / name),
        labels_csv=None, label_column="label", key_tag="StudyInstanceUID", query="",
        state="ready", created=now, updated=now,
    )  # fmt: skip
    with Catalogue.of_home(home) as catalogue:
        catalogue.upsert_dataset(record)


def test_silo_doctor_reports_each_pacs(pacs: Orthanc, tmp_path: Path) -> None:
    home = tmp_path / "silo"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="250")
    for key in ("FEDSILO_PACS_USER", "FEDSILO_PACS_PASSWORD", "FEDSILO_PACS_TOKEN"):
        env.pop(key, None)
    init = [str(BIN / "silo"), "init", "--home", str(home), "--name", "h"]
    done = subprocess.run(init, capture_output=True, text=True, env=env, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pacs_sources(home) == []
    doctor = [str(BIN / "silo"), "doctor", "--home", str(home)]
    out = subprocess.run(doctor, capture_output=True, text=True, env=env, timeout=120).stdout
    assert "ok   pacs         no dataset pulled from a PACS" in out
    closed = free_port()
    _register(home, "ct-dimse", "dimse", pacs.dimse)
    _register(home, "ct-web", "dicomweb", pacs.dicomweb)
    _register(home, "old-pacs", "dimse", f"127.0.0.1:{closed}")
    assert [s.kind for s in pacs_sources(home)] == ["dicomweb", "dimse", "dimse"]
    done = subprocess.run(doctor, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1  # the unjoined silo and the PACS lines below fail
    lines = [line for line in done.stdout.splitlines() if " pacs " in line]
    assert len(lines) == 3, done.stdout
    assert any(
        line.startswith("ok") and "answers C-ECHO" in line and "ct-dimse" in line for line in lines
    ), "\n".join(lines)
    assert any(
        line.startswith("FAIL") and f":{closed} unreachable" in line and "old-pacs" in line
        for line in lines
    )
    assert any(line.startswith("FAIL") and "needs credentials" in line for line in lines)
    env.update(FEDSILO_PACS_USER=USER, FEDSILO_PACS_PASSWORD=PASSWORD)
    out = subprocess.run(doctor, capture_output=True, text=True, env=env, timeout=120).stdout
    assert any(
        line.startswith("ok") and "answers QIDO-RS" in line and "ct-web" in line
        for line in out.splitlines()
    ), out
    assert "Traceback" not in out
