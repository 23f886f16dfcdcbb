"""Bad input gives one clear DataError line (what, where, how to fix) or a precise skip reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import BasicTextSRStorage

from silo_client.data.dataset_builder import build_dataset
from silo_client.data.folder_scan import scan_dicom_folder
from silo_client.data.labels_csv import load_labels
from silo_client.data.preprocessing import Preprocessing
from silo_client.errors import DataError, SiloError

PREP = Preprocessing(input_size=16)


def _one_line_error(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert isinstance(info.value, SiloError) and "\n" not in msg and len(msg) < 400
    assert info.value.__cause__ is None or info.value.__suppress_context__
    return msg


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_dataset(tmp_path / "nowhere", PREP)
    msg = _one_line_error(info)
    assert f"data folder {tmp_path / 'nowhere'} does not exist" in msg and "register" in msg


def test_folder_without_dicom_subfolder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_dataset(tmp_path, PREP)
    assert "has no dicom/ subfolder" in _one_line_error(info)


def test_empty_dicom_folder(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    (tmp_path / "labels.csv").write_text("StudyInstanceUID,label\n")
    with pytest.raises(DataError) as info:
        build_dataset(tmp_path, PREP)
    msg = _one_line_error(info)
    assert "no DICOM files in" in msg and str(tmp_path / "dicom") in msg


def test_folder_with_only_junk(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "readme.txt").write_text("hello")
    (tmp_path / "labels.csv").write_text("StudyInstanceUID,label\n")
    with pytest.raises(DataError) as info:
        build_dataset(tmp_path, PREP)
    msg = _one_line_error(info)
    assert "none of the 1 file(s)" in msg and "readme.txt: not a DICOM file" in msg


def test_missing_labels_file(hospital: Path) -> None:
    (hospital / "labels.csv").unlink()
    with pytest.raises(DataError) as info:
        build_dataset(hospital, PREP)
    msg = _one_line_error(info)
    assert "labels file" in msg and "does not exist" in msg and "StudyInstanceUID,label" in msg


def test_studies_missing_from_labels_are_skipped_not_lost(hospital: Path) -> None:
    lines = (hospital / "labels.csv").read_text().splitlines()
    dropped = [line.split(",")[0] for line in lines[1:4]]
    extra = "1.2.3.4.5.6.7.8.9"
    (hospital / "labels.csv").write_text("\n".join([lines[0], *lines[4:], f"{extra},1"]) + "\n")
    data = build_dataset(hospital, PREP)
    assert len(data) == len(lines) - 1 - 3
    no_label = [s for s in data.skipped if s.reason.startswith("no label in labels.csv")]
    assert len(no_label) == 3 and data.n_skipped == 3
    assert {s.reason.split()[-1].rstrip(")") for s in no_label} == set(dropped)
    assert len(data) + data.n_skipped == len(list((hospital / "dicom").glob("*.dcm")))
    assert len(data.warnings) == 1
    assert "labels.csv line" in data.warnings[0] and extra in data.warnings[0]
    assert "matches no DICOM study" in data.warnings[0]


def test_no_image_has_a_label(hospital: Path) -> None:
    (hospital / "labels.csv").write_text("StudyInstanceUID,label\n9.9.9,1\n")
    with pytest.raises(DataError) as info:
        build_dataset(hospital, PREP)
    msg = _one_line_error(info)
    assert "has a label in" in msg and "StudyInstanceUID" in msg


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("uid,label\n1.2,0\n", ["line 1", "missing column(s) StudyInstanceUID", "found: uid"]),
        ("StudyInstanceUID\n1.2\n", ["missing column(s) label"]),
        ("StudyInstanceUID,label\n1.2,0\n1.3,yes\n", ["line 3", "label 'yes' is not an integer"]),
        ("StudyInstanceUID,label\n1.2,0\n1.2,1\n", ["line 3", "already labelled on line 2"]),
        ("StudyInstanceUID,label\n1.2\n", ["line 2", "expected 2 columns, got 1"]),
        ("StudyInstanceUID,label\n,1\n", ["line 2", "empty StudyInstanceUID"]),
        ("StudyInstanceUID,label\n1.2,-1\n", ["line 2", "negative"]),
        ("", ["is empty"]),
    ],
)
def test_bad_labels_file(tmp_path: Path, content: str, needles: list[str]) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_labels(path)
    msg = _one_line_error(info)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg


def test_labels_file_tolerates_bom_spaces_blank_lines_and_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbfnote, StudyInstanceUID ,label\nx, 1.2 , 1\n\n,1.3,0\n")
    assert load_labels(path) == {"1.2": 1, "1.3": 0}


def test_bad_row_in_labels_stops_build_before_decoding(hospital: Path) -> None:
    with (hospital / "labels.csv").open("a") as fh:
        fh.write("1.2.3,lesion\n")
    with pytest.raises(DataError, match=r"line \d+: label 'lesion' is not an integer"):
        build_dataset(hospital, PREP)


def test_non_dicom_and_pixelless_files_are_skipped_with_reasons(
    hospital: Path, write_dicom
) -> None:
    n_before = len(build_dataset(hospital, PREP))
    dicom = hospital / "dicom"
    (dicom / "report.pdf").write_bytes(b"%PDF-1.4 not an image" * 20)
    (dicom / "sub").mkdir()
    (dicom / "sub" / "empty.dcm").write_bytes(b"")
    write_dicom(dicom / "sub" / "nopix.dcm", PixelData=None)
    write_dicom(dicom / "sub" / "sr.dcm", SOPClassUID=BasicTextSRStorage, PixelData=None)
    write_dicom(
        dicom / "sub" / "hsv.dcm",  # retired colour model: no decoder converts it
        np.zeros((4, 4, 3), dtype=np.uint8),
        PhotometricInterpretation="HSV",
        SamplesPerPixel=3,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PlanarConfiguration=0,
    )
    first = sorted(dicom.glob("*.dcm"))[0]
    shutil.copy(first, dicom / "sub" / "copy-of-first.dcm")
    data = build_dataset(hospital, PREP)
    assert len(data) == n_before  # nothing lost
    reasons = dict(data.skipped)
    assert reasons["report.pdf"].startswith("not a DICOM file")
    assert reasons["sub/empty.dcm"].startswith("not a DICOM file")
    assert reasons["sub/nopix.dcm"] == "no pixel data (tag (7FE0,0010) PixelData is absent)"
    assert reasons["sub/sr.dcm"].startswith("non-image SOP class 'Basic Text SR Storage'")
    assert reasons["sub/hsv.dcm"].startswith("unsupported PhotometricInterpretation 'HSV'")
    assert reasons["sub/copy-of-first.dcm"] == f"duplicate of {first.name} (same SOPInstanceUID)"
    assert data.n_skipped == 6
    scan = scan_dicom_folder(dicom)
    assert dict(scan.skipped) == reasons and len(scan.instances) == n_before


def test_scan_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_dicom_folder(tmp_path / "gone")


def test_undecodable_pixels_are_skipped(labelled_folder, tmp_path: Path) -> None:
    folder = labelled_folder()
    path = folder / "dicom" / "a.dcm"
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:10]  # truncated pixel data
    ds.save_as(path, enforce_file_format=True)
    (folder / "dicom" / "b.dcm").write_bytes(path.read_bytes())
    scan = scan_dicom_folder(folder / "dicom")
    assert not scan.instances
    assert all(
        r.startswith("pixel data in Explicit VR Little Endian cannot be decoded (")
        for _, r in scan.skipped
    )
