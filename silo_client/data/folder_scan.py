"""Scan a folder of DICOM files: which are usable single-frame images, and why the others
are skipped (:func:`scan_dicom_folder`).

Files that cannot be used are listed with a precise reason (:class:`SkippedFile`); nothing is
dropped silently. What pydicom warns about goes to the debug log, not the terminal.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydicom.dataset import Dataset as DicomDataset
from pydicom.uid import UID

from silo_client.data.dicom_read import (
    GRAYSCALE,
    LibraryMessages,
    _read_dicom,
    decode_pixels,
    photometric_of,
)
from silo_client.errors import DataError

__all__ = ["DicomInstance", "ScanResult", "SkippedFile", "scan_dicom_folder"]

log = logging.getLogger(__name__)


class SkippedFile(NamedTuple):
    """A file that is not used, with the reason (path relative to the scanned folder)."""

    path: str
    reason: str


@dataclass(frozen=True)
class DicomInstance:
    """A readable single-frame grayscale DICOM image found by :func:`scan_dicom_folder`."""

    path: str
    study_instance_uid: str
    sop_instance_uid: str
    modality: str
    rows: int
    columns: int
    photometric_interpretation: str


@dataclass
class ScanResult:
    """Readable image instances of a folder, and every other file with the reason it is skipped."""

    folder: Path
    instances: list[DicomInstance] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        """Number of files looked at."""
        return len(self.instances) + len(self.skipped)


@dataclass
class _Decoded:
    instance: DicomInstance
    pixels: np.ndarray  # float64, after the modality LUT
    window: tuple[float, float]  # [lower, upper] from the file (or min/max)
    group: str  # hashed PatientID (never the ID itself)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _float_tag(ds: DicomDataset, keyword: str, default: float | None) -> float | None:
    """First value of a numeric tag as float; default when absent/empty; ValueError if bad."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            return default
        value = value[0]
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{keyword} is {value!r}")
    return out


def _file_window(ds: DicomDataset, pixels: np.ndarray) -> tuple[float, float]:
    """The file's VOI window as [lower, upper]; falls back to the image's min/max."""
    try:
        center = _float_tag(ds, "WindowCenter", None)
        width = _float_tag(ds, "WindowWidth", None)
    except (TypeError, ValueError):
        center = width = None
    if center is not None and width is not None and width > 0:
        return center - width / 2.0, center + width / 2.0
    return float(pixels.min()), float(pixels.max())


def _examine(path: Path, rel: str) -> tuple[_Decoded | None, str | None]:
    """Read, validate and decode one file; exactly one of the results is None. What pydicom
    warns about goes to the debug log, not the terminal."""
    with LibraryMessages() as messages:
        result = _examine_quietly(path, rel)
    for message in messages.messages:
        log.debug("%s: %s", rel, message)
    return result


def _examine_quietly(path: Path, rel: str) -> tuple[_Decoded | None, str | None]:
    ds, reason = _read_dicom(path)
    if ds is None:
        return None, reason
    try:
        sop_class = str(
            ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "")
        )
        if sop_class:
            name = UID(sop_class).name
            if name != sop_class and "Image" not in name:
                return None, f"non-image SOP class '{name}' ({sop_class})"
        if "PixelData" not in ds:
            other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
            if other:
                return None, f"unsupported {other[0]} (only integer PixelData is used)"
            return None, "no pixel data (tag (7FE0,0010) PixelData is absent)"
        study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        if not study_uid:
            return None, "no StudyInstanceUID (needed to match labels.csv)"
        photometric, reason = photometric_of(ds)
        if photometric is None:
            return None, reason
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            return None, f"multi-frame image ({frames} frames) is not supported"
        try:
            slope = _float_tag(ds, "RescaleSlope", 1.0)
            intercept = _float_tag(ds, "RescaleIntercept", 0.0)
        except (TypeError, ValueError) as exc:
            return None, f"invalid RescaleSlope/RescaleIntercept ({_one_line(exc)})"
        if slope == 0 and photometric in GRAYSCALE:
            return None, "invalid RescaleSlope 0"
        decoded, reason = decode_pixels(ds)
        if decoded is None:
            return None, reason
        raw = decoded.frames[0]
        if raw.size == 0:
            return None, f"pixel data has shape {raw.shape}, expected a 2-D image"
        if decoded.colour:
            pixels = raw.astype(np.float64)
            window = (0.0, decoded.full_scale)
        else:
            pixels = raw.astype(np.float64) * float(slope) + float(intercept)  # type: ignore[arg-type]
            if not np.isfinite(pixels).all():
                return None, "pixel values are not finite after RescaleSlope/Intercept"
            window = _file_window(ds, pixels)
        patient = str(ds.get("PatientID", "") or "").strip()
        group_src = f"patient:{patient}" if patient else f"study:{study_uid}"
        group = hashlib.sha256(f"fedsilo-group\0{group_src}".encode()).hexdigest()[:16]
        instance = DicomInstance(
            path=rel,
            study_instance_uid=study_uid,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
            modality=str(ds.get("Modality", "") or ""),
            rows=int(raw.shape[0]),
            columns=int(raw.shape[1]),
            photometric_interpretation=photometric,
        )
        return _Decoded(instance, pixels, window, group), None
    except Exception as exc:  # malformed element values, odd VRs, ...
        return None, f"unreadable DICOM ({_one_line(exc)})"


def _iter_files(folder: Path) -> Iterator[tuple[Path, str]]:
    paths = [p for p in folder.rglob("*") if p.is_file()]
    for path in sorted(paths, key=lambda p: p.relative_to(folder).as_posix()):
        yield path, path.relative_to(folder).as_posix()


def _iter_scan(folder: Path) -> Iterator[tuple[str, _Decoded | None, str | None]]:
    seen: dict[str, str] = {}
    for path, rel in _iter_files(folder):
        decoded, reason = _examine(path, rel)
        if decoded is not None:
            sop = decoded.instance.sop_instance_uid
            if sop and sop in seen:
                decoded, reason = None, f"duplicate of {seen[sop]} (same SOPInstanceUID)"
            elif sop:
                seen[sop] = rel
        yield rel, decoded, reason


def scan_dicom_folder(folder: Path) -> ScanResult:
    """List the usable DICOM images under ``folder`` (recursively) and why others are skipped.

    Colour images are instances too. Skip reasons include: not a DICOM file, unreadable DICOM,
    non-image SOP class, no pixel data, unsupported PhotometricInterpretation, multi-frame,
    undecodable pixel data (naming a missing codec), duplicate SOPInstanceUID. Raises DataError
    if ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"DICOM folder {folder} does not exist; pass the folder with the DICOM files"
        )
    result = ScanResult(folder=folder)
    for rel, decoded, reason in _iter_scan(folder):
        if decoded is not None:
            result.instances.append(decoded.instance)
        else:
            result.skipped.append(SkippedFile(rel, str(reason)))
    return result
