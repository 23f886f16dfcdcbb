"""Pulls from a real Orthanc holding what a hospital PACS holds beside CT: JPEG 2000, MR, RT
Dose / Structure Set / Ion Plan, an ECG, and an MPEG-2 video the silo does not accept over
DIMSE. Every instance the query selects arrives or is named with the reason; a pull that
fails half-way is resumable or removable, and a later, narrower pull never adopts its files."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from silo_client.cli import app, main
from silo_client.data import pacs as pacs_module
from silo_client.data.catalogue import Catalogue
from silo_client.errors import DataError
from silo_client.home import SiloHome, init_silo_home
from tests.pacs.conftest import AET, OUR_AET, PASSWORD, USER, Orthanc

runner = CliRunner()
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"


def _mixed_files(root: Path) -> list[Path]:
    """4 CT (synthetic hospital) + 1 CT in JPEG 2000, 2 MR, a CR, DX, secondary capture and VL
    photographic image, RT Dose, RT Structure Set, RT Ion Plan, a 12-lead ECG and an MPEG-2
    endoscopy video (modality ES): 11 SOP classes."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        MPEG2MPML,
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        JPEG2000Lossless,
        MRImageStorage,
        RTDoseStorage,
        RTIonPlanStorage,
        RTStructureSetStorage,
        SecondaryCaptureImageStorage,
        TwelveLeadECGWaveformStorage,
        VideoEndoscopicImageStorage,
        VLPhotographicImageStorage,
    )

    from fedsilo.synthetic import generate_hospitals
    from tests.data.dicom_factory import compressed, image_dataset, save, textured

    generate_hospitals(root, hospitals=1, images_per_hospital=4, seed=7, image_size=16)
    files = sorted((root / "hospital-0" / "dicom").iterdir())
    files.append(save(compressed(textured(32), JPEG2000Lossless), root / "j2k.dcm"))
    for i in range(2):
        files.append(save(image_dataset(textured(16), sop_class=MRImageStorage, Modality="MR"),
                          root / f"mr{i}.dcm"))  # fmt: skip
    # four more image classes: 11 classes x 13 transfer syntaxes do not fit in the 128
    # presentation contexts of one association, so the C-GET needs two
    for name, sop_class, modality in (
        ("cr", ComputedRadiographyImageStorage, "CR"),
        ("dx", DigitalXRayImageStorageForPresentation, "DX"),
        ("sc", SecondaryCaptureImageStorage, "OT"), ("xc", VLPhotographicImageStorage, "XC"),
    ):  # fmt: skip
        files.append(save(image_dataset(textured(16), sop_class=sop_class, Modality=modality),
                          root / f"{name}.dcm"))  # fmt: skip
    for name, sop_class, modality in (
        ("dose", RTDoseStorage, "RTDOSE"), ("struct", RTStructureSetStorage, "RTSTRUCT"),
        ("ionplan", RTIonPlanStorage, "RTPLAN"), ("ecg", TwelveLeadECGWaveformStorage, "ECG"),
    ):  # fmt: skip
        ds = image_dataset(textured(8), sop_class=sop_class, Modality=modality)
        del ds.PixelData
        files.append(save(ds, root / f"{name}.dcm"))
    video = image_dataset(textured(16, bits=8), sop_class=VideoEndoscopicImageStorage,
                          Modality="ES")  # fmt: skip
    video.file_meta.TransferSyntaxUID = MPEG2MPML
    video.BitsAllocated, video.BitsStored, video.HighBit = 8, 8, 7
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x11" * 100])
    video["PixelData"].VR = "OB"
    files.append(save(video, root / "video.dcm"))
    return files


@pytest.fixture(scope="module")
def mixed_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    from tests.pacs.conftest import orthanc_missing, running_orthanc

    if orthanc_missing():
        pytest.skip("Orthanc PACS not installed (apt-get install orthanc orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("mixed-pacs")
    files = _mixed_files(root / "data")
    (root / "orthanc").mkdir()
    with running_orthanc(root / "orthanc") as pacs:
        pacs.upload(files)
        yield pacs


def _cli(home: SiloHome, *args: str, fails: bool = False) -> str:
    """Output of `silo data ...`; with ``fails``, the DataError's one line (which `silo`
    prints as 'error: ...', exit 2)."""
    result = runner.invoke(app, ["data", *args, "--home", str(home.root)])
    if fails:
        assert isinstance(result.exception, DataError), (result.output, result.exception)
        return str(result.exception)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _dimse(pacs: Orthanc) -> list[str]:
    return ["--dimse", pacs.dimse, "--aet", OUR_AET, "--called-aet", AET]


def _web(pacs: Orthanc) -> list[str]:
    return ["--dicomweb", pacs.dicomweb, "--user", USER, "--password", PASSWORD]


def test_dimse_pull_fetches_every_class_and_names_what_it_cannot(
    mixed_pacs: Orthanc, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = init_silo_home(tmp_path / "home", "site-a")
    with caplog.at_level(logging.INFO, logger="silo_client.data.pacs"):
        out = json.loads(_cli(home, "add", "all", *_dimse(mixed_pacs), "--json"))
    contexts = [int(r.args[1]) for r in caplog.records if "C-GET association" in r.getMessage()]
    assert len(contexts) == 2 and max(contexts) <= 128 and sum(contexts) == 2 + 11 * 13
    cat = out["catalogue"]
    # 5 CT (one in JPEG 2000, fetched as it is stored) + 2 MR + CR, DX, SC, XC usable; RT
    # and ECG arrived (over two associations: 11 classes do not fit in 128 contexts)
    assert (cat["ok"], cat["skipped"], out["files"], out["pulled"]) == (11, 4, 15, 15)
    assert set(cat["modalities"]) == {"CT", "MR", "CR", "DX", "OT", "XC"}
    assert cat["transfer_syntaxes"].get(J2K_LOSSLESS) == 1
    reasons = " ".join(cat["skip_reasons"])
    for kind in ("RT dose", "RT structure set", "RT ion plan", "waveform"):
        assert kind in reasons, reasons
    # the video is named, with why, and the rest is registered
    [missing] = out["undelivered"]
    assert "Video Endoscopic Image Storage" in missing["reason"]
    assert "C-GET sub-operation failed" in missing["reason"]
    assert cat["undelivered"] == 1 and cat["state"] == "complete"
    shown = json.loads(_cli(home, "show", "all", "--json"))
    assert shown["undelivered_instances"] == [missing]
    # the text output says so too, and a re-run asks only for what is missing
    text = _cli(home, "add", "all", *_dimse(mixed_pacs))
    assert "the PACS did not deliver 1 of the instances" in " ".join(text.split())
    assert missing["sop_uid"] in text


def test_nothing_delivered_is_one_clear_error(mixed_pacs: Orthanc, tmp_path: Path,
                                              capsys, monkeypatch) -> None:  # fmt: skip
    home = init_silo_home(tmp_path / "home", "site-a")
    argv = ["silo", "data", "add", "video", *_dimse(mixed_pacs), "--query", "Modality=ES",
            "--home", str(home.root)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "listed 1 instance(s) for the query but delivered none" in err
    assert "Traceback" not in err
    with Catalogue.of_home(home.root) as cat:
        assert cat.dataset("video") is None  # nothing arrived: nothing registered


def _wait_closed(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"Orthanc still listening on {port}")


def _pull_killed_mid_way(home: SiloHome, pacs: Orthanc, name: str, kind: str,
                         monkeypatch: pytest.MonkeyPatch) -> str:  # fmt: skip
    """`silo data add NAME` (no query: everything) while the PACS dies (SIGKILL) after the
    second instance written; returns the one-line error."""
    write = pacs_module._write_atomic
    seen = [0]

    def write_then_crash(*args, **kwargs):
        write(*args, **kwargs)
        seen[0] += 1
        if seen[0] == 2:
            os.kill(pacs.pid, signal.SIGKILL)

    monkeypatch.setattr(pacs_module, "_write_atomic", write_then_crash)
    try:
        source = _web(pacs) if kind == "dicomweb" else _dimse(pacs)
        out = _cli(home, "add", name, *source, fails=True)
    finally:
        monkeypatch.setattr(pacs_module, "_write_atomic", write)
    _wait_closed(pacs.http_port)
    return " ".join(out.split())


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_failed_pull_is_resumable_removable_and_never_adopted(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.pacs.conftest import orthanc_missing, running_orthanc

    if orthanc_missing():
        pytest.skip("Orthanc PACS not installed (apt-get install orthanc orthanc-dicomweb)")
    files = _mixed_files(tmp_path / "data")
    folder = tmp_path / "orthanc"
    folder.mkdir()
    home = init_silo_home(tmp_path / "home", "site-a")
    managed = home.root / "datasets"
    with running_orthanc(folder) as pacs:
        pacs.upload(files)
        ports = (pacs.http_port, pacs.dicom_port)
        err = _pull_killed_mid_way(home, pacs, "x", kind, monkeypatch)
    assert "keeps the" in err and "silo data remove x" in err, err
    assert len(list((managed / "x" / "dicom").iterdir())) >= 2
    with Catalogue.of_home(home.root) as cat:
        assert cat.require("x").state == "ingesting"
    with running_orthanc(folder, ports) as pacs:  # a half-registered dataset can be removed
        _pull_killed_mid_way(home, pacs, "y", kind, monkeypatch)
    assert (managed / "y").is_dir()
    _cli(home, "remove", "y")
    assert not (managed / "y").exists()
    with Catalogue.of_home(home.root) as cat:
        assert cat.dataset("y") is None
    with running_orthanc(folder, ports) as pacs:  # a narrower pull: only what it selects
        source = _web(pacs) if kind == "dicomweb" else _dimse(pacs)
        out = json.loads(_cli(home, "add", "x", *source, "--query", "Modality=MR", "--json"))
    cat = out["catalogue"]
    assert cat["modalities"] == {"MR": 2} and (cat["ok"], cat["skipped"]) == (2, 0), cat
    assert out["files"] == 2 and cat["state"] == "complete"
    assert len(list((managed / "x" / "dicom").iterdir())) == 2
