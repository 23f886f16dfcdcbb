"""Ingest from a real Orthanc over DICOMweb (QIDO-RS + WADO-RS) and DIMSE (C-FIND + C-GET);
wrong password, unreachable PACS and an empty query give one clear line."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from silo_client.cli import app, main
from silo_client.data.dataset_builder import build_dataset
from silo_client.data.preprocessing import Preprocessing
from silo_client.home import SiloHome, init_silo_home
from tests.pacs.conftest import AET, OUR_AET, PASSWORD, USER, Orthanc, free_port
from tests.required_tools import tool_missing

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


# ------------------------------------------------------------------ every instance accounted for


@pytest.fixture(scope="module")
def big_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, int]]:
    """Its own Orthanc: 200 one-instance CT series (as CR/DX often come), plus one series of an
    image SOP class outside the usual CT/MR/CR set (VL photographic, modality XC)."""
    from pydicom.uid import VLPhotographicImageStorage

    from fedsilo.synthetic import generate_hospitals
    from tests.data.dicom_factory import image_dataset, save, textured
    from tests.pacs.conftest import orthanc_missing, running_orthanc

    if orthanc_missing():
        tool_missing("Orthanc PACS not installed (apt-get install orthanc orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("big-pacs")
    generate_hospitals(root, hospitals=1, images_per_hospital=200, seed=5, image_size=16)
    files = sorted((root / "hospital-0" / "dicom").iterdir())
    odd = image_dataset(textured(16), sop_class=VLPhotographicImageStorage, Modality="XC")
    files.append(save(odd, root / "odd.dcm"))
    (root / "orthanc").mkdir()
    with running_orthanc(root / "orthanc") as pacs:
        pacs.upload(files)
        yield pacs, len(files) - 1


@contextlib.contextmanager
def _busy_thread() -> Iterator[None]:
    """A Python thread spinning in this process: GIL contention, as on a loaded silo, which
    is what made pynetdicom's reactor drop the first answer of a request now and then."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    # short GIL switch interval: more thread switches (more chances for the race), and
    # the pull's own threads wait less for the GIL, which keeps the test short
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        sys.setswitchinterval(interval)


def test_dimse_pull_accounts_for_every_instance(big_pacs: tuple[Orthanc, int],
                                                tmp_path: Path) -> None:  # fmt: skip
    """Three fresh C-GET pulls of 200 one-instance series under GIL contention: each one
    stores all 200 (before the fix, a dropped C-FIND answer left 1-4 out, silently)."""
    pacs, n = big_pacs
    dimse = ["--dimse", pacs.dimse, "--aet", OUR_AET, "--called-aet", AET]
    with _busy_thread():
        for attempt in range(3):
            home = init_silo_home(tmp_path / f"home-{attempt}", "site-a")
            out = _add(home, "all", *dimse, "--query", "Modality=CT")
            assert (out["pulled"], out["catalogue"]["ok"], out["files"]) == (n, n, n)


def test_dicomweb_pull_accounts_for_every_instance(big_pacs: tuple[Orthanc, int],
                                                   tmp_path: Path) -> None:  # fmt: skip
    pacs, n = big_pacs
    home = init_silo_home(tmp_path / "home", "site-a")
    web = ["--dicomweb", pacs.dicomweb, "--user", USER, "--password", PASSWORD]
    out = _add(home, "all", *web, "--query", "Modality=CT")
    assert (out["pulled"], out["catalogue"]["ok"], out["files"]) == (n, n, n)


def test_dimse_proposes_the_classes_the_find_lists(big_pacs: tuple[Orthanc, int],
                                                  tmp_path: Path) -> None:  # fmt: skip
    """A VL photographic image (not in any fixed list of classes a silo proposes): the C-FIND
    names its SOP class, the C-GET association proposes it, and it arrives."""
    pacs, _ = big_pacs
    home = init_silo_home(tmp_path / "home", "site-a")
    out = _add(home, "xc", "--dimse", pacs.dimse, "--aet", OUR_AET, "--called-aet", AET,
               "--query", "Modality=XC")  # fmt: skip
    assert (out["pulled"], out["files"], out["undelivered"]) == (1, 1, [])


def test_dicomweb_instance_gone_before_retrieval_is_named(tmp_path: Path, monkeypatch) -> None:
    """An instance deleted on the PACS between QIDO-RS and WADO-RS: the series answer lacks it,
    the one-by-one retry gets 404; the rest is registered, the missing one named with why."""
    import requests

    from fedsilo.synthetic import generate_hospitals
    from silo_client.data import pacs as pacs_module
    from tests.pacs.conftest import orthanc_missing, running_orthanc

    if orthanc_missing():
        tool_missing("Orthanc PACS not installed (apt-get install orthanc orthanc-dicomweb)")
    generate_hospitals(tmp_path / "data", hospitals=1, images_per_hospital=4, seed=2,
                       image_size=16)  # fmt: skip
    (tmp_path / "orthanc").mkdir()
    with running_orthanc(tmp_path / "orthanc") as pacs:
        pacs.upload(sorted((tmp_path / "data" / "hospital-0" / "dicom").iterdir()))
        fetch = pacs_module._wado_fetch

        def delete_one_then_fetch(*args, **kwargs):  # the PACS loses one instance meanwhile
            with requests.Session() as s:
                s.auth, s.trust_env = (USER, PASSWORD), False
                victim = s.get(f"{pacs.url}/instances", timeout=10).json()[0]
                s.delete(f"{pacs.url}/instances/{victim}", timeout=10).raise_for_status()
            monkeypatch.setattr(pacs_module, "_wado_fetch", fetch)
            return fetch(*args, **kwargs)

        monkeypatch.setattr(pacs_module, "_wado_fetch", delete_one_then_fetch)
        home = init_silo_home(tmp_path / "home", "site-a")
        out = _add(home, "x", *_web(pacs))
    assert (out["pulled"], out["catalogue"]["ok"], len(out["undelivered"])) == (3, 3, 1)
    assert "HTTP 404" in out["undelivered"][0]["reason"]
