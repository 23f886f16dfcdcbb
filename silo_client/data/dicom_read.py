"""Reading DICOM files the way real exports need it, without importing torch or MONAI.

Tolerates a missing preamble/file meta (forced read, accepted only when the tags parsed look
like an image dataset) and reports precisely why a file is not DICOM.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset as DicomDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from silo_client.data.file_probe import dicom_prefix, truncation

__all__ = ["read_dicom"]

_NOT_DICOM = "not a DICOM file (no 'DICM' marker and no parseable DICOM image tags)"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _looks_like_dicom(ds: DicomDataset) -> bool:
    """After a forced read: does this look like a DICOM dataset and not random bytes?"""
    try:
        tags = list(ds.keys())
        if len(tags) < 3:
            return False
        standard = sum(1 for t in tags if t.group % 2 == 0 and 0x0008 <= t.group <= 0x7FE0)
        has_image_tags = ("Rows" in ds and "Columns" in ds) or "SOPClassUID" in ds
        return has_image_tags and standard >= 0.9 * len(tags)
    except Exception:
        return False


def _read_dicom(path: Path) -> tuple[DicomDataset | None, str | None]:
    """Read a file; tolerate a missing preamble / file meta, reject non-DICOM bytes."""
    # Decided from the first bytes: a large non-DICOM file costs one small read, not a
    # forced parse of all its bytes.
    try:
        prefix = dicom_prefix(path)
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or type(exc).__name__})"
    if prefix == "no":
        return None, _NOT_DICOM
    if prefix == "dicm":
        try:
            return pydicom.dcmread(path), None
        except InvalidDicomError:
            pass
        except Exception as exc:
            return None, truncation(path) or f"unreadable DICOM ({_one_line(exc)})"
    # No 128-byte preamble + 'DICM': real exports sometimes omit it. Try a forced read, but
    # only accept it when every tag parsed is a plausible image-dataset tag.
    try:
        ds = pydicom.dcmread(path, force=True)
        if not _looks_like_dicom(ds):
            return None, truncation(path) or _NOT_DICOM
        if "TransferSyntaxUID" not in ds.file_meta:
            implicit, little = ds.original_encoding
            if implicit:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            elif little:
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            else:
                ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        return ds, None
    except Exception:
        return None, truncation(path) or _NOT_DICOM


def read_dicom(path: Path) -> tuple[DicomDataset | None, str | None]:
    """Read a file: (dataset, None), or (None, why it is not a usable DICOM file)."""
    return _read_dicom(path)
