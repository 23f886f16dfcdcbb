"""Every encoding hospitals send decodes to the right pixels and is catalogued as usable;
non-image objects are skipped with a reason that says what they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    BasicTextSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    KeyObjectSelectionDocumentStorage,
    RLELossless,
    RTPlanStorage,
    generate_uid,
)

from silo_client.data.ingest import inspect_file, load_frames
from tests.data.dicom_factory import (
    compressed,
    image_dataset,
    jpeg_baseline,
    jpeg_lossless,
    save,
    textured,
)

LOSSLESS = {
    "rle": lambda p: compressed(p, RLELossless),
    "jpeg-ls": lambda p: compressed(p, JPEGLSLossless),
    "jpeg-ls-near-lossless-0": lambda p: compressed(p, JPEGLSNearLossless, jls_error=0),
    "jpeg2000-lossless": lambda p: compressed(p, JPEG2000Lossless),
    "jpeg-lossless-sv1": jpeg_lossless,
    "uncompressed": image_dataset,
}


def _record(path: Path):
    st = path.stat()
    return inspect_file(path, path.name, st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("kind", sorted(LOSSLESS))
def test_lossless_encodings_decode_exactly(tmp_path: Path, kind: str) -> None:
    pixels = textured(64)
    path = save(LOSSLESS[kind](pixels), tmp_path / f"{kind}.dcm")
    record = _record(path)
    assert record.status == "ok", record.reason
    assert (record.rows, record.columns, record.frames) == (64, 64, 1)
    assert record.transfer_syntax == str(pydicom.dcmread(path).file_meta.TransferSyntaxUID)
    frames, _, _ = load_frames(path)
    assert np.array_equal(frames[0], pixels.astype(np.float64))


def test_jpeg2000_lossy_and_jpeg_baseline_decode_close(tmp_path: Path) -> None:
    pixels = textured(64)
    j2k = save(compressed(pixels, JPEG2000, j2k_cr=[5]), tmp_path / "j2k.dcm")
    p8 = textured(64, bits=8)
    jpg = save(jpeg_baseline(p8), tmp_path / "baseline.dcm")
    for path, ref, tol in ((j2k, pixels, 40.0), (jpg, p8, 4.0)):
        assert _record(path).status == "ok"
        frames, _, _ = load_frames(path)
        assert np.abs(frames[0] - ref.astype(np.float64)).mean() < tol


def test_big_endian(tmp_path: Path) -> None:
    pixels = textured(32)
    ds = image_dataset(pixels)
    ds.PixelData = pixels.astype(">u2").tobytes()
    path = save(ds, tmp_path / "be.dcm", big_endian=True)
    assert _record(path).transfer_syntax == "1.2.840.10008.1.2.2"
    frames, _, _ = load_frames(path)
    assert np.array_equal(frames[0], pixels.astype(np.float64))


@pytest.mark.parametrize("codec", ["uncompressed", "rle", "jpeg-ls"])
def test_multi_frame(tmp_path: Path, codec: str) -> None:
    stack = textured(32, frames=3)
    path = save(LOSSLESS[codec](stack), tmp_path / "mf.dcm")
    record = _record(path)
    assert record.status == "ok" and record.frames == 3
    frames, _, _ = load_frames(path)
    assert frames.shape == (3, 32, 32) and np.array_equal(frames, stack.astype(np.float64))


def _non_image(sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "X"
    return ds


@pytest.mark.parametrize(
    ("sop_class", "modality", "what"),
    [
        (BasicTextSRStorage, "SR", "a structured report (SR)"),
        (GrayscaleSoftcopyPresentationStateStorage, "PR", "a presentation state"),
        (RTPlanStorage, "RTPLAN", "an RT plan"),
        (KeyObjectSelectionDocumentStorage, "KO", "a key object selection (KOS)"),
    ],
)
def test_non_image_objects_are_skipped_precisely(
    tmp_path: Path, sop_class: str, modality: str, what: str
) -> None:
    path = save(_non_image(sop_class, modality), tmp_path / "obj.dcm")
    record = _record(path)
    assert record.status == "skipped"
    assert record.reason.startswith("non-image SOP class '")
    assert what in record.reason


def test_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    pixels = textured(32)
    good = save(image_dataset(pixels), tmp_path / "good.dcm")
    data = good.read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) - 500])
    (tmp_path / "notes.txt").write_text("not dicom")
    hsv = image_dataset(np.zeros((8, 8, 3), dtype=np.uint8).reshape(8, 8, 3)[..., 0])
    hsv.PhotometricInterpretation = "HSV"
    save(hsv, tmp_path / "hsv.dcm")
    nopix = image_dataset(pixels)
    del nopix.PixelData
    save(nopix, tmp_path / "nopix.dcm")
    reasons = {p.name: _record(p).reason for p in tmp_path.iterdir() if p.name != "good.dcm"}
    assert reasons["truncated.dcm"].startswith("truncated file (it ends at byte ")
    assert "pixel data (7FE0,0010)" in reasons["truncated.dcm"]
    assert reasons["notes.txt"].startswith("not a DICOM file")
    assert reasons["hsv.dcm"].startswith("unsupported PhotometricInterpretation 'HSV'")
    assert reasons["nopix.dcm"].startswith("no pixel data")
