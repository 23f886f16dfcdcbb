"""Small CT series written as real DICOM files, with any geometry a test needs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.data.dicom_factory import image_dataset, save

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal -x: IPP z is the same on every slice


def normal_of(iop: Sequence[float]) -> np.ndarray:
    """Unit slice normal of an ImageOrientationPatient."""
    n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    return n / np.linalg.norm(n)


def slice_value(k: int) -> int:
    """Stored value of every pixel of slice k (HU = value - 1024): identifies the slice."""
    return 1100 + 10 * k


def series(
    n: int = 6,
    size: int = 8,
    dz: float = 2.0,
    iop: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-10.0, -10.0, 50.0),
    pixel_spacing: float = 0.5,
    steps: Sequence[float] | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    """Slices of one series in position order (slice k at ``origin + z_k * normal``).

    ``steps`` gives the distance from each slice to the next (default ``dz`` each); pixels of
    slice k all hold :func:`slice_value` (k) with RescaleIntercept -1024.
    """
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    normal = normal_of(iop)
    z = np.concatenate([[0.0], np.cumsum(steps if steps is not None else [dz] * (n - 1))])
    out = []
    for k, zk in enumerate(z):
        pixels = np.full((size, size), slice_value(k), dtype=np.uint16)
        pos = np.asarray(origin, float) + zk * normal
        out.append(
            image_dataset(
                pixels,
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid,
                FrameOfReferenceUID=frame_uid,
                InstanceNumber=len(z) - k,  # numbered against the position on purpose
                ImagePositionPatient=[f"{v:.6g}" for v in pos],
                ImageOrientationPatient=[f"{v:.6g}" for v in iop],
                PixelSpacing=[f"{pixel_spacing:g}", f"{pixel_spacing:g}"],
                SliceThickness=f"{dz:g}",
                RescaleIntercept="-1024",
                RescaleSlope="1",
                PatientName="Series^Factory",
                PatientBirthDate="19700101",
                PatientSex="O",
                StudyDate="20240101",
                StudyTime="120000",
                ReferringPhysicianName="",
                AccessionNumber="A1",
                StudyID="1",
                SeriesNumber=1,
                Modality="CT",
            )
        )
    return out


def write(folder: Path, datasets: Sequence[Dataset], seed: int = 0) -> list[Path]:
    """Write the slices under shuffled file names (name order says nothing about position)."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(datasets))
    paths = []
    for name_index, k in enumerate(order):
        paths.append(save(datasets[int(k)], folder / f"im{name_index:03d}.dcm"))
    return paths


def ball(shape: tuple[int, int, int], center: Sequence[float], radius: float) -> np.ndarray:
    """A binary ball in voxel index space."""
    zz, yy, xx = np.indices(shape)
    d2 = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2
    return (d2 <= radius**2).astype(np.uint8)


def affine_lps(datasets: Sequence[Dataset], dz: float) -> np.ndarray:
    """Index (slice, row, column) -> LPS affine of slices given in position order."""
    iop = [float(v) for v in datasets[0].ImageOrientationPatient]
    sp = float(datasets[0].PixelSpacing[0])
    out = np.eye(4)
    out[:3, 0] = normal_of(iop) * dz
    out[:3, 1] = np.asarray(iop[3:]) * sp
    out[:3, 2] = np.asarray(iop[:3]) * sp
    out[:3, 3] = [float(v) for v in datasets[0].ImagePositionPatient]
    return out
