"""A DICOM series as a 3-D volume: slices ordered by position, checked, in HU.

Slices are grouped by SeriesInstanceUID and ordered by their ImagePositionPatient projected on
the slice normal (the cross product of the ImageOrientationPatient row and column cosines), never
by InstanceNumber or file name: both are often wrong or reversed in real exports, and an oblique
(tilted) series is ordered correctly only along its own normal.

Before a volume is built, the geometry is checked and every problem is named precisely
(:class:`VolumeError`, a :class:`~silo_client.errors.DataError`): missing ImagePositionPatient /
ImageOrientationPatient / PixelSpacing, mixed orientations, mixed rows/columns or pixel spacing,
two slices at one position, a missing slice (a gap above :data:`GAP_FACTOR` x the median slice
spacing, naming the positions around it), slice spacing varying by more than
:data:`SPACING_REJECT` of the median, too few slices. Smaller spacing variations (above
:data:`SPACING_WARN`) and a sheared stack (gantry tilt: slice origins drifting in-plane) are
warnings on the volume.

The geometry checks work on headers alone (:func:`check_series_geometry`), so ``silo data
check`` can run them without decoding pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset as DicomDataset

from silo_client.errors import DataError

__all__ = [
    "GAP_FACTOR",
    "SPACING_REJECT",
    "SPACING_WARN",
    "SeriesGeometry",
    "SliceHeader",
    "Volume",
    "VolumeError",
    "build_volume",
    "check_series_geometry",
    "group_by_series",
    "read_series",
    "slice_header",
]

#: A step between neighbouring slices above this multiple of the median step is a missing slice.
GAP_FACTOR = 1.5
#: Relative deviation of a slice step from the median above which the series is refused.
SPACING_REJECT = 0.10
#: Relative deviation of a slice step from the median above which the volume carries a warning.
SPACING_WARN = 0.01
#: Largest difference between two slices' direction cosines still counted as one orientation.
ORIENTATION_TOL = 1e-3
#: Two slices closer than this (mm along the normal) are at the same position.
DUPLICATE_TOL = 0.01
#: Minimum number of slices a volume needs.
MIN_SLICES = 3


class VolumeError(DataError):
    """A series cannot be assembled into a volume; the message says what and where."""


@dataclass(frozen=True)
class SliceHeader:
    """The geometry of one single-frame image of a series (no pixels)."""

    source: str  # where it came from (relative path, or SOPInstanceUID): for messages
    series_uid: str
    sop_uid: str
    rows: int
    columns: int
    position: tuple[float, float, float] | None  # ImagePositionPatient (mm, LPS)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 cosines)
    pixel_spacing: tuple[float, float] | None  # (row spacing dy, column spacing dx) in mm
    slice_thickness: float | None
    instance_number: int | None = None


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        out = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def slice_header(ds: DicomDataset, source: str) -> SliceHeader:
    """The :class:`SliceHeader` of a pydicom dataset (missing or malformed tags become None)."""
    spacing = _floats(ds.get("PixelSpacing"), 2)
    try:
        thickness: float | None = float(ds.get("SliceThickness"))
    except (TypeError, ValueError):
        thickness = None
    try:
        number: int | None = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = None
    return SliceHeader(
        source=source,
        series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip(),
        sop_uid=str(ds.get("SOPInstanceUID", "") or "").strip(),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        slice_thickness=thickness if thickness is not None and math.isfinite(thickness) else None,
        instance_number=number,
    )


def group_by_series(headers: Iterable[SliceHeader]) -> dict[str, list[SliceHeader]]:
    """Slices per SeriesInstanceUID (series without a UID are grouped under '')."""
    out: dict[str, list[SliceHeader]] = {}
    for h in headers:
        out.setdefault(h.series_uid, []).append(h)
    return out


@dataclass(frozen=True)
class SeriesGeometry:
    """The checked geometry of a series: slice order, spacing, direction, warnings."""

    order: tuple[int, ...]  # indices into the headers given, by increasing position on the normal
    positions: tuple[float, ...]  # projected positions (mm along the normal), increasing
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm; dz = median step between slices
    origin: tuple[float, float, float]  # ImagePositionPatient of the first slice
    orientation: tuple[float, ...]  # ImageOrientationPatient (row cosines, column cosines)
    normal: tuple[float, float, float]
    shape: tuple[int, int, int]  # (D, H, W)
    slice_thickness: float | None
    warnings: tuple[str, ...] = ()


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def check_series_geometry(
    headers: Sequence[SliceHeader],
    min_slices: int = MIN_SLICES,
    label: str | None = None,
) -> SeriesGeometry:
    """Order and check the slices of one series; raises :class:`VolumeError` naming the problem.

    ``label`` names the series in messages (default: its SeriesInstanceUID).
    """
    if not headers:
        raise VolumeError("empty series: no slices given")
    name = label or f"series {headers[0].series_uid or '(no SeriesInstanceUID)'}"
    uids = {h.series_uid for h in headers}
    if len(uids) > 1:
        raise VolumeError(f"{name}: slices of {len(uids)} different series given as one")
    if len(headers) < min_slices:
        raise VolumeError(
            f"{name}: only {len(headers)} slice(s), a volume needs at least {min_slices}; "
            "export the whole series"
        )
    for key, what in (
        ("position", "ImagePositionPatient"),
        ("orientation", "ImageOrientationPatient"),
        ("pixel_spacing", "PixelSpacing"),
    ):
        missing = [h.source for h in headers if getattr(h, key) is None]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise VolumeError(
                f"{name}: {missing[0]}{more} has no valid {what}; a volume needs it on every "
                "slice (re-export the series from the scanner or PACS)"
            )
    sizes = sorted({(h.rows, h.columns) for h in headers})
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sizes)
        raise VolumeError(f"{name}: slices have different rows x columns ({shown})")
    iop0 = np.asarray(headers[0].orientation, dtype=np.float64)
    for h in headers[1:]:
        if np.max(np.abs(np.asarray(h.orientation) - iop0)) > ORIENTATION_TOL:
            raise VolumeError(
                f"{name}: mixed orientations: {headers[0].source} has ImageOrientationPatient "
                f"{list(map(_fmt, iop0))}, {h.source} has {list(map(_fmt, h.orientation or ()))}"
            )
    spacings = sorted({h.pixel_spacing for h in headers if h.pixel_spacing})
    if np.ptp(np.asarray(spacings), axis=0).max() > 1e-3:
        shown = ", ".join(f"{a:.4g}x{b:.4g}" for a, b in spacings)
        raise VolumeError(f"{name}: slices have different PixelSpacing ({shown} mm)")
    row_dir, col_dir = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 0.01 or abs(np.linalg.norm(col_dir) - 1) > 0.01:
        raise VolumeError(f"{name}: ImageOrientationPatient {list(iop0)} is not two unit vectors")
    if abs(float(row_dir @ col_dir)) > 0.01:
        raise VolumeError(
            f"{name}: ImageOrientationPatient {list(iop0)} has non-perpendicular row and column"
        )
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    ipp = np.asarray([h.position for h in headers], dtype=np.float64)
    proj = ipp @ normal
    order = np.argsort(proj, kind="stable")
    z = proj[order]
    steps = np.diff(z)
    dy, dx = headers[0].pixel_spacing  # type: ignore[misc]
    dups = np.nonzero(steps <= DUPLICATE_TOL)[0]
    if dups.size:
        i = int(dups[0])
        a, b = headers[int(order[i])].source, headers[int(order[i + 1])].source
        raise VolumeError(
            f"{name}: duplicate slice position {_fmt(z[i])} mm along the normal "
            f"({a} and {b}); remove the duplicate or split the series"
        )
    median = float(np.median(steps))
    gaps = np.nonzero(steps > GAP_FACTOR * median)[0]
    if gaps.size:
        i = int(gaps[0])
        n_missing = round(steps[i] / median) - 1
        more = f" (and {gaps.size - 1} more gap(s))" if gaps.size > 1 else ""
        raise VolumeError(
            f"{name}: missing slice(s): {_fmt(steps[i])} mm gap between positions "
            f"{_fmt(z[i])} and {_fmt(z[i + 1])} mm (after {headers[int(order[i])].source}), "
            f"about {max(n_missing, 1)} slice(s) at {_fmt(median)} mm spacing{more}; "
            "re-export the complete series"
        )
    deviation = np.abs(steps - median) / median
    worst = float(deviation.max()) if deviation.size else 0.0
    warnings: list[str] = []
    if worst > SPACING_REJECT:
        raise VolumeError(
            f"{name}: inconsistent slice spacing: steps range from {_fmt(steps.min())} to "
            f"{_fmt(steps.max())} mm (median {_fmt(median)} mm, {100 * worst:.0f}% > "
            f"{100 * SPACING_REJECT:.0f}% tolerance); resample the series to even spacing"
        )
    if worst > SPACING_WARN:
        warnings.append(
            f"{name}: slice spacing varies from {_fmt(steps.min())} to {_fmt(steps.max())} mm "
            f"(median {_fmt(median)} mm, {100 * worst:.1f}%); treated as even"
        )
    # Gantry tilt: slice origins move in-plane from slice to slice (a sheared stack).
    inplane = (ipp[order] - ipp[order[0]]) - np.outer(z - z[0], normal)
    drift = float(np.linalg.norm(inplane, axis=1).max())
    if drift > 0.5 * min(dy, dx):
        warnings.append(
            f"{name}: slice origins drift {_fmt(drift)} mm in-plane across the stack (gantry "
            "tilt?); the volume is built unsheared"
        )
    thick = [h.slice_thickness for h in headers if h.slice_thickness is not None]
    first = headers[int(order[0])]
    return SeriesGeometry(
        order=tuple(int(i) for i in order),
        positions=tuple(float(v) for v in z),
        spacing=(median, float(dy), float(dx)),
        origin=tuple(float(v) for v in ipp[order[0]]),  # type: ignore[arg-type]
        orientation=tuple(float(v) for v in iop0),
        normal=tuple(float(v) for v in normal),  # type: ignore[arg-type]
        shape=(len(headers), first.rows, first.columns),
        slice_thickness=float(np.median(thick)) if thick else None,
        warnings=tuple(warnings),
    )


@dataclass
class Volume:
    """A CT-like volume: voxels in HU, ordered along the slice normal.

    ``voxels`` is float32 ``(D, H, W)`` (slice, row, column); ``spacing`` ``(dz, dy, dx)`` mm;
    ``origin`` the ImagePositionPatient of slice 0; ``orientation`` the ImageOrientationPatient;
    ``sop_uids``/``sources`` per slice in volume order; ``positions`` mm along the normal.
    """

    voxels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, ...]
    series_uid: str
    sop_uids: list[str]
    sources: list[str] = field(default_factory=list)
    positions: list[float] = field(default_factory=list)
    slice_thickness: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        d, h, w = self.voxels.shape
        return int(d), int(h), int(w)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row cosines x column cosines)."""
        n = np.cross(np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:]))
        return n / np.linalg.norm(n)

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping a voxel index (slice, row, column, 1) to patient LPS mm."""
        dz, dy, dx = self.spacing
        out = np.eye(4)
        out[:3, 0] = self.normal * dz
        out[:3, 1] = np.asarray(self.orientation[3:]) * dy
        out[:3, 2] = np.asarray(self.orientation[:3]) * dx
        out[:3, 3] = self.origin
        return out


def _rescale(ds: DicomDataset, source: str) -> tuple[float, float]:
    # A missing or empty tag means the identity; a present 0 is an error, not a default.
    slope_raw, intercept_raw = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    try:
        slope = 1.0 if slope_raw is None or slope_raw == "" else float(slope_raw)
        intercept = 0.0 if intercept_raw is None or intercept_raw == "" else float(intercept_raw)
    except (TypeError, ValueError):
        raise VolumeError(f"{source}: invalid RescaleSlope/RescaleIntercept") from None
    if slope == 0 or not (math.isfinite(slope) and math.isfinite(intercept)):
        raise VolumeError(f"{source}: invalid RescaleSlope {slope} / RescaleIntercept {intercept}")
    return slope, intercept


def build_volume(
    datasets: Sequence[DicomDataset],
    sources: Sequence[str] | None = None,
    min_slices: int = MIN_SLICES,
) -> Volume:
    """Assemble single-frame slices of one series (any order) into a checked :class:`Volume`.

    Applies RescaleSlope/RescaleIntercept per slice (missing: 1 and 0). ``sources`` name the
    slices in messages (e.g. their relative paths). Raises :class:`VolumeError`.
    """
    if not datasets:
        raise VolumeError("empty series: no slices given")
    names = list(sources) if sources is not None else [
        str(ds.get("SOPInstanceUID", f"slice {i}")) for i, ds in enumerate(datasets)
    ]  # fmt: skip
    for ds, src in zip(datasets, names, strict=True):
        try:  # pydicom converts the IS value when it is first read: that can raise too
            raw_frames = ds.get("NumberOfFrames", 1)
            frames = int(str(raw_frames).strip() or 1) if raw_frames is not None else 1
        except (TypeError, ValueError, OverflowError):
            raise VolumeError(
                f"{src}: malformed NumberOfFrames (not a whole number); fix the export"
            ) from None
        if frames > 1:
            raise VolumeError(
                f"{src}: multi-frame image ({frames} frames); volumes are built from "
                "single-frame slices"
            )
    headers = [slice_header(ds, src) for ds, src in zip(datasets, names, strict=True)]
    geom = check_series_geometry(headers, min_slices=min_slices)
    d, h, w = geom.shape
    voxels = np.empty((d, h, w), dtype=np.float32)
    for k, i in enumerate(geom.order):
        ds = datasets[i]
        try:
            raw = ds.pixel_array
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise VolumeError(f"{names[i]}: pixel data cannot be decoded ({first})") from None
        if raw.shape != (h, w):
            raise VolumeError(f"{names[i]}: pixel data has shape {raw.shape}, expected {(h, w)}")
        slope, intercept = _rescale(ds, names[i])
        voxels[k] = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return Volume(
        voxels=voxels,
        spacing=geom.spacing,
        origin=geom.origin,
        orientation=geom.orientation,
        series_uid=headers[0].series_uid,
        sop_uids=[headers[i].sop_uid for i in geom.order],
        sources=[names[i] for i in geom.order],
        positions=list(geom.positions),
        slice_thickness=geom.slice_thickness,
        warnings=list(geom.warnings),
    )


def read_series(paths: Sequence[Path], root: Path | None = None) -> Volume:
    """Read the files of one series (any order) and build its :class:`Volume`."""
    datasets, names = [], []
    for p in paths:
        p = Path(p)
        try:
            datasets.append(pydicom.dcmread(p))
        except Exception as exc:
            raise VolumeError(f"{p}: unreadable DICOM ({type(exc).__name__}: {exc})") from None
        names.append(p.relative_to(root).as_posix() if root is not None else str(p))
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise VolumeError(f"{len(series)} different SeriesInstanceUIDs among the files given")
    return build_volume(datasets, names)
