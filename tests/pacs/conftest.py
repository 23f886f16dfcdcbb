"""A real Orthanc PACS for the tests: a plain process on 127.0.0.1 with a generated config
(own storage folder, DICOMweb plugin, HTTP basic auth, RemoteAccessAllowed false), stopped by
PID in teardown. Skips with a reason when Debian's orthanc/orthanc-dicomweb are not installed
(.ci/run installs them)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.required_tools import tool_missing

USER, PASSWORD = "silo-reader", "pacs-test-password"
AET = "ORTHANC"
OUR_AET = "FEDSILO"


def _plugin() -> str | None:
    candidates = glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*") + glob.glob(
        "/usr/lib/orthanc/libOrthancDicomWeb.so*"
    )
    try:
        listed = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=10
        ).stdout.split()
        candidates = [p for p in listed if "libOrthancDicomWeb.so" in p] + candidates
    except (OSError, subprocess.SubprocessError):
        pass
    return next((p for p in candidates if os.path.isfile(p)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc: its URLs, ports and credentials."""

    http_port: int
    dicom_port: int
    folder: Path
    pid: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"127.0.0.1:{self.dicom_port}"

    def upload(self, paths: list[Path]) -> None:
        import requests

        with requests.Session() as session:
            session.auth = (USER, PASSWORD)
            session.trust_env = False
            for path in paths:
                r = session.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
                r.raise_for_status()


def orthanc_missing() -> bool:
    """True when the Orthanc binary or its DICOMweb plugin is not installed."""
    return _binary() is None or _plugin() is None


def _binary() -> str | None:
    found = shutil.which("Orthanc")
    return found or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)


@contextlib.contextmanager
def running_orthanc(folder: Path, ports: tuple[int, int] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc as a plain process on 127.0.0.1 with a generated config; stop it by PID.

    ``ports`` (HTTP, DICOM) restart a stopped one where it was, with the same storage."""
    import requests

    binary, plugin = _binary(), _plugin()
    if binary is None or plugin is None:
        raise RuntimeError("Orthanc PACS not installed (apt-get install orthanc orthanc-dicomweb)")
    http_port, dicom_port = ports or (free_port(), free_port())
    pacs = Orthanc(http_port, dicom_port, folder)
    config = {
        "Name": "fedsilo-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": pacs.http_port,
        "DicomPort": pacs.dicom_port,
        "DicomAet": AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "DicomModalities": {"silo": [OUR_AET, "127.0.0.1", free_port()]},
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomCheckModalityHost": False,
        "StorageCompression": False,
        "SaveJobs": False,
        "HttpDescribeErrors": False,
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    env = {**os.environ, "TCP_NODELAY": "1"}
    log = (folder / "orthanc.log").open("ab")
    proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
    pacs.pid = proc.pid
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {proc.returncode}; see {folder}/orthanc.log"
                )
            try:
                r = requests.get(f"{pacs.url}/system", auth=(USER, PASSWORD), timeout=1)
                if r.ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within 30 s; see {folder}/orthanc.log")
            time.sleep(0.1)
        yield pacs
    finally:
        if proc.poll() is None:  # a test may have stopped it already
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc for the session; stopped (SIGTERM, then SIGKILL) by PID afterwards."""
    if orthanc_missing():
        tool_missing(
            "Orthanc PACS not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)"
        )
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs


@pytest.fixture(scope="session")
def pacs_hospital(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic hospital (20 CT images) plus one SR, uploaded to Orthanc once."""
    from pydicom.uid import BasicTextSRStorage

    from fedsilo.synthetic import generate_hospitals
    from tests.data.dicom_factory import image_dataset, save, textured

    root = tmp_path_factory.mktemp("pacs-data")
    generate_hospitals(root, hospitals=1, images_per_hospital=20, seed=11, image_size=32)
    hospital = root / "hospital-0"
    sr = image_dataset(textured(16), sop_class=BasicTextSRStorage, Modality="SR")
    del sr.PixelData
    save(sr, root / "report.dcm")
    orthanc.upload([*sorted((hospital / "dicom").iterdir()), root / "report.dcm"])
    return hospital
