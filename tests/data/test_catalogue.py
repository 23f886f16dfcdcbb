"""`silo data ...`: the SQLite catalogue, resumable ingest, every file accounted for, and the
training loader reading a registered dataset."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import BasicTextSRStorage, RLELossless
from typer.testing import CliRunner

from silo_client.cli import app, main
from silo_client.data import ingest
from silo_client.data.catalogue import Catalogue
from silo_client.data.dataset_builder import build_dataset
from silo_client.data.preprocessing import Preprocessing
from silo_client.home import SiloHome, init_silo_home
from tests.data.dicom_factory import compressed, image_dataset, save, textured

PREP = Preprocessing(input_size=16)
runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> SiloHome:
    return init_silo_home(tmp_path / "home", "site-a")


def _silo(home: SiloHome, *args: str) -> dict | list:
    result = runner.invoke(app, ["data", *args, "--home", str(home.root), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def _cli_error(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *argv: str) -> str:
    monkeypatch.setattr(sys, "argv", ["silo", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err
    return " ".join(err.split())


def test_add_show_list_check_remove(home: SiloHome, hospital: Path) -> None:
    out = _silo(home, "add", "ct", "--dicom-dir", str(hospital))
    n = len(list((hospital / "dicom").iterdir()))
    assert out["files"] == n and out["new_ok"] == n and out["new_skipped"] == 0
    shown = _silo(home, "show", "ct")
    labels = {row["label"] for row in csv.DictReader((hospital / "labels.csv").open())}
    assert shown["ok"] == n and set(shown["labels"]) == labels and shown["modalities"] == {"CT": n}
    assert shown["studies"] == n and shown["bytes"] > 0
    assert [d["name"] for d in _silo(home, "list")] == ["ct"]
    assert isinstance(_silo(home, "check", "ct", "--min-images", "1000")["warnings"], list)
    codes = {w["code"] for w in _silo(home, "check", "ct", "--min-images", "1000")["warnings"]}
    assert "too-few-images" in codes
    assert SiloHome.open(home.root).dataset_folder("ct").is_dir()
    assert _silo(home, "remove", "ct")["removed_file_records"] == n
    assert _silo(home, "list") == []
    assert (hospital / "dicom").is_dir() and len(list((hospital / "dicom").iterdir())) == n


def test_training_reads_the_registered_dataset(home: SiloHome, hospital: Path) -> None:
    _silo(home, "add", "default", "--dicom-dir", str(hospital))
    folder = SiloHome.open(home.root).dataset_folder("default")
    registered = build_dataset(folder, PREP, cache_dir=home.cache_dir)
    plain = build_dataset(hospital, PREP)
    order = np.argsort(registered.paths)
    assert sorted(registered.paths) == sorted(plain.paths)
    assert torch.equal(registered.images[order], plain.images[np.argsort(plain.paths)])
    assert registered.labels.tolist() == [
        plain.labels[plain.paths.index(p)].item() for p in registered.paths
    ]
    again = build_dataset(folder, PREP, cache_dir=home.cache_dir)
    assert again.cache_hit and torch.equal(again.images, registered.images)


def test_local_round_loads_registered_data(home: SiloHome, hospital: Path) -> None:
    from silo_client.local_data import load_local_data
    from training_plan import TrainingPlan

    _silo(home, "add", "default", "--dicom-dir", str(hospital))
    plan = TrainingPlan.model_validate(
        {"title": "t", "model": {"name": "resnet10", "norm": "batch"},
         "preprocessing": {"input_size": 16},
         "training": {"batch_size": 4}, "federation": {"rounds": 1, "min_silos": 3}}
    )  # fmt: skip
    data = load_local_data(SiloHome.open(home.root), plan)
    assert data.train_images.shape[1:] == (1, 16, 16)
    assert len(data.train_labels) + len(data.val_labels) == 12


def test_rerun_ingests_only_new_and_changed(home: SiloHome, hospital: Path) -> None:
    _silo(home, "add", "d", "--dicom-dir", str(hospital))
    again = _silo(home, "add", "d", "--dicom-dir", str(hospital))
    assert again["new_ok"] + again["new_skipped"] == 0 and again["unchanged"] == 12
    save(image_dataset(textured(32)), hospital / "dicom" / "new.dcm")
    (hospital / "dicom" / "img-0000.dcm").unlink()
    third = _silo(home, "add", "d", "--dicom-dir", str(hospital))
    assert (third["new_ok"], third["unchanged"], third["removed"]) == (1, 11, 1)
    assert third["catalogue"]["labels"]["unlabelled"] == 1  # new study has no label row


def test_interrupted_ingest_resumes(
    home: SiloHome, hospital: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "_BATCH", 4)
    calls = {"n": 0}

    def crash(done: int, total: int) -> None:
        calls["n"] += 1
        if done == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest.register_dataset(
            home, "d", source_kind="dicom-dir", source=str(hospital / "dicom"),
            files_root=hospital / "dicom", labels_csv=hospital / "labels.csv", progress=crash,
        )  # fmt: skip
    with Catalogue.of_home(home.root) as cat:
        assert cat.require("d").state == "ingesting"
        # one committed batch, and the two read before the interrupt: nothing read is lost
        assert len(cat.known_files("d")) == 6
    out = _silo(home, "add", "d", "--dicom-dir", str(hospital))
    assert out["unchanged"] == 6 and out["new_ok"] == 6
    assert out["catalogue"]["state"] == "complete" and out["catalogue"]["ok"] == 12


def test_mixed_folder_every_file_accounted_for(home: SiloHome, hospital: Path) -> None:
    d = hospital / "dicom"
    shutil.copy(d / "img-0001.dcm", d / "copy-of-1.dcm")
    (d / "sub").mkdir()
    (d / "sub" / "notes.txt").write_text("hello")
    (d / "sub" / "empty.dcm").write_bytes(b"")
    data = (d / "img-0002.dcm").read_bytes()
    (d / "sub" / "truncated.dcm").write_bytes(data[: len(data) // 2])
    sr = image_dataset(textured(16), sop_class=BasicTextSRStorage)
    del sr.PixelData
    save(sr, d / "sub" / "report.dcm")
    save(compressed(textured(32, frames=2), RLELossless), d / "sub" / "multi.dcm")
    out = _silo(home, "add", "mixed", "--dicom-dir", str(hospital))
    n_files = sum(1 for p in d.rglob("*") if p.is_file())
    assert out["files"] == n_files == out["new_ok"] + out["new_skipped"]
    shown = _silo(home, "show", "mixed")
    reasons = {f["path"]: f["reason"] for f in shown["skipped_files"]}
    assert shown["ok"] + shown["skipped"] == n_files
    assert reasons["sub/notes.txt"].startswith("not a DICOM file")
    assert "structured report" in reasons["sub/report.dcm"]
    assert "duplicate of" in reasons["img-0001.dcm"] or "duplicate of" in reasons["copy-of-1.dcm"]
    assert "sub/truncated.dcm" in reasons and "sub/empty.dcm" in reasons
    assert shown["frames"] == shown["ok"] + 1  # the 2-frame image
    assert shown["labels"]["unlabelled"] == 1


def test_labels_by_other_keys_and_unmatched_rows(
    home: SiloHome, hospital: Path, tmp_path: Path
) -> None:
    files = sorted((hospital / "dicom").iterdir())
    rows = []
    for i, f in enumerate(files[:10]):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rows.append((ds.AccessionNumber, i % 2))
    rows.append(("ACC-NOT-THERE", 1))
    labels = tmp_path / "acc.csv"
    labels.write_text("AccessionNumber,finding\n" + "".join(f"{a},{y}\n" for a, y in rows))
    out = _silo(
        home, "add", "acc", "--dicom-dir", str(hospital / "dicom"), "--labels", str(labels),
        "--key", "AccessionNumber", "--label-column", "finding",
    )  # fmt: skip
    cat = out["catalogue"]
    assert cat["labels"] == {"0": 5, "1": 5, "unlabelled": 2}
    assert cat["unmatched_label_lines"] == [12]
    codes = {w["code"] for w in _silo(home, "check", "acc", "--min-images", "1")["warnings"]}
    assert {"unlabelled", "unmatched-labels"} <= codes
    ds = build_dataset(SiloHome.open(home.root).dataset_folder("acc"), PREP)
    assert (
        len(ds) == 10 and sum(s.reason.startswith("no label in acc.csv") for s in ds.skipped) == 2
    )
    # Nothing identifying in the catalogue for IDs: accession numbers are stored as digests.
    raw = (home.root / "catalogue.sqlite").read_bytes()
    assert rows[0][0].encode() not in raw


def test_audit_counts_profile_attributes_and_burned_in(home: SiloHome, hospital: Path) -> None:
    ds = pydicom.dcmread(hospital / "dicom" / "img-0003.dcm")
    ds.BurnedInAnnotation = "YES"
    ds.save_as(hospital / "dicom" / "img-0003.dcm")
    _silo(home, "add", "a", "--dicom-dir", str(hospital))
    report = _silo(home, "audit", "a")
    by_kw = {a["keyword"]: a for a in report["attributes"]}
    assert by_kw["PatientName"]["files"] == 12 and by_kw["PatientName"]["action"] == "Z"
    assert by_kw["PatientBirthDate"]["tag"] == "(0010,0030)"
    assert report["burned_in_annotation"] == {"YES": 1, "NO": 0, "absent": 11}
    assert "Andersson" not in json.dumps(report)  # counts and names only, no values


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dicom-dir", "/nonexistent/dir"], "DICOM folder /nonexistent/dir does not exist"),
        (["--dicom-dir", "."], "--key Nope is not supported"),
        ([], "pass exactly one source"),
        (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--query", "Bogus=1"], "'Bogus' is not"),
        (["--dimse", "nohost"], "is not HOST:PORT"),
    ],
)
def test_add_errors_are_one_line(
    home: SiloHome, capsys, monkeypatch, args: list[str], needle: str
) -> None:
    extra = ["--key", "Nope"] if needle.startswith("--key") else []
    err = _cli_error(capsys, monkeypatch, "data", "add", "x", *args, *extra,
                     "--home", str(home.root))  # fmt: skip
    assert needle in err


def test_bad_labels_file_and_unknown_dataset(
    home: SiloHome, hospital: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("StudyInstanceUID,diagnosis\n1.2.3,1\n")
    err = _cli_error(capsys, monkeypatch, "data", "add", "x", "--dicom-dir", str(hospital),
                     "--labels", str(bad), "--home", str(home.root))  # fmt: skip
    assert "line 1: missing column(s) label" in err and "--label-column" in err
    err = _cli_error(capsys, monkeypatch, "data", "show", "nope", "--home", str(home.root))
    assert "no dataset named 'nope'" in err and "silo data add nope" in err


def test_catalogue_from_before_undelivered_instances_opens(
    home: SiloHome, hospital: Path
) -> None:
    """A catalogue written before the table of undelivered PACS instances existed: opening it
    adds the table, and what it held is kept."""
    import sqlite3

    _silo(home, "add", "d", "--dicom-dir", str(hospital))
    db = sqlite3.connect(home.root / "catalogue.sqlite")
    db.execute("DROP TABLE undelivered")  # as an older release left it
    db.commit()
    db.close()
    shown = _silo(home, "show", "d")
    assert shown["ok"] == 12 and shown["undelivered"] == 0
    assert shown["undelivered_instances"] == []
