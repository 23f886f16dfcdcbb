"""build_segmentation_dataset: CT series + SEG/NIfTI masks -> cached S^3 tensors, and the 3-D
synthetic generator that feeds it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import BasicTextSRStorage
from typer.testing import CliRunner

from fedsilo.synthetic import (
    generate_segmentation_hospitals,
    make_segmentation_specs,
    write_seg,
)
from silo_client.data.segmentation_dataset import (
    DEFAULT_WINDOW,
    SegmentationData,
    VolumePreprocessing,
    build_segmentation_dataset,
)
from silo_client.data.volume import read_series
from silo_client.errors import DataError
from tests.data import series_factory as sf
from tests.data.dicom_factory import image_dataset, save

PREP = VolumePreprocessing(input_size=16)
SMALL = {"n_hospitals": 2, "cases_per_hospital": 3, "size": 24, "slices": (10, 12), "seed": 5}


@pytest.fixture(scope="session")
def seg_hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """hospital-0 labels with DICOM SEG, hospital-1 with NIfTI; 3 small cases each."""
    return generate_segmentation_hospitals(tmp_path_factory.mktemp("seg"), **SMALL)


@pytest.fixture
def site(seg_hospitals: list[Path], tmp_path: Path):
    """A private, mutable copy of one generated hospital: site(0) (SEG) or site(1) (NIfTI)."""

    def _copy(k: int) -> Path:
        dst = tmp_path / f"site-{k}"
        shutil.copytree(seg_hospitals[k], dst)
        return dst

    return _copy


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every pydicom.dcmread call."""
    calls: list[str] = []
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return calls


def _series_of(folder: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in sorted((folder / "dicom").glob("case-*/*.dcm")):
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
        out.setdefault(uid, []).append(p)
    return out


# ------------------------------------------------------------------------------ generator


def test_generator_hospitals_differ_and_write_real_dicom(seg_hospitals: list[Path]) -> None:
    specs = [json.loads((h / "spec.json").read_text()) for h in seg_hospitals]
    assert [s["mask_format"] for s in specs] == ["seg", "nifti"]
    assert specs[0]["slice_spacing"] != specs[1]["slice_spacing"]
    assert specs[0]["intensity_offset"] != specs[1]["intensity_offset"]
    assert len(list((seg_hospitals[0] / "dicom" / "seg").glob("*.dcm"))) == 3
    assert not (seg_hospitals[0] / "masks").exists()
    assert len(list((seg_hospitals[1] / "masks").glob("*.nii.gz"))) == 3
    case = sorted((seg_hospitals[1] / "dicom" / "case-000").glob("*.dcm"))
    assert 10 <= len(case) <= 12
    ds = pydicom.dcmread(case[0])
    assert ds.Modality == "CT" and "^" in str(ds.PatientName) and ds.PatientID.startswith("S1-")
    assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
    assert float(ds.SliceThickness) == specs[1]["slice_spacing"]
    seg = pydicom.dcmread(next((seg_hospitals[0] / "dicom" / "seg").glob("*.dcm")))
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "lesion"


def test_generator_bad_arguments(tmp_path: Path, seg_hospitals: list[Path]) -> None:
    with pytest.raises(DataError, match="cases_per_hospital must be >= 2"):
        make_segmentation_specs(cases_per_hospital=1)
    with pytest.raises(DataError, match="slices must satisfy"):
        make_segmentation_specs(slices=(4, 2))
    with pytest.raises(DataError, match="already contains files"):
        generate_segmentation_hospitals(seg_hospitals[0].parent, **SMALL)


def test_fedsilo_synth_segmentation(tmp_path: Path) -> None:
    from fedsilo.cli import app

    runner = CliRunner()
    out = tmp_path / "synth"
    result = runner.invoke(
        app,
        ["synth", "--out", str(out), "--task", "segmentation", "--hospitals", "1",
         "--cases-per-hospital", "2", "--image-size", "16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 CT series of 16x16" in result.output and "DICOM SEG" in result.output
    data = build_segmentation_dataset(out / "hospital-0", VolumePreprocessing(8))
    assert len(data) == 2
    bad = runner.invoke(app, ["synth", "--out", str(out), "--task", "detection"])
    assert bad.exit_code != 0 and "--task 'detection' is not known" in str(bad.exception)


# ------------------------------------------------------------------------------ building


@pytest.mark.parametrize("k", [0, 1], ids=["dicom-seg", "nifti"])
def test_builds_cases(site, k: int) -> None:
    folder = site(k)
    spec = json.loads((folder / "spec.json").read_text())
    data = build_segmentation_dataset(folder, PREP)
    assert isinstance(data, SegmentationData) and len(data) == 3
    assert data.images.shape == (3, 1, 16, 16, 16) and data.images.dtype == torch.float32
    assert data.masks.shape == (3, 1, 16, 16, 16) and data.masks.dtype == torch.uint8
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert set(data.masks.unique().tolist()) == {0, 1}
    assert all(int(m.sum()) > 0 for m in data.masks)
    assert data.skipped == [] and data.warnings == []
    assert sorted(data.series_uids) == sorted(_series_of(folder))
    # Rows and columns: 24 pixels of the hospital's spacing over 16 voxels.
    in_plane = spec["size"] * spec["pixel_spacing"] / 16
    assert torch.allclose(data.spacing_mm[:, 1:], torch.tensor(in_plane), rtol=1e-4)
    assert torch.all(data.spacing_mm[:, 0] > spec["slice_spacing"] * 10 / 16 * 0.99)
    # The mask sits on the lesion: brighter than the rest of the body.
    lesion = data.images[data.masks.bool()].mean()
    body = data.images[(~data.masks.bool()) & (data.images > 0.2)].mean()
    assert lesion > body + 0.05


def test_skips_with_reasons(site) -> None:
    folder = site(1)
    series = _series_of(folder)
    uids = sorted(series)
    # A series without a mask, a structured report, a non-DICOM file.
    sf.write(folder / "dicom" / "unlabelled", sf.series(n=4))
    save(image_dataset(np.zeros((4, 4), np.uint16), sop_class=BasicTextSRStorage),
         folder / "dicom" / "report.dcm")  # fmt: skip
    (folder / "dicom" / "notes.txt").write_text("protocol")
    # uids[0]: also labelled by a SEG -> two masks; uids[1]: a slice lost -> missing slice.
    vol = read_series(series[uids[0]])
    by_sop = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, series[uids[0]])}
    write_seg(folder / "dicom" / "extra-seg.dcm", [by_sop[s] for s in vol.sop_uids],
              np.ones(vol.shape, np.uint8), pydicom.uid.generate_uid(),
              pydicom.uid.generate_uid())  # fmt: skip
    positions = {
        p: float(np.asarray(pydicom.dcmread(p).ImagePositionPatient, float)[2])
        for p in series[uids[1]]
    }
    middle = sorted(positions, key=positions.get)[len(positions) // 2]  # type: ignore[arg-type]
    middle.unlink()
    data = build_segmentation_dataset(folder, PREP)
    assert data.series_uids == [uids[2]]
    reasons = dict(data.skipped)
    assert "both a DICOM SEG and a NIfTI mask" in reasons[f"series {uids[0]}"]
    assert "missing slice(s)" in reasons[f"series {uids[1]}"]
    unlabelled = [r for i, r in data.skipped if "no segmentation" in r]
    assert len(unlabelled) == 1 and "dicom/unlabelled/" in unlabelled[0]
    assert "non-image SOP class 'Basic Text SR Storage'" in reasons["dicom/report.dcm"]
    assert "not a DICOM file" in reasons["dicom/notes.txt"]


def test_seg_for_unknown_series_and_stray_nifti_are_skipped(site) -> None:
    folder = site(0)
    seg_path = sorted((folder / "dicom" / "seg").glob("*.dcm"))[0]
    ds = pydicom.dcmread(seg_path)
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.4.5"
    ds.save_as(seg_path)
    (folder / "masks").mkdir()
    (folder / "masks" / "9.9.9.nii.gz").write_bytes(b"")
    data = build_segmentation_dataset(folder, PREP)
    assert len(data) == 2
    reasons = dict(data.skipped)
    rel = seg_path.relative_to(folder).as_posix()
    assert "references series 1.2.3.4.5, which is not in dicom/" in reasons[rel]
    assert "names series 9.9.9, which is not in dicom/" in reasons["masks/9.9.9.nii.gz"]
    assert sum("no segmentation" in r for _, r in data.skipped) == 1


def test_mask_shape_mismatch_is_skipped_with_reason(site) -> None:
    folder = site(1)
    path = sorted((folder / "masks").glob("*.nii.gz"))[0]
    img = nib.load(path)
    cut = nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :-1], img.affine, img.header)
    nib.save(cut, path)
    data = build_segmentation_dataset(folder, PREP)
    uid = path.name[: -len(".nii.gz")]
    assert len(data) == 2 and uid not in data.series_uids
    assert "the series has" in dict(data.skipped)[f"series {uid}"]


def test_empty_mask_warns(site) -> None:
    folder = site(1)
    path = sorted((folder / "masks").glob("*.nii.gz"))[0]
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), path)
    data = build_segmentation_dataset(folder, PREP)
    assert len(data) == 3
    uid = path.name[: -len(".nii.gz")]
    assert int(data.masks[data.series_uids.index(uid)].sum()) == 0
    assert any(uid in w and "is empty" in w for w in data.warnings)


def test_no_usable_series(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_segmentation_dataset(tmp_path / "nope", PREP)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="has no dicom/ subfolder"):
        build_segmentation_dataset(tmp_path / "a", PREP)
    (tmp_path / "a" / "dicom").mkdir()
    with pytest.raises(DataError, match="no DICOM files in"):
        build_segmentation_dataset(tmp_path / "a", PREP)
    (tmp_path / "a" / "dicom" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="is a usable CT slice"):
        build_segmentation_dataset(tmp_path / "a", PREP)
    sf.write(tmp_path / "a" / "dicom" / "s", sf.series(n=4))
    with pytest.raises(DataError, match=r"no usable labelled series .*no segmentation"):
        build_segmentation_dataset(tmp_path / "a", PREP)


# ------------------------------------------------------------------------------ cache


def test_warm_build_reads_no_dicom(site, tmp_path: Path, reads: list[str]) -> None:
    folder, cache = site(0), tmp_path / "cache"
    cold = build_segmentation_dataset(folder, PREP, cache_dir=cache)
    assert not cold.cache_hit and reads
    assert len(list(cache.glob("*.pt"))) == 1
    reads.clear()
    warm = build_segmentation_dataset(folder, PREP, cache_dir=cache)
    assert warm.cache_hit and reads == []
    assert torch.equal(warm.images, cold.images) and torch.equal(warm.masks, cold.masks)
    assert torch.equal(warm.spacing_mm, cold.spacing_mm) and warm.series_uids == cold.series_uids
    assert warm.skipped == cold.skipped and warm.version == cold.version


def test_cache_invalidates_on_preprocessing_and_mask_change(site, tmp_path: Path, reads) -> None:
    folder, cache = site(1), tmp_path / "cache"
    build_segmentation_dataset(folder, PREP, cache_dir=cache)
    reads.clear()
    windowed = build_segmentation_dataset(folder, VolumePreprocessing(16, 50, 350), cache_dir=cache)
    assert not windowed.cache_hit and reads
    mask = sorted((folder / "masks").glob("*.nii.gz"))[0]
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    reads.clear()
    assert not build_segmentation_dataset(folder, PREP, cache_dir=cache).cache_hit and reads
    assert len(list(cache.glob("*.pt"))) == 3


# ------------------------------------------------------------------------------ interface


def test_preprocessing_validation_and_fingerprint() -> None:
    assert VolumePreprocessing(32).window == (
        DEFAULT_WINDOW[0] - DEFAULT_WINDOW[1] / 2,
        DEFAULT_WINDOW[0] + DEFAULT_WINDOW[1] / 2,
    )
    assert VolumePreprocessing(32).fingerprint() == VolumePreprocessing(32).fingerprint()
    assert VolumePreprocessing(32).fingerprint() != VolumePreprocessing(48).fingerprint()
    assert VolumePreprocessing(32).fingerprint() != VolumePreprocessing(32, 40, 400).fingerprint()
    assert (
        VolumePreprocessing(32).fingerprint() != VolumePreprocessing(32, segment="x").fingerprint()
    )
    with pytest.raises(DataError, match="both window_center and window_width"):
        VolumePreprocessing(32, window_center=40)
    with pytest.raises(DataError, match="window_width must be > 0"):
        VolumePreprocessing(32, 40, 0)
    with pytest.raises(DataError, match="input_size must be in"):
        VolumePreprocessing(4)


def test_subset_and_items(site) -> None:
    data = build_segmentation_dataset(site(1), PREP)
    part = data.subset([2, 0])
    assert len(part) == 2 and part.series_uids == [data.series_uids[2], data.series_uids[0]]
    assert torch.equal(part.masks[0], data.masks[2]) and part.skipped == data.skipped
    item = part[1]
    assert torch.equal(item["image"], data.images[0]) and item["spacing"].shape == (3,)


def test_registered_dataset(site, tmp_path: Path) -> None:
    """`silo data add NAME --dicom-dir DIR/dicom`: masks are found next to DIR/dicom."""
    from silo_client.cli import app
    from silo_client.home import SiloHome, init_silo_home

    folder = site(1)
    home = init_silo_home(tmp_path / "home", "site-a")
    result = CliRunner().invoke(
        app, ["data", "add", "seg", "--dicom-dir", str(folder / "dicom"), "--home", str(home.root)]
    )
    assert result.exit_code == 0, result.output
    managed = Path(SiloHome.open(home.root).datasets["seg"])
    data = build_segmentation_dataset(managed, PREP)
    assert len(data) == 3 and data.skipped == []
