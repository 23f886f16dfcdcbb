"""The synthetic DICOM generator: determinism, DICOM validity, hospital heterogeneity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from fedsilo.synthetic import (
    HospitalSpec,
    generate_hospitals,
    generate_test_set,
    lesion_contrast_hu,
    make_hospital_specs,
)
from silo_client.errors import DataError, SiloError

from .conftest import SMALL

REQUIRED = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyDate", "InstitutionName", "ReferringPhysicianName", "PixelSpacing",
    "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
)  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path: Path, small_hospitals) -> None:
    root, _ = small_hospitals
    generate_hospitals(tmp_path / "again", **SMALL)
    first, second = _files(root), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert len([k for k in first if k.endswith(".dcm")]) == sum(
        s.n_images for s in make_hospital_specs(**SMALL)
    )
    assert first == second


def test_different_seed_gives_different_data(tmp_path: Path, small_hospitals) -> None:
    root, _ = small_hospitals
    generate_hospitals(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    a = (root / "hospital-0" / "labels.csv").read_text()
    b = (tmp_path / "other" / "hospital-0" / "labels.csv").read_text()
    assert a != b  # different UIDs
    pa = pydicom.dcmread(root / "hospital-0" / "dicom" / "img-0000.dcm").pixel_array
    pb = pydicom.dcmread(tmp_path / "other" / "hospital-0" / "dicom" / "img-0000.dcm").pixel_array
    assert not np.array_equal(pa, pb)


def test_every_file_is_valid_16bit_monochrome2_dicom_with_phi(small_hospitals) -> None:
    root, specs = small_hospitals
    for spec in specs:
        files = sorted((root / spec.name / "dicom").glob("*.dcm"))
        assert len(files) == spec.n_images
        for path in files:
            assert path.read_bytes()[128:132] == b"DICM"  # preamble + prefix
            ds = pydicom.dcmread(path)  # no force: a proper Part 10 file
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            for keyword in REQUIRED:
                assert keyword in ds and str(ds.data_element(keyword).value), keyword
            assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 16)
            assert ds.PixelRepresentation in (0, 1)
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.pixel_array.shape == (spec.image_size, spec.image_size)
            assert ds.InstitutionName == spec.institution_name
            assert "^" in str(ds.PatientName) and "^" in str(ds.ReferringPhysicianName)
            assert ds.StudyInstanceUID.startswith("1.2.")


def test_labels_csv_is_keyed_by_study_uid(small_hospitals) -> None:
    root, specs = small_hospitals
    for spec in specs:
        with (root / spec.name / "labels.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["StudyInstanceUID", "label"]
        labels = {r["StudyInstanceUID"]: int(r["label"]) for r in rows}
        studies = {
            pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
            for p in (root / spec.name / "dicom").glob("*.dcm")
        }
        assert set(labels) == studies
        assert sum(labels.values()) == spec.n_positive
        assert set(labels.values()) <= {0, 1}


def test_some_patients_have_two_studies(tmp_path: Path) -> None:
    spec = make_hospital_specs(hospitals=1, images_per_hospital=40, image_size=16)
    generate_hospitals(tmp_path, hospitals=1, images_per_hospital=40, image_size=16)
    ids = [
        pydicom.dcmread(p, stop_before_pixels=True).PatientID
        for p in (tmp_path / "hospital-0" / "dicom").glob("*.dcm")
    ]
    assert len(ids) == spec[0].n_images
    assert len(set(ids)) < len(ids)


def test_hospitals_differ(tmp_path: Path) -> None:
    specs = make_hospital_specs(hospitals=3, images_per_hospital=120)
    assert len({s.n_images for s in specs}) == 3
    assert min(s.n_images for s in specs) < 100 < max(s.n_images for s in specs)
    fractions = [s.positive_fraction for s in specs]
    assert min(fractions) == pytest.approx(0.2) and max(fractions) == pytest.approx(0.5)
    assert len({s.rescale_intercept for s in specs}) >= 2
    assert len({s.intensity_offset for s in specs}) == 3
    assert len({s.noise_sigma for s in specs}) == 3
    # On disk: stored values and physical intensities differ between hospitals.
    generate_hospitals(tmp_path, hospitals=3, images_per_hospital=12, image_size=24)
    stored, physical = [], []
    for k in range(3):
        arrays = []
        for p in sorted((tmp_path / f"hospital-{k}" / "dicom").glob("*.dcm")):
            ds = pydicom.dcmread(p)
            arrays.append(
                (ds.pixel_array.astype(float), float(ds.RescaleSlope), float(ds.RescaleIntercept))
            )
        stored.append(np.mean([a.mean() for a, _, _ in arrays]))
        physical.append(np.mean([np.median(a * s + i) for a, s, i in arrays]))
    assert np.ptp(stored) > 100  # different encodings
    assert np.ptp(physical) > 20  # different calibration


def test_spec_json_round_trips(small_hospitals) -> None:
    root, specs = small_hospitals
    data = json.loads((root / "hospital-0" / "spec.json").read_text())
    assert HospitalSpec(**data) == specs[0]


def test_difficulty_controls_lesion_contrast() -> None:
    assert lesion_contrast_hu(0.0) > 3 * lesion_contrast_hu(0.5) / 2 > lesion_contrast_hu(1.0)
    assert lesion_contrast_hu(1.0) > 0


def test_test_set_mixes_hospitals(tmp_path: Path) -> None:
    specs = generate_test_set(tmp_path / "test", n=24, seed=3, image_size=24)
    files = sorted((tmp_path / "test" / "dicom").glob("*.dcm"))
    assert len(files) == 24
    institutions = {pydicom.dcmread(p, stop_before_pixels=True).InstitutionName for p in files}
    assert len(institutions) >= 2 and institutions <= {s.institution_name for s in specs}
    with (tmp_path / "test" / "labels.csv").open() as fh:
        labels = [int(r["label"]) for r in csv.DictReader(fh)]
    assert set(labels) == {0, 1}


def test_test_set_is_disjoint_from_training_data(tmp_path: Path) -> None:
    generate_hospitals(tmp_path / "h", hospitals=2, images_per_hospital=8, image_size=16)
    generate_test_set(tmp_path / "t", n=8, hospitals=2, images_per_hospital=8, image_size=16)
    train = set((tmp_path / "h" / "hospital-0" / "labels.csv").read_text().splitlines()[1:])
    test = set((tmp_path / "t" / "labels.csv").read_text().splitlines()[1:])
    assert not train & test


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"hospitals": 0}, "hospitals must be >= 1"),
        ({"difficulty": 1.5}, "difficulty must be in [0, 1]"),
        ({"image_size": 4}, "image_size must be >= 16"),
        ({"images_per_hospital": 2}, "images_per_hospital must be >= 4"),
    ],
)
def test_bad_generator_arguments(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(DataError, match=None) as info:
        generate_hospitals(tmp_path, **kwargs)
    assert needle in str(info.value)
    assert isinstance(info.value, SiloError)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_hospitals(tmp_path, hospitals=1, images_per_hospital=4, image_size=16)
    with pytest.raises(DataError, match="already contains files"):
        generate_hospitals(tmp_path, hospitals=1, images_per_hospital=4, image_size=16)
