"""Series -> volume: order by position on the slice normal, and precise geometry errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from silo_client.data.volume import (
    Volume,
    VolumeError,
    build_volume,
    check_series_geometry,
    read_series,
    slice_header,
)
from silo_client.errors import DataError
from tests.data import series_factory as sf


def _ordered_values(vol: Volume) -> list[int]:
    """Which factory slice each volume slice is (from its HU)."""
    return [round((float(v) + 1024 - 1100) / 10) for v in vol.voxels[:, 0, 0]]


def test_shuffled_files_are_ordered_by_position_not_number_or_name(tmp_path: Path) -> None:
    slices = sf.series(n=7, dz=2.5)
    paths = sf.write(tmp_path / "s", slices, seed=3)
    vol = read_series(paths, root=tmp_path)
    assert _ordered_values(vol) == list(range(7))
    assert vol.shape == (7, 8, 8) and vol.voxels.dtype == np.float32
    assert vol.spacing == pytest.approx((2.5, 0.5, 0.5))
    assert vol.origin == pytest.approx((-10.0, -10.0, 50.0))
    assert vol.sop_uids == [str(s.SOPInstanceUID) for s in slices]
    assert vol.series_uid == str(slices[0].SeriesInstanceUID) and vol.warnings == []
    # RescaleIntercept applied: stored 1100 is HU 76.
    assert float(vol.voxels[0, 0, 0]) == 1100 - 1024


def test_sagittal_series_ordered_along_its_normal(tmp_path: Path) -> None:
    # Every slice has the same IPP z: only the projection on the normal (-x) orders them.
    slices = sf.series(n=5, iop=sf.SAGITTAL)
    vol = read_series(sf.write(tmp_path / "sag", slices, seed=1))
    assert _ordered_values(vol) == list(range(5))
    assert np.allclose(vol.normal, [-1, 0, 0])


def test_tilted_orientation(tmp_path: Path) -> None:
    t = np.deg2rad(25.0)
    iop = (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t)))
    slices = sf.series(n=6, dz=3.0, iop=iop)
    vol = read_series(sf.write(tmp_path / "tilt", slices, seed=2))
    assert _ordered_values(vol) == list(range(6))
    assert vol.spacing[0] == pytest.approx(3.0, rel=1e-4)
    # The affine maps voxel (k, 0, 0) onto slice k's ImagePositionPatient.
    k = 4
    ipp = np.asarray(slices[k].ImagePositionPatient, dtype=float)
    assert np.allclose(vol.affine() @ [k, 0, 0, 1], [*ipp, 1], atol=1e-3)


def test_missing_slice_names_the_gap(tmp_path: Path) -> None:
    slices = sf.series(n=8, dz=2.0)
    del slices[5]  # positions 0, 2, ..., 8, 12, 14: a 4 mm gap between 8 and 12 mm
    with pytest.raises(VolumeError) as info:
        read_series(sf.write(tmp_path / "gap", slices), root=tmp_path)
    msg = str(info.value)
    assert "missing slice" in msg and "4 mm gap" in msg and "about 1 slice" in msg
    z = float(np.asarray(slices[4].ImagePositionPatient, float)[2])
    assert f"{z:.4g} and {z + 4:.4g} mm" in msg
    assert isinstance(info.value, DataError)


def test_duplicate_position(tmp_path: Path) -> None:
    slices = sf.series(n=5)
    dup = copy.deepcopy(slices[2])
    dup.SOPInstanceUID = pydicom.uid.generate_uid()
    slices.append(dup)
    with pytest.raises(VolumeError) as info:
        build_volume(slices, sources=[f"f{i}.dcm" for i in range(6)])
    assert "duplicate slice position 54 mm along the normal (f2.dcm and f5.dcm)" in str(info.value)


def test_inconsistent_spacing_rejected_with_numbers() -> None:
    slices = sf.series(steps=[2.0, 2.0, 2.6, 2.0, 2.0])
    with pytest.raises(VolumeError) as info:
        build_volume(slices)
    msg = str(info.value)
    assert "inconsistent slice spacing" in msg and "2 to 2.6 mm" in msg and "median 2 mm" in msg


def test_small_spacing_jitter_is_a_warning() -> None:
    vol = build_volume(sf.series(steps=[2.0, 2.0, 2.06, 2.0, 2.0]))
    assert vol.shape[0] == 6
    assert len(vol.warnings) == 1 and "slice spacing varies" in vol.warnings[0]


def test_gantry_tilt_sheared_stack_warns() -> None:
    slices = sf.series(n=5)
    for k, ds in enumerate(slices):  # origins drift 1 mm per slice in y
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:g}", f"{y + k:g}", f"{z:g}"]
    vol = build_volume(slices)
    assert any("drift" in w for w in vol.warnings)


def test_mixed_orientations() -> None:
    slices = sf.series(n=4)
    slices[3].ImageOrientationPatient = ["1", "0", "0", "0", "0.9", "0.43589"]
    with pytest.raises(VolumeError, match="mixed orientations"):
        build_volume(slices)


def test_mixed_rows_cols() -> None:
    slices = sf.series(n=4)
    other = sf.series(n=4, size=10, series_uid=str(slices[0].SeriesInstanceUID))
    slices[2] = other[2]
    with pytest.raises(VolumeError, match=r"different rows x columns \(8x8, 10x10\)"):
        build_volume(slices)


def test_too_few_slices() -> None:
    with pytest.raises(VolumeError, match="only 2 slice"):
        build_volume(sf.series(n=2))


@pytest.mark.parametrize(
    ("tag", "name"),
    [("ImagePositionPatient", "ImagePositionPatient"),
     ("ImageOrientationPatient", "ImageOrientationPatient"),
     ("PixelSpacing", "PixelSpacing")],
)  # fmt: skip
def test_missing_geometry_tag_names_the_file(tag: str, name: str) -> None:
    slices = sf.series(n=4)
    delattr(slices[1], tag)
    with pytest.raises(VolumeError, match=rf"slice-1 has no valid {name}"):
        build_volume(slices, sources=[f"slice-{i}" for i in range(4)])


def test_two_series_are_refused(tmp_path: Path) -> None:
    a = sf.write(tmp_path / "a", sf.series(n=3))
    b = sf.write(tmp_path / "b", sf.series(n=3))
    with pytest.raises(VolumeError, match="2 different SeriesInstanceUIDs"):
        read_series(a + b)


def test_geometry_from_headers_only(tmp_path: Path) -> None:
    paths = sf.write(tmp_path / "h", sf.series(n=6, dz=1.25))
    headers = [slice_header(pydicom.dcmread(p, stop_before_pixels=True), p.name) for p in paths]
    geom = check_series_geometry(headers)
    assert geom.shape == (6, 8, 8) and geom.spacing[0] == pytest.approx(1.25)
    assert [headers[i].instance_number for i in geom.order] == [6, 5, 4, 3, 2, 1]


def test_rescale_slope_and_intercept_give_hu() -> None:
    slices = sf.series(n=3)
    for ds in slices:
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-1000"
    vol = build_volume(slices)
    assert vol.voxels[:, 0, 0].tolist() == [2 * sf.slice_value(k) - 1000 for k in range(3)]
    slices[1].RescaleSlope = "0"
    with pytest.raises(VolumeError, match="invalid RescaleSlope 0"):
        build_volume(slices)


def test_multi_frame_image_is_refused() -> None:
    slices = sf.series(n=3)
    slices[0].NumberOfFrames = 2
    with pytest.raises(VolumeError, match=r"s0: multi-frame image \(2 frames\)"):
        build_volume(slices, sources=["s0", "s1", "s2"])
