"""Segmentation masks: DICOM SEG (highdicom) and NIfTI, mapped onto the series' slices."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fedsilo.synthetic import write_nifti_mask, write_seg
from silo_client.data.masks import (
    MaskError,
    MaskShapeError,
    mask_from_nifti,
    mask_from_seg,
    match_masks,
    nifti_series_uid,
)
from silo_client.data.volume import build_volume
from silo_client.errors import DataError
from tests.data import series_factory as sf

TILT = (1.0, 0.0, 0.0, 0.0, float(np.cos(0.3)), float(np.sin(0.3)))


@pytest.fixture
def case(tmp_path: Path):
    """A tilted 7-slice series, its volume, a ball mask (volume order) and the slices."""
    slices = sf.series(n=7, size=12, dz=2.0, iop=TILT)
    mask = sf.ball((7, 12, 12), (3, 5, 6), 2.5)
    mask[5, 1, 1] = 1  # asymmetric in every axis: flips and transposes show
    # Build the volume from shuffled slices: the mask must follow positions, not input order.
    order = np.random.default_rng(0).permutation(7)
    volume = build_volume([slices[int(i)] for i in order])
    return slices, volume, mask


def _seg(tmp_path: Path, slices, mask) -> pydicom.Dataset:
    path = write_seg(
        tmp_path / "seg.dcm", slices, mask, pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    )
    return pydicom.dcmread(path)


def test_seg_by_source_instances(tmp_path: Path, case) -> None:
    slices, volume, mask = case
    got = mask_from_seg(_seg(tmp_path, slices, mask), volume, "seg.dcm")
    assert got.dtype == np.uint8 and np.array_equal(got, mask)


def test_seg_without_source_references_uses_plane_positions(tmp_path: Path, case) -> None:
    slices, volume, mask = case
    ds = _seg(tmp_path, slices, mask)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    assert np.array_equal(mask_from_seg(ds, volume, "seg.dcm"), mask)


def test_seg_for_another_series(tmp_path: Path, case) -> None:
    slices, _, mask = case
    other = build_volume(sf.series(n=7, size=12, iop=TILT))
    with pytest.raises(MaskError, match=r"seg.dcm: DICOM SEG references series .*, not series"):
        mask_from_seg(_seg(tmp_path, slices, mask), other, "seg.dcm")


def test_seg_on_another_grid(tmp_path: Path, case) -> None:
    slices, _, _ = case
    small = [copy.deepcopy(s) for s in sf.series(n=7, size=8, iop=TILT)]
    seg = _seg(tmp_path, small, np.ones((7, 8, 8), np.uint8))
    volume = build_volume(slices)
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = volume.series_uid
    with pytest.raises(MaskShapeError, match=r"frames are 8x8, the series' slices are 12x12"):
        mask_from_seg(seg, volume, "seg.dcm")


def test_seg_referencing_missing_slices(tmp_path: Path, case) -> None:
    slices, _, mask = case
    seg = _seg(tmp_path, slices, mask)
    partial = build_volume(slices[:5])  # the series lost two slices since the SEG was made
    with pytest.raises(MaskError, match=r"references 2 image\(s\) that are not slices"):
        mask_from_seg(seg, partial, "seg.dcm")


def test_named_segment(tmp_path: Path, case) -> None:
    slices, volume, mask = case
    seg = _seg(tmp_path, slices, mask)
    assert np.array_equal(mask_from_seg(seg, volume, segment="Lesion"), mask)
    assert np.array_equal(mask_from_seg(seg, volume, segment="1"), mask)
    with pytest.raises(MaskError, match=r"no segment 'liver' .*\(segments: 1: lesion\)"):
        mask_from_seg(seg, volume, "seg.dcm", segment="liver")


def test_nifti_dcm2niix_layout(tmp_path: Path, case) -> None:
    slices, volume, mask = case
    path = write_nifti_mask(tmp_path / "m.nii.gz", mask, sf.affine_lps(slices, 2.0))
    assert nib.load(path).shape == (12, 12, 7)  # columns, rows, slices
    assert np.array_equal(mask_from_nifti(path, volume), mask)


def test_nifti_in_volume_order_with_flipped_axis(tmp_path: Path, case) -> None:
    slices, volume, mask = case
    # Array in (slice, row, column) order with the slice axis running backwards.
    data = mask[::-1].copy()
    lps = sf.affine_lps(slices, 2.0)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, 6.0  # nifti index i -> volume slice 6 - i
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps @ flip
    img = nib.Nifti1Image(data.astype(np.int16) * 3, ras)  # label value 3
    img.set_sform(ras, code=1)
    nib.save(img, tmp_path / "v.nii")
    assert np.array_equal(mask_from_nifti(tmp_path / "v.nii", volume), mask)
    assert np.array_equal(mask_from_nifti(tmp_path / "v.nii", volume, segment="3"), mask)
    assert not mask_from_nifti(tmp_path / "v.nii", volume, segment="2").any()


def test_nifti_without_orientation_taken_as_columns_rows_slices(tmp_path: Path, case) -> None:
    _, volume, mask = case
    img = nib.Nifti1Image(np.transpose(mask, (2, 1, 0)).copy(), np.eye(4))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "plain.nii.gz")
    assert np.array_equal(mask_from_nifti(tmp_path / "plain.nii.gz", volume), mask)


def test_nifti_shape_mismatch(tmp_path: Path, case) -> None:
    slices, volume, mask = case
    path = write_nifti_mask(tmp_path / "m.nii.gz", mask[:6], sf.affine_lps(slices, 2.0))
    with pytest.raises(MaskShapeError) as info:
        mask_from_nifti(path, volume, "masks/m.nii.gz")
    assert "6 slices x 12 rows x 12 columns" in str(info.value)
    assert "the series has 7 slices x 12 rows x 12 columns" in str(info.value)
    assert isinstance(info.value, DataError)


def test_nifti_on_another_grid_or_shifted(tmp_path: Path, case) -> None:
    slices, volume, mask = case
    coarse = sf.affine_lps(slices, 2.0)
    coarse[:3, 1:3] *= 2.0  # twice the pixel size
    write_nifti_mask(tmp_path / "c.nii.gz", mask, coarse)
    with pytest.raises(MaskError, match="NIfTI voxel grid is not the series' grid"):
        mask_from_nifti(tmp_path / "c.nii.gz", volume)
    shifted = sf.affine_lps(slices, 2.0)
    shifted[:3, 3] += shifted[:3, 0] * 2  # two slices further along the normal
    write_nifti_mask(tmp_path / "s.nii.gz", mask, shifted)
    with pytest.raises(MaskError, match=r"shifted from the series by \[2.0, 0.0, 0.0\] voxels"):
        mask_from_nifti(tmp_path / "s.nii.gz", volume)


def test_nifti_named_segment_refused(tmp_path: Path, case) -> None:
    slices, volume, mask = case
    path = write_nifti_mask(tmp_path / "m.nii.gz", mask, sf.affine_lps(slices, 2.0))
    with pytest.raises(MaskError, match="NIfTI masks have label values, not segment names"):
        mask_from_nifti(path, volume, segment="lesion")


def test_unreadable_nifti(tmp_path: Path, case) -> None:
    _, volume, _ = case
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(MaskError, match=r"bad\.nii\.gz: not a readable NIfTI file"):
        mask_from_nifti(tmp_path / "bad.nii.gz", volume)


def test_match_masks(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("A.nii.gz", "B.nii", "Z.nii.gz", "readme.txt"):
        (masks / name).write_bytes(b"")
    segs = {"dicom/s1.dcm": ["A"], "dicom/s2.dcm": ["C"], "dicom/s3.dcm": ["Q"],
            "dicom/s4.dcm": []}  # fmt: skip
    paths = {rel: tmp_path / rel for rel in segs}
    chosen, problems, skipped = match_masks(["A", "B", "C", "D"], segs, paths, masks, tmp_path)
    assert {u: s.kind for u, s in chosen.items()} == {"B": "nifti", "C": "seg"}
    assert "both a DICOM SEG and a NIfTI mask" in problems["A"]
    assert "dicom/s1.dcm and masks/A.nii.gz" in problems["A"]
    reasons = dict(skipped)
    assert "references series Q, which is not in dicom/" in reasons["dicom/s3.dcm"]
    assert "names no referenced series" in reasons["dicom/s4.dcm"]
    assert "names series Z, which is not in dicom/" in reasons["masks/Z.nii.gz"]
    assert "not a NIfTI mask" in reasons["masks/readme.txt"]
    assert nifti_series_uid(Path("1.2.3.nii.gz")) == "1.2.3" and nifti_series_uid(Path("x")) is None
