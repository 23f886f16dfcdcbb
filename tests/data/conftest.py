"""Fixtures for the data-layer tests: small synthetic hospitals and hand-made DICOM files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fedsilo.synthetic import HospitalSpec, generate_hospitals

SMALL = {"hospitals": 2, "images_per_hospital": 20, "seed": 7, "image_size": 32}


@pytest.fixture(scope="session")
def small_hospitals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[HospitalSpec]]:
    """Two small synthetic hospitals (about 12 and 28 images of 32x32), generated once."""
    root = tmp_path_factory.mktemp("hospitals")
    specs = generate_hospitals(root, **SMALL)
    return root, specs


@pytest.fixture
def hospital(small_hospitals: tuple[Path, list[HospitalSpec]], tmp_path: Path) -> Path:
    """A private, mutable copy of hospital-0 (12 images; dicom/ + labels.csv)."""
    root, _ = small_hospitals
    dst = tmp_path / "site"
    shutil.copytree(root / "hospital-0", dst)
    return dst


@pytest.fixture
def write_dicom() -> Callable[..., Path]:
    """Factory writing a small DICOM image; tag=None removes a tag, preamble=False drops it."""

    def _write(
        path: Path,
        pixels: np.ndarray | None = None,
        *,
        preamble: bool = True,
        **tags: Any,
    ) -> Path:
        if pixels is None:
            pixels = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
        sop_uid = generate_uid()
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.Modality = "CT"
        ds.PatientID = "TEST-1"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = "0"
        ds.PixelData = pixels.tobytes()
        for key, value in tags.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        path.parent.mkdir(parents=True, exist_ok=True)
        if preamble:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
        else:
            pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
        return path

    return _write


@pytest.fixture
def labelled_folder(tmp_path: Path, write_dicom: Callable[..., Path]) -> Callable[..., Path]:
    """Factory: a dataset folder with one DICOM (given pixels/tags) labelled 1 in labels.csv."""

    def _make(pixels: np.ndarray | None = None, **tags: Any) -> Path:
        folder = tmp_path / "one"
        path = write_dicom(folder / "dicom" / "a.dcm", pixels, **tags)
        uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
        (folder / "labels.csv").write_text(f"StudyInstanceUID,label\n{uid},1\n")
        return folder

    return _make
